"""The node's HTTP side: `/healthz`, `/readyz`, `/metrics` and `POST /infer`.

`POST /infer` is EdgeInfer-compatible: it takes a window as `{"x": [[9 floats] x 100]}` (or a
3600-byte float32 frame with `Content-Type: application/octet-stream`) and answers with the same
JSON as an MQTT result, whose `latent` and `motif_scores` are what EdgeInfer clients read. The
window goes through the node's own queue, worker and model, so it is batched with MQTT traffic
and served by whichever model version is active. A full queue answers 503 with `Retry-After`.
"""

from __future__ import annotations

import logging
import queue
import ssl
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any

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
from node.api.prometheus import CONTENT_TYPE, NodeSources, metrics_registry, render
from node.config import NodeConfig
from node.errors import ConfigError
from node.supervisor import thread_running
from node.work import WorkItem
from schemas.codec import InputRejectedError, decode_any_window
from schemas.limits import MAX_WINDOW_BYTES

logger = logging.getLogger(__name__)

HTTP_SENSOR_ID = "http"
"""The `sensor_id` of results answered over HTTP."""


class NodeHttp:
    """Answers the node's HTTP endpoints on a background thread."""

    def __init__(
        self,
        listen: tuple[str, int],
        sources: NodeSources,
        work: queue.Queue[WorkItem],
        *,
        ready: Callable[[], dict[str, bool]],
        infer_timeout_s: float,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
        metrics_token: str | None = None,
    ) -> None:
        self.sources = sources
        self._token = token.encode() if token else None
        self._metrics_token = metrics_token.encode() if metrics_token else self._token
        self.tls = tls
        self._work = work
        self._ready = ready
        self._timeout = infer_timeout_s
        self.closing = False
        """Set by `stop`: open keep-alive connections get 503 and are closed."""
        self._registry = metrics_registry(sources)
        server = server_class(listen[0])(listen, _handler_for(self))
        server.tls = tls
        server.limits = HttpLimits(  # without a token, answer to loopback names only
            allowed_hosts=LOOPBACK_NAMES if token is None and is_loopback(listen[0]) else None
        )
        self._served = BackgroundServer(server, "http")

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the real port when 0 was asked for)."""
        return self._served.address

    def start(self) -> None:
        """Serve until `stop`."""
        self._served.start()
        logger.info("http on %s:%d (/healthz /readyz /metrics POST /infer)", *self.address)

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

    # -- endpoints ---------------------------------------------------------------------------

    def healthz(self) -> Reply:
        """Liveness: the process answers, and what it serves."""
        pipeline = self.sources.pipeline()
        return json_reply(
            HTTPStatus.OK,
            {
                "status": "ok",
                "node_id": self.sources.node_id,
                "backend": pipeline.info.name,
                "model": {"name": pipeline.ref.name, "version": pipeline.ref.version},
            },
        )

    def readyz(self) -> Reply:
        """Readiness: connected, serving, room in the queue; 503 names what is not."""
        checks = self._ready()
        status = HTTPStatus.OK if all(checks.values()) else HTTPStatus.SERVICE_UNAVAILABLE
        return json_reply(status, {"ready": status is HTTPStatus.OK, "checks": checks})

    def metrics(self) -> Reply:
        """Prometheus text exposition."""
        return Reply(HTTPStatus.OK, render(self._registry), CONTENT_TYPE)

    def infer(self, body: bytes, content_type: str | None) -> Reply:
        """Run one window through the node's queue and model."""
        if self.closing:
            answer = {"error": "stopping", "reason": "node is stopping; send to another node"}
            return json_reply(HTTPStatus.SERVICE_UNAVAILABLE, answer)
        try:
            window = decode_any_window(body, content_type)
        except InputRejectedError as exc:
            return json_reply(HTTPStatus.BAD_REQUEST, {"error": exc.kind, "reason": exc.reason})
        reply: Future[dict[str, Any]] = Future()
        item = WorkItem(
            HTTP_SENSOR_ID, window.seq, window.t0, None, window.x, time.perf_counter_ns(), reply
        )
        try:
            self._work.put_nowait(item)
        except queue.Full:
            self.sources.metrics.window_dropped("queue_full")
            reason = f"node over capacity (queue of {self._work.maxsize} full); retry shortly"
            return json_reply(
                HTTPStatus.SERVICE_UNAVAILABLE,
                {"error": "busy", "reason": reason},
                **{"Retry-After": "1"},
            )
        self.sources.metrics.window_accepted()
        try:
            result = reply.result(self._timeout)
        except FutureTimeout:
            reason = f"no result within {self._timeout:g} s (node stopping or overloaded)"
            return json_reply(HTTPStatus.GATEWAY_TIMEOUT, {"error": "timeout", "reason": reason})
        except Exception as exc:  # the backend's failure, passed on by the worker
            return json_reply(
                HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "inference", "reason": str(exc)}
            )
        return json_reply(HTTPStatus.OK, result)


