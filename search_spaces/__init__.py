"""Declarative search-space files (``*.toml``), installed as ``circtune.search_spaces`` and read with
``importlib.resources``."""
