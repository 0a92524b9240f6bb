"""Progress of a recording or a replay: the counts so far, and when to report them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

PROGRESS_INTERVAL_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class RecordStats:
    """What a recorder has written so far.

    `messages`, `bytes` (payload bytes), `windows` (messages on `*/window`), `samples` (messages
    on `*/samples`) and `topics` (messages per topic) count what is in the file; `dropped` counts
    messages lost because the writer fell behind; `reconnects` counts broker reconnections (with
    MQTT 3.1.1 messages published while disconnected never reach the recorder).
    """

    messages: int = 0
    bytes: int = 0
    windows: int = 0
    samples: int = 0
    topics: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0
    dropped: int = 0
    reconnects: int = 0

    def summary(self) -> str:
        """One progress line: `12.0 s  1234 messages (1000 windows, 234 samples)  3.4 MB ...`."""
        return (
            f"{self.elapsed:6.1f} s  {self.messages} messages ({self.windows} windows, "
            f"{self.samples} samples) on {len(self.topics)} topics  "
            f"{_size(self.bytes)}  {self.dropped} dropped"
            + (f"  {self.reconnects} reconnects" if self.reconnects else "")
        )


@dataclass(frozen=True, slots=True)
class ReplayStats:
    """What a replay has published so far.

    `messages` and `bytes` were handed to the MQTT client, `dropped` were refused by it (queue
    full), `unacknowledged` were still without a PUBACK when the replay ended, `loops` counts the
    completed passes over the file and `max_lag` is the furthest (seconds) any publish fell behind
    its schedule.
    """

    messages: int = 0
    bytes: int = 0
    loops: int = 0
    elapsed: float = 0.0
    dropped: int = 0
    unacknowledged: int = 0
    max_lag: float = 0.0

    def summary(self) -> str:
        """One progress line: `12.0 s  1234 messages  3.4 MB  1 pass done  max lag 1 ms ...`."""
        return (
            f"{self.elapsed:6.1f} s  {self.messages} messages  {_size(self.bytes)}  "
            f"{self.loops} pass{'es' if self.loops != 1 else ''} done  "
            f"max lag {self.max_lag * 1e3:.0f} ms  {self.dropped} dropped"
            + (f"  {self.unacknowledged} unacknowledged" if self.unacknowledged else "")
        )


def _size(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 1e6 else f"{count / 1e3:.1f} kB"


class ProgressClock:
    """When the next progress report is due: `PROGRESS_INTERVAL_S` after the last one."""

    def __init__(self, start: float) -> None:
        self.next = start + PROGRESS_INTERVAL_S
        """Monotonic time the next report is due."""

    def due(self, now: float) -> bool:
        """True (and the next report scheduled) when a report is due at monotonic `now`."""
        if now < self.next:
            return False
        self.next = now + PROGRESS_INTERVAL_S
        return True
