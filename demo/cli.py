"""`imu-node demo` (and `python -m demo`): the options, and the command that runs the demo."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common.logs import configure_logging


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the `demo` command to `imu-node`'s subcommands (the entry point node/cli.py loads)."""
    demo = sub.add_parser(
        "demo", help="embedded broker + node + simulated sensors, with live results"
    )
    add_arguments(demo)
    demo.set_defaults(handler=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options."""
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds (default: until Ctrl-C)"
    )
    parser.add_argument("--sensors", type=int, default=4, help="simulated sensors (4)")
    parser.add_argument("--rate", type=float, default=100.0, help="samples/s per sensor (100)")
    parser.add_argument(
        "--mode",
        choices=["samples", "window"],
        default="samples",
        help="sensors send sample runs (node windows them) or whole windows (samples)",
    )
    parser.add_argument("--broker", default=None, help="use this broker instead of an embedded one")
    parser.add_argument(
        "--embedded",
        choices=["auto", "mosquitto", "amqtt"],
        default="auto",
        help="which local broker to start: mosquitto if installed, else amqtt (auto)",
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="bundle (default: reference model)"
    )
    parser.add_argument("--hop", type=int, default=50, help="samples between windows (50)")
    parser.add_argument(
        "--http",
        default=None,
        metavar="HOST:PORT",
        help="also serve HTTP: /healthz, /livez, /status, /metrics, POST /infer, /docs "
        "(e.g. 127.0.0.1:9108)",
    )
    parser.add_argument(
        "--node-id",
        default="demo-node",
        help="the demo node's id (demo-node); give another to run two demos on one --broker",
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed options; the exit status."""
    from demo.app import run_demo  # noqa: PLC0415 (pulls in the node and the simulator)

    configure_logging("WARNING", json_lines=False)
    return run_demo(
        duration=args.duration,
        sensors=args.sensors,
        rate_hz=args.rate,
        mode=args.mode,
        broker=args.broker,
        model=args.model,
        hop=args.hop,
        embedded=args.embedded,
        http=args.http,
        node_id=args.node_id,
    )
