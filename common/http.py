"""What the node's HTTP side and the fleet dashboard share: TLS, bearer tokens, the server class.

Both serve a few endpoints from `http.server` on threads: a TLS handshake runs on the request's
own thread (a slow client holds only that thread), a failed handshake or a dropped line is not
worth a traceback, and a bearer token is compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
import ssl
import sys
import threading
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


class TlsThreadingServer(ThreadingHTTPServer):
    """A threading HTTP server that wraps accepted sockets in TLS when `tls` is set."""

    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def get_request(self) -> tuple[Any, Any]:
        """Accept; with TLS the handshake runs later on the request's own thread."""
        sock, address = self.socket.accept()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that fails its TLS handshake or drops the line is not worth a traceback;
        anything else is a bug and is logged with one."""
        error = sys.exc_info()[1]
        if isinstance(error, ssl.SSLError | ConnectionError | TimeoutError):
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
    """A request handler that finishes a deferred TLS handshake on its own thread."""

    timeout = 30  # seconds a kept-alive or half-sent request may hold its thread

    def setup(self) -> None:
        """Handshake (bounded by `timeout`) before reading the request."""
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(self.timeout)
            self.request.do_handshake()
        super().setup()
