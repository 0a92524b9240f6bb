"""N inference workers: per-sensor order, hot swaps, failures, and the single-worker path.

Nodes run on the real mosquitto and ONNX Runtime (the reference bundle) through the fixtures.
"""

from __future__ import annotations

import queue
import threading
import time
import zlib
from collections import defaultdict
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from test_node_e2e import raw_window

from fleet.bundles.reference import build_reference_bundle
from fleet.desired import desired_for, desired_topic
from fleet.distribution import publish_bundle
from helpers.mqtt import Probe
from helpers.nodes import NodeFactory
from helpers.waiting import unique, wait_until
from node import app as node_app
from node.app import NodeApp
from node.inference.workers import ShardedQueue, resolve_workers, shard_of
from node.tools.local_broker import LocalBroker
from node.work import WorkItem
from schemas import topics
from schemas.codec import encode

ONNX_ONLY = pytest.mark.parametrize("backend", ["onnx"], indirect=True)


def sensors_covering(count: int, workers: int, per_worker: int = 2) -> list[str]:
    """At least `count` fresh sensor ids, at least `per_worker` of them pinned to each worker."""
    found: list[str] = []
    taken: dict[int, int] = defaultdict(int)
    while len(found) < count or any(taken[i] < per_worker for i in range(workers)):
        sensor = unique("imu")
        index = shard_of(sensor, workers)
        if len(found) >= count and taken[index] >= per_worker:
            continue
        found.append(sensor)
        taken[index] += 1
    return found


def pinned_to(index: int, workers: int) -> str:
    """A fresh sensor id served by worker `index`."""
    while shard_of(sensor := unique("imu"), workers) != index:
        pass
    return sensor


def body(seq: int) -> bytes:
    return orjson.dumps({"x": raw_window(seq % 20).tolist(), "seq": seq})


def flood(probe: Probe, sensors: list[str], per_sensor: int) -> None:
    """Every sensor's windows 0..per_sensor-1, interleaved across sensors, as fast as QoS 1 goes."""
    payloads = [body(seq) for seq in range(per_sensor)]
    infos = [
        probe.client.publish(topics.window(sensor), payloads[seq], qos=1)
        for seq in range(per_sensor)
        for sensor in sensors
    ]
    for info in infos:
        info.wait_for_publish(10)


def results_by_sensor(probe: Probe, sensors: list[str], per_sensor: int) -> dict[str, list[Any]]:
    probe.wait_for("imu/+/motifs", len(sensors) * per_sensor, timeout=60)
    time.sleep(0.3)  # anything served twice would arrive now
    by_sensor: dict[str, list[Any]] = defaultdict(list)
    for message in probe.on("imu/+/motifs"):
        result = message.json()
        by_sensor[result["sensor_id"]].append(result)
    return by_sensor


@ONNX_ONLY
@pytest.mark.parametrize("workers", [2, 3])
def test_each_sensor_keeps_its_order_across_workers(
    start_node: NodeFactory, probe: Probe, workers: int
) -> None:
    app = start_node(workers=workers)
    assert app.worker.count == workers
    assert isinstance(app.queue, ShardedQueue)
    assert app.queue.maxsize == app.config.queue_size  # one capacity for all workers
    sensors = sensors_covering(12, workers)
    probe.subscribe(*(topics.motifs(sensor) for sensor in sensors))
    per_sensor = 60
    flood(probe, sensors, per_sensor)
    by_sensor = results_by_sensor(probe, sensors, per_sensor)
    assert sorted(by_sensor) == sorted(sensors)
    for sensor in sensors:
        seqs = [r["seq"] for r in by_sensor[sensor]]
        assert seqs == list(range(per_sensor)), sensor  # all, once each, in order
    total = len(sensors) * per_sensor
    wait_until(lambda: sum(w.processed for w in app.worker.workers) == total, what="counts")
    served = [worker.processed for worker in app.worker.workers]
    assert all(count >= 2 * per_sensor for count in served), served  # every worker took part


