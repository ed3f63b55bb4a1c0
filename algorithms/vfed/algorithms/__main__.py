"""`python -m vfed.algorithms`: the entry point of algorithm images."""

import sys

from vfed.algorithms.wrapper import main

sys.exit(main())
