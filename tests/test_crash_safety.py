"""Nothing the broker acknowledged is lost when a node dies (docs/reliability.md).

The node runs as `imu-node run` in its own process and is SIGKILLed mid-stream while a sensor
publishes JSON windows at a steady rate (QoS 1). It is started again with the same node id: its
client id is stable, so it resumes the session the broker kept, and the broker delivers every
window the dead process never acknowledged (the node acknowledges a window only once its result
is safe). Each test prints sent / acknowledged / results / lost / duplicates.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from test_lifecycle import persistent_broker
from test_node_e2e import raw_window

from helpers.mqtt import Probe
from helpers.processes import stop_process
from helpers.programs import subprocess_env
from helpers.waiting import unique
from node.tools.local_broker import LocalBroker
from schemas import topics

RATE_HZ = 150.0


def node_process(
    broker: LocalBroker, bundle: Path, node_id: str, folder: Path
) -> subprocess.Popen[bytes]:
    """`imu-node run` with its log in a file (a pipe nobody reads would stall it)."""
    log = (folder / f"{node_id}-{time.monotonic_ns()}.log").open("wb")
    command = [
        sys.executable, "-m", "node.cli", "run", "--broker", broker.url, "--node-id", node_id,
        "--model", str(bundle), "--backend", "onnx", "--config", str(folder / "node.toml"),
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=log, stderr=log, env=subprocess_env("onnx"))


@dataclass
class Sensor:
    """Publishes windows seq 0..count-1 at a steady rate and records which the broker acked."""

    url: str
    sensor_id: str
    count: int
    sent: int = 0

    def __post_init__(self) -> None:
        self._seq_of_mid: dict[int, int] = {}
        self._acked_mids: list[int] = []
        # no lock of ours around publish(): paho calls on_publish holding its own lock, and
        # publish() takes that lock (a lock held across both would deadlock)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, unique("sensor"), protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(0.1, 1)
        self.client.on_publish = lambda client, userdata, mid, *_: self._acked_mids.append(mid)
        host, port = self.url.removeprefix("mqtt://").rsplit(":", 1)
        self.client.connect(host, int(port))
        self.client.loop_start()
        rows = [orjson.dumps(raw_window(i).tolist()) for i in range(16)]
        self._payloads = [
            b'{"x":' + rows[seq % 16] + b',"seq":' + str(seq).encode() + b"}"
            for seq in range(self.count)
        ]
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def acked(self) -> set[int]:
        """Seqs the broker acknowledged (PUBACK) so far."""
        seqs = self._seq_of_mid
        return {seqs[mid] for mid in list(self._acked_mids) if mid in seqs}

    def _run(self) -> None:
        start = time.monotonic()
        for seq, payload in enumerate(self._payloads):
            delay = start + seq / RATE_HZ - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            info = self.client.publish(topics.window(self.sensor_id), payload, qos=1)
            self._seq_of_mid[info.mid] = seq
            self.sent += 1

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def collect(dashboard: Probe, sensor_id: str, wanted: set[int], timeout: float) -> list[int]:
    """Result seqs (with repeats) once every wanted seq has one, or at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seqs = [m.json()["seq"] for m in dashboard.on(topics.motifs(sensor_id))]
        if wanted <= set(seqs):
            time.sleep(1.0)  # late duplicates, if any
            break
        time.sleep(0.1)
    return [m.json()["seq"] for m in dashboard.on(topics.motifs(sensor_id))]


def runs_twice(dashboard: Probe, sensor_id: str) -> set[int]:
    """Windows inferred more than once: results for one seq made at different times (the same
    result delivered twice, byte for byte, is a redelivery, not a second run)."""
    made: dict[int, set[float]] = {}
    for message in dashboard.on(topics.motifs(sensor_id)):
        body = message.json()
        made.setdefault(body["seq"], set()).add(body["ts"])
    return {seq for seq, times in made.items() if len(times) > 1}


