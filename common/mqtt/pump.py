"""Drive a paho client's socket as `client.loop()` does, on poll(2) instead of select(2).

paho's `loop()` waits in select(), which cannot watch a descriptor numbered 1024 (FD_SETSIZE)
or above: in a process with that many files open, every connection then fails with
`MQTT_ERR_CONN_LOST` before its CONNACK, whatever the broker does. poll() has no such limit,
so a controller or dashboard in a process holding thousands of sockets connects as any other.

One wake-up pair replaces paho's: a publish from another thread queues its packet and, through
`on_socket_register_write`, wakes the wait, so only the pumping thread ever writes the socket.
"""

from __future__ import annotations

import contextlib
import select
import socket
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

READABLE = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP
"""Events on the client's socket that `loop_read` must see (it finds errors and EOF itself)."""


class SocketPump:
    """One paho client's network I/O, a step at a time, from the thread that owns it."""

    def __init__(self, client: mqtt.Client) -> None:
        self._client = client
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._poller = select.poll()
        self._poller.register(self._wake_r, select.POLLIN)
        self._watched: Any = None
        client.on_socket_register_write = self._wake

    def _wake(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        """paho queued a packet while the socket had nothing to write: end the wait."""
        with contextlib.suppress(OSError):  # full (a wake-up is pending) or closed (stopping)
            self._wake_w.send(b"\0")

    def step(self, timeout: float) -> MQTTErrorCode:
        """Wait up to `timeout` s for the socket or a wake-up, then read, write and keep the
        connection alive as `client.loop(timeout)` would; returns paho's result code."""
        client = self._client
        sock = client.socket()
        if sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        wants_write = client.want_write()
        mask = READABLE | (select.POLLOUT if wants_write else 0)
        if sock is not self._watched:  # a new connection: a new socket
            if self._watched is not None:
                self._forget_socket()
            self._poller.register(sock, mask)
            self._watched = sock
        else:
            self._poller.modify(sock, mask)
        pending = sock.pending() if hasattr(sock, "pending") else 0  # TLS: already decrypted
        try:
            events = dict(self._poller.poll(0 if pending else timeout * 1000))
        except OSError:
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        ready = events.get(sock.fileno(), 0)
        if ready & select.POLLNVAL:
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        if ready & READABLE or pending:
            rc = client.loop_read()
            if rc or client.socket() is None:
                return rc
        woken = self._wake_r.fileno() in events
        if woken:
            with contextlib.suppress(OSError):  # nothing left, or closed by `close`
                self._wake_r.recv(4096)
        if woken or ready & select.POLLOUT or wants_write:
            rc = client.loop_write()
            if rc or client.socket() is None:
                return rc
        return client.loop_misc()

    def _forget_socket(self) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):  # closed already
            self._poller.unregister(self._watched)
        self._watched = None

    def close(self) -> None:
        """Release the wake-up pair (the client's socket is paho's to close)."""
        self._wake_r.close()
        self._wake_w.close()
