import sys

from meshd.cli import run

sys.exit(run())
