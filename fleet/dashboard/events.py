"""Server-sent events: one stream per open page, fed from the view every `tick_s`.

A page that connects gets the whole picture (`snapshot`), then what changed (`delta`) every
tick while anything did, and a comment line every `keepalive_s` so proxies keep the line open.
Each event is serialised once for every page. A page too slow to take its events (its queue
fills) is disconnected; its `EventSource` reconnects by itself and starts over from a snapshot.
Results carry a running number `n`, and a snapshot the last one it holds (`result_seq`): a page
skips results it already has, so the overlap of a snapshot and the next delta shows nothing twice.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Final

import orjson

from common.errors import EdgeError
from fleet.dashboard.view import DashboardView

logger = logging.getLogger(__name__)

RETRY_MS: Final = 2000
"""How long a page's EventSource waits before reconnecting."""
CLOSE: Final = b""
"""Queued to a stream to end it."""


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One SSE event (orjson never writes a raw newline, so `data` is one line)."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


@dataclass(eq=False)
class Stream:
    """One connected page: its queue of serialised events."""

    events: queue.Queue[bytes]
    peer: str
    login: str = ""
    """Who opened it (fleet/dashboard/auth.py `Gate.login`): streams are capped per login."""
    lagged: bool = False


class TooManyClientsError(EdgeError, RuntimeError):
    """Every SSE slot is taken."""


class Hub:
    """Fans the view's changes out to every connected page."""

    def __init__(
        self,
        view: DashboardView,
        *,
        max_clients: int = 32,
        max_per_login: int = 4,
        queue_events: int = 256,
        tick_s: float = 0.2,
        keepalive_s: float = 15.0,
    ) -> None:
        self.view = view
        self.max_clients = max_clients
        self.max_per_login = max_per_login
        self.keepalive_s = keepalive_s
        self._queue_events = queue_events
        self._tick_s = tick_s
        self._streams: set[Stream] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-events", daemon=True)
        self.disconnected_slow = 0

    @property
    def clients(self) -> int:
        """Pages connected now."""
        with self._lock:
            return len(self._streams)

    def start(self) -> None:
        """Start pushing changes."""
        self._thread.start()

    def stop(self) -> None:
        """End every stream and stop pushing."""
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            for stream in self._streams:
                _offer(stream, CLOSE)
            self._streams.clear()

    def open(self, peer: str, login: str = "") -> Stream:
        """A new stream that starts with a snapshot; TooManyClientsError when every slot is
        taken, or `login` holds `max_per_login` streams already."""
        stream = Stream(queue.Queue(self._queue_events), peer, login or f"peer:{peer}")
        stream.events.put_nowait(f"retry: {RETRY_MS}\n\n".encode())
        with self._lock:  # no delta is drained between this snapshot and the registration
            if len(self._streams) >= self.max_clients:
                msg = f"{self.max_clients} pages are connected already"
                raise TooManyClientsError(msg)
            mine = sum(other.login == stream.login for other in self._streams)
            if mine >= self.max_per_login:
                msg = (
                    f"this login holds {mine} event streams already (at most "
                    f"{self.max_per_login}): close a page"
                )
                raise TooManyClientsError(msg)
            stream.events.put_nowait(sse("snapshot", self.view.snapshot()))
            self._streams.add(stream)
        logger.info("page connected from %s (%d open)", peer, self.clients)
        return stream

    def close(self, stream: Stream) -> None:
        """Forget a stream (its page went away)."""
        with self._lock:
            self._streams.discard(stream)
        logger.info("page from %s disconnected (%d open)", stream.peer, self.clients)

    def push(self) -> int:
        """Send what changed since the last push to every page; returns how many got it."""
        with self._lock:
            delta = self.view.drain()
            if delta is None:
                return 0
            event = sse("delta", delta)
            sent = 0
            for stream in list(self._streams):
                if _offer(stream, event):
                    sent += 1
                else:  # a page that cannot keep up: end it, it reconnects to a snapshot
                    self._streams.discard(stream)
                    stream.lagged = True
                    self.disconnected_slow += 1
                    logger.warning("page from %s is too slow: disconnected", stream.peer)
            return sent

    def _run(self) -> None:
        while not self._stop.wait(self._tick_s):
            try:
                self.push()
            except Exception:  # the pump must outlive one bad delta
                logger.exception("pushing a dashboard update failed")


def _offer(stream: Stream, event: bytes) -> bool:
    try:
        stream.events.put_nowait(event)
    except queue.Full:
        try:  # make room for the end marker so the stream's thread stops promptly
            stream.events.get_nowait()
            stream.events.put_nowait(CLOSE)
        except (queue.Empty, queue.Full):
            pass
        return False
    return True
