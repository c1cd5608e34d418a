import sys

from nnunetv2_recokd.cli import main

sys.exit(main())
