"""``python -m birdnet_stm32`` runs the command-line interface."""

from birdnet_stm32.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
