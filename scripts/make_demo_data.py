"""`python scripts/make_demo_data.py ...` is `birdnet-stm32 make-demo-data ...`: same flags, same code path."""

import sys

from birdnet_stm32.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["make-demo-data", *sys.argv[1:]]))
