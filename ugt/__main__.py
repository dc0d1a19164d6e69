"""`python -m ugt ...`: the same as the `ugt` command."""

import sys

from ugt.cli import main

sys.exit(main())
