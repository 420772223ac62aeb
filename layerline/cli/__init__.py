"""The `layerline` command: one module per command group, each a thin layer over the library."""

from .app import app, main

__all__ = ["app", "main"]
