"""Per-sensor windowing of `samples` runs, with sequence-gap detection.

`seq` in a samples message is the index of its first sample. Consecutive runs continue the same
stream. Windows start at the stream's first index and every `hop` samples after it; each is cut as
soon as its 100th sample arrives. When samples go missing (a gap) or the index goes backwards
(sensor restart, duplicate), the stream restarts at the new run: a window never spans a gap.
Discontinuities are returned for the caller to report.
"""

from __future__ import annotations

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
    buffer: FloatArray
    start: int
    """Sample index of buffer[0]; always the start of the next window."""
    end: int
    """Sample index one past the last sample received."""
    clock: tuple[int, float, float] | None = None
    """(sample index, unix time, rate) from the latest run that carried both t0 and rate_hz."""


@dataclass(slots=True)
class SampleWindower:
    """Cuts 100-sample windows every `hop` samples, per sensor."""

    hop: int
    _streams: dict[str, _Stream] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= self.hop <= WINDOW_LENGTH:
            msg = f"hop must be 1..{WINDOW_LENGTH}, got {self.hop}"
            raise ValueError(msg)

    def add(
        self,
        sensor_id: str,
        samples: FloatArray,
        seq: int,
        t0: float | None = None,
        rate_hz: float | None = None,
    ) -> tuple[list[CutWindow], SequenceEvent | None]:
        """Append a run of (n, 9) samples; returns the windows it completes and any break."""
        stream = self._streams.get(sensor_id)
        event = None
        if stream is not None and seq != stream.end:
            kind = Discontinuity.GAP if seq > stream.end else Discontinuity.RESET
            event = SequenceEvent(kind, stream.end, seq)
        if stream is None or event is not None:
            clock = stream.clock if stream is not None and event is None else None
            stream = _Stream(np.empty((0, CHANNELS), np.float32), start=seq, end=seq, clock=clock)
            self._streams[sensor_id] = stream
        if t0 is not None and rate_hz is not None:
            stream.clock = (seq, t0, rate_hz)
        stream.buffer = np.concatenate([stream.buffer, samples.astype(np.float32, copy=False)])
        stream.end = seq + len(samples)
        windows = []
        while stream.end - stream.start >= WINDOW_LENGTH:
            windows.append(self._cut(stream))
            stream.buffer = stream.buffer[self.hop :]
            stream.start += self.hop
        return windows, event

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
        return 0 if stream is None else len(stream.buffer)

    @staticmethod
    def _cut(stream: _Stream) -> CutWindow:
        x = stream.buffer[:WINDOW_LENGTH].copy()
        t0 = t1 = None
        if stream.clock is not None:
            index, time, rate = stream.clock
            t0 = time + (stream.start - index) / rate
            t1 = t0 + (WINDOW_LENGTH - 1) / rate
        return CutWindow(x=x, seq=stream.start, t0=t0, t1=t1)