def report(name: str, sensor: Sensor, results: list[int], twice: set[int]) -> tuple[int, int]:
    lost = len(sensor.acked - set(results))
    duplicates = len(results) - len(set(results))
    print(
        f"\n{name}: sent {sensor.sent}, acknowledged by the broker {len(sensor.acked)}, "
        f"results {len(results)} ({len(set(results))} windows), lost {lost}, "
        f"duplicate results {duplicates}, windows run twice {len(twice)}"
    )
    return lost, duplicates


@pytest.mark.parametrize("down_s", [0.2, 2.0])
def test_a_node_killed_mid_stream_and_restarted_loses_no_acknowledged_window(
    broker: LocalBroker, reference_bundle_path: Path, tmp_path: Path, down_s: float
) -> None:
    node_id = unique("crash")
    (tmp_path / "node.toml").write_text(f'spool_dir = "{tmp_path / "spool"}"\n')
    dashboard = Probe(broker.url, session_expiry_s=300)
    sensor_id = unique("imu")
    dashboard.subscribe(topics.motifs(sensor_id), topics.node_status(node_id))
    first = node_process(broker, reference_bundle_path, node_id, tmp_path)
    dashboard.wait_for(topics.node_status(node_id), timeout=30,
                       where=lambda m: m.json()["state"] == "online")  # fmt: skip
    sensor = Sensor(broker.url, sensor_id, count=int(RATE_HZ * 6))
    sensor.thread.start()
    time.sleep(2.0)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    served_before = len(dashboard.on(topics.motifs(sensor_id)))
    time.sleep(down_s)
    second = node_process(broker, reference_bundle_path, node_id, tmp_path)
    try:
        sensor.thread.join(30)
        results = collect(dashboard, sensor_id, sensor.acked, timeout=45)
        twice = runs_twice(dashboard, sensor_id)
        lost, _ = report(f"SIGKILL, restarted after {down_s} s", sensor, results, twice)
        assert 0 < served_before < sensor.count, "the kill did not land mid-stream"
        assert len(sensor.acked) == sensor.count
        assert lost == 0
        assert not twice  # results in flight were journaled: their windows are not run again
    finally:
        stop_process(second, signal.SIGTERM, 30)
        sensor.close()
        dashboard.close()


def test_a_node_killed_during_a_broker_outage_delivers_what_it_spooled(
    reference_bundle_path: Path, tmp_path: Path
) -> None:
    """Results made while the broker is away are on disk; the node dies; broker and node come
    back: the spool is replayed and the windows it answers are not run again."""
    own = persistent_broker(tmp_path)
    node_id = unique("outage")
    (tmp_path / "node.toml").write_text(
        f'spool_dir = "{tmp_path / "spool"}"\ntelemetry_interval_s = 1.0\n'
    )
    sensor_id = unique("imu")
    dashboard = Probe(own.url, session_expiry_s=300).subscribe(topics.motifs(sensor_id))
    dashboard.subscribe(topics.node_status(node_id), topics.node_telemetry(node_id))
    first = node_process(own, reference_bundle_path, node_id, tmp_path)
    second: subprocess.Popen[bytes] | None = None
    try:
        dashboard.wait_for(topics.node_status(node_id), timeout=30,
                           where=lambda m: m.json()["state"] == "online")  # fmt: skip
        sender = Probe(own.url)
        sent = 3000
        rows = [orjson.dumps(raw_window(i).tolist()) for i in range(16)]
        for seq in range(sent):  # all on the broker, queued for the node
            payload = b'{"x":' + rows[seq % 16] + b',"seq":' + str(seq).encode() + b"}"
            sender.client.publish(topics.window(sensor_id), payload, qos=1)
        sender.client.publish(topics.window(sensor_id), b"", qos=1).wait_for_publish(30)
        sender.close()
        dashboard.wait_for(topics.motifs(sensor_id), 50, timeout=30)
        own.stop()  # mid-stream: the node works on what it holds; its results go to the spool
        served_before = len({m.json()["seq"] for m in dashboard.on(topics.motifs(sensor_id))})
        time.sleep(2.0)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        spooled = sum(p.stat().st_size for p in (tmp_path / "spool").glob("*.spool"))
        own = persistent_broker(tmp_path, own.port)
        second = node_process(own, reference_bundle_path, node_id, tmp_path)
        results = collect(dashboard, sensor_id, set(range(sent)), timeout=45)
        lost = sent - len(set(results))
        duplicates = len(results) - len(set(results))
        twice = runs_twice(dashboard, sensor_id)
        last = dashboard.on(topics.node_telemetry(node_id))[-1].json()
        print({k: last[k] for k in ("windows_in", "windows_done", "results_published", "dropped",
                                    "redelivered", "errors")})  # fmt: skip
        print(f"\nbroker outage + SIGKILL: sent {sent}, spool {spooled} bytes, results "
              f"{len(results)} ({len(set(results))} windows), lost {lost}, duplicate results "
              f"{duplicates}, windows run twice {len(twice)}")  # fmt: skip
        assert lost == 0
        assert not twice  # settled results stay in the journal: re-sent windows are skipped
        assert served_before < sent, "the outage came too late to test anything"
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                stop_process(process, signal.SIGTERM, 30)
        dashboard.close()
        own.stop()


