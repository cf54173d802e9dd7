#!/usr/bin/env python
"""Entry point: ``python run_bench.py [run CONFIG | table RUN_DIR | list] ...`` (see --help)."""

import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
