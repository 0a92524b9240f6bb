"""Shared counters the worker, ingest and telemetry read and write (thread-safe)."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

LATENCY_SAMPLES = 8192
"""Latencies kept per telemetry interval (the most recent ones when the rate is higher)."""
LATENCY_BUCKETS_MS: tuple[float, ...] = (0.5, 1, 2, 3, 5, 10, 20, 50, 100, 250, 500, 1000)
"""Upper bounds of the cumulative latency histogram (Prometheus `le`), in milliseconds."""


@dataclass(frozen=True, slots=True)
class LatencyHistogram:
    """Window latencies since start: counts per bucket (cumulative), sum and count."""

    bounds_ms: tuple[float, ...]
    cumulative: tuple[int, ...]
    """Windows at or under each bound; the last entry is every window (`+Inf`)."""
    sum_ms: float


@dataclass(frozen=True, slots=True)
class IntervalStats:
    """What happened since the previous snapshot."""

    seconds: float
    windows_done: int
    latencies_ms: np.ndarray
    batch_sizes: np.ndarray


class NodeMetrics:
    """Counters since start, plus per-interval latency and batch-size samples."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.windows_in = 0
        self.windows_done = 0
        self.results_published = 0
        self.dropped: Counter[str] = Counter()
        self.redelivered = 0
        """Re-sent (DUP) windows or sample runs skipped: already served, not lost."""
        self.errors: Counter[str] = Counter()
        self._latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._batches: list[int] = []
        self._interval_start = self.started
        self._interval_done = 0
        self._bucket_counts = np.zeros(len(LATENCY_BUCKETS_MS) + 1, dtype=np.int64)
        self._latency_sum_ms = 0.0
        self.last_latency_ms: float | None = None
        """The latest window's latency (the sidecar's `latency_ms`), None before the first."""

    def reset(self) -> None:
        """Start again from zero, as a new process does (the fleet simulator's crashes)."""
        self.__init__()  # type: ignore[misc]

    def window_accepted(self) -> None:
        """A window entered the inference queue."""
        with self._lock:
            self.windows_in += 1

    def window_dropped(self, reason: str) -> None:
        """A window was dropped (counted by reason)."""
        with self._lock:
            self.dropped[reason] += 1

    def window_redelivered(self) -> None:
        """The broker re-sent a window (or run) this node already took; it was skipped."""
        with self._lock:
            self.redelivered += 1

    def error(self, kind: str) -> None:
        """An error of `kind` was reported."""
        with self._lock:
            self.errors[kind] += 1

    def batch_done(self, size: int, latencies_ms: list[float], published: int) -> None:
        """A batch was inferred and `published` of its results were queued for the broker."""
        with self._lock:
            self.windows_done += size
            self.results_published += published
            self._interval_done += size
            self._latencies.extend(latencies_ms)
            self._batches.append(size)
            buckets = np.searchsorted(LATENCY_BUCKETS_MS, latencies_ms, side="left")
            np.add.at(self._bucket_counts, buckets, 1)
            self._latency_sum_ms += float(sum(latencies_ms))
            if latencies_ms:
                self.last_latency_ms = latencies_ms[-1]

    def take_interval(self) -> IntervalStats:
        """Stats since the previous call, and start a new interval."""
        now = time.monotonic()
        with self._lock:
            stats = IntervalStats(
                seconds=now - self._interval_start,
                windows_done=self._interval_done,
                latencies_ms=np.fromiter(self._latencies, dtype=np.float64),
                batch_sizes=np.asarray(self._batches, dtype=np.float64),
            )
            self._latencies.clear()
            self._batches.clear()
            self._interval_start = now
            self._interval_done = 0
        return stats

    def latency_histogram(self) -> LatencyHistogram:
        """Every window's latency since start, bucketed."""
        with self._lock:
            cumulative = np.cumsum(self._bucket_counts)
            return LatencyHistogram(
                LATENCY_BUCKETS_MS, tuple(int(c) for c in cumulative), self._latency_sum_ms
            )

    def totals(self) -> tuple[int, int, int, dict[str, int], dict[str, int]]:
        """(windows_in, windows_done, results_published, dropped, errors) since start."""
        with self._lock:
            return (
                self.windows_in,
                self.windows_done,
                self.results_published,
                dict(self.dropped),
                dict(self.errors),
            )
