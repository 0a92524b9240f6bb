"""The FastAPI "HailoRT TCN inference sidecar" contract, walked endpoint by endpoint against a
real node over real sockets (written from the issue that lists what the sidecar answered).

The sidecar's own validation script makes six checks and calls a deployment good at 80%; every
one of them is here, then each endpoint and field the sidecar had, then the node's answers while
it has no model, and what a token guards.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_http import call

from common.bundle import read_bundle
from common.signing import generate_keys, load_private_key
from fleet.bundles.builder import sign_bundle
from fleet.desired import desired_for, scoped
from fleet.distribution import publish_bundle
from helpers.mqtt import Probe
from helpers.nodes import NodeFactory
from helpers.waiting import unique, wait_until
from node.app import NodeApp
from node.config import load_config
from node.tools.local_broker import LocalBroker, free_port
from schemas import topics
from schemas.codec import encode
from schemas.export import openapi_json
from schemas.http import Health, ServiceStatus
from schemas.messages import MotifResult, WindowMessage
from schemas.openapi import ENDPOINTS

SIDECAR_METRICS = (
    "hailo_inference_requests_total",
    "hailo_inference_duration_seconds",
    "hailo_model_loaded",
    "hailo_sidecar_start_time_seconds",
)
"""The sidecar script's metrics check wants at least two of these in the text."""


def get_json(app: NodeApp, path: str, **headers: str) -> tuple[int, dict[str, Any]]:
    status, _, body = call(app, "GET", path, **headers)
    return status, json.loads(body)


def post_window(app: NodeApp, window: np.ndarray) -> tuple[int, dict[str, Any]]:
    status, _, body = call(app, "POST", "/infer", orjson.dumps({"x": window.tolist()}),
                           **{"Content-Type": "application/json"})  # fmt: skip
    return status, json.loads(body)


def walking(seed: int = 0) -> np.ndarray:
    """The sidecar script's "walking pattern": periodic acceleration and rotation, some noise."""
    t = np.arange(100) / 100.0
    rng = np.random.default_rng(seed)
    x = np.zeros((100, 9))
    x[:, 0] = 0.3 * np.sin(2 * np.pi * 2 * t)
    x[:, 2] = 9.81 + 0.8 * np.sin(2 * np.pi * 2 * t + 0.5)
    x[:, 4] = 0.4 * np.cos(2 * np.pi * 2 * t)
    x[:, 6:] = [22.0, -5.0, 41.0]
    return (x + rng.normal(0, 0.05, x.shape)).astype(np.float32)


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def served(start_node: NodeFactory) -> NodeApp:
    return start_node(http_listen="127.0.0.1:0")


# -- the sidecar's six checks ----------------------------------------------------------------


def test_the_sidecar_validation_script_scores_six_of_six(served: NodeApp) -> None:
    assert call(served, "GET", "/healthz")[0] == 200  # 1. health
    status, report = get_json(served, "/status")  # 2. status, every key printable
    assert status == 200
    assert all(isinstance(key, str) for key in report)
    zeros = np.zeros((100, 9), np.float32)
    for window in (zeros, walking()):  # 4 and 5: zeros, then the walking pattern
        status, result = post_window(served, window)
        assert status == 200, result
        assert (len(result["latent"]), len(result["motif_scores"])) == (64, 12)
        MotifResult.model_validate(result)
    # (the latents' values against the reference model: tests/test_http.py)
    with ThreadPoolExecutor(5) as pool:  # 6. load test: 5 concurrent calls
        answers = list(pool.map(lambda i: post_window(served, walking(i)), range(5)))
    assert [status for status, _ in answers] == [200] * 5
    status, _, text = call(served, "GET", "/metrics")  # 3. metrics, while windows are served
    assert status == 200
    present = [name for name in SIDECAR_METRICS if name in text.decode()]
    assert present == list(SIDECAR_METRICS), "the script needs 2 of 4; all 4 are there"


# -- each endpoint and field -------------------------------------------------------------------


def test_service_discovery_names_the_service_its_version_endpoints_and_docs(
    served: NodeApp,
) -> None:
    status, index = get_json(served, "/")
    assert status == 200
    assert index["service"] == "imu-node"
    assert index["version"]
    assert index["api_version"]
    assert set(index["endpoints"]) == {e.key for e in ENDPOINTS}
    assert (index["docs"], index["openapi"]) == ("/docs", "/openapi.json")