def test_results_on_one_worker_equal_results_on_two(
    start_node: NodeFactory, probe: Probe, backend: str
) -> None:
    """workers = 1 is the single worker of before; two workers compute the very same results."""
    one = start_node(workers=1)
    assert one.worker.count == 1
    assert type(one.queue) is queue.Queue  # the plain queue, not a sharded one
    assert [w.name for w in one.worker.workers] == ["inference-worker"]
    two = start_node(workers=2)
    expected = 2 if backend == "onnx" else 1  # Hailo: one worker whatever is asked
    assert two.worker.count == expected
    sensor = unique("imu")  # both nodes consume every sensor: each serves all 30 windows
    probe.subscribe(topics.motifs(sensor))
    for seq in range(30):
        probe.client.publish(topics.window(sensor), body(seq), qos=1)
    got = [m.json() for m in probe.wait_for(topics.motifs(sensor), 60, timeout=30)]
    latents: dict[str, dict[int, list[float]]] = {}
    for app in (one, two):
        mine = [r for r in got if r["node_id"] == app.node_id]
        assert [r["seq"] for r in mine] == list(range(30))
        latents[app.node_id] = {r["seq"]: r["latent"] for r in mine}
    first, second = latents[one.node_id], latents[two.node_id]
    for seq in range(30):
        np.testing.assert_allclose(first[seq], second[seq], rtol=0, atol=1e-6)


@ONNX_ONLY
def test_hot_swap_under_load_reaches_every_worker_once(
    broker: LocalBroker, start_node: NodeFactory, probe: Probe, tmp_path: Path
) -> None:
    new = build_reference_bundle(tmp_path / "ref-1.1.0.tar", version="1.1.0", seed=8)
    app = start_node(workers=2, cache_dir=tmp_path / "cache")
    sensors = sensors_covering(6, 2)
    probe.subscribe(*(topics.motifs(sensor) for sensor in sensors))
    publish_bundle(new, broker.url, chunk_size=16 * 1024)
    per_sensor = 150
    payloads = [body(seq) for seq in range(per_sensor)]

    def stream() -> None:  # 600 windows/s over 6 sensors while the swap happens
        start = time.monotonic()
        for seq in range(per_sensor):
            delay = start + seq / 100 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            for sensor in sensors:
                probe.client.publish(topics.window(sensor), payloads[seq], qos=1)

    sender = threading.Thread(target=stream)
    sender.start()
    time.sleep(0.4)
    probe.publish(desired_topic("node", app.node_id), encode(desired_for(new)), retain=True)
    sender.join()
    by_sensor = results_by_sensor(probe, sensors, per_sensor)
    probe.publish(desired_topic("node", app.node_id), b"", retain=True)
    for sensor in sensors:
        results = by_sensor[sensor]
        assert [r["seq"] for r in results] == list(range(per_sensor))  # none lost, none twice
        served = [r["model"]["version"] for r in results]
        switch = served.index("1.1.0")  # one clean cut-over per sensor
        assert 0 < switch < per_sensor
        assert served == ["1.0.0"] * switch + ["1.1.0"] * (per_sensor - switch), sensor
    assert app.worker.pipeline.ref.version == "1.1.0"


class WorkerKilled(BaseException):
    """Ends a worker thread (no `except Exception` in its loop catches it)."""


@ONNX_ONLY
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_worker_is_reported(start_node: NodeFactory, probe: Probe) -> None:
    app = start_node(workers=2, drain_timeout_s=0.5)
    probe.subscribe(topics.node_errors(app.node_id))
    victim = app.worker.workers[1]

    def die(*_: object) -> None:
        raise WorkerKilled

    victim._on_results = die  # type: ignore[method-assign]
    probe.publish(topics.window(pinned_to(1, 2)), body(0))
    wait_until(lambda: not victim.is_alive(), what="the worker to die")
    report = probe.wait_for(
        topics.node_errors(app.node_id), where=lambda m: m.json()["kind"] == "watchdog"
    )[0].json()
    assert "the inference worker 2 thread died" in report["reason"]
    assert app.fatal is not None
    checks = app.readiness()
    assert not checks["serving"]
    assert not checks["supervised"]


