"""The ``dispatch`` command line (entry point ``dispatcher.cli:main``); see ``app.py``."""

from __future__ import annotations

from .app import app, main

__all__ = ["app", "main"]
