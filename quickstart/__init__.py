"""The quickstart: every stage of Tessera end to end on real offline data (the top layer)."""
