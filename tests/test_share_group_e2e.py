"""Sensor-affine share groups end to end: node processes dividing `samples` sensors.

Nodes run as `imu-node run --share-group G` processes against the session's real mosquitto.
Sensors publish runs of samples from seq 0 at a steady rate (QoS 1) while nodes of the group
die (SIGKILL), join and leave (SIGTERM). Every window (sensor, start) a node should cut must
have exactly one result, made once, in the end. The test prints what happened.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import pytest

from helpers.mqtt import Probe
from helpers.processes import stop_process
from helpers.programs import subprocess_env
from helpers.waiting import unique
from node.ingest.share import rendezvous_owner
from node.tools.local_broker import LocalBroker
from schemas import topics

RATE_HZ = 250.0
RUN = 10
"""Samples per message: 25 messages/s per sensor."""
HOP = 50


def node_process(
    broker: LocalBroker, bundle: Path, node_id: str, group: str, folder: Path, *extra: str
) -> subprocess.Popen[bytes]:
    """`imu-node run` in a share group, its log in a file (a pipe nobody reads would stall it)."""
    home = folder / node_id
    home.mkdir()
    (home / "node.toml").write_text(f'spool_dir = "{home / "spool"}"\n')
    log = (home / "node.log").open("wb")
    command = [
        sys.executable, "-m", "node.cli", "run", "--broker", broker.url, "--node-id", node_id,
        "--model", str(bundle), "--backend", "onnx", "--config", str(home / "node.toml"),
        "--share-group", group, "--hop", str(HOP), "--threads", "1", "--workers", "1",
        *extra,
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=log, stderr=log, env=subprocess_env("onnx"))


def sensor_ids(nodes: list[str], per_node: int, joining: str) -> list[str]:
    """Sensor ids that give each of `nodes` `per_node` sensors, and `joining` some of them once
    it joins and the second node is gone (random ids alone could leave a node idle)."""
    while True:
        chosen: dict[str, list[str]] = {node: [] for node in nodes}
        while any(len(ids) < per_node for ids in chosen.values()):
            sensor = unique("imu")
            owner = rendezvous_owner(sensor, nodes)
            assert owner is not None
            if len(chosen[owner]) < per_node:
                chosen[owner].append(sensor)
        ids = [sensor for group in chosen.values() for sensor in group]
        after = [nodes[0], *nodes[2:], joining]
        if sum(rendezvous_owner(s, after) == joining for s in ids) >= 2:
            return ids


class Sensors:
    """Sensors publishing runs of samples from seq 0 at a steady rate, QoS 1."""

    def __init__(self, url: str, ids: list[str]) -> None:
        self.ids = ids
        self.probe = Probe(url)
        self.samples_sent = 0
        self._last: mqtt.MQTTMessageInfo | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        seq = 0
        rng = np.random.default_rng(7)
        while not self._stop.is_set():
            delay = start + seq / RATE_HZ - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            rows = rng.normal(0, 1, (RUN, 9)).round(4).tolist()
            payload = orjson.dumps({"seq": seq, "rate_hz": RATE_HZ, "samples": rows})
            for sensor_id in self.ids:
                self._last = self.probe.client.publish(topics.samples(sensor_id), payload, qos=1)
            seq += RUN
            self.samples_sent = seq

    def stop(self) -> None:
        """Stop publishing once every run sent is on the broker (a disconnect drops the rest)."""
        self._stop.set()
        self.thread.join(5)
        if self._last is not None:
            self._last.wait_for_publish(10)
        self.probe.close()

    def expected(self) -> set[tuple[str, int]]:
        """Every window the sensors' samples make: starts 0, hop, ... with 100 samples."""
        last = self.samples_sent - 100
        return {(s, start) for s in self.ids for start in range(0, last + 1, HOP)}


def results(dashboard: Probe) -> list[dict[str, object]]:
    return [m.json() for m in dashboard.on("imu/+/motifs")]


