"""The node against what real devices do: any async queue size, hangs mid-stream, stuck calls.

Hailo behaviour comes from the hailo_platform stand-in (its queue size is the HEF's, as HailoRT
computes it, unless a test forces one); a stuck ONNX Runtime call comes from a wrapper around the
real ONNX backend whose call blocks until the watchdog aborts it. Every test prints how long
serving stopped, measured from the results a subscriber received.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import pytest
from test_node_e2e import raw_window
from test_node_e2e import window_json as window

from common.bundle import Bundle, read_bundle
from hailo_standin import faults
from helpers.mqtt import Probe, Received
from helpers.nodes import NodeFactory
from helpers.waiting import unique, wait_until
from node.app import NodeApp
from node.config import load_config
from node.tools.local_broker import LocalBroker
from runtime.backend import (
    BackendInfo,
    BackendOptions,
    FloatArray,
    InferenceBackend,
    InferenceOutput,
)
from runtime.errors import BackendError
from runtime.onnx_backend import OnnxBackend
from runtime.pipeline import ModelPipeline, cosine_similarity
from schemas import topics

HAILO = pytest.mark.parametrize("backend", ["hailo"], indirect=True)


@pytest.fixture(autouse=True)
def healthy_device() -> None:
    """Every test starts with a healthy stand-in device."""
    faults.reset()


def onnx_latents(bundle: Bundle, seqs: list[int]) -> np.ndarray:
    """ONNX Runtime on the normalised windows, one session: what the node must reproduce."""
    assert bundle.onnx is not None
    norm = bundle.manifest.normalization
    session = ort.InferenceSession(bundle.onnx, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rows = []
    for seq in seqs:
        x = (raw_window(seq) - np.asarray(norm.mean, np.float32)) / np.asarray(norm.std, np.float32)
        rows.append(session.run(None, {name: x[None].astype(np.float32)})[0][0])
    return np.asarray(rows, np.float32)


def publish_paced(probe: Probe, sensor: str, seqs: range, rate_hz: float) -> None:
    period = 1.0 / rate_hz
    start = time.monotonic()
    for i, seq in enumerate(seqs):
        delay = start + i * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        probe.publish(topics.window(sensor), window(seq))


def serving_gap_s(results: list[Received], arrivals: dict[int, float]) -> float:
    """The longest time between two consecutive results reaching the subscriber."""
    times = sorted(arrivals[m.json()["seq"]] for m in results)
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


class Arrivals:
    """When each result reached the subscriber (by seq)."""

    def __init__(self, probe: Probe, sensor: str) -> None:
        self.at: dict[int, float] = {}
        original = probe._on_message

        def record(client: object, userdata: object, message: object) -> None:
            if getattr(message, "topic", "") == topics.motifs(sensor):
                seq = orjson.loads(message.payload)["seq"]  # type: ignore[attr-defined]
                self.at.setdefault(seq, time.monotonic())
            original(client, userdata, message)  # type: ignore[arg-type]

        probe.client.on_message = record


# -- the device's async queue -------------------------------------------------------------------


@HAILO
@pytest.mark.parametrize("queue_size", [1, 2, 4, 8, 16, 0])
def test_node_serves_on_any_async_queue_size(
    start_node: NodeFactory,
    hailo_bundle_path: Path,
    reference_bundle: Bundle,
    probe: Probe,
    queue_size: int,
) -> None:
    """1..16 forced (1 is below every default); 0: what HailoRT derives for this HEF (32)."""
    faults.set_faults(async_queue_size=queue_size, latency_ms=2)
    app = start_node(backend="hailo", model=hailo_bundle_path, max_batch=16, batch_wait_ms=20)
    plan = app.worker.pipeline.info.detail
    expected_queue = queue_size or 32
    assert plan["async_queue_size"] == expected_queue
    assert int(plan["frames_per_job"]) * int(plan["max_jobs"]) <= expected_queue
    assert int(plan["frames_per_job"]) <= 8  # the configured bounds still hold
    assert int(plan["max_jobs"]) <= 4
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor))
    seqs = list(range(40))
    for seq in seqs:  # a burst: batches of up to 16 frames meet a queue of `queue_size`
        probe.publish(topics.window(sensor), window(seq))
    results = {m.json()["seq"]: m.json() for m in probe.wait_for(topics.motifs(sensor), 40)}
    assert sorted(results) == seqs
    got = np.asarray([results[s]["latent"] for s in seqs], np.float32)
    cosine = cosine_similarity(got, onnx_latents(reference_bundle, seqs))
    assert float(cosine.min()) >= 0.99
    assert app.metrics.totals()[3] == {}  # nothing dropped
    assert not app.metrics.totals()[4]  # nothing failed


@HAILO
def test_describe_and_telemetry_show_what_the_device_allows(
    start_node: NodeFactory, hailo_bundle_path: Path, probe: Probe
) -> None:
    faults.set_faults(async_queue_size=3)
    app = start_node(
        backend="hailo", model=hailo_bundle_path, hailo_frames_per_job=2, hailo_max_jobs=8
    )
    probe.subscribe(topics.node_telemetry(app.node_id))
    device = probe.wait_for(topics.node_telemetry(app.node_id))[0].json()["device"]
    assert (device["async_queue_size"], device["frames_per_job"], device["max_jobs"]) == (3, 2, 1)


# -- a Hailo device that hangs mid-stream -------------------------------------------------------


@HAILO
def test_a_hang_mid_stream_is_recovered_without_a_person(
    start_node: NodeFactory, hailo_bundle_path: Path, probe: Probe
) -> None:
    app = start_node(backend="hailo", model=hailo_bundle_path, hailo_timeout_ms=200, max_batch=4)
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor), topics.node_errors(app.node_id))
    arrivals = Arrivals(probe, sensor)
    faults.set_faults(hang_after_frames=60, hang_until="reset")  # the chip stops mid-stream
    publish_paced(probe, sensor, range(150), rate_hz=100)
    results = probe.wait_for(topics.motifs(sensor), 150, timeout=30)
    seqs = [m.json()["seq"] for m in results]
    assert sorted(seqs) == list(range(150))  # nothing lost, nothing run twice
    report = probe.wait_for(
        topics.node_errors(app.node_id), where=lambda m: m.json()["kind"] == "backend_recovery"
    )[0].json()
    assert "rebuilt the hailo backend" in report["reason"]
    gap = serving_gap_s(results, arrivals.at)
    print(f"\nhang mid-stream: serving stopped for {gap:.2f} s; node says: {report['reason']}")
    assert gap < 5.0  # two device timeouts, a rebuild and its golden check
    assert app.worker.pipeline.info.name == "hailo"
    assert app.metrics.totals()[3] == {}
    assert app.readiness()["backend_healthy"]
    assert app.recovery.stats().rebuilds == 1


@HAILO
def test_a_hang_that_outlasts_rebuilds_is_reported_until_it_clears(
    start_node: NodeFactory, hailo_bundle_path: Path, probe: Probe
) -> None:
    app = start_node(backend="hailo", model=hailo_bundle_path, hailo_timeout_ms=100, max_batch=1)
    sensor = unique("imu")
    probe.subscribe(
        topics.motifs(sensor), topics.node_errors(app.node_id), topics.node_telemetry(app.node_id)
    )
    faults.set_faults(hang_after_frames=0, hang_until="never")  # only a reboot would help
    probe.publish(topics.window(sensor), window(0))
    failed = probe.wait_for(
        topics.node_errors(app.node_id),
        where=lambda m: "rebuilding it failed" in m.json()["reason"],
        timeout=15,
    )[0].json()
    assert failed["kind"] == "backend_recovery"
    assert "next try in" in failed["reason"]
    assert not app.readiness()["backend_healthy"]
    telemetry = probe.wait_for(
        topics.node_telemetry(app.node_id), where=lambda m: not m.json()["backend_healthy"]
    )[0].json()
    assert telemetry["backend_rebuilds"] == 0
    probe.wait_for(topics.node_errors(app.node_id), where=lambda m: m.json()["kind"] == "inference")
    faults.set_faults(hang_after_frames=-1)  # the chip comes back (say, after a power cycle)
    wait_until(lambda: app.recovery.stats().failed_rebuilds >= 1)
    for seq in range(1, 4):
        time.sleep(0.5)  # past the 1 s back-off, a batch finds the backend rebuilt
        probe.publish(topics.window(sensor), window(seq))
    results = probe.wait_for(topics.motifs(sensor), 1, timeout=15)
    assert results[0].json()["seq"] >= 1
    wait_until(lambda: app.readiness()["backend_healthy"], what="backend healthy again")
    assert app.worker.pipeline.info.name == "hailo"
    assert app.metrics.totals()[3].get("inference_failed", 0) >= 1  # counted, reported


# -- a stuck call (the watchdog) ----------------------------------------------------------------


class StuckOnce(InferenceBackend):
    """The real ONNX backend, except that one call blocks until aborted (or forever)."""

    def __init__(self, bundle: Bundle, *, honours_abort: bool = True) -> None:
        self.inner = OnnxBackend.from_bundle(bundle, BackendOptions())
        self.honours_abort = honours_abort
        self.stick = threading.Event()
        self.entered = threading.Event()
        self.release = threading.Event()

    def infer(self, windows: FloatArray) -> InferenceOutput:
        if self.stick.is_set():
            self.entered.set()
            self.release.wait(60)
            msg = "call aborted"
            raise BackendError(msg)
        return self.inner.infer(windows)

    def abort(self) -> None:
        if self.honours_abort:
            self.release.set()

    def describe(self) -> BackendInfo:
        return self.inner.describe()  # "onnx": the recovery rebuilds a plain ONNX backend

    def close(self) -> None:
        self.inner.close()


def node_on(backend: StuckOnce, bundle: Bundle, broker: LocalBroker, **settings: object) -> NodeApp:
    """A started node serving `backend`; returns once its birth is on the broker."""
    config = load_config(
        broker=broker.url, node_id=unique("node"), model=bundle.path, backend="onnx", **settings
    )
    pipeline = ModelPipeline(bundle, backend)
    pipeline.golden_check()
    app = NodeApp(config, pipeline)
    watcher = Probe(broker.url).subscribe(topics.node_status(app.node_id))
    app.start()
    watcher.wait_for(
        topics.node_status(app.node_id), where=lambda m: m.json()["instance"] == app.instance
    )
    watcher.close()
    return app


def test_watchdog_aborts_a_stuck_call_and_the_node_serves_on(
    broker: LocalBroker, reference_bundle_path: Path, probe: Probe
) -> None:
    bundle = read_bundle(reference_bundle_path)
    stuck = StuckOnce(bundle)
    app = node_on(stuck, bundle, broker, inference_deadline_ms=300)
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor), topics.node_errors(app.node_id))
    try:
        stuck.stick.set()
        started = time.monotonic()
        probe.publish(topics.window(sensor), window(0))
        assert stuck.entered.wait(10)
        result = probe.wait_for(topics.motifs(sensor), timeout=10)[0].json()
        gap = time.monotonic() - started
        print(f"\nstuck ONNX call: result after {gap:.2f} s (deadline 0.3 s)")
        assert result["seq"] == 0  # the stuck batch ran again on the rebuilt backend
        kinds = [m.json()["kind"] for m in probe.wait_for(topics.node_errors(app.node_id), 2)]
        assert kinds[:2] == ["watchdog", "backend_recovery"]
        assert app.watchdog.stalls == 1
        assert app.worker.pipeline.backend is not stuck
        assert app.readiness()["backend_healthy"]
        assert app.fatal is None
        probe.publish(topics.window(sensor), window(1))
        assert probe.wait_for(topics.motifs(sensor), 2)[1].json()["seq"] == 1
    finally:
        app.stop()


def test_a_call_that_ignores_its_abort_makes_the_node_exit_for_a_restart(
    broker: LocalBroker, reference_bundle_path: Path, probe: Probe
) -> None:
    bundle = read_bundle(reference_bundle_path)
    stuck = StuckOnce(bundle, honours_abort=False)
    app = node_on(stuck, bundle, broker, inference_deadline_ms=200, drain_timeout_s=0.5)
    fatal = threading.Event()
    app.on_fatal = fatal.set
    sensor = unique("imu")
    probe.subscribe(topics.node_errors(app.node_id))
    try:
        stuck.stick.set()
        probe.publish(topics.window(sensor), window(0))
        assert fatal.wait(10)
        assert app.fatal is not None
        assert "still runs" in app.fatal
        reports = probe.wait_for(topics.node_errors(app.node_id), 2)
        assert [m.json()["kind"] for m in reports] == ["watchdog", "watchdog"]
    finally:
        stuck.release.set()
        app.stop()


def test_closing_a_backend_with_a_stuck_call_returns_within_seconds(
    hailo_bundle_path: Path,
) -> None:
    """SIGTERM during a hung call: close() aborts the call instead of waiting on it."""
    from runtime.hailo_backend import HailoBackend

    bundle = read_bundle(hailo_bundle_path)
    backend = HailoBackend(bundle, BackendOptions(timeout_ms=30_000))
    faults.set_faults(hang_after_frames=0, hang_until="never")
    errors: list[BaseException] = []

    def call() -> None:
        try:
            backend.infer(np.zeros((1, 100, 9), np.float32))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    time.sleep(0.3)  # the call is now waiting on the hung chip
    started = time.monotonic()
    backend.close()
    took = time.monotonic() - started
    thread.join(5)
    print(f"\nclose() with a hung call took {took:.2f} s")
    assert not thread.is_alive()
    assert errors
    assert isinstance(errors[0], BackendError)
