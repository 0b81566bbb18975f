"""``python -m cachelayers``: the ``cachelayers`` command."""

import sys

from cachelayers.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
