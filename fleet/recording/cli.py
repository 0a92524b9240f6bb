"""`imu-fleet record` and `imu-fleet replay`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common.cli import Command, arg
from fleet.settings import broker_options


def _progress(stats: Any) -> None:
    print(f"\r{stats.summary()}", end="", file=sys.stderr, flush=True)


def _record(args: argparse.Namespace) -> int:
    from fleet.recording import record  # noqa: PLC0415

    stats = record(
        args.broker,
        args.topic,
        args.out,
        duration=args.duration,
        max_messages=args.max_messages,
        protocol=args.mqtt_protocol,
        progress=_progress,
    )
    print(f"\r{stats.summary()}", file=sys.stderr)
    return 0


def _replay(args: argparse.Namespace) -> int:
    from fleet.recording import parse_rewrite, replay  # noqa: PLC0415

    stats = replay(
        args.file,
        args.broker,
        rate=args.rate,
        loop=args.loop,
        protocol=args.mqtt_protocol,
        rewrite=dict(parse_rewrite(spec) for spec in args.rewrite or []),
        progress=_progress,
    )
    print(f"\r{stats.summary()}", file=sys.stderr)
    return 0


COMMANDS = [
    Command(
        "record",
        "capture sensor traffic to a file (calibration set and replay input)",
        _record,
        description="Subscribes (QoS 1) and writes every message as a JSON line with its time "
        "offset; binary frames are kept byte for byte. Use the file as --calibration for "
        "bundle create / model compile, or feed it back with `imu-fleet replay`.",
        args=[
            arg(
                "--topic",
                action="append",
                required=True,
                help="topic filter, repeatable (e.g. 'imu/+/window')",
            ),
            arg("--out", type=Path, required=True, help="file (.jsonl or .jsonl.gz)"),
            arg("--duration", type=float, help="seconds (default: until Ctrl-C)"),
            arg("--max-messages", type=int, help="stop after this many messages"),
        ],
        shared=broker_options,
        examples=[
            "imu-fleet record --topic 'imu/+/window' --out rec.jsonl.gz --duration 600 "
            "--broker mqtt://broker.local:1883"
        ],
    ),
    Command(
        "replay",
        "publish a recording again, at its pace or faster",
        _replay,
        args=[
            arg("file", type=Path),
            arg(
                "--rate",
                type=float,
                default=1.0,
                help="speed factor: 2 = twice as fast, 0 = flat out",
            ),
            arg("--loop", action="store_true", help="start over at the end"),
            arg(
                "--rewrite",
                action="append",
                metavar="OLD=NEW",
                help="replace a topic prefix, e.g. imu/s1=imu/replay-1 (repeatable)",
            ),
        ],
        shared=broker_options,
        examples=["imu-fleet replay rec.jsonl.gz --rate 10 --broker mqtt://127.0.0.1:1883"],
    ),
]
"""The recording commands of `imu-fleet`."""
