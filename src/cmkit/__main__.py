"""`python -m cmkit` runs the command-line interface (also what `torchrun -m cmkit` needs)."""

from cmkit.cli import main

raise SystemExit(main())
