"""`python scripts/find_lr.py ...` is `birdnet-stm32 find-lr ...`: same flags, same code path."""

import sys

from birdnet_stm32.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["find-lr", *sys.argv[1:]]))