@ONNX_ONLY
def test_a_stalled_worker_is_reported_while_the_other_serves(
    start_node: NodeFactory, probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node_app, "STALL_S", 1.0)
    app = start_node(workers=2, drain_timeout_s=0.5)
    probe.subscribe(topics.node_errors(app.node_id))
    stuck = app.worker.workers[0]
    entered, release = threading.Event(), threading.Event()
    publish = stuck._on_results

    def hang(*args: Any) -> None:  # a worker stuck outside any backend call
        entered.set()
        release.wait(30)
        publish(*args)

    stuck._on_results = hang  # type: ignore[method-assign]
    held, served = pinned_to(0, 2), pinned_to(1, 2)
    probe.subscribe(topics.motifs(held), topics.motifs(served))
    stop_sending = threading.Event()

    def keep_serving() -> None:  # the other worker finishes windows all along
        seq = 0
        while not stop_sending.is_set():
            probe.client.publish(topics.window(served), body(seq), qos=1)
            seq += 1
            time.sleep(0.02)

    sender = threading.Thread(target=keep_serving)
    try:
        probe.publish(topics.window(held), body(0))
        assert entered.wait(10)
        for seq in range(1, 4):  # these wait behind the stuck worker
            probe.publish(topics.window(held), body(seq))
        sender.start()
        report = probe.wait_for(
            topics.node_errors(app.node_id),
            where=lambda m: m.json()["kind"] == "watchdog",
            timeout=15,
        )[0].json()
        assert "no progress in the inference worker 1: 3 windows waiting" in report["reason"]
        assert stuck.is_alive()
        assert not app.readiness()["supervised"]
        assert len(probe.on(topics.motifs(served))) >= 20  # the other worker served on
        assert probe.on(topics.motifs(held)) == []
    finally:
        stop_sending.set()
        release.set()
        if sender.is_alive():
            sender.join()
    held_results = probe.wait_for(topics.motifs(held), 4)
    assert [m.json()["seq"] for m in held_results] == [0, 1, 2, 3]


def item(sensor: str, reply: bool = False) -> WorkItem:
    return WorkItem(
        sensor, 0, None, None, raw_window(0), time.perf_counter_ns(), Future() if reply else None
    )


def test_the_sharded_queue_has_one_capacity_and_blocks_then_refuses_when_full() -> None:
    work = ShardedQueue(4, 2)
    first = pinned_to(0, 2)
    for _ in range(4):
        work.put_nowait(item(first))  # one sensor may use the whole capacity
    assert work.full()
    assert work.qsize() == 4
    assert work.shard_sizes() == [4, 0]
    with pytest.raises(queue.Full):
        work.put(item(pinned_to(1, 2)), timeout=0.2)  # ingest's wait, then the drop
    freed = threading.Timer(0.1, lambda: work.shard(0).get())
    freed.start()
    work.put(item(pinned_to(1, 2)), timeout=2)  # room made by worker 0 is anyone's
    freed.join()
    assert work.shard_sizes() == [3, 1]
    assert work.shard(1).get_nowait().sensor_id != first
    with pytest.raises(queue.Empty):
        work.shard(1).get(timeout=0.05)


def test_http_windows_go_to_the_shortest_shard() -> None:
    work = ShardedQueue(16, 2)
    for _ in range(3):
        work.put_nowait(item(pinned_to(0, 2)))
    work.put_nowait(item("http", reply=True))
    work.put_nowait(item("http", reply=True))
    assert work.shard_sizes() == [3, 2]


def test_auto_workers_follow_the_cores_and_the_backend() -> None:
    assert resolve_workers("auto", "onnx", 1, cpus=2) == 2
    assert resolve_workers("auto", "onnx", 1, cpus=16) == 4
    assert resolve_workers("auto", "onnx", 2, cpus=2) == 1
    assert resolve_workers("auto", "onnx", 1, cpus=1) == 1
    assert resolve_workers(3, "onnx", 1, cpus=2) == 3
    assert resolve_workers("auto", "hailo", 1, cpus=8) == 1
    assert resolve_workers(4, "hailo", 1, cpus=8) == 1


def test_shards_are_stable_across_processes() -> None:
    assert shard_of("imu-0001", 2) == shard_of("imu-0001", 2)
    assert [shard_of(f"imu-{i}", 3) for i in range(6)] == [
        zlib.crc32(f"imu-{i}".encode()) % 3 for i in range(6)
    ]


def test_a_node_reports_its_workers(start_node: NodeFactory, backend: str) -> None:
    app: NodeApp = start_node(workers=3)
    names = {t.name for t in threading.enumerate()}
    if backend == "onnx":
        assert {"inference-worker-1", "inference-worker-2", "inference-worker-3"} <= names
    else:
        assert app.worker.count == 1