def test_healthz_carries_the_sidecar_fields_beside_the_nodes(served: NodeApp, backend: str) -> None:
    post_window(served, walking(3))
    status, health = get_json(served, "/healthz")
    assert status == 200
    Health.model_validate(health)
    assert health["ok"] is True
    assert health["model"] == "tcn-reference"  # a string, as the sidecar had it
    assert isinstance(health["uptime_s"], int)
    assert health["config_version"] == "1.0.0"
    assert health["device"] == ("hailo8" if backend == "hailo" else "cpu")
    bundle = read_bundle(served.config.model) if served.config.model else None
    assert bundle is not None
    hef = bundle.manifest.files.get("model.hef")
    assert health["hef_sha256"] == (hef.sha256 if hef else None)
    assert health["latency_ms"] > 0
    assert health["version"]
    assert (health["node_id"], health["backend"]) == (served.node_id, backend)


def test_status_reports_model_device_and_endpoints(served: NodeApp, backend: str) -> None:
    status, report = get_json(served, "/status")
    assert status == 200
    ServiceStatus.model_validate(report)
    assert report["model"]["loaded"] is True
    assert (report["model"]["name"], report["model"]["version"]) == ("tcn-reference", "1.0.0")
    assert report["model"]["backend"] == backend
    assert report["api_version"]
    installed = importlib.util.find_spec("hailo_platform") is not None  # the stand-in, here
    assert report["hailort_available"] is installed
    assert set(report["endpoint_status"]) == {e.key for e in ENDPOINTS}
    assert set(report["endpoint_status"].values()) == {"ok"}
    assert report["device"]["healthy"] is True
    if backend == "hailo":  # the stand-in's chip has a sensor; the CPU has none here
        assert report["device"]["temperature_celsius"] is not None
    else:
        assert report["device"]["temperature_celsius"] is None


def test_post_test_infers_a_zero_window(served: NodeApp) -> None:
    _, by_infer = post_window(served, np.zeros((100, 9), np.float32))
    latent, scores = np.asarray(by_infer["latent"]), np.asarray(by_infer["motif_scores"])
    for body in (None, b"", b"{}"):
        status, _, answer = call(served, "POST", "/test", body)
        assert status == 200, answer
        test = json.loads(answer)
        assert test["test_status"] == "passed"
        assert (test["latent_shape"], test["motif_shape"]) == ([64], [12])
        np.testing.assert_allclose(test["latent_range"], [latent.min(), latent.max()], atol=1e-5)
        np.testing.assert_allclose(test["motif_range"], [scores.min(), scores.max()], atol=1e-6)
        assert test["inference_time_ms"] > 0
        assert test["model"] == {"name": "tcn-reference", "version": "1.0.0"}


def test_openapi_is_built_from_the_contract_models_and_docs_render_offline(
    served: NodeApp,
) -> None:
    status, headers, body = call(served, "GET", "/openapi.json")
    assert status == 200
    document = json.loads(body)
    assert document["openapi"].startswith("3.1")
    assert {(path, method.upper()) for path, ops in document["paths"].items() for method in ops} \
        == {(e.path, e.method) for e in ENDPOINTS}  # fmt: skip
    schemas = document["components"]["schemas"]
    window = WindowMessage.model_json_schema(ref_template="#/components/schemas/{model}")
    assert schemas["WindowMessage"]["properties"] == window["properties"]
    assert set(schemas["MotifResult"]["properties"]) == set(MotifResult.model_fields)
    infer = document["paths"]["/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/WindowMessage"
    )
    assert infer["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/MotifResult"
    )
    committed = Path(__file__).resolve().parents[1] / "docs" / "schemas" / "openapi.json"
    assert json.loads(committed.read_bytes()) == document == json.loads(openapi_json()), (
        "docs/schemas/openapi.json is stale: run `python -m schemas.export`"
    )
    status, headers, page = call(served, "GET", "/docs")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    html = page.decode()
    assert "<script" not in html
    assert "http://" not in html  # nothing fetched from anywhere
    assert "https://" not in html
    for e in ENDPOINTS:
        assert f"<code>{e.path}</code>" in html


