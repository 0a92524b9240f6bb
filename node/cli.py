"""`imu-node`: run a node, run the demo, show the node id or the effective configuration."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from importlib.metadata import entry_points
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from common.cli import run_main
from common.errors import EdgeError
from common.logs import configure_logging
from common.mqtt.connection import (
    Connection,
    NoPasswordFlag,
    add_broker_arguments,
    connection_from_args,
)
from node.config import ENV_PREFIX, NodeConfig, certificate_name, load_config
from node.errors import ConfigError
from node.identity import default_node_id, hardware_identity

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
  imu-node check --broker mqtt://127.0.0.1:1883  # drive a running node, judge the targets

precedence: flags > environment (IMU_NODE_*) > --config file > defaults
"""


def _add_node_options(parser: argparse.ArgumentParser) -> None:
    fields = NodeConfig.model_fields
    parser.add_argument("--config", type=Path, help="TOML file with node settings")
    parser.add_argument("--password", action=NoPasswordFlag, help=argparse.SUPPRESS)
    for flag, name, kind in (
        ("--broker", "broker", str),
        ("--node-id", "node_id", str),
        ("--group", "group", str),
        ("--model", "model", Path),
        ("--trust-key", "trust_key", Path),
        ("--backend", "backend", str),
        ("--fallback", "fallback", str),
        ("--threads", "threads", int),
        ("--workers", "workers", str),
        ("--hop", "hop", int),
        ("--queue-size", "queue_size", int),
        ("--max-batch", "max_batch", int),
        ("--batch-wait-ms", "batch_wait_ms", float),
        ("--telemetry-interval", "telemetry_interval_s", float),
        ("--mqtt-protocol", "mqtt_protocol", str),
        ("--share-group", "share_group", str),
        ("--site", "site", str),
        ("--sensors", "sensors", str),
        ("--results-qos", "results_qos", int),
        ("--username", "username", str),
        ("--password-file", "password_file", Path),
        ("--ca-file", "ca_file", Path),
        ("--cert-file", "cert_file", Path),
        ("--key-file", "key_file", Path),
        ("--file-url-root", "file_url_root", Path),
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


COMMANDS_ENTRY_POINTS = "imu_edge.node_commands"
"""Entry-point group of commands other packages add to `imu-node` (the demo adds `demo`): each
is a function taking the subparsers, which adds its parser with `set_defaults(handler=...)`."""


def _add_plugin_commands(sub: argparse._SubParsersAction[Any]) -> None:
    for entry in entry_points(group=COMMANDS_ENTRY_POINTS):
        try:
            register = entry.load()
        except ImportError as exc:  # an image built without that package: no such command
            logger.debug("imu-node %s is not installed here: %s", entry.name, exc)
            continue
        register(sub)


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
    _add_check(sub)
    _add_plugin_commands(sub)
    return parser


CHECK_EXAMPLES = """\
examples:
  imu-node check --broker mqtt://pi-07.local:1883              # 40 windows/s for 30 s
  imu-node check --broker mqtt://pi-07.local:1883 --rate 200 --duration 60 --node pi-07
  imu-node check --broker mqtt://127.0.0.1:1883 --json > check.json

The check publishes JSON windows as a sensor would (imu/check-*/window, QoS 1), so the node must
subscribe to them (its default `sensors = "+"` does). Exit status: 0 every measured target met
(what could not be measured is listed; --require-all fails on it), 1 a target missed, 2 bad
arguments or no broker.
"""


def _add_check(sub: Any) -> None:
    check = sub.add_parser(
        "check",
        help="drive a running node through the broker and judge it against the targets",
        description="Plays a sensor at a fixed rate for a fixed time against a running node, "
        "then prints pass/fail per target with the measured figures: p95 latency from publish "
        "to result, sustained results per second with none lost, the node's RSS and its chip "
        "(or board) temperature from its telemetry. What the node does not report is listed "
        "as not measured, not as passed.",
        epilog=CHECK_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("--node", default=None, help="judge only this node id (default: any)")
    check.add_argument(
        "--sensor-id",
        default=None,
        metavar="ID",
        help="publish as this sensor; on a secured site the check login's own name "
        "(`imu-fleet pki add site/ check NAME` makes check-NAME; taken from its certificate "
        "or user name when not given)",
    )
    check.add_argument("--rate", type=float, default=40.0, help="windows per second (40)")
    check.add_argument("--duration", type=float, default=30.0, help="seconds of load (30)")
    check.add_argument("--sensors", type=int, default=1, help="simulated sensors sharing it (1)")
    check.add_argument("--grace", type=float, default=5.0, help="wait for late results, s (5)")
    check.add_argument("--p95-ms", type=float, default=50.0, help="latency target (50)")
    check.add_argument("--min-rate", type=float, default=20.0, help="windows/s target (20)")
    check.add_argument("--max-rss-mb", type=float, default=512.0, help="memory target (512)")
    check.add_argument("--max-temp-c", type=float, default=85.0, help="temperature target (85)")
    check.add_argument(
        "--require-all",
        action="store_true",
        help="fail when a target could not be measured (e.g. no temperature sensor)",
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_broker_arguments(check, ENV_PREFIX)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `imu-node`."""
    return run_main("imu-node", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    commands = {
        "run": _run,
        "id": _identity,
        "config": _config,
        "doctor": _config,
        "check": _check,
    }
    try:
        handler = getattr(args, "handler", None) or commands[args.command]
        return int(handler(args))
    except ConfigError as exc:
        print(f"imu-node: {exc}", file=sys.stderr)
        return 2
    except EdgeError as exc:
        print(f"imu-node: {exc}", file=sys.stderr)
        return 1


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
    from node.tools.doctor import Level, format_report, run_checks  # noqa: PLC0415

    configure_logging("ERROR", json_lines=False)
    checks = run_checks(config)
    if as_json:
        rows = [
            {"check": c.name, "level": c.level, "found": c.found, "fix": c.fix, "detail": c.detail}
            for c in checks
        ]
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_report(checks))
    return 1 if any(c.level is Level.FAIL for c in checks) else 0


def _check_login(connection: Connection) -> str | None:
    """`check-NAME` when the check logs in as a check login (certificate CN or user name)."""
    c = connection.credentials
    name = certificate_name(Path(c.cert_file)) if c.cert_file else c.username
    return name if name is not None and name.startswith("check-") else None


def _check(args: argparse.Namespace) -> int:
    from node.tools.check import CheckPlan, Targets, format_report, progress_bar, run_check  # noqa: PLC0415

    if args.rate <= 0 or args.duration <= 0 or args.sensors < 1:
        print("imu-node check: --rate and --duration must be > 0, --sensors >= 1", file=sys.stderr)
        return 2
    configure_logging("ERROR", json_lines=False)
    try:
        connection = connection_from_args(args, NodeConfig)
    except ValueError as exc:
        print(f"imu-node check: {exc}", file=sys.stderr)
        return 2
    plan = CheckPlan(
        broker=connection,
        rate=args.rate,
        duration_s=args.duration,
        sensors=args.sensors,
        grace_s=args.grace,
        node_id=args.node,
        protocol=connection.protocol,
        sensor_id=args.sensor_id or _check_login(connection),
    )
    targets = Targets(args.p95_ms, args.min_rate, args.max_rss_mb, args.max_temp_c)
    try:
        report = run_check(plan, targets, None if args.no_progress else progress_bar())
    except (ConnectionError, ValueError) as exc:
        print(f"imu-node check: {exc}", file=sys.stderr)
        return 2
    print(report.to_json().decode() if args.json else format_report(report))
    return 0 if report.passed and not (args.require_all and report.unmeasured) else 1


def _run(args: argparse.Namespace) -> int:
    from node.app import NodeApp  # noqa: PLC0415 (keeps `imu-node --help` fast)

    config = load_config(args.config, **_overrides(args))
    configure_logging(config.log_level, json_lines=args.log_format == "json")
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    app = NodeApp.open(config, stopping=stop)  # with no model, it waits for the fleet's first
    if app is None:
        logger.info("stopped while waiting for a first model (%s)", ", ".join(received))
        return 0
    app.on_fatal = stop.set
    app.start()
    stop.wait()
    if app.fatal is not None:
        return _exit_for_restart(app, app.fatal, app.fatal_status)
    reason = f"{received[0] if received else 'stop'} received"
    clean = app.stop(reason)
    logger.info("exiting (%s, clean drain: %s)", reason, clean)
    return 0


def _exit_for_restart(app: Any, reason: str, status: int) -> int:
    """Exit non-zero at once, without a clean stop: a clean stop ends the broker session, and
    with it the windows this process holds unacknowledged, which the restarted node must get
    again (its results in flight are in the journal, the rest in the spool). systemd decides by
    the status: 70 restarts, 76 (a duplicate node id) does not. The broker publishes the will."""
    logger.critical("exiting with status %d: %s", status, reason)
    logging.shutdown()
    os._exit(int(status))


if __name__ == "__main__":
    raise SystemExit(main())
