"""`python -m recsys` (what torchrun runs: `torchrun -m recsys train --config …`)."""

import sys

from recsys.cli import main

sys.exit(main())
