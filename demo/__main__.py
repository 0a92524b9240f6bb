"""`python -m demo`: the same as `imu-node demo`."""

from __future__ import annotations

import argparse
import sys

from demo.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m demo`."""
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="A local broker, a node on the reference model, simulated sensors, live "
        "results (the same as `imu-node demo`).",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