# -- metrics: the sidecar's names from the node's own figures ---------------------------------


def test_the_sidecar_metric_names_read_the_nodes_own_figures(
    served: NodeApp, probe: Probe, backend: str
) -> None:
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor))
    probe.publish(topics.window(sensor), orjson.dumps({"x": walking(5).tolist()}))
    probe.wait_for(topics.motifs(sensor))
    probe.subscribe(topics.node_errors(served.node_id))
    probe.publish(topics.window(sensor), b"{broken")
    probe.wait_for(topics.node_errors(served.node_id))
    post_window(served, walking(6))
    call(served, "GET", "/healthz")
    call(served, "GET", "/healthz")
    samples = metric_samples(call(served, "GET", "/metrics")[2].decode())
    assert samples[("hailo_inference_requests_total", ())] == 2
    assert (
        samples[("hailo_inference_requests_total", ())]
        == samples[("imu_node_windows_inferred_total", ())]
    )
    for suffix in ("_count", "_sum", "_bucket"):
        node, sidecar = (
            {labels: v for (name, labels), v in samples.items() if name == f"{family}{suffix}"}
            for family in ("imu_node_window_latency_seconds", "hailo_inference_duration_seconds")
        )
        assert sidecar == node, suffix
    errors = sum(v for (name, _), v in samples.items() if name == "imu_node_errors_total")
    assert samples[("hailo_errors_total", ())] == errors == 1
    assert samples[("hailo_health_checks_total", ())] >= 2
    assert samples[("hailo_model_loaded", ())] == 1
    assert samples[("hailo_config_ok", ())] == 1
    assert samples[("hailo_sidecar_start_time_seconds", ())] > 1.7e9
    info = next(labels for (name, labels) in samples if name == "hailo_model_info")
    assert ("model", "tcn-reference") in info
    assert ("version", "1.0.0") in info
    assert any(name == "hailo_build_info" for name, _ in samples)
    busy = samples[("imu_node_backend_busy_seconds_total", ())]
    assert busy > 0
    if backend == "hailo":
        assert ("hailo_device_temperature_celsius", ()) in samples
    else:
        assert ("hailo_device_temperature_celsius", ()) not in samples


