"""`python -m kdlab ...` is the `kdlab` command (kdlab/scripts/cli.py)."""
import sys

from kdlab.scripts.cli import main

sys.exit(main())
