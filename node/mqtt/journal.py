"""Results handed to paho and not yet acknowledged by the broker, kept on disk.

The node acknowledges a sensor window only once its result is safe, so a crash never loses a
window; but a result that reached the broker just before the crash, its PUBACK lost with the
process, would make the restarted node run the window again. The journal closes that gap: every
result is written here (to the OS, not synced: it guards against the process dying, not the
power) before paho gets it, and forgotten once the broker acknowledges it. A restarted node
publishes what the journal still holds and marks those windows as served, so their re-sent
copies are skipped: no window runs twice. A result can still arrive twice (QoS 1).

Keeping a result until its PUBACK is not enough: the window's own PUBACK, sent right after, can
die with the connection (a broker stopping, a link dropping) while the broker already stored the
result. The broker then re-sends the window after the restart, and nothing in flight remembers
it. So settled results stay on disk a while longer (`KEEP_BYTES`, the newest ones): a restarted
node reads them only to mark their windows as served, and skips their re-sent copies.

Segments (`*.journal`, the spool's record format) are deleted oldest first once every result in
them is acknowledged and newer segments hold `KEEP_BYTES`; an acknowledgement is also written as
a small marker record, so a restart republishes only the results still in flight, not the whole
open segment (deleting oldest first never deletes a marker whose result is still on disk). The
folder is bounded (`MAX_BYTES`): past it the oldest segment goes even with results in flight,
and that is logged and counted. The folder lives in the spool's, whose lock covers it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from node.mqtt.spool import encode_record, read_records

logger = logging.getLogger(__name__)

SUFFIX = ".journal"
SEGMENT_BYTES = 256 * 1024
KEEP_BYTES = 4 * 2**20
"""Settled results kept, newest first: about 3,800 results of the reference model (1.1 KB
each), seconds of a busy node, far more than the window acknowledgements one dropped link takes."""
MAX_BYTES = 64 * 2**20
"""The folder's bound: past it the oldest segment is deleted, results in flight or not."""
ACK_TOPIC = "\x00ack"
"""Marker records: payload `SEGMENT:INDEX` of a result the broker acknowledged."""


@dataclass
class Leftovers:
    """What an earlier run left in the journal."""

    in_flight: list[tuple[str, bytes]] = field(default_factory=list)
    """Results it never saw acknowledged: publish them again."""
    settled: list[tuple[str, bytes]] = field(default_factory=list)
    """Results the broker acknowledged: their windows were served."""


@dataclass
class _Segment:
    outstanding: int = 0
    size: int = 0
    closed: bool = False


class Journal:
    """An append-only record of results in flight, pruned as the broker acknowledges them."""

    def __init__(
        self,
        folder: Path,
        segment_bytes: int = SEGMENT_BYTES,
        keep_bytes: int = KEEP_BYTES,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._segment_bytes = segment_bytes
        self._keep_bytes = keep_bytes
        self._max_bytes = max(max_bytes, keep_bytes + 2 * segment_bytes)
        self._lock = threading.Lock()
        self._left = sorted(folder.glob(f"*{SUFFIX}"))
        """Segments an earlier run left: results it never saw acknowledged."""
        self._next = 1 + max((int(p.stem) for p in self._left if p.stem.isdigit()), default=0)
        self._segments: dict[Path, _Segment] = {}
        """This run's segments, oldest first."""
        self._current: BinaryIO | None = None
        self._current_path: Path | None = None
        self._current_entries = 0
        self._closed = False
        self.written = 0
        self.dropped = 0
        """Results deleted in flight because the folder reached `max_bytes`."""

    def leftovers(self) -> Leftovers:
        """What an earlier run left (then forget it: the caller publishes the results in flight
        anew, which journals them again)."""
        entries: dict[str, tuple[str, bytes]] = {}
        acked: set[str] = set()
        for path in self._left:
            index = 0
            for topic, payload in read_records(path):
                if topic == ACK_TOPIC:
                    acked.add(payload.decode(errors="replace"))
                    continue
                entries[f"{path.stem}:{index}"] = (topic, payload)
                index += 1
        found = Leftovers()
        for key, record in entries.items():
            (found.settled if key in acked else found.in_flight).append(record)
        for path in self._left:
            path.unlink(missing_ok=True)
        if entries:
            logger.info(
                "journal %s: %d results in flight and %d settled from an earlier run",
                self.folder,
                len(found.in_flight),
                len(found.settled),
            )
        self._left = []
        return found

    def append(self, topic: str, payload: bytes) -> Callable[[], None]:
        """Record one result; returns what to call once the broker acknowledged it."""
        record = encode_record(topic, payload)
        with self._lock:
            if not self._write(record):
                return _nothing  # a full disk: the result still goes out, unjournaled
            assert self._current_path is not None
            path, entry = self._current_path, f"{self._current_path.stem}:{self._current_entries}"
            self._current_entries += 1
            self._segments[path].outstanding += 1
            self.written += 1
            if self._segments[path].size >= self._segment_bytes:
                self._rotate()
        return lambda: self._settle(path, entry)

    def _write(self, record: bytes) -> bool:
        """Append a record to the current segment, opening one if needed (under the lock).

        Unbuffered: a failed write (a full disk) is cut off the file again, so it never lands
        later and shifts the index of every record after it (markers name records by index)."""
        try:
            if self._current is None or self._current_path is None:
                path = self.folder / f"{self._next:012d}{SUFFIX}"
                self._current = path.open("ab", buffering=0)
                self._current_path = path
                self._segments[path] = _Segment()
                self._current_entries = 0
                self._next += 1
            written = self._current.write(record)
            if written != len(record):
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            logger.error("journal %s cannot write (%s)", self.folder, exc)
            if self._current is not None and self._current_path is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._current.fileno(), self._segments[self._current_path].size)
            return False
        self._segments[self._current_path].size += len(record)
        return True

    def _settle(self, path: Path, entry: str) -> None:
        with self._lock:
            segment = self._segments.get(path)
            if segment is None:
                return  # deleted at the bound
            segment.outstanding -= 1
            if not self._closed:  # a marker, so a restart skips this one
                self._write(encode_record(ACK_TOPIC, entry.encode()))
            self._prune()

    def _rotate(self) -> None:
        """Close the current segment (under the lock) and prune."""
        if self._current is not None:
            self._current.close()
        if self._current_path is not None:
            self._segments[self._current_path].closed = True
        self._current, self._current_path = None, None
        self._prune()

    def _prune(self) -> None:
        """Delete the oldest closed segments (under the lock): settled ones while newer
        segments hold `keep_bytes`, any while the folder is past `max_bytes`."""
        total = sum(segment.size for segment in self._segments.values())
        for path, segment in list(self._segments.items()):
            if not segment.closed:
                return
            if segment.outstanding > 0 and total <= self._max_bytes:
                return
            if segment.outstanding <= 0 and total - segment.size < self._keep_bytes:
                return
            if segment.outstanding > 0:
                self.dropped += segment.outstanding
                logger.warning(
                    "journal %s is past %d bytes: %d results in flight lose their record (a "
                    "crash now would run their windows again)",
                    self.folder,
                    self._max_bytes,
                    segment.outstanding,
                )
            del self._segments[path]
            path.unlink(missing_ok=True)
            total -= segment.size

    def close(self) -> None:
        """Close the current segment; what is on disk stays for the next run."""
        with self._lock:
            self._closed = True
            if self._current is not None:
                self._current.close()
            self._current, self._current_path = None, None


def _nothing() -> None:
    """Nothing was journaled: nothing to settle."""
