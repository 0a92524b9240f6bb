"""`/metrics`: the node's shared counters in Prometheus text format, read at scrape time.

Nothing is counted twice: the collector reads the same `NodeMetrics`, session counters, queue
and spool that telemetry reads. Process CPU, memory and file descriptors come from
prometheus-client's own process collector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from common.mqtt.session import MqttSession
from node.metrics import NodeMetrics
from node.mqtt.outbox import Outbox
from runtime.pipeline import ModelPipeline
from schemas.messages import ErrorKind

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DROP_REASONS = (
    "queue_full",
    "outbox_full",
    "shutting_down",
    "inference_failed",
    "share_group",
    "offline",
)
"""Reasons a window is dropped (`NodeMetrics.window_dropped`), exported at 0 from the start.

Counters that exist before their first event let `rate()` and `increase()` (alerts, dashboards)
see that event; a series born at 1 would hide it.
"""


@dataclass(frozen=True, slots=True)
class NodeSources:
    """Where the numbers live."""

    node_id: str
    group: str
    software_version: str
    metrics: NodeMetrics
    session: MqttSession
    outbox: Outbox
    queue_depth: Callable[[], int]
    queue_capacity: int
    pipeline: Callable[[], ModelPipeline]
    backend_health: Callable[[], tuple[bool, int, int]] = lambda: (True, 0, 0)
    """(healthy, rebuilds and fallbacks, watchdog stalls)."""
    stale_since: Callable[[], float | None] = lambda: None
    """Since when the control plane is stale (node/updates/freshness.py), None while fresh."""


class NodeCollector(Collector):
    """Yields `imu_node_*` metrics from the node's live state."""

    def __init__(self, sources: NodeSources) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        """One consistent-enough snapshot per scrape."""
        s = self.sources
        pipeline = s.pipeline()
        info = InfoMetricFamily("imu_node", "What this node is and serves")
        info.add_metric(
            [],
            {
                "node_id": s.node_id,
                "group": s.group,
                "software_version": s.software_version,
                "backend": pipeline.info.name,
                "model": pipeline.ref.name,
                "model_version": pipeline.ref.version,
            },
        )
        yield info
        windows_in, done, published, dropped, errors = s.metrics.totals()
        yield CounterMetricFamily(
            "imu_node_windows_received", "Windows accepted into the queue", value=windows_in
        )
        yield CounterMetricFamily("imu_node_windows_inferred", "Windows inferred", value=done)
        yield CounterMetricFamily(
            "imu_node_results_published", "Results queued for the broker", value=published
        )
        yield CounterMetricFamily(
            "imu_node_windows_redelivered",
            "Windows the broker re-sent after a reconnect, already served (skipped)",
            value=s.metrics.redelivered,
        )
        by_reason = CounterMetricFamily(
            "imu_node_windows_dropped", "Windows not served, by reason", labels=["reason"]
        )
        for reason in sorted(dropped.keys() | set(DROP_REASONS)):
            by_reason.add_metric([reason], dropped.get(reason, 0))
        yield by_reason
        by_kind = CounterMetricFamily(
            "imu_node_errors", "Errors reported on the errors topic, by kind", labels=["kind"]
        )
        for kind in sorted(errors.keys() | {kind.value for kind in ErrorKind}):
            by_kind.add_metric([kind], errors.get(kind, 0))
        yield by_kind
        yield from self._latency(s.metrics)
        yield GaugeMetricFamily("imu_node_queue_depth", "Windows waiting", value=s.queue_depth())
        yield GaugeMetricFamily(
            "imu_node_queue_capacity", "Size of the inference queue", value=s.queue_capacity
        )
        yield from self._mqtt(s.session, s.outbox)
        yield GaugeMetricFamily(
            "imu_node_control_plane_stale",
            "1 while the signed desired state the node follows has expired without a renewal "
            "(or the current one was too old to take): nobody steers the node",
            value=int(s.stale_since() is not None),
        )
        healthy, rebuilds, stalls = s.backend_health()
        yield GaugeMetricFamily(
            "imu_node_backend_healthy",
            "1 while the backend serves, 0 while it is rebuilt",
            value=int(healthy),
        )
        yield CounterMetricFamily(
            "imu_node_backend_rebuilds",
            "Backend failures answered by a rebuild or a fallback",
            value=rebuilds,
        )
        yield CounterMetricFamily(
            "imu_node_watchdog_stalls", "Inference calls that ran past their deadline", value=stalls
        )
        queue = pipeline.info.detail.get("async_queue_size")
        if isinstance(queue, int):
            yield GaugeMetricFamily(
                "imu_node_accelerator_async_queue_frames",
                "Frames the device's async queue holds (asked of the device at configure)",
                value=queue,
            )
        temperature = pipeline.backend.temperature()
        if temperature is not None:
            yield GaugeMetricFamily(
                "imu_node_accelerator_temperature_celsius", "Accelerator chip", value=temperature
            )

    @staticmethod
    def _latency(metrics: NodeMetrics) -> Iterator[Metric]:
        histogram = metrics.latency_histogram()
        buckets = [
            (f"{bound / 1000:g}", count)
            for bound, count in zip(histogram.bounds_ms, histogram.cumulative, strict=False)
        ]
        buckets.append(("+Inf", histogram.cumulative[-1]))
        yield HistogramMetricFamily(
            "imu_node_window_latency_seconds",
            "Message arrival to result queued, per window",
            buckets=buckets,
            sum_value=histogram.sum_ms / 1000,
        )

    @staticmethod
    def _mqtt(session: MqttSession, outbox: Outbox) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "imu_node_mqtt_connected", "1 while connected to the broker", int(session.is_connected)
        )
        yield CounterMetricFamily(
            "imu_node_mqtt_connects", "Successful connections", value=session.counters.connects
        )
        yield GaugeMetricFamily(
            "imu_node_mqtt_pending_publishes",
            "Messages handed to the client, not yet acknowledged",
            value=session.pending_publishes(),
        )
        stats = outbox.stats()
        if stats is not None:
            yield GaugeMetricFamily(
                "imu_node_spool_messages", "Results on disk for the broker", value=stats.messages
            )
            yield GaugeMetricFamily("imu_node_spool_bytes", "Disk the spool uses", stats.bytes)
        if outbox.spool is not None:
            yield GaugeMetricFamily(
                "imu_node_spool_capacity_bytes",
                "Disk the spool may use (spool_max_mb); results past it are dropped",
                outbox.spool.max_bytes,
            )


def metrics_registry(sources: NodeSources) -> CollectorRegistry:
    """A registry holding the node collector and the process collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(sources))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition of everything in `registry`."""
    return generate_latest(registry)
