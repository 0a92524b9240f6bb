"""The node's HTTP side: the FastAPI sidecar's endpoints beside the node's own.

| endpoint | access | what |
|---|---|---|
| `GET /` | open | service discovery: name, version, endpoints, docs |
| `GET /healthz` | open | can this node infer? 200 `ok: true`, or 503 with the reason |
| `GET /livez` | open | the process answers (200 whatever the model's state) |
| `GET /readyz` | open | broker link, serving, healthy backend, room in the queue |
| `GET /status` | token | model and device state, which endpoints can answer |
| `GET /metrics` | scrape token | `imu_node_*` and the sidecar's `hailo_*` names |
| `POST /infer` | token | one window in, one result out (EdgeInfer) |
| `POST /test` | token | a window of zeros through the queue and model |
| `GET /openapi.json`, `/docs` | open | the contract (schemas/openapi.py), as JSON and a page |

`POST /infer` takes a window as `{"x": [[9 floats] x 100]}` (or a 3600-byte float32 frame with
`Content-Type: application/octet-stream`) and answers with the same JSON as an MQTT result. The
window goes through the node's own queue, worker and model, so it is batched with MQTT traffic
and served by whichever model version is active. A full queue answers 503 with `Retry-After`.

The server opens before the model (`attach` hands it the node's state once there is one), so
a node waiting for its first model from the fleet answers `/livez` 200 and `/healthz` 503.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel

from common.http import (
    LOOPBACK_NAMES,
    BackgroundServer,
    HttpLimits,
    Reply,
    TlsHandshakeHandler,
    bearer_matches,
    is_loopback,
    json_reply,
    parse_listen,
    read_token_file,
    send_reply,
    server_class,
    server_tls_context,
)
from common.version import software_version
from node.api.docs_page import CSP, render_docs
from node.api.prometheus import (
    CONTENT_TYPE,
    NodeSources,
    ProcessFacts,
    device_name,
    file_sha256,
    metrics_registry,
    render,
)
from node.api.sidecar import UtilizationMeter
from node.config import NodeConfig
from node.errors import ConfigError
from node.supervisor import thread_running
from node.work import WorkItem
from schemas.codec import InputRejectedError, decode_any_window
from schemas.http import (
    HTTP_API_VERSION,
    ApiError,
    DeviceStatus,
    Health,
    HealthState,
    Liveness,
    ModelStatus,
    QueueStatus,
    Readiness,
    SelfTest,
    ServiceIndex,
    ServiceStatus,
)
from schemas.limits import CHANNELS, MAX_WINDOW_BYTES, WINDOW_LENGTH
from schemas.messages import ModelRef
from schemas.openapi import ENDPOINTS, endpoint, openapi_document

logger = logging.getLogger(__name__)

HTTP_SENSOR_ID = "http"
"""The `sensor_id` of results answered over HTTP."""
NODE_MAX_PER_CLIENT = 16
"""Connections one client address may hold: an EdgeInfer host keeps several `/infer` calls in
flight (the sidecar's own load test: 5; ten is common), and 16 of the 64 still leave room for
others."""
MAX_TEST_BODY = 64
"""`POST /test` takes no body, or `{}`: anything longer is refused unread."""


@dataclass(frozen=True, slots=True)
class Attached:
    """The node's state, once it has a model."""

    sources: NodeSources
    work: queue.Queue[WorkItem]
    ready: Callable[[], dict[str, bool]]
    utilization: UtilizationMeter


@functools.cache
def hailort_installed() -> bool:
    """Whether `hailo_platform` is installed, looked up once (without importing it: an ONNX node
    on a Pi with HailoRT need not pay for loading it)."""
    return importlib.util.find_spec("hailo_platform") is not None


def model_reply(model: BaseModel, status: HTTPStatus = HTTPStatus.OK, **headers: str) -> Reply:
    """A JSON answer from one of the contract's models (schemas/http.py)."""
    return json_reply(status, model.model_dump(mode="json"), **headers)


def error_reply(status: HTTPStatus, error: str, reason: str, **headers: str) -> Reply:
    """A refusal: `{"error", "reason"}`."""
    return model_reply(ApiError(error=error, reason=reason), status, **headers)


class NodeHttp:
    """Answers the node's HTTP endpoints on a background thread."""

    def __init__(
        self,
        listen: tuple[str, int],
        node_id: str,
        *,
        infer_timeout_s: float,
        group: str | None = None,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
        metrics_token: str | None = None,
    ) -> None:
        self.node_id = node_id
        self.group = group
        self._token = token.encode() if token else None
        self._metrics_token = metrics_token.encode() if metrics_token else self._token
        self.tls = tls
        self._timeout = infer_timeout_s
        self._attached: Attached | None = None
        self.closing = False
        """Set by `stop`: open keep-alive connections get 503 and are closed."""
        self._started = time.monotonic()
        self._health_checks = 0
        self._lock = threading.Lock()
        self._version = software_version()
        self.facts = ProcessFacts(self._version, time.time(), lambda: self._health_checks)
        self._registry = metrics_registry(self.facts, self._sources, self._utilization)
        document = openapi_document()
        self._openapi = orjson.dumps(document)
        self._docs = render_docs(document)
        server = server_class(listen[0])(listen, _handler_for(self))
        server.tls = tls
        server.limits = HttpLimits(  # without a token, answer to loopback names only
            max_per_client=NODE_MAX_PER_CLIENT,
            allowed_hosts=LOOPBACK_NAMES if token is None and is_loopback(listen[0]) else None,
        )
        self._served = BackgroundServer(server, "http")

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the real port when 0 was asked for)."""
        return self._served.address

    @property
    def started(self) -> bool:
        """True once `start` ran."""
        return self._served.thread.ident is not None

    @property
    def sources(self) -> NodeSources | None:
        """The node's state, None until `attach`."""
        return self._attached.sources if self._attached is not None else None

    def attach(
        self,
        sources: NodeSources,
        work: queue.Queue[WorkItem],
        ready: Callable[[], dict[str, bool]],
    ) -> None:
        """Serve the node's model, queue and state from now on."""
        meter = UtilizationMeter(sources.busy_seconds, sources.workers)
        self._attached = Attached(sources, work, ready, meter)

    def start(self) -> None:
        """Serve until `stop`."""
        self._served.start()
        logger.info("http on %s:%d (%s)", *self.address, " ".join(e.key for e in ENDPOINTS))

    def is_alive(self) -> bool:
        """True while the HTTP thread serves (or before it was started, or after `stop`)."""
        return thread_running(self._served.thread) or self.closing

    def stop(self) -> None:
        """Stop answering and close the socket."""
        self.closing = True
        self._served.stop()

    def authorized(self, header: str | None, *, scrape: bool = False) -> bool:
        """True when no token is set, or `header` is `Bearer <the token>` (constant time); for
        `/metrics` (`scrape`), the scrape token when one is set."""
        token = self._metrics_token if scrape else self._token
        return token is None or bearer_matches(header, token)

    # -- state ------------------------------------------------------------------------------

    def _sources(self) -> NodeSources | None:
        return self.sources

    def _utilization(self) -> float | None:
        return self._attached.utilization.percent() if self._attached is not None else None

    def uptime_s(self) -> int:
        """Whole seconds since the HTTP side opened (at process start)."""
        return int(time.monotonic() - self._started)

    def state(self) -> tuple[HealthState, str | None]:
        """Whether this node can infer now, and why not."""
        attached = self._attached
        if attached is None:
            return "waiting", "no model yet: waiting for the fleet's first desired state"
        if self.closing:
            return "stopping", "the node is stopping"
        checks = attached.ready()
        if not checks.get("serving", False):
            return "starting", "the inference workers are not running (starting or stopping)"
        if not checks.get("backend_healthy", False):
            return "degraded", "the backend failed and is being rebuilt or replaced"
        return "ok", None

    # -- endpoints ---------------------------------------------------------------------------

    def index(self) -> Reply:
        """Service discovery."""
        return model_reply(
            ServiceIndex(
                description="IMU inference node: MQTT windows in, latents and motif scores "
                "out; a drop-in for the HailoRT TCN inference sidecar's HTTP API",
                version=self._version,
                api_version=HTTP_API_VERSION,
                endpoints={e.key: e.summary for e in ENDPOINTS},
                docs="/docs",
                openapi="/openapi.json",
            )
        )

    def healthz(self) -> Reply:
        """Can this node infer: 200 with `ok: true`, or 503 saying why not."""
        with self._lock:
            self._health_checks += 1
        status, reason = self.state()
        sources = self.sources
        pipeline = sources.pipeline() if sources is not None else None
        health = Health(
            ok=status == "ok",
            model=pipeline.ref.name if pipeline else None,
            uptime_s=self.uptime_s(),
            config_version=pipeline.ref.version if pipeline else None,
            hef_sha256=file_sha256(pipeline, "model.hef") if pipeline else None,
            version=self._version,
            device=device_name(pipeline) if pipeline else None,
            latency_ms=sources.metrics.last_latency_ms if sources else None,
            status=status,
            reason=reason,
            node_id=self.node_id,
            backend=pipeline.info.name if pipeline else None,
            model_version=pipeline.ref.version if pipeline else None,
        )
        code = HTTPStatus.OK if health.ok else HTTPStatus.SERVICE_UNAVAILABLE
        return model_reply(health, code)

    def livez(self) -> Reply:
        """Liveness: the process answers."""
        status, _ = self.state()
        return model_reply(Liveness(node_id=self.node_id, status=status, uptime_s=self.uptime_s()))

    def readyz(self) -> Reply:
        """Readiness: connected, serving, room in the queue; 503 names what is not."""
        checks = self._attached.ready() if self._attached is not None else {"model_loaded": False}
        ready = all(checks.values())
        code = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
        return model_reply(Readiness(ready=ready, checks=checks), code)

    def status(self) -> Reply:
        """Model and device state, and which endpoints can answer now."""
        state, _ = self.state()
        attached = self._attached
        sources = attached.sources if attached else None
        pipeline = sources.pipeline() if sources else None
        healthy, rebuilds, stalls = sources.backend_health() if sources else (False, 0, 0)
        can_infer: Literal["ok", "unavailable"] = "ok" if state == "ok" else "unavailable"
        return model_reply(
            ServiceStatus(
                version=self._version,
                api_version=HTTP_API_VERSION,
                node_id=self.node_id,
                group=self.group,
                uptime_s=self.uptime_s(),
                status=state,
                hailort_available=hailort_installed(),
                model=ModelStatus(
                    loaded=pipeline is not None,
                    name=pipeline.ref.name if pipeline else None,
                    version=pipeline.ref.version if pipeline else None,
                    backend=pipeline.info.name if pipeline else None,
                    quantized=pipeline.info.quantized if pipeline else None,
                    hef_sha256=file_sha256(pipeline, "model.hef") if pipeline else None,
                    onnx_sha256=file_sha256(pipeline, "model.onnx") if pipeline else None,
                ),
                device=DeviceStatus(
                    name=device_name(pipeline) if pipeline else None,
                    identity=pipeline.info.device if pipeline else None,
                    healthy=pipeline is not None and healthy,
                    temperature_celsius=pipeline.backend.temperature() if pipeline else None,
                    utilization_percent=attached.utilization.percent() if attached else None,
                    rebuilds=rebuilds,
                    watchdog_stalls=stalls,
                ),
                endpoint_status={
                    e.key: can_infer if e.key in ("POST /infer", "POST /test") else "ok"
                    for e in ENDPOINTS
                },
                broker_connected=sources.session.is_connected if sources else False,
                queue=QueueStatus(
                    depth=sources.queue_depth() if sources else 0,
                    capacity=sources.queue_capacity if sources else 0,
                ),
                windows_inferred=sources.metrics.totals()[1] if sources else 0,
            )
        )

    def metrics(self) -> Reply:
        """Prometheus text exposition."""
        return Reply(HTTPStatus.OK, render(self._registry), CONTENT_TYPE)

    def openapi(self) -> Reply:
        """The OpenAPI document (built once, from the contract's models)."""
        return Reply(HTTPStatus.OK, self._openapi)

    def docs(self) -> Reply:
        """The API page: no scripts, nothing fetched."""
        return Reply(
            HTTPStatus.OK,
            self._docs,
            "text/html; charset=utf-8",
            (("Content-Security-Policy", CSP), ("X-Content-Type-Options", "nosniff")),
        )

    def infer(self, body: bytes, content_type: str | None) -> Reply:
        """Run one window through the node's queue and model."""
        try:
            window = decode_any_window(body, content_type)
        except InputRejectedError as exc:
            return error_reply(HTTPStatus.BAD_REQUEST, exc.kind, exc.reason)
        return self._through_queue(window.seq, window.t0, window.x, lambda result: result)

    def selftest(self) -> Reply:
        """A 100 x 9 window of zeros through the node's queue and model."""
        zeros = np.zeros((WINDOW_LENGTH, CHANNELS), dtype=np.float32)
        started = time.perf_counter()

        def answer(result: dict[str, Any]) -> dict[str, Any]:
            latent = np.asarray(result["latent"], dtype=np.float64)
            scores = np.asarray(result["motif_scores"], dtype=np.float64)
            return SelfTest(
                latent_shape=list(latent.shape),
                motif_shape=list(scores.shape),
                latent_range=(float(latent.min()), float(latent.max())),
                motif_range=(float(scores.min()), float(scores.max())),
                inference_time_ms=round((time.perf_counter() - started) * 1000, 3),
                model=ModelRef.model_validate(result["model"]),
            ).model_dump(mode="json")

        return self._through_queue(None, None, zeros, answer)

    def _through_queue(
        self,
        seq: int | None,
        t0: float | None,
        x: np.ndarray,
        answer: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> Reply:
        attached = self._attached
        if self.closing:
            reason = "node is stopping; send to another node"
            return error_reply(HTTPStatus.SERVICE_UNAVAILABLE, "stopping", reason)
        if attached is None:
            reason = "no model yet: the node waits for the fleet's first desired state"
            return error_reply(
                HTTPStatus.SERVICE_UNAVAILABLE, "no_model", reason, **{"Retry-After": "5"}
            )
        reply: Future[dict[str, Any]] = Future()
        item = WorkItem(HTTP_SENSOR_ID, seq, t0, None, x, time.perf_counter_ns(), reply)
        work, metrics = attached.work, attached.sources.metrics
        try:
            work.put_nowait(item)
        except queue.Full:
            metrics.window_dropped("queue_full")
            reason = f"node over capacity (queue of {work.maxsize} full); retry shortly"
            return error_reply(
                HTTPStatus.SERVICE_UNAVAILABLE, "busy", reason, **{"Retry-After": "1"}
            )
        metrics.window_accepted()
        try:
            result = reply.result(self._timeout)
        except FutureTimeout:
            reason = f"no result within {self._timeout:g} s (node stopping or overloaded)"
            return error_reply(HTTPStatus.GATEWAY_TIMEOUT, "timeout", reason)
        except Exception as exc:  # the backend's failure, passed on by the worker
            return error_reply(HTTPStatus.INTERNAL_SERVER_ERROR, "inference", str(exc))
        return json_reply(HTTPStatus.OK, answer(result))


def _handler_for(api: NodeHttp) -> type[BaseHTTPRequestHandler]:
    getters: dict[str, Callable[[], Reply]] = {
        "/": api.index,
        "/healthz": api.healthz,
        "/livez": api.livez,
        "/readyz": api.readyz,
        "/status": api.status,
        "/metrics": api.metrics,
        "/openapi.json": api.openapi,
        "/docs": api.docs,
    }

    class Handler(TlsHandshakeHandler, BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "imu-node"
        disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stall

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            found = endpoint("GET", path)
            if found is None:
                self._send(_unknown("GET", path))
            elif self._authorized(found.access):
                self._send(getters[path]())

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            found = endpoint("POST", path)
            if found is None:
                self.close_connection = True  # the body is not read
                self._send(_unknown("POST", path))
                return
            if not self._authorized(found.access):
                self.close_connection = True  # the body is not read
                return
            limit = MAX_WINDOW_BYTES if path == "/infer" else MAX_TEST_BODY
            body = self._body(limit, required=path == "/infer")
            if body is None:
                return
            if path == "/infer":
                media_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip()
                self._send(api.infer(body, media_type or None))
            elif body.strip() not in (b"", b"{}"):
                reason = "POST /test takes no body (or {}): it infers a window of zeros"
                self._send(error_reply(HTTPStatus.BAD_REQUEST, "invalid", reason))
            else:
                self._send(api.selftest())

        def _body(self, limit: int, *, required: bool) -> bytes | None:
            """The request body within `limit` bytes, or None after answering the refusal."""
            length = self.headers.get("Content-Length")
            chunked = self.headers.get("Transfer-Encoding") is not None
            if chunked or (length is None and required) or (length and not length.isdigit()):
                self.close_connection = True
                reason = "send the body with a Content-Length (chunked bodies are not taken)"
                self._send(error_reply(HTTPStatus.LENGTH_REQUIRED, "length", reason))
                return None
            size = int(length or 0)
            if size > limit:
                self.close_connection = True  # the body is not read
                reason = f"body of {size} bytes; this endpoint takes at most {limit}"
                self._send(error_reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "oversized", reason))
                return None
            body = self.rfile.read(size)
            self.request_read()  # the reply may take the inference's time, not the deadline's
            return body

        def _authorized(self, access: str) -> bool:
            if access == "open" or api.authorized(
                self.headers.get("Authorization"), scrape=access == "scrape"
            ):
                return True
            which = "http_metrics_token_file" if access == "scrape" else "http_token_file"
            reason = f"this endpoint needs `Authorization: Bearer TOKEN` (the node's {which})"
            self._send(
                error_reply(
                    HTTPStatus.UNAUTHORIZED,
                    "unauthorized",
                    reason,
                    **{"WWW-Authenticate": 'Bearer realm="imu-node"'},
                )
            )
            return False

        def _send(self, reply: Reply) -> None:
            send_reply(self, reply, close=api.closing or self.close_connection)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("http %s %s", self.client_address[0], format % args)

    return Handler


def _unknown(method: str, path: str) -> Reply:
    """404 naming what exists, or 405 when the path takes another method."""
    allowed = [e.method for e in ENDPOINTS if e.path == path]
    if allowed:
        reason = f"{path} takes {' or '.join(allowed)}, not {method}"
        return error_reply(
            HTTPStatus.METHOD_NOT_ALLOWED, "method", reason, Allow=", ".join(allowed)
        )
    known = ", ".join(e.key for e in ENDPOINTS)
    return error_reply(HTTPStatus.NOT_FOUND, "not_found", f"no {path}; this node has {known}")


def open_node_http(config: NodeConfig, node_id: str) -> NodeHttp:
    """The node's HTTP server as `config` asks (listen address, token file, TLS), not yet
    serving and with no model attached; ConfigError saying which setting to fix when it cannot
    be opened."""
    assert config.http_listen is not None
    try:
        token = (
            read_token_file(config.http_token_file, "http_token_file")
            if config.http_token_file is not None
            else None
        )
        tls = (
            server_tls_context(config.http_tls_cert, config.http_tls_key)
            if config.http_tls_cert is not None and config.http_tls_key is not None
            else None
        )
        return NodeHttp(
            parse_listen(config.http_listen),
            node_id,
            infer_timeout_s=config.http_infer_timeout_s,
            group=config.group,
            token=token,
            tls=tls,
            metrics_token=(
                read_token_file(config.http_metrics_token_file, "http_metrics_token_file")
                if config.http_metrics_token_file is not None
                else None
            ),
        )
    except ValueError as exc:  # an unreadable or empty token file
        raise ConfigError(str(exc)) from None
    except OSError as exc:  # a taken port, an unreadable token, a bad TLS key
        msg = f"cannot serve HTTP on {config.http_listen}: {exc}; check the http_* settings"
        raise ConfigError(msg) from exc
