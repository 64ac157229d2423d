"""`python scripts/demo.py ...` is `birdnet-stm32 demo ...`: same flags, same code path."""

import sys

from birdnet_stm32.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["demo", *sys.argv[1:]]))
