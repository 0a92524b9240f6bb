"""A bounded on-disk spool of MQTT messages, kept while the broker is away.

Messages are appended to numbered segment files, each record `crc32 | topic length | payload
length | topic | payload`. A segment that is full, or sealed for replay, is never written
again; replay reads segments oldest first and deletes one only when all of its messages were
acknowledged, so a crash mid-replay repeats messages (QoS 1 is at least once) but loses none.
A torn record at the end of a segment (power cut mid-write) ends that segment's replay and is
reported. The folder is locked, so two processes never share one spool.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from node.errors import ConfigError

logger = logging.getLogger(__name__)

_HEADER = struct.Struct(">IHI")
SEGMENT_SUFFIX = ".spool"
DEFAULT_SEGMENT_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """What the spool holds right now."""

    messages: int
    bytes: int
    segments: int


class Spool:
    """Append while offline; replay sealed segments oldest first once back online."""

    def __init__(
        self, folder: Path, max_bytes: int, segment_bytes: int = DEFAULT_SEGMENT_BYTES
    ) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        folder.mkdir(parents=True, exist_ok=True)
        self._lock_file = (folder / "LOCK").open("a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            msg = (
                f"spool folder {folder} is in use by another node process; give each node its "
                "own --node-id or spool_dir"
            )
            raise ConfigError(msg) from None
        self._lock = threading.Lock()
        self._sizes: dict[Path, tuple[int, int]] = {}  # segment -> (bytes, messages)
        for path in sorted(folder.glob(f"*{SEGMENT_SUFFIX}")):
            self._sizes[path] = (path.stat().st_size, sum(1 for _ in _records(path)))
        self._next = 1 + max((int(p.stem) for p in self._sizes), default=0)
        self._current: BinaryIO | None = None
        self._current_path: Path | None = None
        self._closed = False
        self._failing = False
        if self._sizes:
            stats = self.stats()
            logger.info("spool %s holds %d messages from before", folder, stats.messages)

    def append(self, topic: str, payload: bytes) -> bool:
        """Keep one message; False (and nothing written) when the spool is full or closed."""
        encoded = topic.encode()
        record = _HEADER.pack(zlib.crc32(encoded + payload), len(encoded), len(payload))
        size = len(record) + len(encoded) + len(payload)
        with self._lock:
            if self._closed or self._total_bytes() + size > self.max_bytes:
                return False
            used = 0
            try:
                if self._current is None or self._current_path is None:
                    path = self.folder / f"{self._next:012d}{SEGMENT_SUFFIX}"
                    self._current = path.open("ab")
                    self._current_path = path
                    self._next += 1
                    self._sizes[path] = (0, 0)
                used, count = self._sizes[self._current_path]
                self._current.write(record + encoded + payload)
                self._current.flush()
            except OSError as exc:  # e.g. a full disk: cut the partial record, start afresh
                if not self._failing:
                    logger.error("spool %s cannot write (%s): refusing messages", self.folder, exc)
                self._failing = True
                self._abandon_partial(used)
                return False
            if self._failing:
                logger.warning("spool %s is writable again", self.folder)
                self._failing = False
            self._sizes[self._current_path] = (used + size, count + 1)
            if used + size >= self.segment_bytes:
                self._close_current()
        return True

    def seal(self) -> list[Path]:
        """Close the segment being written; returns every segment ready for replay, oldest first."""
        with self._lock:
            self._close_current()
            return sorted(self._sizes)

    def read(self, segment: Path) -> Iterator[tuple[str, bytes]]:
        """The messages of a sealed segment, in order."""
        return _records(segment)

    def discard(self, segment: Path) -> None:
        """Delete a replayed segment."""
        with self._lock:
            self._sizes.pop(segment, None)
        segment.unlink(missing_ok=True)

    def stats(self) -> SpoolStats:
        """Messages, bytes and segments held."""
        with self._lock:
            return SpoolStats(
                messages=sum(count for _, count in self._sizes.values()),
                bytes=self._total_bytes(),
                segments=len(self._sizes),
            )

    def close(self) -> None:
        """Sync what was written and release the folder."""
        with self._lock:
            self._close_current()
            self._closed = True
        self._lock_file.close()

    def _abandon_partial(self, good_bytes: int) -> None:
        """Truncate the current segment to its last whole record and close it."""
        current, path = self._current, self._current_path
        self._current = None
        self._current_path = None
        if current is None or path is None:
            return
        try:
            current.truncate(good_bytes)
            current.close()
        except OSError:
            logger.exception("spool %s: cannot repair %s", self.folder, path.name)

    def _total_bytes(self) -> int:
        return sum(used for used, _ in self._sizes.values())

    def _close_current(self) -> None:
        if self._current is not None:
            self._current.flush()
            os.fsync(self._current.fileno())
            self._current.close()
        self._current = None
        self._current_path = None


def spooled_bytes(folder: Path) -> int:
    """Bytes of spooled messages in `folder` (without opening, or locking, the spool)."""
    if not folder.exists():
        return 0
    return sum(p.stat().st_size for p in folder.glob(f"*{SEGMENT_SUFFIX}"))


def encode_record(topic: str, payload: bytes) -> bytes:
    """One record as segments hold it: crc32, lengths, topic, payload."""
    encoded = topic.encode()
    return (
        _HEADER.pack(zlib.crc32(encoded + payload), len(encoded), len(payload)) + encoded + payload
    )


def read_records(path: Path) -> Iterator[tuple[str, bytes]]:
    """The whole records of a segment file, in order (a torn last one is left out)."""
    return _records(path)


def _records(path: Path) -> Iterator[tuple[str, bytes]]:
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
        if offset + _HEADER.size > len(data):
            break
        crc, topic_len, payload_len = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        end = start + topic_len + payload_len
        body = data[start:end]
        if end > len(data) or zlib.crc32(body) != crc:
            break
        yield body[:topic_len].decode(), body[topic_len:]
        offset = end
    if offset < len(data):
        logger.warning("spool segment %s ends in a torn record after %d bytes", path, offset)
