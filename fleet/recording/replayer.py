"""`replay`: republish a recording's messages on their recorded schedule, once or in a loop.

Every message goes out at QoS 1 at its recorded time divided by `rate`; publishing waits while
too many are unacknowledged (back-pressure, no drops).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from common.mqtt.connection import Connection
from common.mqtt.session import MqttSession
from fleet.recording.broker import check_protocol, connect, new_session
from fleet.recording.format import read_header, read_recording
from fleet.recording.stats import ProgressClock, ReplayStats

logger = logging.getLogger("fleet.recording")

ACK_TIMEOUT_S: Final = 10.0
MAX_IN_FLIGHT: Final = 1_000
"""Replay waits while this many publishes are unacknowledged (back-pressure, no drops)."""


def parse_rewrite(spec: str) -> tuple[str, str]:
    """Parse a CLI rewrite `OLD_PREFIX=NEW_PREFIX` (e.g. `imu/s1/=imu/s1-replay/`)."""
    old, sep, new = spec.partition("=")
    if not sep or not old or not new:
        msg = f"topic rewrite {spec!r} must look like OLD_PREFIX=NEW_PREFIX"
        raise ValueError(msg)
    return old, new


def replay(
    path: Path,
    broker: str | Connection,
    *,
    rate: float = 1.0,
    loop: bool = False,
    protocol: str = "5",
    progress: Callable[[ReplayStats], None] | None = None,
    stop: threading.Event | None = None,
    rewrite: Mapping[str, str] | None = None,
) -> ReplayStats:
    """Republish a recording's messages to their topics (QoS 1) on their recorded schedule.

    Message i goes out `(t_i - t_first) / rate` seconds after the pass starts (rate 2 is twice
    as fast; 0 or infinity as fast as the broker acknowledges). With `loop` the file is replayed
    until `stop` is set or Ctrl-C, each pass one mean message interval after the last. `rewrite`
    maps topic prefixes to new ones (longest prefix wins), e.g. `{"imu/": "replay/imu/"}`.
    Payloads are the recorded bytes (JSON objects re-serialised by orjson, same values) and the
    MQTT 5 content type is restored. Returns after every publish is acknowledged (or 10 s).
    Raises RecordingError for a file that is not a recording (checked before connecting),
    ValueError for a bad rate and ConnectionError when the broker cannot be reached.
    """
    if math.isnan(rate) or rate < 0:
        msg = f"rate must be >= 0 (0 or inf: as fast as possible), got {rate}"
        raise ValueError(msg)
    check_protocol(protocol)
    retopic = _rewriter(rewrite)
    read_header(path)
    session = new_session(broker, "replay", protocol)
    stop = stop if stop is not None else threading.Event()
    connect(session)
    replayer = _Replayer(session, rate, stop, progress, retopic)
    logger.info(
        "replaying %s to %s at %s%s",
        path,
        session.settings.address,
        "full speed" if replayer.fast else f"{rate:g}x",
        " in a loop" if loop else "",
    )
    try:
        begin = time.monotonic()
        while not stop.is_set():
            count, first, last = replayer.one_pass(path, begin)
            if stop.is_set():
                break
            replayer.loops += 1
            if not loop:
                break
            if count == 0:
                logger.warning("%s holds no messages; nothing to loop over", path)
                break
            if not replayer.fast:
                gap = (last - first) / (count - 1) if count > 1 else 0.0
                begin += (last - first + gap) / rate
    except KeyboardInterrupt:
        logger.info("interrupted; waiting for acknowledgements")
    finally:
        acknowledged = session.wait_published(ACK_TIMEOUT_S)
        unacknowledged = 0 if acknowledged else session.pending_publishes()
        session.stop()
    stats = replayer.stats(unacknowledged)
    if stats.unacknowledged or stats.dropped:
        logger.warning(
            "replay incomplete: %d dropped, %d unacknowledged", stats.dropped, stats.unacknowledged
        )
    logger.info("replayed %s", stats.summary().strip())
    return stats


def _rewriter(rewrite: Mapping[str, str] | None) -> Callable[[str], str]:
    rules = sorted((rewrite or {}).items(), key=lambda rule: -len(rule[0]))
    for old, new in rules:
        if not old or not new or any(c in new for c in "+#"):
            msg = f"topic rewrite {old!r} -> {new!r}: both must be non-empty, without + or #"
            raise ValueError(msg)

    def apply(topic: str) -> str:
        for old, new in rules:
            if topic.startswith(old):
                return new + topic[len(old) :]
        return topic

    return apply


class _Replayer:
    """Publishes recorded messages on schedule; one instance per `replay` call."""

    def __init__(
        self,
        session: MqttSession,
        rate: float,
        stop: threading.Event,
        progress: Callable[[ReplayStats], None] | None,
        retopic: Callable[[str], str],
    ) -> None:
        self.session = session
        self.fast = rate == 0 or math.isinf(rate)
        self.rate = rate
        self.stop = stop
        self.progress = progress
        self.retopic = retopic
        self.started = time.monotonic()
        self.clock = ProgressClock(self.started)
        self.messages = self.bytes = self.loops = self.dropped = 0
        self.max_lag = 0.0

    def stats(self, unacknowledged: int = 0) -> ReplayStats:
        return ReplayStats(
            messages=self.messages,
            bytes=self.bytes,
            loops=self.loops,
            elapsed=time.monotonic() - self.started,
            dropped=self.dropped,
            unacknowledged=unacknowledged,
            max_lag=self.max_lag,
        )

    def one_pass(self, path: Path, begin: float) -> tuple[int, float, float]:
        """Publish the file once, starting at monotonic `begin`; (messages, first t, last t)."""
        count, first, last = 0, 0.0, 0.0
        for message in read_recording(path):
            if count == 0:
                first = message.t
            count, last = count + 1, message.t
            due = begin if self.fast else begin + max(0.0, message.t - first) / self.rate
            if not self._wait_until(due):
                break
            self._throttle()
            if self.stop.is_set():
                break
            if not self.fast:
                self.max_lag = max(self.max_lag, time.monotonic() - due)
            topic = self.retopic(message.topic)
            if self.session.publish(
                topic, message.payload, qos=1, content_type=message.content_type
            ):
                self.messages += 1
                self.bytes += len(message.payload)
            else:
                self.dropped += 1
                if self.dropped == 1:
                    logger.warning("the MQTT client refused a publish (queue full); counting")
        return count, first, last

    def tick(self) -> None:
        """Report progress when a second has passed."""
        if self.clock.due(time.monotonic()) and self.progress is not None:
            self.progress(self.stats(self.session.pending_publishes()))

    def _wait_until(self, due: float) -> bool:
        """Sleep until `due` (monotonic), reporting progress; False when stopped."""
        while True:
            self.tick()
            remaining = due - time.monotonic()
            if remaining <= 0:
                return not self.stop.is_set()
            if self.stop.wait(min(remaining, max(0.0, self.clock.next - time.monotonic()))):
                return False

    def _throttle(self) -> None:
        while self.session.pending_publishes() >= MAX_IN_FLIGHT and not self.stop.is_set():
            self.tick()
            self.stop.wait(0.001)