def test_a_broker_killed_mid_stream_loses_nothing_it_had_handed_on(
    reference_bundle_path: Path, tmp_path: Path
) -> None:
    """SIGKILL the broker at 150 windows/s and start it again 2 s later from its persistence:
    the node reconnects, the sensor re-sends what the broker never acknowledged, and every
    window the broker acknowledged gets its result, once.

    A killed mosquitto keeps only what it last saved (`autosave_interval`, 60 s as shipped), so
    the node's session must be older than the last save, as on any site running for a while: a
    clean broker restart saves it here. (A session younger than that is lost with the kill: the
    node subscribes again on reconnect, but what sensors publish before that has no subscriber;
    docs/reliability.md.)"""
    own = persistent_broker(tmp_path)
    node_id = unique("brokerkill")
    (tmp_path / "node.toml").write_text(f'spool_dir = "{tmp_path / "spool"}"\n')
    sensor_id = unique("imu")
    dashboard = Probe(own.url, session_expiry_s=300).subscribe(topics.motifs(sensor_id))
    dashboard.subscribe(topics.node_status(node_id))
    node = node_process(own, reference_bundle_path, node_id, tmp_path)
    sensor: Sensor | None = None
    try:
        dashboard.wait_for(topics.node_status(node_id), timeout=30,
                           where=lambda m: m.json()["state"] == "online")  # fmt: skip
        own.stop()  # saves the sessions, as an autosave would
        own = persistent_broker(tmp_path, own.port)
        dashboard.wait_for(topics.node_status(node_id), 2, timeout=30,
                           where=lambda m: m.json()["state"] == "online")  # fmt: skip
        sensor = Sensor(own.url, sensor_id, count=int(RATE_HZ * 6))
        sensor.thread.start()
        time.sleep(2.0)
        own.kill()
        acked_before_kill, sent_before_kill = set(sensor.acked), sensor.sent
        time.sleep(2.0)
        own = persistent_broker(tmp_path, own.port)
        sensor.thread.join(30)
        results = collect(dashboard, sensor_id, sensor.acked, timeout=45)
        twice = runs_twice(dashboard, sensor_id)
        lost, _ = report("broker SIGKILL, restarted after 2 s", sensor, results, twice)
        resent = sent_before_kill - len(acked_before_kill)
        print(f"windows sent and not acknowledged when the broker died: {resent}")
        assert 0 < len(acked_before_kill) < sensor.count, "the kill did not land mid-stream"
        assert len(sensor.acked) == sensor.count, "the sensor's client re-sends after the restart"
        assert lost == 0
        # a window the broker handed on but never acknowledged to the sensor comes again as a
        # new message (no DUP on the broker's hop to the node): it may run again, nothing else
        assert not twice & acked_before_kill
    finally:
        if node.poll() is None:
            stop_process(node, signal.SIGTERM, 30)
        if sensor is not None:
            sensor.close()
        dashboard.close()
        own.stop()
