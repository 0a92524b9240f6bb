"""Results handed to paho and not yet acknowledged by the broker, kept on disk.

The node acknowledges a sensor window only once its result is safe, so a crash never loses a
window; but a result that reached the broker just before the crash, its PUBACK lost with the
process, would make the restarted node run the window again. The journal closes that gap: every
result is written here (to the OS, not synced: it guards against the process dying, not the
power) before paho gets it, and forgotten once the broker acknowledges it. A restarted node
publishes what the journal still holds and marks those windows as served, so their re-sent
copies are skipped: no window runs twice. A result can still arrive twice (QoS 1).

Segments (`*.journal`, the spool's record format) are deleted once every result in them is
acknowledged; an acknowledgement is also written as a small marker record, so a restart
republishes only the results still in flight, not the whole open segment. The folder lives in
the spool's, whose lock covers it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from node.mqtt.spool import encode_record, read_records

logger = logging.getLogger(__name__)

SUFFIX = ".journal"
SEGMENT_BYTES = 256 * 1024
ACK_TOPIC = "\x00ack"
"""Marker records: payload `SEGMENT:INDEX` of a result the broker acknowledged."""


class Journal:
    """An append-only record of results in flight, pruned as the broker acknowledges them."""

    def __init__(self, folder: Path, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._left = sorted(folder.glob(f"*{SUFFIX}"))
        """Segments an earlier run left: results it never saw acknowledged."""
        self._next = 1 + max((int(p.stem) for p in self._left if p.stem.isdigit()), default=0)
        self._outstanding: dict[Path, int] = {}
        self._current: BinaryIO | None = None
        self._current_path: Path | None = None
        self._current_bytes = 0
        self._current_entries = 0
        self.written = 0

    def leftovers(self) -> list[tuple[str, bytes]]:
        """What an earlier run left in flight (then forget it: the caller publishes it anew)."""
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
        found = [record for key, record in entries.items() if key not in acked]
        for path in self._left:
            path.unlink(missing_ok=True)
        if found:
            logger.info(
                "journal %s: %d results in flight from an earlier run", self.folder, len(found)
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
            self._outstanding[path] = self._outstanding.get(path, 0) + 1
            self.written += 1
            if self._current_bytes >= self._segment_bytes:
                self._rotate()
        return lambda: self._settle(path, entry)

    def _write(self, record: bytes) -> bool:
        """Append a record to the current segment, opening one if needed (under the lock)."""
        if self._current is None or self._current_path is None:
            self._current_path = self.folder / f"{self._next:012d}{SUFFIX}"
            self._current = self._current_path.open("ab")
            self._current_bytes = 0
            self._current_entries = 0
            self._next += 1
        try:
            self._current.write(record)
            self._current.flush()
        except OSError as exc:
            logger.error("journal %s cannot write (%s)", self.folder, exc)
            return False
        self._current_bytes += len(record)
        return True

    def _settle(self, path: Path, entry: str) -> None:
        with self._lock:
            left = self._outstanding.get(path, 0) - 1
            self._outstanding[path] = left
            if left <= 0 and path != self._current_path:
                self._forget(path)
            elif self._current is not None:  # a marker, so a restart skips this one
                self._write(encode_record(ACK_TOPIC, entry.encode()))

    def _rotate(self) -> None:
        """Close the current segment (under the lock); delete it if all of it is settled."""
        if self._current is not None:
            self._current.close()
        closed, self._current, self._current_path = self._current_path, None, None
        if closed is not None and self._outstanding.get(closed, 0) <= 0:
            self._forget(closed)

    def _forget(self, path: Path) -> None:
        self._outstanding.pop(path, None)
        path.unlink(missing_ok=True)

    def close(self) -> None:
        """Close the current segment; what is unsettled stays for the next run."""
        with self._lock:
            if self._current is not None:
                self._current.close()
            path, self._current, self._current_path = self._current_path, None, None
            if path is not None and self._outstanding.get(path, 0) <= 0:
                self._forget(path)


def _nothing() -> None:
    """Nothing was journaled: nothing to settle."""