# -- health a sidecar client can trust ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["onnx"], indirect=True)
def test_a_node_waiting_for_its_first_model_is_alive_but_not_healthy(  # noqa: PLR0915 (a journey)
    broker: LocalBroker, reference_bundle_path: Path, tmp_path: Path, backend: str
) -> None:
    keys = tmp_path / "keys"
    generate_keys(keys)
    signed = sign_bundle(read_bundle(reference_bundle_path), keys / "fleet.key", tmp_path / "s.tar")
    assert signed.path is not None
    node_id, group, port = unique("first"), unique("grp"), free_port()
    config = load_config(
        broker=broker.url, node_id=node_id, group=group, trust_key=keys / "fleet.pub",
        backend=backend, state_dir=tmp_path / "state", cache_dir=tmp_path / "cache",
        spool_dir=tmp_path / "spool", http_listen=f"127.0.0.1:{port}",
    )  # fmt: skip
    opened: list[NodeApp | None] = []
    opener = threading.Thread(target=lambda: opened.append(NodeApp.open(config)), daemon=True)
    opener.start()

    def request(method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request(method, path, body=body)
            answer = connection.getresponse()
            data = answer.read()
            return answer.status, json.loads(data) if data.startswith(b"{") else data.decode()
        finally:
            connection.close()

    probe = Probe(broker.url)
    try:
        wait_until(lambda: _answers(request), what="the HTTP side, before any model")
        status, health = request("GET", "/healthz")
        assert status == 503
        assert (health["ok"], health["status"], health["model"]) == (False, "waiting", None)
        assert "first desired state" in health["reason"]
        assert request("GET", "/livez")[0] == 200  # systemd and containers: alive, no restart
        status, report = request("GET", "/status")
        assert status == 200
        assert report["model"]["loaded"] is False
        assert report["endpoint_status"]["POST /infer"] == "unavailable"
        window = orjson.dumps({"x": walking().tolist()})
        status, refused = request("POST", "/infer", window)
        assert (status, refused["error"]) == (503, "no_model")
        assert request("POST", "/test")[0] == 503
        assert request("GET", "/readyz")[0] == 503
        samples = metric_samples(request("GET", "/metrics")[1])
        assert samples[("hailo_model_loaded", ())] == 0
        assert samples[("hailo_inference_requests_total", ())] == 0
        publish_bundle(signed.path, broker.url, sign_key=keys / "fleet.key")
        order = scoped(
            desired_for(signed.path), "group", group, load_private_key(keys / "fleet.key")
        )
        probe.publish(topics.group_desired(group), encode(order), retain=True)
        opener.join(60)
        app = opened[0] if opened else None
        assert app is not None
        app.start()
        wait_until(lambda: request("GET", "/healthz")[0] == 200, what="healthy on its model")
        assert request("GET", "/healthz")[1]["model"] == "tcn-reference"
        assert request("POST", "/infer", window)[0] == 200
        app.stop("test finished")
    finally:
        probe.publish(topics.group_desired(group), b"", retain=True)
        probe.close()


def _answers(request: Any) -> bool:
    try:
        return bool(request("GET", "/livez")[0] == 200)
    except OSError:
        return False


@pytest.mark.parametrize(
    ("checks", "status", "state"),
    [
        ({"serving": True, "backend_healthy": True, "broker_connected": False}, 200, "ok"),
        ({"serving": True, "backend_healthy": False}, 503, "degraded"),
        ({"serving": False, "backend_healthy": True}, 503, "starting"),
    ],
)
@pytest.mark.parametrize("backend", ["onnx"], indirect=True)
def test_healthz_follows_the_backend_not_the_broker(
    served: NodeApp, checks: dict[str, bool], status: int, state: str
) -> None:
    """A failed backend (being rebuilt) answers 503; a lost broker does not stop HTTP inference."""
    http_side = served.http
    assert http_side is not None
    assert http_side.sources is not None
    http_side.attach(http_side.sources, served.queue, lambda: checks)
    code, health = get_json(served, "/healthz")
    assert (code, health["status"], health["ok"]) == (status, state, status == 200)
    assert call(served, "GET", "/livez")[0] == 200


# -- access and bad input ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["onnx"], indirect=True)
def test_a_token_guards_status_and_test_as_it_guards_infer(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    app = start_node(http_listen="127.0.0.1:0", http_token_file=token)
    for method, path in (("GET", "/status"), ("POST", "/test"), ("POST", "/infer")):
        status, headers, body = call(app, method, path, b"{}")
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert json.loads(body)["error"] == "unauthorized"
    assert call(app, "GET", "/status", Authorization="Bearer s3cret-token")[0] == 200
    assert call(app, "POST", "/test", Authorization="Bearer s3cret-token")[0] == 200
    for path in ("/", "/healthz", "/livez", "/readyz", "/docs", "/openapi.json"):
        assert call(app, "GET", path)[0] == 200, path


@pytest.mark.parametrize("backend", ["onnx"], indirect=True)
@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "code", "error"),
    [
        ("GET", "/test", None, {}, 405, "method"),
        ("POST", "/status", b"", {}, 405, "method"),
        ("GET", "/infer", None, {}, 405, "method"),
        ("GET", "/nothing-here", None, {}, 404, "not_found"),
        ("POST", "/test", b'{"x": 1}', {}, 400, "invalid"),
        ("POST", "/test", b"x" * 65, {}, 413, "oversized"),
        ("POST", "/test", b"{}", {"Transfer-Encoding": "chunked"}, 411, "length"),
        ("POST", "/infer", orjson.dumps({"x": [[0.0] * 9] * 105}), {}, 400, "invalid"),
    ],
)
def test_bad_requests_get_one_clear_error_and_the_node_serves_on(
    served: NodeApp, method: str, path: str, body: bytes | None, headers: dict[str, str],
    code: int, error: str,
) -> None:  # fmt: skip
    status, got, answer = call(served, method, path, body, **headers)
    assert status == code
    reply = json.loads(answer)
    assert reply["error"] == error
    assert reply["reason"]
    assert "Traceback" not in reply["reason"]
    if code == 405:
        assert got["Allow"]
    assert call(served, "POST", "/test")[0] == 200
