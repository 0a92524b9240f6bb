"""HTTP servers that hold up: connection caps overall and per client, a deadline for a whole
request, Host names checked without a token, event streams capped per login.

The red team held 30 threads of a node with 30 sockets each sending one byte every 20 s, past
the per-read timeout; a no-token loopback server answered any Host (DNS rebinding); one token
holder could take every event stream of the dashboard.
"""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import replace

import pytest

from fleet.dashboard.events import Hub, TooManyClientsError
from fleet.dashboard.view import DashboardView
from helpers.nodes import NodeFactory
from helpers.waiting import wait_until
from node.app import NodeApp
from schemas.openapi import ENDPOINTS


@pytest.fixture
def node(start_node: NodeFactory) -> NodeApp:
    app = start_node(http_listen="127.0.0.1:0")
    assert app.http is not None
    server = app.http._served.server
    server.limits = replace(server.limits, request_deadline_s=2.0)  # a short deadline

    return app


def healthz(app: NodeApp, *, source: str = "127.0.0.1", host: str | None = None) -> int:
    assert app.http is not None
    address = app.http.address
    conn = http.client.HTTPConnection(*address, timeout=10, source_address=(source, 0))
    conn.request("GET", "/healthz", headers={"Host": host} if host else {})
    status = conn.getresponse().status
    conn.close()
    return status


def trickle(app: NodeApp) -> socket.socket:
    """A client that starts a request and then sends it one byte at a time."""
    assert app.http is not None
    sock = socket.create_connection(app.http.address, timeout=10)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """True when the server closed (or reset) the connection, or refused it with its 503."""
    try:
        sock.settimeout(0.05)
        data = sock.recv(4096)
        return data == b"" or data.startswith(b"HTTP/1.1 503")
    except TimeoutError:
        return False
    except OSError:
        return True


def test_tricklers_are_capped_per_client(node: NodeApp) -> None:
    """Connections over the per-client cap are closed at accept; another client is served.
    With a deadline the test cannot reach: a busy machine accepting slowly would otherwise see
    the first tricklers cut, and their places taken, before the last ones are accepted."""
    assert node.http is not None
    server = node.http._served.server
    server.limits = replace(server.limits, request_deadline_s=120.0)
    cap = server.limits.max_per_client
    sockets = [trickle(node) for _ in range(cap + 4)]
    try:
        wait_until(lambda: server.refused >= 4, 30, "the cap")  # counted by the server itself
        assert healthz(node, source="127.0.0.2") == 200  # another client is served meanwhile
        assert server.refused == 4  # the others are held
        assert sum(closed_by_server(s) for s in sockets) <= 4
    finally:
        for sock in sockets:
            sock.close()


def test_tricklers_are_cut_at_the_request_deadline(node: NodeApp) -> None:
    """Requests that never end are cut at the deadline (2 s here), and their places are free."""
    assert node.http is not None
    cap = node.http._served.server.limits.max_per_client
    sockets = [trickle(node) for _ in range(cap)]
    try:

        def still_trickling() -> bool:
            for sock in sockets:
                try:
                    sock.sendall(b"x")
                except OSError:
                    continue
            return all(closed_by_server(s) for s in sockets)

        wait_until(still_trickling, 30, "the deadline to cut every trickler off")
        assert healthz(node) == 200  # and their places are free again
    finally:
        for sock in sockets:
            sock.close()


def test_a_loopback_node_without_a_token_answers_only_to_loopback_names(node: NodeApp) -> None:
    assert healthz(node, host="evil.example") == 421
    assert healthz(node, host="evil.example:80") == 421
    assert node.http is not None
    port = node.http.address[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"[::1]:{port}"):
        assert healthz(node, host=host) == 200, host


def test_a_client_over_the_cap_is_told_why(node: NodeApp) -> None:
    """Closed at accept, but with a 503 that names the cap (plain HTTP), not a bare reset."""
    assert node.http is not None
    server = node.http._served.server
    server.limits = replace(server.limits, request_deadline_s=120.0)  # not racing the cap
    cap = server.limits.max_per_client
    held = [trickle(node) for _ in range(cap)]
    try:
        wait_until(lambda: node.http is not None and _held(node) >= cap, 30, "the cap to fill")
        late = socket.create_connection(node.http.address, timeout=10)
        answer = late.makefile("rb").read()
        late.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), answer[:200]
        assert b"Retry-After: 1" in head
        reply = json.loads(body)
        assert reply["error"] == "busy"
        assert f"{cap} per client address" in reply["reason"]
    finally:
        for sock in held:
            sock.close()
    assert healthz(node, source="127.0.0.2") == 200


def _held(node: NodeApp) -> int:
    assert node.http is not None
    server = node.http._served.server
    with server._held_lock:
        return sum(server._held.values())


def test_every_endpoint_has_the_limits(node: NodeApp) -> None:
    """The sidecar's endpoints sit behind the same Host check and request deadline."""
    assert node.http is not None
    for endpoint in ENDPOINTS:
        conn = http.client.HTTPConnection(*node.http.address, timeout=10)
        conn.request(endpoint.method, endpoint.path, headers={"Host": "evil.example"})
        assert conn.getresponse().status == 421, endpoint.key
        conn.close()
    for path in ("/test", "/infer"):  # a body that trickles in is cut at the deadline
        sock = socket.create_connection(node.http.address, timeout=10)
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{{".encode()
        )
        # closed by the server at its 2 s deadline, no answer (the handler's own read timeout
        # is 30 s: past this socket's 10 s, recv would raise instead)
        assert sock.recv(1024) == b"", path
        sock.close()
    assert healthz(node) == 200


def test_one_login_cannot_take_every_event_stream() -> None:
    hub = Hub(DashboardView(), max_clients=10, max_per_login=4)
    mine = [hub.open("10.0.0.1", "session:aaaa") for _ in range(4)]
    with pytest.raises(TooManyClientsError, match="this login holds 4"):
        hub.open("10.0.0.2", "session:aaaa")
    others = [hub.open("10.0.0.1", "session:bbbb") for _ in range(4)]
    assert len(others) == 4  # another login is not held back
    hub.close(mine[0])
    hub.open("10.0.0.1", "session:aaaa")  # a closed page frees its place
    assert hub.clients == 8
