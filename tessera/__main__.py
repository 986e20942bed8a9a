"""``python -m tessera``: the same as the ``tessera`` console command."""

import sys

from tessera.cli import main

if __name__ == "__main__":
    sys.exit(main())
