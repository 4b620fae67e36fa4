"""`python cli.py <command>`: the same commands as the `kdtune` console script."""

from kdtune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