def _handler_for(api: NodeHttp) -> type[BaseHTTPRequestHandler]:
    class Handler(TlsHandshakeHandler, BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "imu-node"
        disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stall

        def do_GET(self) -> None:
            routes = {"/healthz": api.healthz, "/readyz": api.readyz, "/metrics": api.metrics}
            path = self.path.split("?", 1)[0]
            route = routes.get(path)
            if route is None:
                self._send(_not_found(self.path))
                return
            if path == "/metrics" and not self._authorized(scrape=True):
                return
            self._send(route())

        def do_POST(self) -> None:
            if self.path.split("?", 1)[0] != "/infer":
                self._send(_not_found(self.path))
                return
            if not self._authorized():
                self.close_connection = True  # the body is not read
                return
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                reason = "send the window with a Content-Length"
                self._send(
                    json_reply(HTTPStatus.LENGTH_REQUIRED, {"error": "length", "reason": reason})
                )
                return
            if int(length) > MAX_WINDOW_BYTES:
                self.close_connection = True  # the body is not read
                reason = f"body of {length} bytes; a window is at most {MAX_WINDOW_BYTES}"
                self._send(
                    json_reply(
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        {"error": "oversized", "reason": reason},
                    )
                )
                return
            body = self.rfile.read(int(length))
            self.request_read()  # the reply may take the inference's time, not the deadline's
            media_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip()
            self._send(api.infer(body, media_type or None))

        def _authorized(self, *, scrape: bool = False) -> bool:
            if api.authorized(self.headers.get("Authorization"), scrape=scrape):
                return True
            which = "http_metrics_token_file" if scrape else "http_token_file"
            reason = f"this endpoint needs `Authorization: Bearer TOKEN` (the node's {which})"
            self._send(
                json_reply(
                    HTTPStatus.UNAUTHORIZED,
                    {"error": "unauthorized", "reason": reason},
                    **{"WWW-Authenticate": 'Bearer realm="imu-node"'},
                )
            )
            return False

        def _send(self, reply: Reply) -> None:
            send_reply(self, reply, close=api.closing or self.close_connection)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("http %s %s", self.client_address[0], format % args)

    return Handler


def _not_found(path: str) -> Reply:
    reason = f"no {path}; try /healthz, /readyz, /metrics or POST /infer"
    return json_reply(HTTPStatus.NOT_FOUND, {"error": "not_found", "reason": reason})


def open_node_http(
    config: NodeConfig,
    sources: NodeSources,
    work: queue.Queue[WorkItem],
    ready: Callable[[], dict[str, bool]],
) -> NodeHttp:
    """The node's HTTP server as `config` asks (listen address, token file, TLS); ConfigError
    saying which setting to fix when it cannot be opened."""
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
            sources,
            work,
            ready=ready,
            infer_timeout_s=config.http_infer_timeout_s,
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
