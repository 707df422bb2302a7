"""`python -m bertforge` (and `torchrun -m bertforge`): the `bertforge` command."""

import sys

from bertforge.cli import main

sys.exit(main())
