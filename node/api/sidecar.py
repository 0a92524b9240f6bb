"""The FastAPI sidecar's `hailo_*` metric names, computed from the node's own measurements.

Dashboards and alerts built for the sidecar keep working against the node. Each name reads a
figure the node already keeps for its `imu_node_*` metrics (docs/sidecar.md has the table), so
nothing is counted twice: `hailo_inference_requests_total` is `imu_node_windows_inferred_total`,
`hailo_inference_duration_seconds` is `imu_node_window_latency_seconds`, and so on.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from node.metrics import LATENCY_BUCKETS_MS, LatencyHistogram

UTILIZATION_SPAN_S = 60.0
"""Span `hailo_device_utilization_percent` and `/status` average over."""


class UtilizationMeter:
    """The share of the last `span_s` seconds a backend call ran, per worker, from a running
    total of busy seconds (`imu_node_backend_busy_seconds`): checkpoints at most one a second,
    so memory stays bounded however often it is read."""

    def __init__(
        self, busy_seconds: Callable[[], float], workers: int, span_s: float = UTILIZATION_SPAN_S
    ) -> None:
        self._busy = busy_seconds
        self._workers = max(workers, 1)
        self._span = span_s
        self._lock = threading.Lock()
        self._marks: deque[tuple[float, float]] = deque([(time.monotonic(), busy_seconds())])

    def percent(self) -> float | None:
        """Busy share in percent (0-100), None until a second has passed."""
        now, busy = time.monotonic(), self._busy()
        with self._lock:
            if now - self._marks[-1][0] >= 1.0:
                self._marks.append((now, busy))
            while len(self._marks) > 2 and self._marks[1][0] <= now - self._span:
                self._marks.popleft()
            since, busy_then = self._marks[0]
        if now - since < 1.0:
            return None
        share = (busy - busy_then) / (now - since) / self._workers
        return round(min(max(share, 0.0), 1.0) * 100, 1)


@dataclass(frozen=True, slots=True)
class SidecarFigures:
    """One scrape's figures, read once by the node's collector."""

    started_unix: float
    software_version: str
    health_checks: int
    model_loaded: bool
    model: str = ""
    model_version: str = ""
    backend: str = ""
    device: str = ""
    hef_sha256: str = ""
    windows_inferred: int = 0
    errors: int = 0
    latency: LatencyHistogram | None = None
    temperature_c: float | None = None
    utilization_percent: float | None = None


def latency_family(name: str, documentation: str, histogram: LatencyHistogram | None) -> Metric:
    """A Prometheus histogram in seconds of window latencies (all zero when None)."""
    histogram = histogram or LatencyHistogram(
        LATENCY_BUCKETS_MS, (0,) * (len(LATENCY_BUCKETS_MS) + 1), 0.0
    )
    buckets = [
        (f"{bound / 1000:g}", count)
        for bound, count in zip(histogram.bounds_ms, histogram.cumulative, strict=False)
    ]
    buckets.append(("+Inf", histogram.cumulative[-1]))
    return HistogramMetricFamily(
        name, documentation, buckets=buckets, sum_value=histogram.sum_ms / 1000
    )


def sidecar_families(f: SidecarFigures) -> Iterator[Metric]:
    """The sidecar's metric set: model info, temperature and utilization when they exist."""
    yield CounterMetricFamily(
        "hailo_inference_requests",
        "Windows inferred, MQTT and HTTP (= imu_node_windows_inferred_total)",
        value=f.windows_inferred,
    )
    yield latency_family(
        "hailo_inference_duration_seconds",
        "Window arrival to result, per window (= imu_node_window_latency_seconds)",
        f.latency,
    )
    yield GaugeMetricFamily(
        "hailo_model_loaded", "1 while a model serves, 0 while waiting for one", int(f.model_loaded)
    )
    info = InfoMetricFamily("hailo_model", "The model served")
    if f.model_loaded:
        info.add_metric(
            [],
            {"model": f.model, "version": f.model_version, "backend": f.backend,
             "device": f.device, "hef_sha256": f.hef_sha256},
        )  # fmt: skip
        yield info
    if f.temperature_c is not None:
        yield GaugeMetricFamily(
            "hailo_device_temperature_celsius", "Accelerator chip (sensor ts0)", f.temperature_c
        )
    if f.utilization_percent is not None:
        yield GaugeMetricFamily(
            "hailo_device_utilization_percent",
            f"Share of the last {UTILIZATION_SPAN_S:g} s a backend call ran, per worker",
            f.utilization_percent,
        )
    yield GaugeMetricFamily(
        "hailo_sidecar_start_time_seconds", "Unix time the node started", f.started_unix
    )
    yield CounterMetricFamily("hailo_health_checks", "GET /healthz answered", value=f.health_checks)
    yield CounterMetricFamily(
        "hailo_errors", "Errors reported (= sum of imu_node_errors_total)", value=f.errors
    )
    build = InfoMetricFamily("hailo_build", "The node's software")
    build.add_metric([], {"version": f.software_version, "service": "imu-node"})
    yield build
    yield GaugeMetricFamily(
        "hailo_config_ok",
        "1 while a verified model bundle serves (its signature and golden check passed)",
        int(f.model_loaded),
    )
