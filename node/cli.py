"""`imu-node`: run a node, run the demo, show the node id or the effective configuration."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from node.config import ENV_PREFIX, NodeConfig, load_config
from node.errors import ConfigError, NodeError
from node.identity import default_node_id, hardware_identity
from node.logs import configure_logging

logger = logging.getLogger("node")

EXAMPLES = """\
examples:
  imu-node demo                                 # broker + node + simulated sensors, live table
  imu-node run --broker mqtt://localhost:1883 --model tcn-1.0.0.tar
  imu-node run --config /etc/imu-node.toml      # settings from a TOML file
  IMU_NODE_BROKER=mqtt://10.0.0.5 imu-node run --model m.tar   # or from the environment
  imu-node id                                   # this machine's default node id
  imu-node config --config /etc/imu-node.toml   # effective settings (secrets hidden)
  imu-node doctor --config /etc/imu-node.toml   # what is wrong and what to do about it

precedence: flags > environment (IMU_NODE_*) > --config file > defaults
"""


def _add_node_options(parser: argparse.ArgumentParser) -> None:
    fields = NodeConfig.model_fields
    parser.add_argument("--config", type=Path, help="TOML file with node settings")
    for flag, name, kind in (
        ("--broker", "broker", str),
        ("--node-id", "node_id", str),
        ("--group", "group", str),
        ("--model", "model", Path),
        ("--trust-key", "trust_key", Path),
        ("--backend", "backend", str),
        ("--fallback", "fallback", str),
        ("--threads", "threads", int),
        ("--hop", "hop", int),
        ("--queue-size", "queue_size", int),
        ("--max-batch", "max_batch", int),
        ("--batch-wait-ms", "batch_wait_ms", float),
        ("--telemetry-interval", "telemetry_interval_s", float),
        ("--mqtt-protocol", "mqtt_protocol", str),
        ("--share-group", "share_group", str),
        ("--sensors", "sensors", str),
        ("--username", "username", str),
        ("--log-level", "log_level", str),
        ("--http", "http_listen", str),
    ):
        info = fields[name]
        default = info.default
        env = f"{ENV_PREFIX}{name.upper()}"
        parser.add_argument(
            flag,
            dest=name,
            type=kind,
            default=None,
            help=f"{info.description or name} (env {env}; default {default})",
        )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in NodeConfig.model_fields if hasattr(args, name)}


def build_parser() -> argparse.ArgumentParser:
    """The full `imu-node` argument parser."""
    parser = argparse.ArgumentParser(
        prog="imu-node",
        description="IMU inference node: MQTT windows in, latent + motif results out.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="serve a model bundle against a broker until SIGTERM")
    _add_node_options(run)
    run.add_argument(
        "--log-format", choices=["json", "text"], default="json", help="log lines (json)"
    )

    demo = sub.add_parser(
        "demo", help="embedded broker + node + simulated sensors, with live results"
    )
    demo.add_argument(
        "--duration", type=float, default=None, help="seconds (default: until Ctrl-C)"
    )
    demo.add_argument("--sensors", type=int, default=4, help="simulated sensors (4)")
    demo.add_argument("--rate", type=float, default=100.0, help="samples/s per sensor (100)")
    demo.add_argument(
        "--mode", choices=["samples", "window"], default="samples",
        help="sensors send sample runs (node windows them) or whole windows (samples)",
    )  # fmt: skip
    demo.add_argument("--broker", default=None, help="use this broker instead of an embedded one")
    demo.add_argument(
        "--embedded", choices=["auto", "mosquitto", "amqtt"], default="auto",
        help="which local broker to start: mosquitto if installed, else amqtt (auto)",
    )  # fmt: skip
    demo.add_argument("--model", type=Path, default=None, help="bundle (default: reference model)")
    demo.add_argument("--hop", type=int, default=50, help="samples between windows (50)")
    demo.add_argument(
        "--http", default=None, metavar="HOST:PORT",
        help="also serve /healthz, /readyz, /metrics, POST /infer (e.g. 127.0.0.1:9108)",
    )  # fmt: skip

    ident = sub.add_parser("id", help="print this machine's default node id and its source")
    ident.add_argument("--json", action="store_true", help="machine-readable output")

    config = sub.add_parser("config", help="print the effective configuration (secrets hidden)")
    _add_node_options(config)

    doctor = sub.add_parser(
        "doctor",
        help="check HailoRT, the device, the broker and the model; say what to fix",
        description="Checks, in order: software versions and node id; HailoRT library vs "
        "driver; Hailo devices, architecture, firmware, temperature; broker reachability and "
        "credentials; the bundle's hashes, signature, HEF architecture and golden check on "
        "every backend available. Exit status 1 when any check fails.",
    )
    _add_node_options(doctor)
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `imu-node`."""
    args = build_parser().parse_args(argv)
    commands = {"run": _run, "demo": _demo, "id": _identity, "config": _config, "doctor": _config}
    try:
        return commands[args.command](args)
    except ConfigError as exc:
        print(f"imu-node: {exc}", file=sys.stderr)
        return 2
    except NodeError as exc:
        print(f"imu-node: {exc}", file=sys.stderr)
        return 1


def _demo(args: argparse.Namespace) -> int:
    from node.demo import run_demo  # noqa: PLC0415 (pulls in the simulator)

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
    )


def _identity(args: argparse.Namespace) -> int:
    source = hardware_identity()
    node_id = default_node_id()
    if args.json:
        print(orjson.dumps({"node_id": node_id, "source": source.kind}).decode())
    else:
        print(f"{node_id}  (derived from {source.kind})")
    return 0


def _config(args: argparse.Namespace) -> int:
    config = load_config(args.config, **_overrides(args))
    if args.command == "doctor":
        return _doctor(config, as_json=args.json)
    print(orjson.dumps(config.model_dump(mode="json"), option=orjson.OPT_INDENT_2).decode())
    return 0


def _doctor(config: NodeConfig, *, as_json: bool) -> int:
    from node.doctor import Level, format_report, run_checks  # noqa: PLC0415

    configure_logging("ERROR", json_lines=False)
    checks = run_checks(config)
    if as_json:
        rows = [{"check": c.name, "level": c.level, "found": c.found, "fix": c.fix} for c in checks]
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_report(checks))
    return 1 if any(c.level is Level.FAIL for c in checks) else 0


def _run(args: argparse.Namespace) -> int:
    from node.app import NodeApp  # noqa: PLC0415 (keeps `imu-node --help` fast)

    config = load_config(args.config, **_overrides(args))
    configure_logging(config.log_level, json_lines=args.log_format == "json")
    app = NodeApp.open(config)
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    app.start()
    stop.wait()
    reason = f"{received[0] if received else 'stop'} received"
    clean = app.stop(reason)
    logger.info("exiting (%s, clean drain: %s)", reason, clean)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
