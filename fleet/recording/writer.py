"""The recorder's writer thread: encoded lines from a bounded queue to the file, and the counts.

The recorder encodes each message as it arrives and hands the line to this thread through a
bounded queue, so a slow disk never stalls the MQTT connection; a message that finds the queue
full is counted in `dropped` and logged, never lost silently.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import IO, Final

from fleet.recording.stats import RecordStats
from fleet.recording.topics import is_samples_topic, is_window_topic

logger = logging.getLogger("fleet.recording")

QUEUE_SIZE: Final = 10_000
"""Messages the writer may fall behind by before the recorder drops (and counts) them."""
FLUSH_INTERVAL_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class _Line:
    """One encoded message line, with what the stats need to know about it."""

    data: bytes
    topic: str
    payload_bytes: int


_IDLE: Final = _Line(b"", "", 0)
"""Wakes the writer to flush when nothing arrived."""


class _Writer:
    """Writes encoded lines from a bounded queue on its own thread, flushing every second.

    Messages are encoded on arrival (the MQTT thread), so this thread spends its time in
    `write()` with the GIL released instead of competing with the MQTT thread for it.
    """

    def __init__(self, stream: IO[bytes], queue_size: int) -> None:
        self._stream = stream
        self._queue: queue.Queue[_Line | None] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._messages = self._bytes = self._windows = self._samples = self._dropped = 0
        self._topics: dict[str, int] = {}
        self.error: OSError | None = None
        self.failed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recording-writer", daemon=True)

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    def offer(self, line: _Line) -> bool:
        """Queue a line without blocking; False (and counted as dropped) when full."""
        if not self.failed.is_set():
            try:
                self._queue.put_nowait(line)
            except queue.Full:
                pass
            else:
                return True
        self.drop(
            f"writer queue of {self._queue.maxsize} full"
            if self.error is None
            else f"writing failed: {self.error}"
        )
        return False

    def drop(self, reason: str) -> None:
        """Count a message that will not be in the file; the first one is logged."""
        with self._lock:
            self._dropped += 1
            first = self._dropped == 1
        if first:
            logger.warning("recording lost a message (%s); counting every lost one", reason)

    def close(self) -> None:
        """Write everything queued, flush and join the writer thread."""
        if self._thread.ident is None:  # never started
            return
        self._queue.put(None)
        self._thread.join()

    def snapshot(self, elapsed: float, reconnects: int) -> RecordStats:
        """Counts so far."""
        with self._lock:
            return RecordStats(
                messages=self._messages,
                bytes=self._bytes,
                windows=self._windows,
                samples=self._samples,
                topics=dict(self._topics),
                elapsed=elapsed,
                dropped=self._dropped,
                reconnects=reconnects,
            )

    def _run(self) -> None:
        last_flush = time.monotonic()
        dirty = False
        while True:
            try:
                line = self._queue.get(timeout=FLUSH_INTERVAL_S)
            except queue.Empty:
                line = _IDLE
            if line is None:
                break
            if line is not _IDLE:
                self._write(line)
                dirty = True
            now = time.monotonic()
            if dirty and now - last_flush >= FLUSH_INTERVAL_S:
                self._flush()
                last_flush, dirty = now, False
        self._flush()

    def _write(self, line: _Line) -> None:
        if self.error is not None:
            self.drop(f"writing failed: {self.error}")
            return
        try:
            self._stream.write(line.data)
        except OSError as exc:
            self._fail(exc)
            self.drop(f"writing failed: {exc}")
            return
        with self._lock:
            self._messages += 1
            self._bytes += line.payload_bytes
            self._topics[line.topic] = self._topics.get(line.topic, 0) + 1
            if is_window_topic(line.topic):
                self._windows += 1
            elif is_samples_topic(line.topic):
                self._samples += 1

    def _flush(self) -> None:
        if self.error is not None:
            return
        try:
            self._stream.flush()
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        logger.error("writing the recording failed: %s; stopping", exc)
        self.error = exc
        self.failed.set()
