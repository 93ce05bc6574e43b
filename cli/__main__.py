"""python -m cli ...: the same as the `refit` command."""
import sys

from cli.main import main

sys.exit(main())
