"""`python -m tensorcut` entry point."""

from tensorcut.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
