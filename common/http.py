"""What the node's HTTP side and the fleet dashboard share: TLS, bearer tokens, the server class.

Both serve a few endpoints from `http.server` on threads: a TLS handshake runs on the request's
own thread (a slow client holds only that thread), a failed handshake or a dropped line is not
worth a traceback, and a bearer token is compared in constant time.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from schemas.codec import encode_dict

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP answer."""

    status: HTTPStatus
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_reply(status: HTTPStatus, payload: dict[str, Any], **headers: str) -> Reply:
    """A JSON answer (numpy arrays allowed in `payload`)."""
    return Reply(status, encode_dict(payload) + b"\n", headers=tuple(headers.items()))


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[V6]:PORT`) to a bind address; `:PORT` or `PORT` means 127.0.0.1."""
    host, sep, port = value.rpartition(":")
    if not sep and value.isdigit():
        host, port, sep = "", value, ":"
    if not sep or not port.isdigit() or int(port) > 65535:
        msg = f"{value!r} is not HOST:PORT (e.g. 0.0.0.0:9108, or 127.0.0.1:0 for any free port)"
        raise ValueError(msg)
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bearer_matches(header: str | None, token: bytes) -> bool:
    """True when `header` is `Bearer <token>` (scheme case-insensitive; constant-time compare)."""
    scheme, _, value = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token)


def read_token_file(path: Path, what: str = "token file") -> str:
    """The token in `path` (surrounding whitespace stripped); ValueError when it is empty."""
    token = path.read_text().strip()
    if not token:
        msg = f"{what} {path} is empty"
        raise ValueError(msg)
    return token


def server_tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """An HTTPS server context: TLS 1.2 or later, the given certificate chain and key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def send_reply(handler: BaseHTTPRequestHandler, reply: Reply, *, close: bool = False) -> None:
    """Write `reply` as the answer to `handler`'s request (`close`: say the connection ends)."""
    handler.send_response(reply.status)
    if close:
        handler.send_header("Connection", "close")  # and the handler closes it
    handler.send_header("Content-Type", reply.content_type)
    handler.send_header("Content-Length", str(len(reply.body)))
    for name, value in reply.headers:
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(reply.body)


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one server lets clients hold."""

    max_connections: int = 64
    """Connections served at once; the next ones are closed at accept."""
    max_per_client: int = 8
    """Connections one client address may hold at once."""
    request_deadline_s: float = 10.0
    """Longest the TLS handshake, or reading one request (line, headers, body), may take as a
    whole, however slowly the bytes trickle in (a per-read timeout alone does not stop a client
    sending a byte every few seconds)."""
    allowed_hosts: frozenset[str] | None = None
    """When set, a request whose Host header names another host is refused (421): servers on
    loopback without a token answer only to their loopback names, so a page on another site
    cannot reach them through DNS rebinding."""


LOOPBACK_NAMES: frozenset[str] = frozenset({"localhost", "127.0.0.1", "::1"})
"""The Host names a loopback-only server without a token answers to."""


def host_of(header: str | None) -> str:
    """The host name of a Host header, without its port (and brackets of an IPv6 literal)."""
    value = (header or "").strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _say_over_capacity(sock: socket.socket, limits: HttpLimits) -> None:
    """Best effort, never blocking the accepting thread: a 503 that says which cap was hit, so
    a client sees a reason rather than a reset."""
    reason = (
        f"over this server's connection caps ({limits.max_per_client} per client address, "
        f"{limits.max_connections} in all): reuse keep-alive connections or retry shortly"
    )
    body = encode_dict({"error": "busy", "reason": reason}) + b"\n"
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.send(head.encode() + body)


class _Deadlines:
    """One thread per server that cuts off requests past their deadline (SHUT_RDWR makes the
    handler's blocked read return)."""

    def __init__(self, name: str) -> None:
        self._due: dict[Any, float] = {}
        self._lock = threading.Lock()
        self.expired = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-deadlines", daemon=True)
        self._thread.start()

    def arm(self, sock: Any, seconds: float) -> None:
        with self._lock:
            self._due[sock] = time.monotonic() + seconds

    def disarm(self, sock: Any) -> None:
        with self._lock:
            self._due.pop(sock, None)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            now = time.monotonic()
            with self._lock:
                late = [sock for sock, due in self._due.items() if due <= now]
                for sock in late:
                    del self._due[sock]
            for sock in late:
                self.expired += 1
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class TlsThreadingServer(ThreadingHTTPServer):
    """A threading HTTP server that wraps accepted sockets in TLS when `tls` is set, caps
    connections overall and per client, and bounds the time to read a request (`limits`)."""

    daemon_threads = True
    tls: ssl.SSLContext | None = None
    limits: HttpLimits = HttpLimits()

    def server_activate(self) -> None:
        """Listen, and start the bookkeeping of connections and deadlines."""
        super().server_activate()
        self._held: dict[str, int] = {}
        self._held_lock = threading.Lock()
        self.refused = 0
        """Connections closed at accept: over the overall or the per-client cap."""
        self.deadlines = _Deadlines(type(self).__name__)

    def get_request(self) -> tuple[Any, Any]:
        """Accept; with TLS the handshake runs later on the request's own thread."""
        sock, address = self.socket.accept()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve on a thread, unless the caps are reached: then close at once."""
        peer = str(client_address[0])
        with self._held_lock:
            total = sum(self._held.values())
            if (
                total >= self.limits.max_connections
                or self._held.get(peer, 0) >= self.limits.max_per_client
            ):
                self.refused += 1
                refused = True
            else:
                self._held[peer] = self._held.get(peer, 0) + 1
                refused = False
        if refused:
            logger.warning("http: refused a connection from %s (connection caps)", peer)
            if not isinstance(request, ssl.SSLSocket):  # TLS would need a handshake first
                _say_over_capacity(request, self.limits)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve, then give the connection's place back."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.deadlines.disarm(request)
            peer = str(client_address[0])
            with self._held_lock:
                left = self._held.get(peer, 1) - 1
                if left:
                    self._held[peer] = left
                else:
                    self._held.pop(peer, None)

    def server_close(self) -> None:
        """Close the socket and stop the deadline thread."""
        super().server_close()
        if hasattr(self, "deadlines"):
            self.deadlines.stop()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that fails its TLS handshake or drops the line is not worth a traceback;
        anything else is a bug and is logged with one."""
        error = sys.exc_info()[1]
        if isinstance(error, ssl.SSLError | ConnectionError | TimeoutError | OSError):
            logger.debug("http request from %s failed: %s", client_address, error)
        else:
            logger.error("http request from %s failed", client_address, exc_info=error)


class BackgroundServer:
    """A server answering on its own named thread: `start`, `address`, `stop`."""

    def __init__(self, server: TlsThreadingServer, name: str) -> None:
        self.server = server
        self.thread = threading.Thread(
            target=server.serve_forever, name=name, kwargs={"poll_interval": 0.2}
        )

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the real port when 0 was asked for)."""
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Serve until `stop`."""
        self.thread.start()

    def stop(self) -> None:
        """Stop answering (waiting up to 5 s for the serving loop) and close the socket; safe
        before `start` too."""
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join(5)
        self.server.server_close()


class TlsThreadingServer6(TlsThreadingServer):
    """The same on IPv6."""

    address_family = socket.AF_INET6


def server_class(host: str) -> type[TlsThreadingServer]:
    """The server class for a bind host (IPv6 when it has a colon)."""
    return TlsThreadingServer6 if ":" in host else TlsThreadingServer


class TlsHandshakeHandler(BaseHTTPRequestHandler):
    """A request handler that finishes a deferred TLS handshake on its own thread, within the
    server's request deadline, and refuses Host names the server does not answer to.

    The deadline covers the handshake and the reading of each request; it ends when the
    request is in: at its headers for a request without a body, and where a handler calls
    `request_read()` after reading the body (replying may take longer: `/infer`, events)."""

    timeout = 30  # seconds a kept-alive connection may wait idle for its next request
    server: TlsThreadingServer

    def setup(self) -> None:
        """Handshake (within the request deadline) before reading the request."""
        self.server.deadlines.arm(self.request, self.server.limits.request_deadline_s)
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(self.timeout)
            self.request.do_handshake()
        super().setup()

    def handle_one_request(self) -> None:
        """Read one request within the deadline (re-armed for each kept-alive request)."""
        self.server.deadlines.arm(self.request, self.server.limits.request_deadline_s)
        try:
            super().handle_one_request()
        finally:
            self.request_read()

    def parse_request(self) -> bool:
        """Parse the request line and headers; refuse a Host this server does not answer to.
        A request without a body is fully read here."""
        if not super().parse_request():
            return False
        allowed = self.server.limits.allowed_hosts
        if allowed is not None and host_of(self.headers.get("Host")) not in allowed:
            self.close_connection = True
            reason = (
                "this server answers only to its loopback names (localhost, 127.0.0.1, ::1) "
                "without a token: a page of another site cannot reach it through DNS rebinding"
            )
            send_reply(
                self,
                json_reply(HTTPStatus.MISDIRECTED_REQUEST, {"error": "host", "reason": reason}),
                close=True,
            )
            return False
        if self.command not in ("POST", "PUT", "PATCH"):
            self.request_read()
        return True

    def request_read(self) -> None:
        """The whole request is in: the deadline no longer applies to this connection."""
        self.server.deadlines.disarm(self.request)
