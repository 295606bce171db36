"""`python -m palm.cli ...` (what torchrun runs: `torchrun ... -m palm.cli train ...`)."""

from . import main

main()
