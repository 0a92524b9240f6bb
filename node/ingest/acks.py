"""When a received sensor message may be acknowledged: once nothing in it can be lost any more.

The node acknowledges a sensor message (its PUBACK) only when every window made from it has a
result that is safe (acknowledged by the broker, or on disk), or was reported as failed. Until
then the broker holds the message in the node's session, and a node that crashes gets it again
when it restarts with the same client id. Nothing acknowledged is ever without a result.

- A whole window (`imu/+/window`) is acknowledged when its one result is safe. The broker's
  re-sent copy (DUP) of a window still in work is acknowledged together with it; of one already
  done, at once (it is not run twice).
- A run of samples (`imu/+/samples`) covers sample indices [seq, end). It is acknowledged once no
  window that uses its samples is in work. Samples still waiting in the windower for the next
  window are not waited for: many sensors sending small runs would otherwise hold more runs
  unacknowledged than the broker sends in flight, and nothing would move again. A crash loses
  those waiting samples (less than one window per sensor); the restarted node starts the stream
  at the next run. After a gap or a reset the stream restarts: runs of the old stream wait only
  for the old windows.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from common.mqtt.client import Ack


@dataclass(slots=True)
class _Run:
    end: int
    epoch: int
    ack: Ack


@dataclass(slots=True)
class _Samples:
    epoch: int = 0
    runs: deque[_Run] = field(default_factory=deque)
    open: dict[int, list[int]] = field(default_factory=dict)
    """Per stream epoch: starts of its windows still in work."""


class AckLedger:
    """Holds each received message's acknowledgement until its windows are done."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, int], list[Ack]] = {}
        self._samples: dict[str, _Samples] = {}

    # -- whole windows -----------------------------------------------------------------------

    def window(self, sensor_id: str, seq: int | None, ack: Ack) -> Callable[[], None]:
        """The `done` of a window taken for work: acknowledges it (and any re-sent copy)."""
        if seq is None:
            return ack  # no seq: nothing can recognise a copy; acknowledged with its result
        key = (sensor_id, seq)
        with self._lock:
            self._windows.setdefault(key, []).append(ack)
        return lambda: self._window_done(key)

    def duplicate_window(self, sensor_id: str, seq: int, ack: Ack) -> None:
        """A re-sent copy of a window already taken: acknowledged when the original is done."""
        with self._lock:
            waiting = self._windows.get((sensor_id, seq))
            if waiting is not None:
                waiting.append(ack)
                return
        ack()

    def _window_done(self, key: tuple[str, int]) -> None:
        with self._lock:
            acks = self._windows.pop(key, [])
        for ack in acks:
            ack()

    # -- sample runs -------------------------------------------------------------------------

    def samples(self, sensor_id: str, end: int, ack: Ack, *, restarted: bool) -> None:
        """A run ending before sample `end` was taken (`restarted`: its stream began anew)."""
        with self._lock:
            state = self._samples.setdefault(sensor_id, _Samples())
            if restarted:
                state.epoch += 1
            state.runs.append(_Run(end, state.epoch, ack))

    def cut(self, sensor_id: str, start: int) -> Callable[[], None]:
        """The `done` of a window cut from a sensor's current stream at sample `start`."""
        with self._lock:
            state = self._samples.setdefault(sensor_id, _Samples())
            epoch = state.epoch
            state.open.setdefault(epoch, []).append(start)
        return lambda: self._cut_done(sensor_id, epoch, start)

    def release(self, sensor_id: str) -> None:
        """Acknowledge the sensor's runs no window in work holds (after its windows were cut)."""
        with self._lock:
            state = self._samples.setdefault(sensor_id, _Samples())
            acks = self._releasable(state)
        for ack in acks:
            ack()

    def _cut_done(self, sensor_id: str, epoch: int, start: int) -> None:
        with self._lock:
            state = self._samples[sensor_id]
            starts = state.open.get(epoch, [])
            if start in starts:
                starts.remove(start)
            if not starts:
                state.open.pop(epoch, None)
            acks = self._releasable(state)
        for ack in acks:
            ack()

    @staticmethod
    def _releasable(state: _Samples) -> list[Ack]:
        """Runs no window in work and no waiting sample needs any more (under the lock)."""
        needed = min(state.open.get(state.epoch, []), default=None)
        kept: deque[_Run] = deque()
        acks: list[Ack] = []
        for run in state.runs:
            if run.epoch < state.epoch:  # an earlier stream: only its windows in work count
                done = run.epoch not in state.open
            else:
                done = needed is None or run.end <= needed
            if done:
                acks.append(run.ack)
            else:
                kept.append(run)
        state.runs = kept
        return acks

    def held(self) -> int:
        """Messages whose acknowledgement is still held."""
        with self._lock:
            windows = sum(len(acks) for acks in self._windows.values())
            return windows + sum(len(s.runs) for s in self._samples.values())