def wait_served(dashboard: Probe, expected: set[tuple[str, int]], timeout: float = 30) -> None:
    """Until every expected window has a result (or the timeout), then a little longer for
    late duplicates, if any."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if expected <= {(r["sensor_id"], r["seq"]) for r in results(dashboard)}:
            break
        time.sleep(0.2)
    time.sleep(1.5)


def stop_all(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_a_share_group_serves_every_window_once_through_kill_join_and_leave(
    broker: LocalBroker, reference_bundle_path: Path, tmp_path: Path
) -> None:
    group = unique("share")
    dashboard = Probe(broker.url)
    dashboard.subscribe("imu/+/motifs", topics.NODES_STATUS_FILTER, "fleet/nodes/+/errors")
    names = [unique(f"pi-{letter}") for letter in "abcd"]
    a, b, c, d = names
    procs = {
        name: node_process(broker, reference_bundle_path, name, group, tmp_path)
        for name in (a, b, c)
    }

    def online(node_id: str) -> None:
        dashboard.wait_for(
            topics.node_status(node_id),
            timeout=60,
            where=lambda m: m.payload != b"" and m.json()["state"] == "online",
        )

    sensors = Sensors(broker.url, sensor_ids([a, b, c], 2, d))
    try:
        for name in (a, b, c):
            online(name)
        time.sleep(0.5)
        sensors.thread.start()
        time.sleep(4.0)
        procs[b].send_signal(signal.SIGKILL)  # dies with windows in work
        procs[b].wait(10)
        killed_at = sensors.samples_sent
        procs[d] = node_process(broker, reference_bundle_path, d, group, tmp_path)
        online(d)  # joins: takes sensors over from the live nodes
        time.sleep(3.0)
        procs[c].send_signal(signal.SIGTERM)  # leaves cleanly: hands its sensors over
        assert procs[c].wait(30) == 0
        time.sleep(3.0)
        sensors.stop()
        expected = sensors.expected()
        wait_served(dashboard, expected)
        errors = [m.json() for m in dashboard.on("fleet/nodes/+/errors")]
    finally:
        stop_all(procs)  # the last two stop at once: nobody is left to take their sensors
        dashboard.close()

    made = results(dashboard)
    served = Counter((r["sensor_id"], r["seq"]) for r in made)
    runs = Counter((r["sensor_id"], r["seq"], r["ts"]) for r in made)  # one per inference
    twice = {key for key, count in Counter(k[:2] for k in runs).items() if count > 1}
    missing = expected - set(served)
    by_node = Counter(r["node_id"] for r in made)
    print(
        f"\nshare group of 3 (+1 joining, -1 killed at sample {killed_at}, -1 leaving): "
        f"{len(expected)} windows expected, {len(set(served) & expected)} served, "
        f"{len(missing)} missing, {len(twice)} run twice; results by node "
        f"{ {n[-6:]: k for n, k in by_node.items()} }; "
        f"errors {Counter(e['kind'] for e in errors)}"
    )
    for error in errors:
        print(f"  {error['node_id'][-6:]}: {error['kind']}: {error['reason']}")
    assert not missing, sorted(missing)[:10]
    assert not twice, sorted(twice)[:10]
    assert set(served) <= expected  # on the group's grid, and only whole windows
    assert all(by_node[node] for node in names)  # all four served some
    assert not [e for e in errors if e["kind"] == "share_group"]


@pytest.mark.parametrize("protocol", ["3.1.1"])
def test_a_node_alone_in_its_group_serves_at_once(
    broker: LocalBroker, reference_bundle_path: Path, tmp_path: Path, protocol: str
) -> None:
    """One node in a group (and MQTT 3.1.1: no shared subscriptions needed for samples)."""
    group = unique("share")
    name = unique("pi")
    dashboard = Probe(broker.url)
    dashboard.subscribe("imu/+/motifs", topics.node_status(name))
    proc = node_process(
        broker, reference_bundle_path, name, group, tmp_path, "--mqtt-protocol", protocol
    )
    try:
        dashboard.wait_for(topics.node_status(name), timeout=60)
        sensors = Sensors(broker.url, [unique("imu")])
        sensors.thread.start()
        time.sleep(2.0)
        sensors.stop()
        expected = sensors.expected()
        dashboard.wait_for("imu/+/motifs", len(expected), timeout=15)
        assert {(r["sensor_id"], r["seq"]) for r in results(dashboard)} == expected
    finally:
        stop_process(proc, signal.SIGTERM, 30)
        dashboard.close()
