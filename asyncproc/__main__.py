"""`python -m asyncproc` is the same as the `asyncproc` command."""
import sys

from asyncproc.cli import main

if __name__ == "__main__":
    sys.exit(main())
