"""Tessera's cross-cutting core: config, storage, tracking, logging, device detection and the CLI."""

__version__ = "0.1.0"
