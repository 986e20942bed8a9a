"""Shipped YAML configs, found through importlib.resources (``tessera.config.resolve_config_path``)."""
