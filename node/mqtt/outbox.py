"""QoS 1 messages that must not be lost: to the broker while connected, to disk while not.

While the session is connected a message goes straight to paho (which keeps it until its
PUBACK and re-sends it after a reconnect). While it is not, the message goes to the disk spool
instead of paho's memory, so an outage longer than memory allows, or a node restart during one,
loses nothing. After every connection a replay thread publishes the spool oldest first, a
bounded number in flight at a time, and deletes each segment once all of it is acknowledged.
Replayed messages can arrive after newer ones: consumers order by `seq`/`ts`, as always.

A message published with `on_safe` calls it once it is safe: acknowledged by the broker, or
written to the spool. The node acknowledges a sensor window only then, so a crash at any point
leaves the window unacknowledged and the broker delivers it again to the restarted node.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt

from common.mqtt.session import MqttSession
from node.mqtt.journal import Journal
from node.mqtt.spool import Spool, SpoolStats

logger = logging.getLogger(__name__)

REPLAY_IN_FLIGHT = 200
"""Replayed messages handed to paho and not yet acknowledged, at most (and at most half of
paho's own limit, so that live results always find room beside the replay)."""
REPLAY_ACK_TIMEOUT_S = 30.0
EARLY_KEPT = 4096
"""PUBACKs remembered that came before their message was registered (message ids repeat only
after 65,535 publishes, long after these are forgotten)."""


class Outbox:
    """Publishes QoS 1 messages through a session, spooling them while it is offline."""

    def __init__(
        self, session: MqttSession, spool: Spool | None, journal: Journal | None = None
    ) -> None:
        self.session = session
        self.spool = spool
        self.journal = journal
        """Where results in flight (those published with `on_safe`) wait on disk for their
        PUBACK (node/mqtt/journal.py)."""
        pending = session.settings.max_pending_publishes
        self.replay_in_flight = max(1, min(REPLAY_IN_FLIGHT, pending // 2))
        self._awaiting: dict[int, Callable[[], None]] = {}
        """Message id -> what to call once the broker acknowledges it."""
        self._early: set[int] = set()
        self._early_order: deque[int] = deque()
        self._awaiting_lock = threading.Lock()
        session.on_published(self._release)
        self.spooled = 0
        """Messages written to the spool since start."""
        self.replayed = 0
        """Spooled messages published and acknowledged since start."""
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        session.on_connected(self._wake.set)

    @classmethod
    def open(cls, session: MqttSession, spool_dir: Path | None, spool_max_mb: int) -> Outbox:
        """An outbox with a spool of `spool_max_mb` in `spool_dir` (none for 0) and a journal of
        results in flight beside it. The spool takes a lock: `stop()` releases it."""
        if not spool_max_mb or spool_dir is None:
            return cls(session, None)
        spool = Spool(spool_dir, spool_max_mb * 2**20)
        return cls(session, spool, Journal(spool.folder / "inflight"))

    def publish(
        self, topic: str, payload: bytes, on_safe: Callable[[], None] | None = None
    ) -> bool:
        """Queue one QoS 1 message; False when neither paho nor the spool could take it.

        `on_safe` is called once the message is safe (broker acknowledgement, or on disk)."""
        if self.spool is None or self.session.is_connected:
            settle = None
            if on_safe is not None and self.journal is not None:
                settle = self.journal.append(topic, payload)  # on disk before paho has it
            info = self.session.publish_message(topic, payload, qos=1)
            if info is not None:  # paho holds it until the broker acknowledges it
                if on_safe is not None:
                    self._await(info, _both(settle, on_safe))
                return True
            if settle is not None:
                settle()  # never went out: not in flight
            if self.spool is None:
                return False
            # paho's memory queue is full (a link dying unnoticed): to disk
        if self.spool.append(topic, payload):
            with self._awaiting_lock:  # publishers on several threads (inference workers)
                self.spooled += 1
            if on_safe is not None:
                on_safe()
            return True
        return False

    def publish_at_most_once(
        self, topic: str, payload: bytes, on_safe: Callable[[], None] | None = None
    ) -> bool:
        """Hand a message to the socket at QoS 0 (`results_qos = 0`), never spooled; `on_safe`
        is called at once. False without a connection (the caller counts it)."""
        sent = self.session.is_connected and self.session.publish(topic, payload, qos=0)
        if sent and on_safe is not None:
            on_safe()
        return sent

    def _await(self, info: mqtt.MQTTMessageInfo, on_safe: Callable[[], None]) -> None:
        """Call `on_safe` when the PUBACK for `info.mid` arrives (or has already arrived)."""
        with self._awaiting_lock:  # never held while calling into paho (its locks call us)
            early = info.mid in self._early
            if early:
                self._early.discard(info.mid)
            else:
                self._awaiting[info.mid] = on_safe
        if early:
            on_safe()

    def _release(self, mid: int) -> None:
        """The broker acknowledged `mid` (network thread)."""
        with self._awaiting_lock:
            on_safe = self._awaiting.pop(mid, None)
            if on_safe is None:  # not ours, or acknowledged before it was registered
                self._early.add(mid)
                self._early_order.append(mid)
                if len(self._early_order) > EARLY_KEPT:
                    self._early.discard(self._early_order.popleft())
        if on_safe is not None:
            try:
                on_safe()
            except Exception:
                logger.exception("on_safe callback failed")

    def stats(self) -> SpoolStats | None:
        """What the spool holds (None without a spool)."""
        return self.spool.stats() if self.spool is not None else None

    def start(self) -> None:
        """Start the replay thread (a spool left by an earlier run is replayed too)."""
        self._thread = threading.Thread(target=self._run, name="spool-replay", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        """True while the replay thread runs (or before it was started)."""
        return self._thread is None or self._thread.is_alive()

    def stop(self) -> None:
        """Stop replaying and close the spool (what is left stays for the next run)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.spool is not None:
            self.spool.close()
        if self.journal is not None:
            self.journal.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if self.spool is None or not self.session.is_connected:
                continue
            if self.spool.stats().messages == 0:
                continue
            try:
                self._replay(self.spool)
            except Exception:  # never let the thread die: the spool would only grow
                logger.exception("spool replay failed; retrying after the next connection")

    def _replay(self, spool: Spool) -> None:
        for segment in spool.seal():
            count = self._replay_segment(spool, segment)
            if count is None:
                return  # disconnected, stopping, or paho full: the segment stays for next time
            spool.discard(segment)
            self.replayed += count
            logger.info("replayed %d spooled messages from %s", count, segment.name)

    def _replay_segment(self, spool: Spool, segment: Path) -> int | None:
        """Publish one segment; its message count once all are acknowledged, else None."""
        unacked: deque[mqtt.MQTTMessageInfo] = deque()
        count = 0
        for topic, payload in spool.read(segment):
            if not self._wait(lambda: _in_flight(unacked) < self.replay_in_flight):
                return None
            info = self.session.publish_message(topic, payload, qos=1)
            if info is None or info.rc != mqtt.MQTT_ERR_SUCCESS:
                return None  # refused, or the link just dropped: the segment stays
            unacked.append(info)
            count += 1
        if not self._wait(lambda: _in_flight(unacked) == 0, REPLAY_ACK_TIMEOUT_S):
            return None  # what was acknowledged will come again: at least once
        return count

    def _wait(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        """Until `done()` while connected and running; False when that ended first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            if self._stop.is_set() or not self.session.is_connected:
                return False
            if deadline is not None and time.monotonic() > deadline:
                return False
            self.session.wait_settled(0.05)  # woken by the next acknowledgement
        return True


def _both(first: Callable[[], None] | None, then: Callable[[], None]) -> Callable[[], None]:
    """`first` (when there is one), then `then`."""
    if first is None:
        return then

    def call() -> None:
        first()
        then()

    return call


def _in_flight(unacked: deque[mqtt.MQTTMessageInfo]) -> int:
    """Drop acknowledged messages from the front of `unacked`; how many are left.

    QoS 1 acknowledgements come in publish order (MQTT 5 section 4.6), so the oldest
    unacknowledged message bounds the rest; a stray later one is caught by the final wait.
    """
    while unacked and unacked[0].is_published():
        unacked.popleft()
    return len(unacked)
