"""`python -m tensorcut` entry point (what ``torchrun -m tensorcut`` runs)."""

from tensorcut import distributed
from tensorcut.cli import main

if __name__ == "__main__":
    distributed.exit_process(main())
