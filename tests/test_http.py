"""The node's HTTP side over real sockets: /healthz, /readyz, /metrics, POST /infer (EdgeInfer)."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_node_e2e import onnx_reference, raw_window

from common.bundle import Bundle
from common.http import parse_listen
from helpers.mqtt import Probe
from helpers.nodes import NodeFactory
from helpers.programs import latent_tolerance
from helpers.waiting import unique, wait_until
from node.app import NodeApp
from node.config import load_config
from node.errors import ConfigError
from node.tools.local_broker import LocalBroker
from schemas import topics
from schemas.limits import BINARY_CONTENT_TYPE, MAX_WINDOW_BYTES


def call(
    app: NodeApp, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    assert app.http is not None
    host, port = app.http.address
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def infer(app: NodeApp, window: np.ndarray) -> tuple[int, dict[str, Any]]:
    status, _, body = call(app, "POST", "/infer", orjson.dumps({"x": window.tolist()}),
                           **{"Content-Type": "application/json"})  # fmt: skip
    return status, json.loads(body)


@pytest.fixture
def served(start_node: NodeFactory) -> NodeApp:
    return start_node(http_listen="127.0.0.1:0")


def test_infer_answers_like_edgeinfer_with_the_nodes_model(
    served: NodeApp, reference_bundle: Bundle, backend: str, serving_bundle_path: Path
) -> None:
    window = raw_window(11)
    status, result = infer(served, window)
    assert status == 200
    expected = onnx_reference(reference_bundle, window)
    atol = latent_tolerance(backend, serving_bundle_path)
    np.testing.assert_allclose(result["latent"], expected, atol=atol)
    assert len(result["motif_scores"]) == 12
    assert sum(result["motif_scores"]) == pytest.approx(1.0, abs=1e-5)
    assert result["top_motif"] == int(np.argmax(result["motif_scores"]))
    assert result["model"] == {"name": "tcn-reference", "version": "1.0.0"}
    assert result["node_id"] == served.node_id
    assert result["latency_ms"] > 0


def test_a_binary_frame_gives_the_json_answer(served: NodeApp) -> None:
    window = raw_window(12)
    _, as_json = infer(served, window)
    status, _, body = call(served, "POST", "/infer", window.astype("<f4").tobytes(),
                           **{"Content-Type": BINARY_CONTENT_TYPE})  # fmt: skip
    assert status == 200
    np.testing.assert_allclose(json.loads(body)["latent"], as_json["latent"], atol=1e-6)


def test_http_windows_are_not_published_on_mqtt(served: NodeApp, probe: Probe) -> None:
    probe.subscribe(topics.MOTIFS_FILTER)
    sensor = unique("imu")
    infer(served, raw_window(13))
    probe.publish(topics.window(sensor), orjson.dumps({"x": raw_window(14).tolist()}))
    probe.wait_for(topics.motifs(sensor))
    assert [m.topic for m in probe.on(topics.MOTIFS_FILTER)] == [topics.motifs(sensor)]


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"{not json", "malformed"),
        (orjson.dumps({"x": [[0.0] * 9] * 99}), "invalid"),
        (b'{"x": [[NaN, 0, 0, 0, 0, 0, 0, 0, 0]]}', "non_finite"),
    ],
)
def test_bad_windows_get_400_with_the_reason(served: NodeApp, body: bytes, kind: str) -> None:
    status, _, answer = call(served, "POST", "/infer", body)
    assert status == 400
    reply = json.loads(answer)
    assert reply["error"] == kind
    assert reply["reason"]
    assert infer(served, raw_window(15))[0] == 200  # and the node keeps serving


def test_an_oversized_body_is_refused_unread(served: NodeApp) -> None:
    status, headers, answer = call(served, "POST", "/infer", b" " * (MAX_WINDOW_BYTES + 1))
    assert status == 413
    assert headers["Connection"] == "close"  # the unread body must not be taken for a request
    assert json.loads(answer)["error"] == "oversized"


def test_a_body_without_length_is_refused(served: NodeApp) -> None:
    assert served.http is not None
    connection = http.client.HTTPConnection(*served.http.address, timeout=10)
    connection.putrequest("POST", "/infer")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 411
    connection.close()


def test_unknown_paths_say_what_exists(served: NodeApp) -> None:
    status, _, body = call(served, "GET", "/nope")
    assert status == 404
    assert "/healthz" in json.loads(body)["reason"]


def test_health_and_readiness(served: NodeApp, backend: str) -> None:
    status, _, body = call(served, "GET", "/healthz")
    assert status == 200
    health = json.loads(body)
    assert health["status"] == "ok"
    assert health["ok"] is True
    assert health["backend"] == backend
    assert (health["model"], health["model_version"]) == ("tcn-reference", "1.0.0")
    status, _, body = call(served, "GET", "/readyz")
    assert status == 200
    assert json.loads(body) == {
        "ready": True,
        "checks": {
            "broker_connected": True,
            "serving": True,
            "backend_healthy": True,
            "model_manager": True,
            "supervised": True,
            "queue_has_room": True,
        },
    }


def test_readiness_fails_while_the_broker_is_away(start_node: NodeFactory) -> None:
    own = LocalBroker("mosquitto").start()
    app = start_node(broker=own.url, http_listen="127.0.0.1:0")
    own.stop()
    wait_until(lambda: not app.session.is_connected, what="the node to see the broker gone")
    status, _, body = call(app, "GET", "/readyz")
    assert status == 503
    assert json.loads(body)["checks"]["broker_connected"] is False
    assert call(app, "GET", "/healthz")[0] == 200  # alive, just not ready


def test_metrics_count_what_the_node_did(served: NodeApp, probe: Probe, backend: str) -> None:
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor))
    probe.publish(topics.window(sensor), orjson.dumps({"x": raw_window(16).tolist()}))
    probe.wait_for(topics.motifs(sensor))
    probe.subscribe(topics.node_errors(served.node_id))
    probe.publish(topics.window(sensor), b"{broken")
    probe.wait_for(topics.node_errors(served.node_id))  # counted before it is reported
    infer(served, raw_window(17))
    status, headers, body = call(served, "GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert samples[("imu_node_windows_inferred_total", ())] == 2
    assert samples[("imu_node_results_published_total", ())] == 1  # the HTTP one is answered
    assert samples[("imu_node_errors_total", (("kind", "malformed"),))] == 1
    assert samples[("imu_node_window_latency_seconds_count", ())] == 2
    assert samples[("imu_node_window_latency_seconds_bucket", (("le", "+Inf"),))] == 2
    assert samples[("imu_node_mqtt_connected", ())] == 1
    assert samples[("imu_node_spool_messages", ())] == 0
    assert samples[("imu_node_backend_healthy", ())] == 1
    assert samples[("imu_node_backend_rebuilds_total", ())] == 0
    assert samples[("imu_node_watchdog_stalls_total", ())] == 0
    if backend == "hailo":  # the stand-in's queue for this HEF, as HailoRT derives it
        assert samples[("imu_node_accelerator_async_queue_frames", ())] == 32
    info = next(labels for (name, labels) in samples if name == "imu_node_info")
    assert ("backend", backend) in info
    assert ("model_version", "1.0.0") in info
    assert ("node_id", served.node_id) in info
    assert ("process_resident_memory_bytes", ()) in samples


@pytest.mark.parametrize("backend", ["onnx"], indirect=True)
def test_a_full_queue_answers_503_and_a_stuck_one_504(
    broker: LocalBroker, serving_bundle_path: Path
) -> None:
    """A node that is built but not started: nothing drains its queue."""
    config = load_config(node_id=unique("idle"), model=serving_bundle_path, broker=broker.url,
                         backend="onnx", http_listen="127.0.0.1:0", queue_size=1,
                         http_infer_timeout_s=0.3, spool_max_mb=0)  # fmt: skip
    app = NodeApp.open(config)
    assert app.http is not None
    try:
        body = orjson.dumps({"x": raw_window(18).tolist()})
        stuck = app.http.infer(body, None)
        assert stuck.status == 504
        assert json.loads(stuck.body)["error"] == "timeout"
        assert app.queue.full()
        busy = app.http.infer(body, None)
        assert busy.status == 503
        assert ("Retry-After", "1") in busy.headers
        assert app.metrics.totals()[3] == {"queue_full": 1}
    finally:
        app.http.stop()
        app.outbox.stop()
        app.worker.pipeline.close()


def test_a_stopping_node_refuses_work_on_open_connections(start_node: NodeFactory) -> None:
    app = start_node(http_listen="127.0.0.1:0")
    assert app.http is not None
    connection = http.client.HTTPConnection(*app.http.address, timeout=10)
    body = orjson.dumps({"x": raw_window(19).tolist()})
    connection.request("POST", "/infer", body=body)
    first = connection.getresponse()
    first.read()
    assert first.status == 200
    app.stop("test finished")  # the keep-alive connection is still open
    connection.request("POST", "/infer", body=body)
    second = connection.getresponse()
    assert second.status == 503
    assert json.loads(second.read())["error"] == "stopping"
    assert second.getheader("Connection") == "close"
    connection.close()


def test_a_taken_port_is_a_clear_error_and_frees_the_spool(
    served: NodeApp, serving_bundle_path: Path, backend: str
) -> None:
    assert served.http is not None
    host, port = served.http.address
    settings = {"node_id": unique("late"), "model": serving_bundle_path, "backend": backend,
                "http_listen": f"{host}:{port}"}  # fmt: skip
    with pytest.raises(ConfigError, match=f"cannot serve HTTP on {host}:{port}"):
        NodeApp.open(load_config(**settings))
    settings["http_listen"] = f"{host}:0"
    again = NodeApp.open(load_config(**settings))  # the spool and the device were released
    try:
        assert again.http is not None
    finally:
        again.outbox.stop()
        if again.http is not None:
            again.http.stop()
        again.worker.pipeline.close()


def test_listen_addresses() -> None:
    assert parse_listen("0.0.0.0:9108") == ("0.0.0.0", 9108)
    assert parse_listen(":9108") == ("127.0.0.1", 9108)  # loopback unless asked otherwise
    assert parse_listen("9108") == ("127.0.0.1", 9108)
    assert parse_listen("[::1]:80") == ("::1", 80)
    for bad in ("99999", "host:", "host:99999", "host:port"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_listen(bad)


# -- who may call it --------------------------------------------------------------------------


def test_beyond_loopback_needs_a_token_or_a_deliberate_open(
    broker: LocalBroker, serving_bundle_path: Path, tmp_path: Path
) -> None:
    base = {"broker": broker.url, "model": serving_bundle_path, "backend": "onnx"}
    with pytest.raises(ConfigError, match="set http_token_file"):
        load_config(**base, http_listen="0.0.0.0:9108")
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    assert load_config(**base, http_listen="0.0.0.0:9108", http_token_file=token).http_open is False
    assert load_config(**base, http_listen="0.0.0.0:9108", http_open=True).http_open
    with pytest.raises(ConfigError, match="http_tls_cert and http_tls_key go together"):
        load_config(**base, http_tls_cert=token)


@pytest.mark.parametrize("backend", ["onnx"], indirect=True)
def test_a_token_guards_infer_and_metrics_not_health(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    app = start_node(http_listen="127.0.0.1:0", http_token_file=token)
    body = orjson.dumps({"x": raw_window(21).tolist()})
    for method, path, payload in (("GET", "/metrics", None), ("POST", "/infer", body)):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            status, got, reply = call(app, method, path, payload, **headers)
            assert status == 401, (path, headers)
            assert got["WWW-Authenticate"].startswith("Bearer")
            assert json.loads(reply)["error"] == "unauthorized"
        status, _, _ = call(app, method, path, payload, Authorization="Bearer s3cret-token")
        assert status == 200
    for path in ("/healthz", "/readyz"):
        assert call(app, "GET", path)[0] == 200
    assert not app.metrics.totals()[4]


@pytest.mark.parametrize("backend", ["onnx"], indirect=True)
def test_https_serves_with_the_configured_certificate_and_a_stalled_handshake_blocks_nobody(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    import socket
    import ssl

    from fleet import pki

    site = pki.Layout(tmp_path / "site")
    pki.init_site(site.root, site="http", hosts=("127.0.0.1",))
    app = start_node(
        http_listen="127.0.0.1:0",
        http_tls_cert=site.broker_certs / "server.crt",
        http_tls_key=site.broker_certs / "server.key",
    )
    assert app.http is not None
    host, port = app.http.address
    stalled = socket.create_connection((host, port), timeout=5)  # never says hello
    try:
        context = ssl.create_default_context(cafile=str(site.ca_cert))
        secure = http.client.HTTPSConnection(host, port, timeout=10, context=context)
        secure.request("GET", "/healthz")
        assert secure.getresponse().status == 200
        secure.close()

        def plain_get() -> int:
            plain = http.client.HTTPConnection(host, port, timeout=5)
            try:
                plain.request("GET", "/healthz")
                return plain.getresponse().status
            finally:
                plain.close()

        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            plain_get()
    finally:
        stalled.close()
