"""`python scripts/evaluate.py ...` is `birdnet-stm32 evaluate ...`: same flags, same code path."""

import sys

from birdnet_stm32.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["evaluate", *sys.argv[1:]]))
