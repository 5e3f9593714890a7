"""`python -m distill.cli ...` and `torchrun -m distill.cli run x.yaml`: the `distill` command."""

import sys

from distill.cli import main

sys.exit(main())
