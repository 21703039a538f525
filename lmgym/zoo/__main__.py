"""``python -m lmgym.zoo ship [NAMES]``: rebuild shipped zoo entries into the package."""

import sys

from lmgym.zoo.entries import _main

sys.exit(_main())
