"""`imu-fleet simulate sensors|nodes`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common.cli import Command, arg
from common.mqtt.connection import Credentials
from fleet.settings import broker_options

DEGRADE_MODES = ("errors", "latency", "crash")


def _sensors(args: argparse.Namespace) -> int:
    from fleet.simulate.sensors import SensorSimulator  # noqa: PLC0415

    simulator = SensorSimulator(
        args.broker,
        sensors=args.sensors,
        rate_hz=args.rate,
        mode=args.mode,
        interval_s=args.interval,
        hop=args.hop,
        prefix=args.prefix,
        seed=args.seed,
        sensor_ids=args.sensor_id or (),
        sensor_credentials=args.sensor_credentials,
        protocol=args.mqtt_protocol,
        encoding=args.encoding,
    )
    ids = simulator.sensor_ids
    print(
        f"publishing {len(ids)} sensor{'s' if len(ids) > 1 else ''} ({', '.join(ids[:3])}"
        f"{', ...' if len(ids) > 3 else ''}) at {args.rate:g} Hz as {args.mode} to "
        f"{args.broker}; Ctrl-C to stop",
        file=sys.stderr,
    )
    started = time.monotonic()
    calls = iter(range(1 << 62))

    def progress(stats: object) -> None:  # every second on a terminal, else every 10 s
        line = f"{time.monotonic() - started:6.0f} s: {stats}"
        if sys.stderr.isatty():
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
        elif next(calls) % 10 == 9:
            print(line, file=sys.stderr, flush=True)

    try:
        simulator.run_for(args.duration, progress)
    except KeyboardInterrupt:
        simulator.stop()
    stats = simulator.stats()
    print(f"\nsent: {stats}", file=sys.stderr)
    if stats.refused:
        print(
            f"imu-fleet: the broker refused {stats.refused} publishes: a sensor's login may "
            "publish only its own topics (imu/ID/...); with a certificate `sensor-ID`, pass "
            "--sensor-id ID",
            file=sys.stderr,
        )
        return 1
    return 0 if stats.messages else 1


def _nodes(args: argparse.Namespace) -> int:
    from fleet.simulate.nodes import simulate_nodes  # noqa: PLC0415

    def connected(done: int, total: int) -> None:
        print(f"\rconnected {done}/{total}", end="", file=sys.stderr, flush=True)

    if args.broker.credentials != Credentials() and args.node_credentials is None:
        msg = (
            "simulated nodes log in as themselves, each with its own certificate: give "
            "--node-credentials site/clients (and --ca-file is not needed), or run them "
            "against an open test broker"
        )
        raise ValueError(msg)
    degrade = {}
    for item in args.degrade:
        version, _, mode = item.partition("=")
        if mode not in DEGRADE_MODES:
            msg = f"--degrade {item!r}: give VERSION={'|'.join(DEGRADE_MODES)}"
            raise ValueError(msg)
        degrade[version] = mode
    return simulate_nodes(
        str(args.broker.address),
        args.bundle,
        args.count,
        prefix=args.prefix,
        groups=args.groups,
        telemetry_interval_s=args.telemetry_interval,
        trust_key=args.trust_key,
        protocol=args.mqtt_protocol,
        duration=args.duration,
        progress=connected,
        degrade=degrade,
        give_up_s=args.give_up_after or None,
        node_credentials=args.node_credentials,
        site=args.site,
    )


SENSORS = Command(
    "sensors",
    "publish simulated IMU sensors in real time",
    _sensors,
    args=[
        arg("--sensors", type=int, default=4, help="how many sensors (4)"),
        arg("--rate", type=float, default=100.0, help="samples/s per sensor (100)"),
        arg(
            "--mode",
            choices=["samples", "window"],
            default="samples",
            help="publish sample runs on imu/ID/samples or whole windows on imu/ID/window",
        ),
        arg("--hop", type=int, default=50, help="window mode: samples per window (50)"),
        arg(
            "--encoding",
            choices=["json", "binary"],
            default="json",
            help="window mode: JSON windows, or binary frames with their seq in the header "
            "(docs/topics.md, Binary frames)",
        ),
        arg("--interval", type=float, default=0.1, help="seconds between messages"),
        arg("--prefix", default="sim", help="sensor ids are PREFIX-000, ... (sim)"),
        arg(
            "--sensor-id",
            action="append",
            metavar="ID",
            help="this sensor id (repeat for more; instead of --sensors/--prefix): on a secured "
            "site, the ID of the sensor-ID certificate the connection uses",
        ),
        arg(
            "--sensor-credentials",
            type=Path,
            default=None,
            metavar="DIR",
            help="secured site: each sensor logs in on its own connection with "
            "DIR/sensor-ID.crt and .key (`imu-fleet pki add site/ sensor ID` wrote them to "
            "site/clients), so one process plays many sensors",
        ),
        arg("--duration", type=float, default=None, help="seconds (default: forever)"),
        arg(
            "--seed",
            type=int,
            default=None,
            help="seed of the simulated signals (default: one per sensor id, so two simulators "
            "differ; set it to repeat a run)",
        ),
    ],
    shared=broker_options,
    examples=[
        "imu-fleet simulate sensors --broker mqtt://127.0.0.1:1883 --sensors 8 --rate 100 "
        "--mode window --encoding binary"
    ],
)

NODES = Command(
    "nodes",
    "run N lightweight nodes (real MQTT clients, the real model manager) for rollouts",
    _nodes,
    description="Each simulated node connects on its own, publishes birth/will, telemetry and "
    "model state, and follows desired state with the same model manager code as a real node "
    "(fetch, verify, load, golden check, swap); inference is shared per version.",
    args=[
        arg("--count", type=int, required=True, help="how many nodes"),
        arg("--bundle", type=Path, required=True, help="the model they start on"),
        arg("--prefix", default="sim", help="node ids are PREFIX-0000, ... (sim)"),
        arg("--groups", type=int, default=1, help="spread over PREFIX-g0.. (1)"),
        arg(
            "--site",
            default=None,
            help="the site every node names in its status, for nodes on a site broker bridged "
            "to the fleet broker (`imu-fleet pki bridge`); none by default",
        ),
        arg("--duration", type=float, default=None, help="seconds (default: forever)"),
        arg("--trust-key", type=Path, help="fleet public key the nodes require"),
        arg(
            "--telemetry-interval",
            type=float,
            default=5.0,
            help="seconds between a node's telemetry messages (5)",
        ),
        arg(
            "--degrade",
            action="append",
            default=[],
            metavar="VERSION=MODE",
            help="make nodes serving VERSION degrade once it is active, to try health gates: "
            "errors (every window fails), latency (+80 ms), crash (restart every interval)",
        ),
        arg(
            "--node-credentials",
            type=Path,
            default=None,
            metavar="DIR",
            help="secured site: each node logs in with DIR/node-ID.crt and .key and DIR/ca.crt "
            "(`imu-fleet pki add site/ node PREFIX-0000`, ... wrote them to site/clients)",
        ),
        arg(
            "--give-up-after",
            type=float,
            default=60.0,
            metavar="SECONDS",
            help="exit (status 1) when no node has reached the broker for this long; 0: never (60)",
        ),
    ],
    shared=broker_options,
    examples=[
        "imu-fleet simulate nodes --count 1000 --bundle tcn-reference-1.0.0.tar \\\n"
        "      --telemetry-interval 10 --degrade 1.4.0=errors"
    ],
)

COMMANDS = [
    Command("simulate", "simulate sensors or fleet nodes", children=[SENSORS, NODES], dest="what")
]
"""The simulation commands of `imu-fleet`."""
