"""The dashboard's HTTP side: the page, its events, `/metrics` and `/healthz`.

| path | token | what |
|---|---|---|
| `/healthz` | open | alive, broker connected, how much the view holds |
| `/`, `/static/*` | yes | the page (static HTML, JS, CSS shipped in the package) |
| `/?code=CODE` | a one-time link | opens a session (its cookie) and redirects to `/` |
| `POST /login` | the token | `{"path": "/?code=CODE", "expires_in_s": 300}`: a new one-time link |
| `/events` | yes | server-sent events (`events.Hub`) |
| `/metrics` | yes | Prometheus text (`metrics`) |

Only GET (and `POST /login` without a body), a bounded number of connections (overall and per
address), of event streams (overall and per login), a deadline for reading each request, Host
names checked when there is no token; every answer
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
    LOOPBACK_NAMES,
    BackgroundServer,
    HttpLimits,
    Reply,
    TlsHandshakeHandler,
    bearer_matches,
    is_loopback,
    json_reply,
    server_class,
)
from fleet.dashboard.auth import LINK_S, Gate
from fleet.dashboard.events import CLOSE, Hub, TooManyClientsError
from fleet.dashboard.metrics import CONTENT_TYPE

logger = logging.getLogger(__name__)

_TOKEN_IN_QUERY: Final = re.compile(r"(token|code)=[^&\s]*")
MAX_PATH: Final = 2048
MAX_CONNECTIONS: Final = 128
MAX_PER_CLIENT: Final = 16
"""Connections one address may hold (pages with their event streams, and their fetches)."""
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


class DashboardHttp:
    """Serves the dashboard on a background thread."""

    def __init__(
        self,
        listen: tuple[str, int],
        hub: Hub,
        gate: Gate,
        *,
        metrics: Callable[[], bytes],
        metrics_token: bytes | None = None,
        health: Callable[[], dict[str, Any]],
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.hub = hub
        self.gate = gate
        self.metrics = metrics
        self.metrics_token = metrics_token
        """The scrape role's token: /metrics only."""
        self.health = health
        self.static = load_static()
        self.closing = threading.Event()
        server = server_class(listen[0])(listen, _handler_for(self))
        server.tls = tls
        server.limits = HttpLimits(
            max_connections=MAX_CONNECTIONS,
            max_per_client=MAX_PER_CLIENT,
            allowed_hosts=LOOPBACK_NAMES if gate.open and is_loopback(listen[0]) else None,
        )
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
            if self._before_login(parts.path, parse_qs(parts.query)):
                return
            login = app.gate.login(self.headers.get("Authorization"), self.headers.get("Cookie"))
            if login is None:
                self._unauthorized()
                return
            if parts.path == "/events":
                self._events(login)
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

        def _before_login(self, path: str, query: dict[str, list[str]]) -> bool:
            """Answer what needs no session (health, links, the scrape token); True if done."""
            authorization = self.headers.get("Authorization")
            if path == "/healthz":
                self._send(json_reply(HTTPStatus.OK, app.health()))
            elif path == "/" and "token" in query:
                self._refuse(
                    HTTPStatus.BAD_REQUEST,
                    "the token does not travel in a URL (it would stay in histories and logs): "
                    "open a one-time link (`imu-fleet dashboard-link URL --token-file FILE`)",
                )
            elif path == "/" and "code" in query and not app.gate.open:
                self._redeem(query["code"][0])
            elif (
                path == "/metrics"
                and app.metrics_token is not None
                and bearer_matches(authorization, app.metrics_token)
            ):
                self._send(Reply(HTTPStatus.OK, app.metrics(), CONTENT_TYPE))
            else:
                return False
            return True

        def _not_allowed(self) -> None:
            self._refuse(HTTPStatus.METHOD_NOT_ALLOWED, "the dashboard only answers GET")

        def do_POST(self) -> None:
            if urlsplit(self.path).path != "/login":
                self._not_allowed()
                return
            if self.headers.get("Content-Length", "0") != "0" or self.headers.get(
                "Transfer-Encoding"
            ):
                self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "POST /login takes no body")
                return
            if app.gate.open or app.gate.login(self.headers.get("Authorization"), None) is None:
                self._unauthorized()
                return
            answer = {"path": f"/?code={app.gate.new_link()}", "expires_in_s": LINK_S}
            self._send(json_reply(HTTPStatus.OK, answer))

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

        def _redeem(self, code: str) -> None:
            cookie = app.gate.redeem(code)
            if cookie is None:
                self._refuse(
                    HTTPStatus.UNAUTHORIZED,
                    "this link was used already or is older than five minutes: make a new one "
                    "(`imu-fleet dashboard-link URL --token-file FILE`)",
                )
                return
            self._send(
                Reply(
                    HTTPStatus.SEE_OTHER,
                    b"",
                    "text/plain",
                    (("Location", "/"), ("Set-Cookie", cookie)),
                )
            )

        def _events(self, login: str) -> None:
            peer = str(self.client_address[0])
            try:
                stream = app.hub.open(peer, login)
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
                "this dashboard needs its token: open a one-time link (`imu-fleet dashboard-link "
                "URL --token-file FILE`), or send `Authorization: Bearer TOKEN`"
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
            line = _TOKEN_IN_QUERY.sub(r"\1=<redacted>", format % args)
            logger.debug("http %s %s", self.client_address[0], line)

    return Handler
