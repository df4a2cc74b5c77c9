"""`python -m distrain` is the `distrain` command."""

import sys

from distrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
