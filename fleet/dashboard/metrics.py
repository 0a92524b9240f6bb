"""`/metrics` of the dashboard: the fleet as Prometheus sees it, read from the view at scrape time.

Names are a contract (alert rules are written against them; docs/dashboard.md lists them):

- `imu_fleet_node_online{node_id}`: 1 while the node's retained status says online, else 0;
- `imu_fleet_node_info{node_id,version,backend,model_state}`: always 1 (version: active model);
- `imu_fleet_rollout_info{rollout_id,version,state}`: always 1 (state: a RolloutState value);
- `imu_fleet_rollout_wave{rollout_id}` (current wave, 1-based), `imu_fleet_rollout_waves` (total);
- `imu_fleet_rollout_updated_timestamp_seconds{rollout_id}`: when the record last changed;
- `imu_fleet_rollout_failures{rollout_id}`;

and the dashboard's own: `imu_fleet_dashboard_messages_total{kind}`,
`imu_fleet_dashboard_rejected_total{reason}`, `imu_fleet_dashboard_evicted_total{what}`,
`imu_fleet_dashboard_sse_clients`, `imu_fleet_dashboard_broker_connected`, plus the process
collector's `process_*`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleet.dashboard.view import DashboardView

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class DashboardCollector(Collector):
    """Yields the fleet and dashboard metrics from the live view."""

    def __init__(
        self,
        view: DashboardView,
        sse_clients: Callable[[], int],
        broker_connected: Callable[[], bool],
    ) -> None:
        self.view = view
        self.sse_clients = sse_clients
        self.broker_connected = broker_connected

    def collect(self) -> Iterator[Metric]:
        """One snapshot per scrape."""
        yield from self._nodes()
        yield from self._rollouts()
        yield from self._own()

    def _nodes(self) -> Iterator[Metric]:
        online = GaugeMetricFamily(
            "imu_fleet_node_online",
            "1 while the node's retained status says online, else 0",
            labels=["node_id"],
        )
        info = GaugeMetricFamily(
            "imu_fleet_node_info",
            "Always 1: the node's active model version, backend and model lifecycle state",
            labels=["node_id", "version", "backend", "model_state"],
        )
        for row in self.view.node_rows():
            online.add_metric([row.node_id], 1.0 if row.online else 0.0)
            info.add_metric(
                [row.node_id, row.model_version or "", row.backend or "", row.model_state or ""],
                1.0,
            )
        yield online
        yield info

    def _rollouts(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "imu_fleet_rollout_info",
            "Always 1: the version a rollout moves to and its state",
            labels=["rollout_id", "version", "state"],
        )
        wave = GaugeMetricFamily(
            "imu_fleet_rollout_wave", "Wave in progress (1-based)", labels=["rollout_id"]
        )
        waves = GaugeMetricFamily(
            "imu_fleet_rollout_waves", "Waves in the rollout's plan", labels=["rollout_id"]
        )
        updated = GaugeMetricFamily(
            "imu_fleet_rollout_updated_timestamp_seconds",
            "When the rollout record last changed (unix seconds)",
            labels=["rollout_id"],
        )
        failures = GaugeMetricFamily(
            "imu_fleet_rollout_failures",
            "Nodes that failed to take the new version",
            labels=["rollout_id"],
        )
        for row in self.view.rollout_rows():
            h = row.head
            info.add_metric([h.rollout_id, h.desired.version, h.state.value], 1.0)
            wave.add_metric([h.rollout_id], float(row.current_wave))
            waves.add_metric([h.rollout_id], float(len(row.waves)))
            updated.add_metric([h.rollout_id], h.updated_at)
            failures.add_metric([h.rollout_id], float(row.failures))
        yield from (info, wave, waves, updated, failures)

    def _own(self) -> Iterator[Metric]:
        counts = self.view.counts()
        messages = CounterMetricFamily(
            "imu_fleet_dashboard_messages", "Broker messages taken, by kind", labels=["kind"]
        )
        for kind, value in counts.messages.items():
            messages.add_metric([str(kind)], value)
        rejected = CounterMetricFamily(
            "imu_fleet_dashboard_rejected",
            "Broker messages dropped, by reason (bad_topic, oversized, malformed, invalid, "
            "mismatch, stale, over_capacity)",
            labels=["reason"],
        )
        for reason, value in counts.rejected.items():
            rejected.add_metric([str(reason)], value)
        evicted = CounterMetricFamily(
            "imu_fleet_dashboard_evicted",
            "Entries dropped to stay within the caps (least recently heard first)",
            labels=["what"],
        )
        for what, value in counts.evicted.items():
            evicted.add_metric([what], value)
        clients = GaugeMetricFamily(
            "imu_fleet_dashboard_sse_clients", "Pages connected to /events now"
        )
        clients.add_metric([], float(self.sse_clients()))
        connected = GaugeMetricFamily(
            "imu_fleet_dashboard_broker_connected", "1 while the MQTT session is connected"
        )
        connected.add_metric([], 1.0 if self.broker_connected() else 0.0)
        yield from (messages, rejected, evicted, clients, connected)


def metrics_registry(collector: DashboardCollector) -> CollectorRegistry:
    """A registry with the dashboard's collector and the process collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition."""
    return generate_latest(registry)
