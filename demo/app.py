"""`imu-node demo`: a local broker, a node on the reference model, simulated sensors, live results.

Everything runs in this process except mosquitto (when installed). The table refreshes every
second until Ctrl-C or `--duration`; the same messages are visible from another terminal with
`mosquitto_sub -p PORT -v -t 'imu/+/motifs'`.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

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
from schemas.manifest import PrototypeHead


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
) -> int:
    """Run the demo; returns the exit code."""
    local = None if broker else LocalBroker(embedded).start()
    url = broker or (local.url if local else "")
    protocol = local.protocol if local else "5"
    bundle_path = model or ensure_reference_bundle()
    bundle = read_bundle(bundle_path)
    config = load_config(
        broker=url,
        node_id="demo-node",
        model=bundle_path,
        mqtt_protocol=protocol,
        hop=hop,
        telemetry_interval_s=5.0,
        log_level="WARNING",
        http_listen=http,
    )
    head = bundle.manifest.motif_head
    labels = head.labels if isinstance(head, PrototypeHead) else None
    app = NodeApp.open(config)
    board = ResultBoard(url, protocol)
    simulator = SensorSimulator(
        url, sensors=sensors, rate_hz=rate_hz, mode=mode, hop=hop, protocol=protocol
    )
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
    try:
        app.start()
        board.session.start()
        board.session.wait_connected(10)
        simulator.start()
        while duration is None or time.monotonic() - start < duration:
            time.sleep(1.0)
            if interactive:
                table = board.render(labels, time.monotonic() - start)
                print("\x1b[H\x1b[J" + table, flush=True)
        if not interactive:
            print(board.render(labels, time.monotonic() - start), flush=True)
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
    finally:
        simulator.stop()
        app.stop("demo finished")
        board.session.stop()
        if local is not None:
            local.stop()
    return 0 if board.sensors else 1
