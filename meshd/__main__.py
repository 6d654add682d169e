import sys

from meshd.cli.main import main

sys.exit(main())
