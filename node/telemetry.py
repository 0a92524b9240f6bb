"""Periodic telemetry on `fleet/nodes/{node_id}/telemetry`, built from the shared counters."""

from __future__ import annotations

import logging
import queue
import resource
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil

from node.metrics import NodeMetrics
from node.mqtt.spool import SpoolStats
from node.supervisor import thread_running
from runtime.pipeline import ModelPipeline
from schemas import topics
from schemas.codec import encode
from schemas.messages import LatencySummary, Telemetry

logger = logging.getLogger(__name__)


def latency_summary(latencies_ms: np.ndarray) -> LatencySummary:
    """p50/p95/p99/max of a set of latencies (None when empty)."""
    if not len(latencies_ms):
        return LatencySummary(count=0, p50=None, p95=None, p99=None, max=None)
    p50, p95, p99 = (float(v) for v in np.percentile(latencies_ms, [50, 95, 99]))
    return LatencySummary(
        count=len(latencies_ms),
        p50=round(p50, 3),
        p95=round(p95, 3),
        p99=round(p99, 3),
        max=round(float(latencies_ms.max()), 3),
    )


def board_temperature() -> float | None:
    """SoC temperature in Celsius (Raspberry Pi `cpu_thermal`), None where there is no sensor."""
    try:
        sensors: dict[str, Any] = psutil.sensors_temperatures()
    except (AttributeError, OSError):
        return None
    for name in ("cpu_thermal", "coretemp", "k10temp", *sensors):
        readings = sensors.get(name)
        if readings:
            return float(readings[0].current)
    return None


class TelemetryLoop:
    """A named thread publishing one Telemetry message per interval."""

    def __init__(
        self,
        *,
        node_id: str,
        interval_s: float,
        metrics: NodeMetrics,
        work: queue.Queue[Any],
        model: Callable[[], ModelPipeline],
        backend_reason: Callable[[], str],
        publish: Callable[[str, bytes], bool],
        spool: Callable[[], SpoolStats | None] = lambda: None,
        health: Callable[[], tuple[bool, int, int]] = lambda: (True, 0, 0),
    ) -> None:
        self._node_id = node_id
        self._interval = interval_s
        self._metrics = metrics
        self._queue = work
        self._model = model
        self._backend_reason = backend_reason
        self._publish = publish
        self._spool = spool
        self._health = health
        """(backend healthy, backend rebuilds, watchdog stalls)."""
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # first call primes the measurement
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)

    def start(self) -> None:
        """Start publishing."""
        self._thread.start()

    def is_alive(self) -> bool:
        """True while the telemetry thread runs (or before it was started)."""
        return thread_running(self._thread)

    def stop(self) -> None:
        """Stop publishing (returns within a second)."""
        self._stop.set()
        self._thread.join(1.0)

    def build(self) -> Telemetry:
        """A telemetry message for the interval since the previous one."""
        interval = self._metrics.take_interval()
        windows_in, done, published, dropped, errors = self._metrics.totals()
        model = self._model()
        rss = self._process.memory_info().rss
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        spool = self._spool()
        healthy, rebuilds, stalls = self._health()
        return Telemetry(
            node_id=self._node_id,
            ts=time.time(),
            interval_s=round(interval.seconds, 3),
            uptime_s=round(time.monotonic() - self._metrics.started, 3),
            backend=model.info.name,
            backend_reason=self._backend_reason(),
            device=model.info.detail if model.info.name != "onnx" else None,
            model=model.ref,
            windows_in=windows_in,
            windows_done=done,
            results_published=published,
            windows_per_s=round(interval.windows_done / max(interval.seconds, 1e-9), 2),
            latency_ms=latency_summary(interval.latencies_ms),
            batch_mean=(
                round(float(interval.batch_sizes.mean()), 2) if len(interval.batch_sizes) else None
            ),
            queue_depth=self._queue.qsize(),
            queue_capacity=self._queue.maxsize,
            dropped=dropped,
            redelivered=self._metrics.redelivered,
            errors=errors,
            cpu_percent=self._process.cpu_percent(None),
            rss_mb=round(rss / 2**20, 1),
            peak_rss_mb=round(peak_kb / 1024, 1),
            temperature_c=board_temperature(),
            accelerator_temperature_c=model.backend.temperature(),
            spooled=spool.messages if spool else None,
            spool_mb=round(spool.bytes / 2**20, 2) if spool else None,
            backend_healthy=healthy,
            backend_rebuilds=rebuilds,
            watchdog_stalls=stalls,
        )

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                telemetry = self.build()
                self._publish(topics.node_telemetry(self._node_id), encode(telemetry))
            except Exception:
                logger.exception("telemetry failed")
