"""`imu-node demo`: a local broker, a node on the reference model, simulated sensors, live results.

Everything runs in this process except mosquitto (when installed). The table refreshes every
second until Ctrl-C or `--duration`; the same messages are visible from another terminal with
`mosquitto_sub -p PORT -v -t 'imu/+/motifs'`.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import paho.mqtt.client as mqtt

from common.bundle import read_bundle
from common.mqtt.address import BrokerAddress
from common.mqtt.client import SessionSettings
from common.mqtt.session import MqttSession
from fleet.bundles.reference import ensure_reference_bundle
from fleet.simulate.sensors import SensorMode, SensorSimulator
from node.app import NodeApp
from node.config import load_config
from node.tools.local_broker import BrokerKind, LocalBroker
from schemas import topics


@dataclass(slots=True)
class _SensorView:
    windows: int = 0
    top: int = 0
    score: float = 0.0
    seq: int | None = None
    version: str = ""
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=200))


class ResultBoard:
    """Subscribes to results and keeps a per-sensor summary for the live table."""

    def __init__(self, broker: str, protocol: str) -> None:
        self.sensors: dict[str, _SensorView] = {}
        self.errors: deque[str] = deque(maxlen=3)
        self._lock = threading.Lock()
        self.session = MqttSession(
            SessionSettings(
                address=BrokerAddress.parse(broker),
                client_id=f"demo-board-{time.monotonic_ns() % 10**6}",
                protocol=protocol,
            )
        )
        self.session.route(topics.MOTIFS_FILTER, self._on_result)
        self.session.route(topics.node_errors("+"), self._on_error)

    def _on_result(self, message: mqtt.MQTTMessage) -> None:
        result = orjson.loads(message.payload)
        with self._lock:
            view = self.sensors.setdefault(result["sensor_id"], _SensorView())
            view.windows += 1
            view.top = result["top_motif"]
            view.score = result["motif_scores"][view.top]
            view.seq = result["seq"]
            view.version = result["model"]["version"]
            view.latencies.append(result["latency_ms"])

    def _on_error(self, message: mqtt.MQTTMessage) -> None:
        report = orjson.loads(message.payload)
        self.errors.append(f"{report['kind']}: {report['reason']}")

    def render(self, labels: list[str] | None, elapsed: float) -> str:
        """The live table as text."""
        lines = [
            f"imu-node demo  {elapsed:6.1f} s   (Ctrl-C to stop)",
            f"{'sensor':<10} {'windows':>7} {'seq':>7}  {'top motif':<16} {'score':>5} "
            f"{'lat p50':>8} {'lat p95':>8}  model",
        ]
        with self._lock:
            for sensor_id, view in sorted(self.sensors.items()):
                lat = np.asarray(view.latencies) if view.latencies else np.zeros(1)
                label = f"m{view.top:02d}"
                if labels and labels[view.top]:
                    label += f" ~{labels[view.top]}"
                seq = "-" if view.seq is None else view.seq
                lines.append(
                    f"{sensor_id:<10} {view.windows:>7} {seq:>7}"
                    f"  {label:<16} {view.score:>5.2f} {np.percentile(lat, 50):>6.2f}ms "
                    f"{np.percentile(lat, 95):>6.2f}ms  {view.version}"
                )
            if not self.sensors:
                lines.append("(waiting for the first windows: 100 samples = 1 s at 100 Hz)")
            lines.extend(f"last error: {e}" for e in self.errors)
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What `imu-node demo` was asked for."""

    duration: float | None
    sensors: int
    rate_hz: float
    mode: SensorMode
    broker: str | None
    model: Path | None
    hop: int
    embedded: BrokerKind
    http: str | None
    node_id: str


def run_demo(
    *,
    duration: float | None,
    sensors: int,
    rate_hz: float,
    mode: SensorMode,
    broker: str | None,
    model: Path | None,
    hop: int,
    embedded: BrokerKind = "auto",
    http: str | None = None,
    node_id: str = "demo-node",
) -> int:
    """Run the demo; returns the exit code. Whatever way it ends (its duration, Ctrl-C,
    SIGTERM, an error), the node, the sensors and the embedded broker stop and its files go."""
    stop = threading.Event()

    def on_signal(_number: int, _frame: object) -> None:
        if stop.is_set():  # asked twice: the user is in a hurry
            raise KeyboardInterrupt
        stop.set()  # the main loop ends at its next tick; setup is never cut in the middle

    previous: dict[int, Any] = {number: signal.signal(number, on_signal) for number in STOP_SIGNALS}
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(_restore, previous)
        try:
            options = DemoOptions(
                duration, sensors, rate_hz, mode, broker, model, hop, embedded, http, node_id
            )
            return _run(cleanup, options, stop)
        except KeyboardInterrupt:
            print("\nstopping...", flush=True)
            return 0


