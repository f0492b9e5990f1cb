"""``python -m bench``: the load generator (the same as ``mgpu bench``)."""

import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
