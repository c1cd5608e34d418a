"""`python -m nnunetv2_recokd ...` runs the `nnunetv2_recokd` command, for environments whose scripts folder is not
on PATH (the same entry point as the console script and `python -m nnunetv2_recokd.cli`)."""

import sys

from nnunetv2_recokd.cli import main

if __name__ == "__main__":  # importing the module (e.g. by a test collector) must not run the command
    sys.exit(main())
