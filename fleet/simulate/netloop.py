"""One epoll loop that drives many paho clients: how 1,000 simulated nodes share a thread.

paho's own `loop()` uses select(), which fails on descriptors above 1023, and a thread per client
polls for nothing; here one thread waits on every socket with epoll and runs paho's
`loop_read`/`loop_write`/`loop_misc` for the clients that are ready.
"""

from __future__ import annotations

import contextlib
import logging
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import paho.mqtt.client as mqtt

from common.mqtt.address import BrokerAddress
from common.mqtt.client import SessionSettings
from common.mqtt.session import MqttSession

logger = logging.getLogger(__name__)

TICK_S = 1.0
"""How often the network loop runs keepalive checks and due reconnects."""


class NetLoop:
    """One thread driving every node's paho client through epoll (paho's external-loop API)."""

    def __init__(self, address: BrokerAddress) -> None:
        self._address = address
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._calls: list[Callable[[], None]] = []
        self._writers: set[LoopSession] = set()
        self._sessions: set[LoopSession] = set()  # loop thread only
        self._running = True
        self._thread = threading.Thread(target=self._run, name="sim-nodes-net", daemon=True)
        self._thread.start()

    def call(self, function: Callable[[], None]) -> None:
        """Run `function` on the loop thread."""
        with self._lock:
            self._calls.append(function)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"w")

    def want_write(self, session: LoopSession) -> None:
        """paho queued a packet for `session` (called on any thread)."""
        if threading.current_thread() is self._thread:
            self._writers.add(session)
        else:
            self.call(partial(self._settle, session, write=True))

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread; sockets still open are closed (the broker sends their wills)."""
        self.call(self._halt)
        self._thread.join(timeout)
        for session in self._sessions:
            if (sock := session.client.socket()) is not None:
                sock.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _halt(self) -> None:
        self._running = False

    def _run(self) -> None:
        next_tick = time.monotonic() + TICK_S
        while self._running:
            with self._lock:
                calls, self._calls = self._calls, []
            writers, self._writers = self._writers, set()
            for call in calls:
                self._guarded(call)
            for session in writers:
                self._guarded(partial(self._settle, session, write=True))
            if not self._running:
                return
            busy = self._calls or self._writers
            timeout = 0.0 if busy else max(0.0, next_tick - time.monotonic())
            for key, mask in self._selector.select(timeout):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(4096)
                else:
                    self._guarded(partial(self._io, key.data, mask))
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK_S
                for session in list(self._sessions):
                    self._guarded(partial(self._tick, session))

    @staticmethod
    def _guarded(step: Callable[[], None]) -> None:
        try:
            step()
        except Exception:
            logger.exception("simulated node network step failed")

    def _io(self, session: LoopSession, mask: int) -> None:
        client = session.client
        if mask & selectors.EVENT_READ:
            client.loop_read()
            while (sock := client.socket()) is not None and getattr(sock, "pending", int)():
                client.loop_read()  # TLS: decrypted bytes are invisible to epoll
        if mask & selectors.EVENT_WRITE and client.socket() is not None:
            client.loop_write()
        self._settle(session)

    def _tick(self, session: LoopSession) -> None:
        if session.registered is not None:
            session.client.loop_misc()  # keepalive pings, dead-connection detection
            self._settle(session)
        elif session.retry_at is not None and time.monotonic() >= session.retry_at:
            self.connect(session)

    def connect(self, session: LoopSession) -> None:
        """(Re)connect (loop thread); a failure schedules a retry with backoff."""
        session.retry_at = None
        self._sessions.add(session)
        address = self._address
        if session.stopping:
            return
        try:
            session.client.connect(address.host, address.port, session.settings.keepalive_s)
        except OSError as exc:
            session.counters.last_error = str(exc)
            logger.warning("%s cannot connect to %s: %s", session.node_id, address, exc)
            session.schedule_retry()
            return
        self._settle(session)

    def disconnect(self, session: LoopSession) -> None:
        """Send DISCONNECT (the broker drops the will); `session.closed` is set when done."""
        session.stopping, session.retry_at = True, None
        if session.client.socket() is None:
            self._sessions.discard(session)
            session.closed.set()
        else:
            session.client.disconnect()
            self._settle(session)

    def _settle(self, session: LoopSession, *, write: bool = False) -> None:
        """Make the selector follow the client's socket and whether it has bytes to write."""
        if write and session.registered is not None and session.client.want_write():
            session.client.loop_write()  # the socket is nearly always writable: try at once
        sock = session.client.socket()
        if session.registered is not None and sock is not session.registered:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(session.registered)
            session.registered = None
            if session.stopping:
                self._sessions.discard(session)
                session.closed.set()
            else:
                session.schedule_retry()
        if sock is None:
            return
        events = selectors.EVENT_READ
        if session.client.want_write():
            events |= selectors.EVENT_WRITE
        if session.registered is None:
            self._selector.register(sock, events, session)
            session.registered, session.events = sock, events
        elif events != session.events:
            self._selector.modify(sock, events, session)
            session.events = events


class LoopSession(MqttSession):
    """A `MqttSession` whose I/O runs on the shared `NetLoop` instead of its own thread."""

    def __init__(
        self, settings: SessionSettings, net: NetLoop, node_id: str, hook: Callable[[], None]
    ) -> None:
        super().__init__(settings, hook)
        self.node_id, self.client, self._net = node_id, self._client, net
        self.registered: Any = None
        self.events = 0
        self.retry_at: float | None = None
        self.stopping = False
        self.closed = threading.Event()
        self._backoff, self._connects_seen = settings.backoff_initial_s, 0
        self._client.on_socket_register_write = self._register_write

    def _register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._net.want_write(self)

    def start(self) -> None:
        """Connect through the shared loop; returns at once (see `wait_connected`)."""
        self._net.call(partial(self._net.connect, self))

    def request_stop(self) -> None:
        """Disconnect cleanly without waiting (see `closed`)."""
        self._stop.set()
        self._net.call(partial(self._net.disconnect, self))

    def stop(self, *, timeout: float = 5.0) -> None:
        """Disconnect cleanly and wait until the socket is closed."""
        self.request_stop()
        self.closed.wait(timeout)

    def schedule_retry(self) -> None:
        """Reconnect later: exponential backoff with jitter, reset by a success (loop thread)."""
        initial = self.settings.backoff_initial_s
        if self.counters.connects != self._connects_seen:
            self._connects_seen, self._backoff = self.counters.connects, initial
        self.retry_at = time.monotonic() + self._backoff + random.uniform(0, initial)
        self._backoff = min(self._backoff * 2, self.settings.backoff_max_s)
        self._connected.clear()
