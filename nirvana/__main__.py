"""``python -m nirvana``: the command line, so ``torchrun -m nirvana prune ...`` works."""

import sys

from .cli import main

sys.exit(main())
