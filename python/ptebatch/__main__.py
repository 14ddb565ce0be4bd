"""``python -m ptebatch``: the ``ptebatch`` command."""

import sys

from ptebatch.cli import main

if __name__ == "__main__":
    sys.exit(main())
