"""HTTP servers that hold up: connection caps overall and per client, a deadline for a whole
request, Host names checked without a token, event streams capped per login.

The red team held 30 threads of a node with 30 sockets each sending one byte every 20 s, past
the per-read timeout; a no-token loopback server answered any Host (DNS rebinding); one token
holder could take every event stream of the dashboard.
"""

from __future__ import annotations

import http.client
import socket

import pytest

from common.http import HttpLimits
from fleet.dashboard.events import Hub, TooManyClientsError
from fleet.dashboard.view import DashboardView
from helpers.nodes import NodeFactory
from helpers.waiting import wait_until
from node.app import NodeApp


@pytest.fixture
def node(start_node: NodeFactory) -> NodeApp:
    app = start_node(http_listen="127.0.0.1:0")
    assert app.http is not None
    app.http._served.server.limits = HttpLimits(  # a short deadline, the default caps
        request_deadline_s=2.0, allowed_hosts=app.http._served.server.limits.allowed_hosts
    )
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
    """True when the server closed (or reset) the connection."""
    try:
        sock.settimeout(0.05)
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_tricklers_are_capped_per_client_and_cut_at_the_request_deadline(node: NodeApp) -> None:
    sockets = [trickle(node) for _ in range(12)]
    try:
        wait_until(lambda: sum(closed_by_server(s) for s in sockets) >= 4, 10, "the cap")
        held = [s for s in sockets if not closed_by_server(s)]
        assert len(held) == HttpLimits().max_per_client  # the others were closed at accept
        assert healthz(node, source="127.0.0.2") == 200  # another client is served meanwhile

        def still_trickling() -> bool:
            for sock in held:
                try:
                    sock.sendall(b"x")
                except OSError:
                    continue
            return all(closed_by_server(s) for s in held)

        wait_until(still_trickling, 15, "the deadline to cut every trickler off")
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
