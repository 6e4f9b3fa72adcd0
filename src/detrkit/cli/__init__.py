"""The ``detrkit`` command line (``python -m detrkit`` and the console script)."""

from .app import main

__all__ = ["main"]
