"""`/metrics`: the node's shared counters in Prometheus text format, read at scrape time.

Nothing is counted twice: the collector reads the same `NodeMetrics`, session counters, queue
and spool that telemetry reads, and the sidecar's `hailo_*` names (node/api/sidecar.py) read
the same figures again. Process CPU, memory and file descriptors come from prometheus-client's
own process collector. While the node waits for its first model, only the sidecar's set (with
`hailo_model_loaded` 0) and the process metrics are there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from common.mqtt.session import MqttSession
from node.api.sidecar import SidecarFigures, latency_family, sidecar_families
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
    busy_seconds: Callable[[], float] = lambda: 0.0
    """Seconds the workers spent in backend calls since start."""
    workers: int = 1


@dataclass(frozen=True, slots=True)
class ProcessFacts:
    """What `/metrics` knows before any model: the sidecar set's version, start time and checks."""

    software_version: str
    started_unix: float
    health_checks: Callable[[], int]


def device_name(pipeline: ModelPipeline) -> str:
    """The sidecar's `device`: the accelerator's architecture (e.g. hailo8), or cpu."""
    architecture = pipeline.info.detail.get("architecture")
    return str(architecture).lower() if architecture else pipeline.info.device.split()[0]


def file_sha256(pipeline: ModelPipeline, name: str) -> str | None:
    """The manifest's sha256 of the bundle file `name`, when the bundle has it."""
    entry = pipeline.bundle.manifest.files.get(name)
    return entry.sha256 if entry is not None else None


class NodeCollector(Collector):
    """Yields `imu_node_*` and the sidecar's `hailo_*` metrics from the node's live state."""

    def __init__(
        self,
        facts: ProcessFacts,
        sources: Callable[[], NodeSources | None],
        utilization: Callable[[], float | None],
    ) -> None:
        self.facts = facts
        self.sources = sources
        self.utilization = utilization

    def collect(self) -> Iterator[Metric]:
        """One consistent-enough snapshot per scrape."""
        s = self.sources()
        if s is None:  # waiting for a first model
            yield from sidecar_families(self._figures(None, None, None))
            return
        pipeline = s.pipeline()
        temperature = pipeline.backend.temperature()
        yield from self._node(s, pipeline, temperature)
        yield from sidecar_families(self._figures(s, pipeline, temperature))

    def _figures(
        self, s: NodeSources | None, pipeline: ModelPipeline | None, temperature: float | None
    ) -> SidecarFigures:
        facts = self.facts
        waiting = SidecarFigures(
            facts.started_unix, facts.software_version, facts.health_checks(), model_loaded=False
        )
        if s is None or pipeline is None:
            return waiting
        _, done, _, _, errors = s.metrics.totals()
        return replace(
            waiting,
            model_loaded=True,
            model=pipeline.ref.name,
            model_version=pipeline.ref.version,
            backend=pipeline.info.name,
            device=device_name(pipeline),
            hef_sha256=file_sha256(pipeline, "model.hef") or "",
            windows_inferred=done,
            errors=sum(errors.values()),
            latency=s.metrics.latency_histogram(),
            temperature_c=temperature,
            utilization_percent=self.utilization(),
        )

    def _node(
        self, s: NodeSources, pipeline: ModelPipeline, temperature: float | None
    ) -> Iterator[Metric]:
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
        yield CounterMetricFamily(
            "imu_node_backend_busy_seconds",
            "Seconds the workers spent in backend calls",
            value=s.busy_seconds(),
        )
        if temperature is not None:
            yield GaugeMetricFamily(
                "imu_node_accelerator_temperature_celsius", "Accelerator chip", value=temperature
            )

    @staticmethod
    def _latency(metrics: NodeMetrics) -> Iterator[Metric]:
        yield latency_family(
            "imu_node_window_latency_seconds",
            "Message arrival to result queued, per window",
            metrics.latency_histogram(),
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


def metrics_registry(
    facts: ProcessFacts,
    sources: Callable[[], NodeSources | None],
    utilization: Callable[[], float | None],
) -> CollectorRegistry:
    """A registry holding the node collector and the process collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(facts, sources, utilization))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition of everything in `registry`."""
    return generate_latest(registry)
