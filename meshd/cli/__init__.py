"""Callers: the ``meshd`` command line (``main``) and the demo mesh."""

from meshd.cli.main import main

__all__ = ["main"]
