"""End to end through a real mosquitto: windows and samples in, results and errors out."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from common.bundle import Bundle
from hailo_standin import faults
from helpers.mqtt import Probe
from helpers.nodes import NodeFactory
from helpers.programs import latent_tolerance
from helpers.waiting import unique, wait_until
from node.tools.local_broker import LocalBroker
from schemas import topics
from schemas.limits import BINARY_CONTENT_TYPE
from schemas.messages import ErrorReport, MotifResult, NodeModelState, NodeStatus, Telemetry


def raw_window(seed: int) -> np.ndarray:
    """A plausible raw IMU window (gravity on z, magnetometer field) rounded for JSON."""
    rng = np.random.default_rng(seed)
    base = np.array([0.0, 0.0, 9.81, 0.0, 0.0, 0.0, 20.0, 0.0, -45.0], dtype=np.float32)
    return (
        (base + rng.normal(0, [2, 2, 2, 0.5, 0.5, 0.5, 3, 3, 3], (100, 9)))
        .round(4)
        .astype(np.float32)
    )


def window_json(seq: int) -> bytes:
    """`raw_window(seq)` as the JSON window message a sensor publishes, with its seq."""
    return orjson.dumps({"x": raw_window(seq).tolist(), "seq": seq})


def onnx_reference(bundle: Bundle, window: np.ndarray) -> np.ndarray:
    """ONNX Runtime run directly on the normalised window: what the node must reproduce."""
    norm = bundle.manifest.normalization
    x = (window - np.asarray(norm.mean, np.float32)) / np.asarray(norm.std, np.float32)
    assert bundle.onnx is not None
    session = ort.InferenceSession(bundle.onnx, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: x[None].astype(np.float32)})[0][0])


def mosquitto_pub(broker: LocalBroker, topic: str, payload_file: Path) -> None:
    """Publish a file with the real mosquitto_pub client, as an engineer would."""
    port = str(broker.port)
    command = ["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-q", "1", "-t", topic]
    subprocess.run([*command, "-f", str(payload_file)], check=True, timeout=10)


def test_window_from_mosquitto_pub_comes_back_as_a_result(
    broker: LocalBroker,
    start_node: NodeFactory,
    probe: Probe,
    reference_bundle: Bundle,
    backend: str,
    serving_bundle_path: Path,
    tmp_path: Path,
) -> None:
    app = start_node()
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor))
    window = raw_window(1)
    payload = tmp_path / "window.json"
    payload.write_bytes(orjson.dumps({"x": window.tolist(), "seq": 7, "t0": 1700000000.5}))

    mosquitto_pub(broker, topics.window(sensor), payload)

    message = probe.wait_for(topics.motifs(sensor))[0]
    result = MotifResult.model_validate_json(message.payload)
    expected = onnx_reference(reference_bundle, window)
    # ONNX Runtime: equal to 1e-4; Hailo: within one step of the HEF's uint8 output quantisation
    atol = latent_tolerance(backend, serving_bundle_path)
    np.testing.assert_allclose(np.asarray(result.latent), expected, atol=atol)
    assert len(result.motif_scores) == 12
    assert sum(result.motif_scores) == pytest.approx(1.0, abs=1e-5)
    assert result.top_motif == int(np.argmax(result.motif_scores))
    assert result.model.name == "tcn-reference"
    assert result.model.version == "1.0.0"
    assert result.sensor_id == sensor
    assert result.node_id == app.node_id
    assert result.seq == 7
    assert result.t0 == 1700000000.5
    assert 0 < result.latency_ms < 5000
    assert not message.retain


def test_binary_frame_gives_the_same_latent_as_json(
    broker: LocalBroker, start_node: NodeFactory, probe: Probe, tmp_path: Path
) -> None:
    start_node()
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor))
    window = raw_window(2)
    frame = tmp_path / "window.f32"
    frame.write_bytes(window.astype("<f4").tobytes())
    as_json = tmp_path / "window.json"
    as_json.write_bytes(orjson.dumps({"x": window.tolist()}))

    mosquitto_pub(broker, topics.window(sensor), frame)  # MQTT 5 without content type: by size
    probe.publish(topics.window(sensor), frame.read_bytes())
    mosquitto_pub(broker, topics.window(sensor), as_json)

    results = [
        MotifResult.model_validate_json(m.payload) for m in probe.wait_for(topics.motifs(sensor), 3)
    ]
    for result in results[1:]:
        np.testing.assert_allclose(result.latent, results[0].latent, atol=1e-6)


def test_binary_frame_marked_by_content_type(start_node: NodeFactory, probe: Probe) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    start_node()
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor))
    frame = raw_window(3).astype("<f4").tobytes()
    properties = Properties(PacketTypes.PUBLISH)
    properties.ContentType = BINARY_CONTENT_TYPE
    probe.client.publish(topics.window(sensor), b"{" + frame[1:], qos=1, properties=properties)
    result = MotifResult.model_validate_json(probe.wait_for(topics.motifs(sensor))[0].payload)
    assert len(result.latent) == 64


def test_samples_are_windowed_with_the_configured_hop(
    start_node: NodeFactory, probe: Probe
) -> None:
    start_node(hop=25)
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor))
    stream = np.concatenate([raw_window(i) for i in range(3)])[:230]
    t0, rate = 1700000000.0, 100.0
    for start in range(0, 230, 23):  # runs that do not align with the hop
        run = stream[start : start + 23]
        payload = {
            "seq": 1000 + start,
            "t0": t0 + start / rate,
            "rate_hz": rate,
            "samples": run.tolist(),
        }
        probe.publish(topics.samples(sensor), orjson.dumps(payload))

    # 230 samples, windows start every 25: 0, 25, ..., 125 -> 6 windows (130 would need 230)
    results = [m.json() for m in probe.wait_for(topics.motifs(sensor), 6)]
    time.sleep(0.3)
    assert len(probe.on(topics.motifs(sensor))) == 6
    assert [r["seq"] for r in results] == [1000 + 25 * i for i in range(6)]
    for r in results:
        offset = r["seq"] - 1000
        assert r["t0"] == pytest.approx(t0 + offset / rate)
        assert r["t1"] == pytest.approx(t0 + (offset + 99) / rate)


def test_samples_give_the_same_latent_as_the_whole_window(
    start_node: NodeFactory, probe: Probe
) -> None:
    start_node(hop=100)
    sensor_a, sensor_b = unique("imu"), unique("imu")
    probe.subscribe(topics.motifs(sensor_a), topics.motifs(sensor_b))
    window = raw_window(4)
    probe.publish(topics.window(sensor_a), orjson.dumps({"x": window.tolist()}))
    for start in range(0, 100, 10):
        run = {"seq": start, "samples": window[start : start + 10].tolist()}
        probe.publish(topics.samples(sensor_b), orjson.dumps(run))
    a = probe.wait_for(topics.motifs(sensor_a))[0].json()
    b = probe.wait_for(topics.motifs(sensor_b))[0].json()
    np.testing.assert_allclose(a["latent"], b["latent"], atol=1e-6)


BAD_INPUTS = [
    ("window", b"not json at all", "malformed"),
    ("window", b'{"x": [[1, 2, 3]]}', "invalid"),
    ("window", orjson.dumps({"x": [[0.0] * 9] * 99}), "invalid"),
    ("window", orjson.dumps({"x": [[0.0] * 9] * 99 + [[0.0] * 10]}), "invalid"),
    ("window", orjson.dumps({"x": [[0.0] * 9] * 99 + [["a"] * 9]}), "invalid"),
    ("window", b'{"x": [' + b",".join([b"[NaN,0,0,0,0,0,0,0,0]"] * 100) + b"]}", "non_finite"),
    ("window", b'{"x": [' + b",".join([b"[1e999,0,0,0,0,0,0,0,0]"] * 100) + b"]}", "non_finite"),
    ("window", b"[" * 70000, "oversized"),
    ("window", orjson.dumps({"x": [[0.0] * 9] * 100, "seq": "seven"}), "invalid"),
    ("samples", orjson.dumps({"samples": [[0.0] * 9]}), "invalid"),
    ("samples", orjson.dumps({"seq": 0, "samples": []}), "invalid"),
    ("samples", orjson.dumps({"seq": 0, "samples": [[0.0] * 8]}), "invalid"),
    ("samples", orjson.dumps({"seq": 0, "rate_hz": -5, "samples": [[0.0] * 9]}), "invalid"),
    ("samples", b"\x00\x01\x02", "malformed"),
]


@pytest.mark.parametrize(("kind", "payload", "error"), BAD_INPUTS)
def test_bad_input_is_reported_and_the_node_keeps_serving(
    start_node: NodeFactory, probe: Probe, kind: str, payload: bytes, error: str
) -> None:
    app = start_node()
    sensor = unique("imu")
    probe.subscribe(topics.node_errors(app.node_id), topics.motifs(sensor))
    topic = f"imu/{sensor}/{kind}"

    probe.publish(topic, payload)
    report = ErrorReport.model_validate_json(
        probe.wait_for(topics.node_errors(app.node_id))[0].payload
    )
    assert report.kind == error
    assert report.topic == topic
    assert report.sensor_id == sensor
    assert len(report.reason) > 10

    probe.publish(topics.window(sensor), orjson.dumps({"x": raw_window(5).tolist()}))
    probe.wait_for(topics.motifs(sensor))
    assert app.metrics.totals()[4][error] == 1


def test_invalid_sensor_id_in_topic_is_reported(start_node: NodeFactory, probe: Probe) -> None:
    app = start_node()
    probe.subscribe(topics.node_errors(app.node_id))
    probe.publish("imu/bad id with spaces/window", orjson.dumps({"x": raw_window(6).tolist()}))
    report = probe.wait_for(topics.node_errors(app.node_id))[0].json()
    assert report["kind"] == "bad_topic"


def test_sequence_gaps_and_resets_are_reported(start_node: NodeFactory, probe: Probe) -> None:
    app = start_node(hop=50)
    sensor = unique("imu")
    probe.subscribe(topics.node_errors(app.node_id), topics.motifs(sensor))
    samples = raw_window(7)
    probe.publish(
        topics.samples(sensor), orjson.dumps({"seq": 0, "samples": samples[:60].tolist()})
    )
    probe.publish(topics.samples(sensor), orjson.dumps({"seq": 80, "samples": samples.tolist()}))
    probe.publish(
        topics.samples(sensor), orjson.dumps({"seq": 5, "samples": samples[:10].tolist()})
    )
    reports = [m.json() for m in probe.wait_for(topics.node_errors(app.node_id), 2)]
    assert [r["kind"] for r in reports] == ["sequence_gap", "sequence_reset"]
    assert "20 samples missing" in reports[0]["reason"]
    # the window after the gap starts at the new run and never spans the gap
    result = probe.wait_for(topics.motifs(sensor))[0].json()
    assert result["seq"] == 80

    window_sensor = unique("imu")
    for seq in (1, 2, 5):
        probe.publish(
            topics.window(window_sensor), orjson.dumps({"x": samples.tolist(), "seq": seq})
        )
    gap = probe.wait_for(
        topics.node_errors(app.node_id), where=lambda m: m.json()["sensor_id"] == window_sensor
    )[0].json()
    assert gap["kind"] == "sequence_gap"
    assert "2 windows missing" in gap["reason"]


def test_birth_model_state_and_telemetry(
    start_node: NodeFactory, probe: Probe, backend: str
) -> None:
    app = start_node(group="lab")
    probe.subscribe(topics.node_status(app.node_id), topics.node_model(app.node_id))
    status = NodeStatus.model_validate_json(
        probe.wait_for(topics.node_status(app.node_id))[0].payload
    )
    assert status.state == "online"
    assert status.backend == backend
    assert status.backend_reason == "requested"
    if backend == "hailo":
        assert status.device is not None
        assert status.device["architecture"] in {"HAILO8", "HAILO8L"}
    assert status.model is not None
    assert status.model.version == "1.0.0"
    assert status.config_digest == app.config.digest()
    assert status.group == "lab"
    assert status.software_version
    model = NodeModelState.model_validate_json(
        probe.wait_for(topics.node_model(app.node_id))[0].payload
    )
    assert model.state == "active"
    assert probe.on(topics.node_model(app.node_id))[0].retain

    sensor = unique("imu")
    probe.subscribe(topics.node_telemetry(app.node_id), topics.motifs(sensor))
    for seq in range(5):
        probe.publish(
            topics.window(sensor), orjson.dumps({"x": raw_window(seq).tolist(), "seq": seq})
        )
    probe.wait_for(topics.motifs(sensor), 5)
    telemetry = probe.wait_for(
        topics.node_telemetry(app.node_id), where=lambda m: m.json()["windows_done"] >= 5
    )[0]
    parsed = Telemetry.model_validate_json(telemetry.payload)
    assert parsed.windows_in == parsed.windows_done == parsed.results_published == 5
    assert parsed.backend == backend
    if backend == "hailo":
        assert parsed.accelerator_temperature_c is not None
        assert parsed.device is not None
    assert parsed.rss_mb > 0
    assert parsed.queue_capacity == app.config.queue_size


def test_overload_drops_are_counted_and_reported_never_silent(
    start_node: NodeFactory, probe: Probe
) -> None:
    app = start_node(queue_size=2, max_batch=1)
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor), topics.node_errors(app.node_id))
    body = orjson.dumps({"x": raw_window(8).tolist()})
    sent = 300
    for _ in range(sent):
        probe.client.publish(topics.window(sensor), body, qos=1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        _, done, _, dropped, _ = app.metrics.totals()
        if done + dropped.get("queue_full", 0) >= sent and app.queue.empty():
            break
        time.sleep(0.05)
    _windows_in, done, _published, dropped, errors = app.metrics.totals()
    assert done + dropped.get("queue_full", 0) == sent  # every window is accounted for
    assert errors.get("queue_full", 0) == dropped.get("queue_full", 0)
    if dropped.get("queue_full"):
        probe.wait_for(
            topics.node_errors(app.node_id), where=lambda m: m.json()["kind"] == "queue_full"
        )
    probe.wait_for(topics.motifs(sensor), done)


def test_two_nodes_with_one_id_are_reported(
    start_node: NodeFactory, probe: Probe, tmp_path: Path
) -> None:
    faults.set_faults(devices=2)  # on Hailo, two nodes in one process need two chips
    node_id = unique("twin")
    probe.subscribe(topics.node_errors(node_id))
    first = start_node(node_id=node_id)
    second = start_node(node_id=node_id, spool_dir=tmp_path / "other-machine")
    report = probe.wait_for(
        topics.node_errors(node_id), where=lambda m: m.json()["kind"] == "duplicate_node_id"
    )[0].json()
    assert first.instance in report["reason"]
    assert "exit status 76" in report["reason"]
    wait_until(first.session.taken_over.is_set, what="the first process to give way")
    wait_until(lambda: first.fatal is not None, what="the first process to take exit status 76")
    assert first.fatal_status == 76
    wait_until(lambda: second.session.is_connected, what="the newer process to serve")
    settled = second.session.counters.disconnects  # at most a turn or two before the first gave way
    time.sleep(1.5)
    assert second.session.is_connected
    assert not second.session.taken_over.is_set()
    assert second.session.counters.disconnects == settled  # no ping-pong


@pytest.mark.parametrize("qos", [0, 1])
def test_results_go_out_at_the_configured_qos(
    start_node: NodeFactory, broker: LocalBroker, qos: int
) -> None:
    node = start_node(results_qos=qos)
    sensor = unique("imu")
    delivered: list[int] = []
    listener = mqtt.Client(CallbackAPIVersion.VERSION2, unique("listener"))
    listener.on_message = lambda _c, _u, message: delivered.append(message.qos)
    host, port = broker.url.removeprefix("mqtt://").rsplit(":", 1)
    listener.connect(host, int(port))
    listener.subscribe(topics.motifs(sensor), qos=1)  # the broker delivers at min(pub, sub)
    listener.loop_start()
    try:
        time.sleep(0.3)
        sender = Probe(broker.url)
        for seq in range(10):
            sender.publish(
                topics.window(sensor), orjson.dumps({"x": raw_window(seq).tolist(), "seq": seq})
            )
        sender.close()
        wait_until(lambda: len(delivered) == 10, what="10 results")
        assert set(delivered) == {qos}
        wait_until(lambda: node.ingest.acks.held() == 0, what="every window acknowledged")
    finally:
        listener.loop_stop()
        listener.disconnect()


def test_shared_subscription_serves_each_window_once(start_node: NodeFactory, probe: Probe) -> None:
    faults.set_faults(devices=2)
    group = unique("share")
    nodes = [start_node(share_group=group) for _ in range(2)]
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor))
    for seq in range(40):
        probe.publish(
            topics.window(sensor), orjson.dumps({"x": raw_window(seq).tolist(), "seq": seq})
        )
    results = [m.json() for m in probe.wait_for(topics.motifs(sensor), 40)]
    time.sleep(0.3)
    assert sorted(m.json()["seq"] for m in probe.on(topics.motifs(sensor))) == list(range(40))
    assert {r["node_id"] for r in results} <= {n.node_id for n in nodes}
