"""``python -m afnio``: the same command line as the installed ``afnio`` script."""

import sys

from afnio.trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
