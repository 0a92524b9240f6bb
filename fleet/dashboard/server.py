"""The dashboard's HTTP side: the page, its events, `/metrics` and `/healthz`.

| path | token | what |
|---|---|---|
| `/healthz` | open | alive, broker connected, how much the view holds |
| `/`, `/static/*` | yes | the page (static HTML, JS, CSS shipped in the package) |
| `/?token=TOKEN` | the token | sets the session cookie and redirects to `/` |
| `/events` | yes | server-sent events (`events.Hub`) |
| `/metrics` | yes | Prometheus text (`metrics`) |

Only GET, no request body, a bounded number of connections and of event streams; every answer
says `nosniff`, no referrer, no framing, no caching, and the page's Content-Security-Policy
allows only its own script, style and event stream.
"""

from __future__ import annotations

import logging
import queue
import re
import ssl
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from importlib import resources
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from common.http import (
    BackgroundServer,
    Reply,
    TlsHandshakeHandler,
    TlsThreadingServer,
    json_reply,
    server_class,
)
from fleet.dashboard.auth import Gate
from fleet.dashboard.events import CLOSE, Hub, TooManyClientsError
from fleet.dashboard.metrics import CONTENT_TYPE

logger = logging.getLogger(__name__)

_TOKEN_IN_QUERY: Final = re.compile(r"token=[^&\s]*")
MAX_PATH: Final = 2048
MAX_CONNECTIONS: Final = 128
"""Connections served at once (event streams included); more are closed at once."""
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


def load_static() -> dict[str, tuple[bytes, str]]:
    """The page's files from the package: `/static/NAME` -> (content, type); `/` the page."""
    folder = resources.files("fleet.dashboard") / "static"
    files: dict[str, tuple[bytes, str]] = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in _TYPES:
            files[f"/static/{entry.name}"] = (entry.read_bytes(), _TYPES[suffix])
    if "/static/index.html" not in files:
        msg = "fleet/dashboard/static/index.html is missing: the package was installed without it"
        raise FileNotFoundError(msg)
    files["/"] = files["/static/index.html"]
    return files


class _BoundedServer(TlsThreadingServer):
    """At most `MAX_CONNECTIONS` requests served at once; the next ones are closed."""

    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    refused = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class DashboardHttp:
    """Serves the dashboard on a background thread."""

    def __init__(
        self,
        listen: tuple[str, int],
        hub: Hub,
        gate: Gate,
        *,
        metrics: Callable[[], bytes],
        health: Callable[[], dict[str, Any]],
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.hub = hub
        self.gate = gate
        self.metrics = metrics
        self.health = health
        self.static = load_static()
        self.closing = threading.Event()
        server_type = type("DashboardServer", (_BoundedServer, server_class(listen[0])), {})
        server: _BoundedServer = server_type(listen, _handler_for(self))
        server.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        server.tls = tls
        self._served = BackgroundServer(server, "dashboard-http")

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the real port when 0 was asked for)."""
        return self._served.address

    @property
    def url(self) -> str:
        """The page's address."""
        host, port = self.address
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self._served.server.tls else 'http'}://{host}:{port}/"

    def start(self) -> None:
        """Serve until `stop`."""
        self._served.start()
        logger.info("dashboard on %s (%s)", self.url, "open" if self.gate.open else "token")

    def stop(self) -> None:
        """Stop answering, end the event streams, close the socket."""
        self.closing.set()
        self._served.stop()


