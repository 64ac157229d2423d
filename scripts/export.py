"""`python scripts/export.py ...` is `birdnet-stm32 export ...`: same flags, same code path."""

import sys

from birdnet_stm32.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["export", *sys.argv[1:]]))
