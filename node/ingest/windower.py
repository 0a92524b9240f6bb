"""Per-sensor windowing of `samples` runs, with sequence-gap detection.

`seq` in a samples message is the index of its first sample. Consecutive runs continue the same
stream. Windows start at the stream's first index and every `hop` samples after it (with `align`,
as in share groups: at the multiples of `hop`); each is cut as soon as its 100th sample arrives.
When samples go missing (a gap) or the index goes backwards (sensor restart, duplicate), the
stream restarts at the new run: a window never spans a gap.
Discontinuities are returned for the caller to report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

from schemas.limits import CHANNELS, WINDOW_LENGTH

FloatArray = NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class CutWindow:
    """A window cut from a sample stream: its first sample's index and times when known."""

    x: FloatArray
    seq: int
    t0: float | None
    t1: float | None


class Discontinuity(StrEnum):
    """Kinds of break in a sample stream."""

    GAP = "gap"
    RESET = "reset"


@dataclass(frozen=True, slots=True)
class SequenceEvent:
    """A break in one sensor's sample stream: the index expected and the one received."""

    kind: Discontinuity
    expected: int
    got: int


@dataclass(slots=True)
class _Stream:
    data: FloatArray
    """Samples from index `base` on; rows past `fill` are free room."""
    origin: int
    """Sample index the stream began at: windows start at origin, origin + hop, ..."""
    base: int
    """Sample index of data[0]."""
    fill: int
    start: int
    """Sample index of the next window to cut."""
    clock: tuple[int, float, float] | None = None
    """(sample index, unix time, rate) from the latest run that carried both t0 and rate_hz."""

    @property
    def end(self) -> int:
        """Sample index one past the last sample received."""
        return self.base + self.fill

    def append(self, samples: FloatArray, keep: int) -> None:
        """Add samples, keeping at most `keep` samples from before the next window's start."""
        count = len(samples)
        if self.fill + count > len(self.data):
            drop = max(0, self.start - self.base - keep)
            if drop:
                self.data[: self.fill - drop] = self.data[drop : self.fill]
                self.base += drop
                self.fill -= drop
            if self.fill + count > len(self.data):
                grown = np.empty((max(2 * len(self.data), self.fill + count), CHANNELS), np.float32)
                grown[: self.fill] = self.data[: self.fill]
                self.data = grown
        self.data[self.fill : self.fill + count] = samples
        self.fill += count

    def rows(self, first: int) -> FloatArray:
        """The 100 samples from index `first` (a copy)."""
        offset = first - self.base
        return self.data[offset : offset + WINDOW_LENGTH].copy()


@dataclass(frozen=True, slots=True)
class Recut:
    """Windows cut again from a stream's kept samples, and how many asked for were gone."""

    windows: list[CutWindow]
    missing: int


@dataclass(slots=True)
class SampleWindower:
    """Cuts 100-sample windows every `hop` samples, per sensor.

    With `keep` > 0 a stream also keeps up to `keep` samples from before its next window, so
    that windows already passed can be cut again (`recut`): a member of a share group serves the
    windows a member that went away left without a result.
    """

    hop: int
    keep: int = 0
    align: bool = False
    """Start windows at sample indices that are multiples of `hop` (every node of a share group
    then cuts the same windows), instead of at the stream's first sample."""
    _streams: dict[str, _Stream] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= self.hop <= WINDOW_LENGTH:
            msg = f"hop must be 1..{WINDOW_LENGTH}, got {self.hop}"
            raise ValueError(msg)
        if self.keep < 0:
            msg = f"keep must be >= 0, got {self.keep}"
            raise ValueError(msg)

    def add(
        self,
        sensor_id: str,
        samples: FloatArray,
        seq: int,
        t0: float | None = None,
        rate_hz: float | None = None,
        *,
        cut: bool | Callable[[int], bool] = True,
    ) -> tuple[list[CutWindow], SequenceEvent | None]:
        """Append a run of (n, 9) samples; returns the windows it completes and any break.

        With `cut` False the stream moves past its completed windows without copying them out
        (a sensor this node follows but does not serve); a function decides per window start."""
        stream = self._streams.get(sensor_id)
        event = None
        if stream is not None and seq != stream.end:
            kind = Discontinuity.GAP if seq > stream.end else Discontinuity.RESET
            event = SequenceEvent(kind, stream.end, seq)
        if stream is None or event is not None:
            clock = stream.clock if stream is not None and event is None else None
            room = np.empty((WINDOW_LENGTH + self.keep + len(samples), CHANNELS), np.float32)
            origin = -(-seq // self.hop) * self.hop if self.align else seq
            stream = _Stream(room, origin=origin, base=seq, fill=0, start=origin, clock=clock)
            self._streams[sensor_id] = stream
        if t0 is not None and rate_hz is not None:
            stream.clock = (seq, t0, rate_hz)
        stream.append(samples.astype(np.float32, copy=False), self.keep)
        windows = []
        while stream.end - stream.start >= WINDOW_LENGTH:
            if cut is True or (cut is not False and cut(stream.start)):
                windows.append(self._cut(stream, stream.start))
            stream.start += self.hop
        return windows, event

    def recut(self, sensor_id: str, first: int | None, before: int | None = None) -> Recut:
        """The windows already passed whose start is in [first, before) (None: from the
        stream's first window; up to its next), from the kept samples, oldest first; `missing`
        counts those whose samples this node no longer (or never) held."""
        stream = self._streams.get(sensor_id)
        if stream is None:
            return Recut([], 0)
        # windows before the stream's own first one count as missing: this node joined after
        # their samples went by (a sensor's gap is reported by its own error besides)
        low = stream.origin if first is None else first
        high = stream.start if before is None else min(before, stream.start)
        if low >= high:
            return Recut([], 0)
        # the window grid: origin + k * hop
        k_low = -(-(low - stream.origin) // self.hop)
        k_high = -(-(high - stream.origin) // self.hop)
        starts = [stream.origin + k * self.hop for k in range(k_low, k_high)]
        kept = [s for s in starts if s >= stream.base]
        return Recut([self._cut(stream, s) for s in kept], len(starts) - len(kept))

    def end(self, sensor_id: str) -> int | None:
        """Sample index one past the sensor's last sample received (None: no stream yet)."""
        stream = self._streams.get(sensor_id)
        return None if stream is None else stream.end

    def next_start(self, sensor_id: str) -> int | None:
        """Sample index of the sensor's next window (None: no stream yet)."""
        stream = self._streams.get(sensor_id)
        return None if stream is None else stream.start

    def has_taken(self, sensor_id: str, seq: int, count: int) -> bool:
        """True when samples seq .. seq+count-1 end at or before what this sensor's stream took
        (for telling a broker's re-sent run from new samples)."""
        stream = self._streams.get(sensor_id)
        return stream is not None and seq + count <= stream.end

    def forget(self, sensor_id: str) -> None:
        """Drop a sensor's buffered samples."""
        self._streams.pop(sensor_id, None)

    def buffered(self, sensor_id: str) -> int:
        """Samples held for a sensor's next window."""
        stream = self._streams.get(sensor_id)
        return 0 if stream is None else stream.end - stream.start

    @staticmethod
    def _cut(stream: _Stream, start: int) -> CutWindow:
        t0 = t1 = None
        if stream.clock is not None:
            index, time, rate = stream.clock
            t0 = time + (start - index) / rate
            t1 = t0 + (WINDOW_LENGTH - 1) / rate
        return CutWindow(x=stream.rows(start), seq=start, t0=t0, t1=t1)