def _handler_for(app: DashboardHttp) -> type[BaseHTTPRequestHandler]:
    class Handler(TlsHandshakeHandler, BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "imu-fleet-dashboard"
        sys_version = ""
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            if len(self.path) > MAX_PATH:
                self._refuse(HTTPStatus.REQUEST_URI_TOO_LONG, "path too long")
                return
            if self.headers.get("Content-Length", "0") != "0" or self.headers.get(
                "Transfer-Encoding"
            ):
                self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "GET takes no body")
                return
            parts = urlsplit(self.path)
            if parts.path == "/healthz":
                self._send(json_reply(HTTPStatus.OK, app.health()))
                return
            token = parse_qs(parts.query).get("token")
            if parts.path == "/" and token and not app.gate.open:
                self._login(token[0])
                return
            if not app.gate.allows(self.headers.get("Authorization"), self.headers.get("Cookie")):
                self._unauthorized()
                return
            if parts.path == "/events":
                self._events()
            elif parts.path == "/metrics":
                self._send(Reply(HTTPStatus.OK, app.metrics(), CONTENT_TYPE))
            elif parts.path in app.static:
                body, content_type = app.static[parts.path]
                self._send(Reply(HTTPStatus.OK, body, content_type))
            else:
                reason = "try /, /events, /metrics or /healthz"
                self._send(
                    json_reply(HTTPStatus.NOT_FOUND, {"error": "not_found", "reason": reason})
                )

        def _not_allowed(self) -> None:
            self._refuse(HTTPStatus.METHOD_NOT_ALLOWED, "the dashboard only answers GET")

        def do_POST(self) -> None:
            self._not_allowed()

        def do_PUT(self) -> None:
            self._not_allowed()

        def do_DELETE(self) -> None:
            self._not_allowed()

        def do_PATCH(self) -> None:
            self._not_allowed()

        def do_HEAD(self) -> None:
            self._not_allowed()

        def do_OPTIONS(self) -> None:
            self._not_allowed()

        def _login(self, candidate: str) -> None:
            if not app.gate.token_matches(candidate):
                self._unauthorized()
                return
            self._send(
                Reply(
                    HTTPStatus.SEE_OTHER,
                    b"",
                    "text/plain",
                    (("Location", "/"), ("Set-Cookie", app.gate.set_cookie())),
                )
            )

        def _events(self) -> None:
            peer = str(self.client_address[0])
            try:
                stream = app.hub.open(peer)
            except TooManyClientsError as exc:
                self._send(
                    json_reply(
                        HTTPStatus.SERVICE_UNAVAILABLE,
                        {"error": "busy", "reason": str(exc)},
                        **{"Retry-After": "10"},
                    )
                )
                return
            self.close_connection = True
            try:
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.send_header("Connection", "close")
                self.send_header("X-Accel-Buffering", "no")
                self._common_headers()
                self.end_headers()
                self.wfile.flush()
                while not app.closing.is_set():
                    try:
                        event = stream.events.get(timeout=app.hub.keepalive_s)
                    except queue.Empty:
                        event = b": keepalive\n\n"
                    if event == CLOSE:
                        break
                    self.wfile.write(event)
                    self.wfile.flush()
            except OSError:  # the page went away
                pass
            finally:
                app.hub.close(stream)

        def _unauthorized(self) -> None:
            reason = (
                "this dashboard needs its token: open /?token=TOKEN once in a browser (it sets "
                "a cookie), or send `Authorization: Bearer TOKEN`"
            )
            self._send(
                json_reply(
                    HTTPStatus.UNAUTHORIZED,
                    {"error": "unauthorized", "reason": reason},
                    **{"WWW-Authenticate": 'Bearer realm="imu-fleet-dashboard"'},
                )
            )

        def _refuse(self, status: HTTPStatus, reason: str) -> None:
            self.close_connection = True  # a body, if any, is not read
            self._send(json_reply(status, {"error": status.phrase.lower(), "reason": reason}))

        def _common_headers(self) -> None:
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("Content-Security-Policy", CSP)

        def _send(self, reply: Reply) -> None:
            self.send_response(reply.status)
            if app.closing.is_set() or self.close_connection:
                self.send_header("Connection", "close")
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers:
                self.send_header(name, value)
            self._common_headers()
            self.end_headers()
            self.wfile.write(reply.body)

        def log_message(self, format: str, *args: Any) -> None:
            line = _TOKEN_IN_QUERY.sub("token=<redacted>", format % args)
            logger.debug("http %s %s", self.client_address[0], line)

    return Handler