def _run(cleanup: contextlib.ExitStack, options: DemoOptions, stop: threading.Event) -> int:
    duration, sensors, rate_hz, mode = (
        options.duration,
        options.sensors,
        options.rate_hz,
        options.mode,
    )
    broker, model, hop, http = options.broker, options.model, options.hop, options.http
    embedded, node_id = options.embedded, options.node_id
    seen: list[ResultBoard] = []
    cleanup.callback(_summary, seen, time.monotonic())  # runs last: after everything stopped
    local = None
    if not broker:
        local = LocalBroker(embedded, detached=True).start()  # Ctrl-C is ours, not the broker's
        cleanup.callback(local.stop)
    url = broker or (local.url if local else "")
    protocol = local.protocol if local else "5"
    bundle_path = model or ensure_reference_bundle()
    bundle = read_bundle(bundle_path)
    # the node's spool, state and cache live as long as this demo: two demos never share them
    work = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="imu-demo-")))
    config = load_config(
        broker=url,
        node_id=node_id,
        model=bundle_path,
        mqtt_protocol=protocol,
        hop=hop,
        telemetry_interval_s=5.0,
        log_level="WARNING",
        http_listen=http,
        spool_dir=work / "spool",
        state_dir=work / "state",
        cache_dir=work / "cache",
    )
    labels = bundle.manifest.shown_labels
    app = NodeApp.open(config)
    if app is None:  # only a node without a model waits for the fleet; the demo has one
        msg = "the demo's node did not open"
        raise RuntimeError(msg)
    cleanup.callback(app.stop, "demo finished")
    board = ResultBoard(url, protocol)
    seen.append(board)
    cleanup.callback(board.session.stop)
    simulator = SensorSimulator(
        url, sensors=sensors, rate_hz=rate_hz, mode=mode, hop=hop, protocol=protocol
    )
    cleanup.callback(simulator.stop)
    interactive = sys.stdout.isatty()
    port = BrokerAddress.parse(url).port
    kind = f"{local.kind}" if local else "external"
    print(
        (
            "this demo's broker is open (no login) and listens on 127.0.0.1 only; a site runs "
            "the locked-down compose/mosquitto-secure.conf (docs/security.md)\n"
            if local
            else ""
        )
        + f"broker {url} ({kind}), model {bundle.ref.name} "
        f"{bundle.ref.version}, {sensors} sensors at {rate_hz:g} Hz sending {mode}\n"
        f"watch raw traffic: mosquitto_sub -h 127.0.0.1 -p {port} -v -t 'imu/#'"
        + (f"\nnode over HTTP: curl http://{http}/metrics" if http else ""),
        flush=True,
    )
    start = time.monotonic()
    app.start()
    board.session.start()
    board.session.wait_connected(10)
    simulator.start()
    while (duration is None or time.monotonic() - start < duration) and not stop.is_set():
        stop.wait(1.0)
        if interactive:
            table = board.render(labels, time.monotonic() - start)
            print("\x1b[H\x1b[J" + table, flush=True)
    if stop.is_set():
        print("\nstopping...", flush=True)
        return 0
    if not interactive:
        print(board.render(labels, time.monotonic() - start), flush=True)
    return 0 if board.sensors else 1


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _restore(previous: dict[int, Any]) -> None:
    for number, handler in previous.items():
        signal.signal(number, handler)


def _summary(seen: list[ResultBoard], started: float) -> None:
    """What the demo did, and what to try next."""
    board = seen[0] if seen else None
    windows = sum(view.windows for view in board.sensors.values()) if board else 0
    sensors = len(board.sensors) if board else 0
    print(
        f"demo done: {windows} windows from {sensors} sensors in "
        f"{time.monotonic() - started:.0f} s. Next: `imu-fleet dashboard --broker URL` shows a "
        'fleet live (docs/dashboard.md); run a node on your broker: README, "Run a node".',
        flush=True,
    )
