"""`python -m lmforge ...` (and `torchrun -m lmforge ...`) run the command line."""
from .cli import main

raise SystemExit(main())
