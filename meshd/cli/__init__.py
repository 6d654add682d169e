"""Callers: the ``meshd`` command line (:func:`meshd.cli.main.main`) and the demo mesh.

:func:`run` is the installed ``meshd`` command: it imports the command line itself, so that an
interrupt (Ctrl-C) while Python is still importing it exits 130 quietly, as one during the
command does, instead of printing a traceback."""

from __future__ import annotations

__all__ = ["run"]


def run(argv: list[str] | None = None) -> int:
    try:
        from meshd.cli.main import main
    except KeyboardInterrupt:
        return 130
    return main(argv)
