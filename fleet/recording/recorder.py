"""`record`: subscribe to topic filters and write every message to a recording until told to stop.

Each message is encoded on the MQTT network thread as it arrives and handed to the writer
thread (`fleet.recording.writer`), so a slow disk never stalls the connection.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt

from common.mqtt.connection import Connection
from common.mqtt.session import MqttSession
from fleet.recording.broker import check_protocol, connect, new_session
from fleet.recording.format import (
    RecordingHeader,
    encode_header,
    encode_message,
    open_for_writing,
)
from fleet.recording.stats import ProgressClock, RecordStats
from fleet.recording.topics import subscription_filters
from fleet.recording.writer import QUEUE_SIZE, _Line, _Writer

logger = logging.getLogger("fleet.recording")


def record(
    broker: str | Connection,
    topics: list[str],
    out: Path,
    *,
    duration: float | None = None,
    max_messages: int | None = None,
    protocol: str = "5",
    progress: Callable[[RecordStats], None] | None = None,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
    queue_size: int = QUEUE_SIZE,
) -> RecordStats:
    """Subscribe to `topics` (QoS 1) and write every message to `out` until told to stop.

    Stops after `duration` seconds, after `max_messages` messages, when `stop` is set or on
    Ctrl-C (KeyboardInterrupt ends the recording cleanly), whichever comes first; the file is
    complete and closed when this returns. `progress` is called about once per second with the
    counts so far; `ready` is set once the broker has acknowledged the subscriptions. Raises
    ValueError for bad arguments, ConnectionError when the broker cannot be reached and OSError
    when the file cannot be written.
    """
    _validate_record_args(topics, duration, max_messages, protocol)
    session = new_session(broker, "recorder", protocol)
    address = session.settings.address
    created_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    stream = open_for_writing(out)
    writer = _Writer(stream, queue_size)
    recorder = _Recorder(session, writer, max_messages)
    try:
        stream.write(encode_header(RecordingHeader(created_at, str(address), list(topics))))
        stream.flush()
        writer.start()
        for topic_filter in subscription_filters(topics):
            session.route(topic_filter, recorder.on_message, qos=1)
        try:
            connect(session)
            _await_subscriptions(session)
            logger.info("recording %s from %s to %s", ", ".join(topics), address, out)
            if ready is not None:
                ready.set()
            recorder.wait(duration, stop if stop is not None else threading.Event(), progress)
        except KeyboardInterrupt:
            logger.info("interrupted; finishing %s", out)
        finally:
            session.stop()
    finally:
        writer.close()
        try:
            stream.close()
        except OSError:
            if writer.error is None:
                raise
    if writer.error is not None:
        raise writer.error
    stats = recorder.stats()
    if stats.dropped:
        logger.warning(
            "%d message(s) are missing from %s (dropped; the first warning says why)",
            stats.dropped,
            out,
        )
    logger.info("recorded %s to %s", stats.summary().strip(), out)
    return stats


def _validate_record_args(
    topics: list[str], duration: float | None, max_messages: int | None, protocol: str
) -> None:
    if not topics:
        msg = "give at least one topic filter to record, e.g. imu/+/window"
        raise ValueError(msg)
    if duration is not None and not duration > 0:
        msg = f"duration must be positive, got {duration}"
        raise ValueError(msg)
    if max_messages is not None and max_messages < 1:
        msg = f"max_messages must be at least 1, got {max_messages}"
        raise ValueError(msg)
    check_protocol(protocol)


def _await_subscriptions(session: MqttSession) -> None:
    """Return once the broker has processed our SUBSCRIBEs.

    A broker handles one connection's packets in order, so the UNSUBACK of a throw-away
    subscription sent after them proves the real subscriptions are in place.
    """
    barrier = f"imu-recorder/{session.settings.client_id}/barrier"
    session.route(barrier, lambda message: None, qos=0)
    if not session.unroute(barrier, timeout=5.0):
        logger.debug("no UNSUBACK for the subscription barrier; carrying on")


class _Recorder:
    """The message handler (network thread) and the wait loop (caller's thread) of `record`."""

    def __init__(self, session: MqttSession, writer: _Writer, max_messages: int | None) -> None:
        self.session = session
        self.writer = writer
        self.max_messages = max_messages
        self.started = time.monotonic()
        self.finished = threading.Event()
        self._accepted = 0
        self._last: mqtt.MQTTMessage | None = None

    def on_message(self, message: mqtt.MQTTMessage) -> None:
        """Queue one arrival for the writer (runs on the MQTT network thread)."""
        if message is self._last:  # overlapping filters: paho calls every matching route
            return
        self._last = message
        t = time.monotonic() - self.started
        if self.max_messages is not None and self._accepted >= self.max_messages:
            return
        self._accepted += 1
        properties = message.properties
        content_type = getattr(properties, "ContentType", None) if properties else None
        payload = bytes(message.payload)
        try:
            data = encode_message(t, message.topic, payload, content_type)
        except Exception:  # a bug, not a full disk: lose this message, loudly, and carry on
            logger.exception("cannot encode a message on %s", message.topic)
            self.writer.drop(f"cannot encode a message on {message.topic}")
        else:
            self.writer.offer(_Line(data, message.topic, len(payload)))
        if self.max_messages is not None and self._accepted >= self.max_messages:
            self.finished.set()

    def stats(self) -> RecordStats:
        """Counts so far."""
        reconnects = max(0, self.session.counters.connects - 1)
        return self.writer.snapshot(time.monotonic() - self.started, reconnects)

    def wait(
        self,
        duration: float | None,
        stop: threading.Event,
        progress: Callable[[RecordStats], None] | None,
    ) -> None:
        """Block until the duration passes, enough messages arrived, `stop` or a write failure."""
        deadline = math.inf if duration is None else self.started + duration
        clock = ProgressClock(time.monotonic())
        while not (stop.is_set() or self.finished.is_set() or self.writer.failed.is_set()):
            now = time.monotonic()
            if now >= deadline:
                return
            if clock.due(now) and progress is not None:
                progress(self.stats())
            wakeup = min(clock.next, deadline) - time.monotonic()
            self.finished.wait(min(0.1, max(0.0, wakeup)))
