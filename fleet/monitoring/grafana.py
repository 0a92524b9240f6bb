"""The Grafana dashboard of an imu-edge site, written with Grafana's Foundation SDK.

`compose/grafana/dashboards/imu-fleet.json` is this module's output; regenerate it with

    python -m fleet.monitoring.grafana > compose/grafana/dashboards/imu-fleet.json

(tests/test_monitoring.py fails when the two differ, and runs every query below against a real
Prometheus scraping a real node). The SDK is a development dependency (`pip install -e .[dev]`):
neither the node nor the fleet tools import this module.

Node series carry `node_id` (set per target by compose/prometheus/prometheus.yml); fleet
series come from `imu-fleet dashboard` (job `imu-fleet`).
"""

from __future__ import annotations

import json
import sys

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    GraphTresholdsStyleMode,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

UID = "imu-fleet"
DATASOURCE_UID = "imu-prometheus"
"""The uid of the datasource compose/grafana/provisioning/datasources/prometheus.yml creates."""
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
NODE = 'job="imu-node"'
ONE_NODE = 'job="imu-node", node_id="$node"'
RATE = "$__rate_interval"
LATENCY_TARGET_S = 0.05
"""p95 window latency target (docs/performance.md)."""


def query(expr: str, legend: str = "", *, ref: str = "A") -> prometheus.Dataquery:
    """A range query (graphs and stats)."""
    built = prometheus.Dataquery().expr(expr).ref_id(ref).range().datasource(DATASOURCE)
    return built.legend_format(legend) if legend else built


def table_query(expr: str, *, ref: str = "A") -> prometheus.Dataquery:
    """An instant query whose labels become columns."""
    return (
        prometheus.Dataquery()
        .expr(expr)
        .ref_id(ref)
        .instant()
        .format(PromQueryFormat.TABLE)
        .datasource(DATASOURCE)
    )


def thresholds(*steps: tuple[float | None, str]) -> dashboard.ThresholdsConfig:
    """Absolute thresholds: (from value, colour); the first step starts at None (-inf)."""
    return (
        dashboard.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps([model.Threshold(value=value, color=color) for value, color in steps])
    )


def graph(
    title: str,
    description: str,
    targets: list[prometheus.Dataquery],
    unit: str = "short",
    *,
    width: int = 8,
    limit: tuple[float, str] | None = None,
) -> timeseries.Panel:
    """A time series panel; `limit` draws a threshold line (value, colour)."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(list(targets))
        .unit(unit)
        .span(width)
        .height(8)
        .fill_opacity(10)
        .min(0)
    )
    if limit is not None:
        value, color = limit
        panel = panel.thresholds(thresholds((None, "green"), (value, color))).thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(GraphTresholdsStyleMode.LINE)
        )
    return panel


def single(
    title: str,
    description: str,
    target: prometheus.Dataquery,
    unit: str = "short",
    *,
    width: int = 4,
    steps: tuple[tuple[float | None, str], ...] = ((None, "green"),),
) -> stat.Panel:
    """One big number (the last value)."""
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(target)
        .unit(unit)
        .span(width)
        .height(4)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
        .graph_mode(BigValueGraphMode.AREA)
        .color_mode(BigValueColorMode.BACKGROUND)
        .thresholds(thresholds(*steps))
    )


def grid(
    title: str,
    description: str,
    targets: list[prometheus.Dataquery],
    width: int,
    columns: dict[str, str | None],
) -> table.Panel:
    """A table of instant queries merged on their common labels. `columns` renames fields
    (`Value`, or `Value #B` with several queries) or hides them (None); Time and __name__ are
    always hidden."""
    hidden = {"Time": True, "__name__": True} | {k: True for k, v in columns.items() if v is None}
    renamed = {k: v for k, v in columns.items() if v is not None}
    return (
        table.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(list(targets))
        .span(width)
        .height(8)
        .show_header(True)
        .with_transformation(model.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            model.DataTransformerConfig(
                id_val="organize", options={"excludeByName": hidden, "renameByName": renamed}
            )
        )
    )


def fleet_overview(board: dashboard.Dashboard) -> dashboard.Dashboard:
    """Every node at once: health, versions, throughput, latency, errors, resources."""
    board = board.with_row(dashboard.Row("Fleet overview"))
    board = (
        board.with_panel(
            single(
                "Nodes up",
                "Nodes Prometheus scrapes successfully (nodes.yml lists them)",
                query(f"sum(up{{{NODE}}})"),
            )
        )
        .with_panel(
            single(
                "Nodes down",
                "Listed nodes whose /metrics does not answer (alert ImuNodeDown)",
                query(f"sum(up{{{NODE}}} == bool 0)"),
                steps=((None, "green"), (1, "red")),
            )
        )
        .with_panel(
            single(
                "Connected to the broker",
                "Nodes with a live MQTT connection",
                query(f"sum(imu_node_mqtt_connected{{{NODE}}})"),
            )
        )
        .with_panel(
            single(
                "Windows/s",
                "Windows inferred per second, all nodes",
                query(f"sum(rate(imu_node_windows_inferred_total{{{NODE}}}[{RATE}]))"),
                "ops",
            )
        )
        .with_panel(
            single(
                "Worst p95 latency",
                "Highest per-node p95 of window latency (arrival to result); target 50 ms",
                query(
                    "max(histogram_quantile(0.95, sum by (node_id, le) "
                    f"(rate(imu_node_window_latency_seconds_bucket{{{NODE}}}[{RATE}]))))"
                ),
                "s",
                steps=((None, "green"), (LATENCY_TARGET_S, "red")),
            )
        )
        .with_panel(
            single(
                "Hottest chip",
                "Highest Hailo chip temperature; target under 85 °C",
                query(f"max(imu_node_accelerator_temperature_celsius{{{NODE}}})"),
                "celsius",
                steps=((None, "green"), (85, "orange"), (100, "red")),
            )
        )
    )
    return (
        board.with_panel(
            grid(
                "Nodes and model versions",
                "What each node serves, on which backend, and which software it runs",
                [
                    table_query(
                        "max by (node_id, backend, model, model_version, software_version, "
                        f"group) (imu_node_info{{{NODE}}})"
                    )
                ],
                12,
                {"Value": None},
            )
        )
        .with_panel(
            grid(
                "Model versions in the fleet",
                "How many nodes serve each model version",
                [
                    table_query(
                        f"count by (model, model_version, backend) (imu_node_info{{{NODE}}})"
                    )
                ],
                12,
                {"Value": "nodes"},
            )
        )
        .with_panel(
            graph(
                "Windows/s by node",
                "Windows inferred per second",
                [
                    query(
                        "sum by (node_id) "
                        f"(rate(imu_node_windows_inferred_total{{{NODE}}}[{RATE}]))",
                        "{{node_id}}",
                    )
                ],
                "ops",
            )
        )
        .with_panel(
            graph(
                "p95 window latency by node",
                "95th percentile of arrival-to-result latency; the line is the 50 ms target",
                [
                    query(
                        "histogram_quantile(0.95, sum by (node_id, le) "
                        f"(rate(imu_node_window_latency_seconds_bucket{{{NODE}}}[{RATE}])))",
                        "{{node_id}}",
                    )
                ],
                "s",
                limit=(LATENCY_TARGET_S, "red"),
            )
        )
        .with_panel(
            graph(
                "Inference queue fill by node",
                "Windows waiting / queue_size; full means new windows are dropped",
                [
                    query(
                        f"imu_node_queue_depth{{{NODE}}} / imu_node_queue_capacity{{{NODE}}}",
                        "{{node_id}}",
                    )
                ],
                "percentunit",
                limit=(0.8, "orange"),
            )
        )
        .with_panel(
            graph(
                "Errors/s by kind",
                "Errors reported on fleet/nodes/+/errors, all nodes",
                [
                    query(
                        f"sum by (kind) (rate(imu_node_errors_total{{{NODE}}}[{RATE}]))",
                        "{{kind}}",
                    )
                ],
                "ops",
            )
        )
        .with_panel(
            graph(
                "Dropped windows/s by reason",
                "Windows not served: queue_full, outbox_full, shutting_down, inference_failed",
                [
                    query(
                        f"sum by (reason) (rate(imu_node_windows_dropped_total{{{NODE}}}[{RATE}]))",
                        "{{reason}}",
                    )
                ],
                "ops",
            )
        )
        .with_panel(
            graph(
                "Chip temperature by node",
                "Hailo chip (sensor ts0); target under 85 °C",
                [
                    query(
                        f"imu_node_accelerator_temperature_celsius{{{NODE}}}",
                        "{{node_id}}",
                    )
                ],
                "celsius",
                limit=(85, "orange"),
            )
        )
        .with_panel(
            graph(
                "Result spool use by node",
                "Results on disk waiting for the broker / spool_max_mb",
                [
                    query(
                        f"imu_node_spool_bytes{{{NODE}}} / imu_node_spool_capacity_bytes{{{NODE}}}",
                        "{{node_id}}",
                    )
                ],
                "percentunit",
                limit=(0.8, "red"),
            )
        )
    )


def fleet_view(board: dashboard.Dashboard) -> dashboard.Dashboard:
    """What the fleet dashboard (`imu-fleet dashboard`) sees over MQTT: presence and rollouts."""
    board = board.with_row(dashboard.Row("Fleet view and rollouts"))
    return (
        board.with_panel(
            single(
                "Nodes online (fleet view)",
                "Nodes whose retained status is online",
                query("sum(imu_fleet_node_online)"),
                width=6,
            )
        )
        .with_panel(
            single(
                "Nodes offline (fleet view)",
                "Nodes whose retained status is offline or stopped",
                query("sum(imu_fleet_node_online == bool 0)"),
                width=6,
                steps=((None, "green"), (1, "red")),
            )
        )
        .with_panel(
            single(
                "Running rollouts",
                "Rollouts in state running",
                query('count(imu_fleet_rollout_info{state="running"}) or vector(0)'),
                width=6,
            )
        )
        .with_panel(
            single(
                "Rollout failures",
                "Nodes that failed the running rollouts",
                query(
                    "sum(imu_fleet_rollout_failures and on (rollout_id) "
                    'imu_fleet_rollout_info{state="running"}) or vector(0)'
                ),
                width=6,
                steps=((None, "green"), (1, "red")),
            )
        )
        .with_panel(
            grid(
                "Nodes (fleet view)",
                "Every node the fleet knows, with what it reports",
                [
                    table_query(
                        "max by (node_id, version, backend, model_state) (imu_fleet_node_info)",
                        ref="A",
                    ),
                    table_query("max by (node_id) (imu_fleet_node_online)", ref="B"),
                ],
                12,
                {"Value #A": None, "Value #B": "online"},
            )
        )
        .with_panel(
            grid(
                "Rollouts",
                "Each rollout: version, state, current wave of all waves, failures, last change",
                [
                    table_query("max by (rollout_id, version, state) (imu_fleet_rollout_info)"),
                    table_query("max by (rollout_id) (imu_fleet_rollout_wave)", ref="B"),
                    table_query("max by (rollout_id) (imu_fleet_rollout_waves)", ref="C"),
                    table_query("max by (rollout_id) (imu_fleet_rollout_failures)", ref="D"),
                    table_query(
                        "max by (rollout_id) "
                        "(time() - imu_fleet_rollout_updated_timestamp_seconds)",
                        ref="E",
                    ),
                ],
                12,
                {
                    "Value #A": None,
                    "Value #B": "wave",
                    "Value #C": "of",
                    "Value #D": "failures",
                    "Value #E": "unchanged for",
                },
            ).override_by_name("Value #E", [model.DynamicConfigValue(id_val="unit", value="s")])
        )
    )


def node_detail(board: dashboard.Dashboard) -> dashboard.Dashboard:
    """One node ($node): everything it exports."""
    board = board.with_row(dashboard.Row("Node $node"))
    return (
        board.with_panel(
            grid(
                "What $node serves",
                "Backend, model, version, software and group",
                [
                    table_query(
                        "max by (node_id, backend, model, model_version, software_version, "
                        f"group) (imu_node_info{{{ONE_NODE}}})"
                    )
                ],
                12,
                {"Value": None},
            )
        )
        .with_panel(
            single(
                "Broker",
                "1 while connected to the MQTT broker",
                query(f"imu_node_mqtt_connected{{{ONE_NODE}}}"),
                width=4,
                steps=((None, "red"), (1, "green")),
            )
        )
        .with_panel(
            single(
                "Backend healthy",
                "1 while the backend serves, 0 while it is being rebuilt",
                query(f"imu_node_backend_healthy{{{ONE_NODE}}}"),
                width=4,
                steps=((None, "red"), (1, "green")),
            )
        )
        .with_panel(
            single(
                "Resident memory",
                "Process RSS; target under 512 MB",
                query(f"process_resident_memory_bytes{{{ONE_NODE}}}"),
                "bytes",
                width=4,
                steps=((None, "green"), (512 * 1024 * 1024, "red")),
            )
        )
        .with_panel(
            graph(
                "Windows/s",
                "Accepted into the queue, inferred, results published",
                [
                    query(
                        f"rate(imu_node_windows_received_total{{{ONE_NODE}}}[{RATE}])",
                        "received",
                    ),
                    query(
                        f"rate(imu_node_windows_inferred_total{{{ONE_NODE}}}[{RATE}])",
                        "inferred",
                        ref="B",
                    ),
                    query(
                        f"rate(imu_node_results_published_total{{{ONE_NODE}}}[{RATE}])",
                        "published",
                        ref="C",
                    ),
                ],
                "ops",
            )
        )
        .with_panel(
            graph(
                "Window latency",
                "p50, p95 and p99 of arrival to result; the line is the 50 ms target",
                [
                    query(
                        f"histogram_quantile({q}, sum by (le) "
                        f"(rate(imu_node_window_latency_seconds_bucket{{{ONE_NODE}}}[{RATE}])))",
                        f"p{round(q * 100)}",
                        ref=ref,
                    )
                    for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))
                ],
                "s",
                limit=(LATENCY_TARGET_S, "red"),
            )
        )
        .with_panel(
            graph(
                "Queue",
                "Windows waiting for inference, and the queue's size",
                [
                    query(f"imu_node_queue_depth{{{ONE_NODE}}}", "waiting"),
                    query(f"imu_node_queue_capacity{{{ONE_NODE}}}", "capacity", ref="B"),
                ],
            )
        )
        .with_panel(
            graph(
                "Errors/s by kind",
                "Errors this node reported",
                [
                    query(
                        f"rate(imu_node_errors_total{{{ONE_NODE}}}[{RATE}])",
                        "{{kind}}",
                    )
                ],
                "ops",
            )
        )
        .with_panel(
            graph(
                "Dropped windows/s by reason",
                "Windows this node did not serve",
                [
                    query(
                        f"rate(imu_node_windows_dropped_total{{{ONE_NODE}}}[{RATE}])",
                        "{{reason}}",
                    )
                ],
                "ops",
            )
        )
        .with_panel(
            graph(
                "MQTT",
                "Messages the broker has not acknowledged yet, and connections made",
                [
                    query(f"imu_node_mqtt_pending_publishes{{{ONE_NODE}}}", "pending publishes"),
                    query(
                        f"increase(imu_node_mqtt_connects_total{{{ONE_NODE}}}[{RATE}])",
                        "connects",
                        ref="B",
                    ),
                ],
            )
        )
        .with_panel(
            graph(
                "Result spool",
                "Results on disk waiting for the broker, and the limit (spool_max_mb)",
                [
                    query(f"imu_node_spool_bytes{{{ONE_NODE}}}", "used"),
                    query(f"imu_node_spool_capacity_bytes{{{ONE_NODE}}}", "limit", ref="B"),
                ],
                "bytes",
            )
        )
        .with_panel(
            graph(
                "Backend recoveries",
                "Backend rebuilds or fallbacks, and calls past their deadline (watchdog)",
                [
                    query(
                        f"increase(imu_node_backend_rebuilds_total{{{ONE_NODE}}}[{RATE}])",
                        "rebuilds",
                    ),
                    query(
                        f"increase(imu_node_watchdog_stalls_total{{{ONE_NODE}}}[{RATE}])",
                        "watchdog stalls",
                        ref="B",
                    ),
                ],
            )
        )
        .with_panel(
            graph(
                "Chip temperature",
                "Hailo chip (sensor ts0); the line is the 85 °C target",
                [query(f"imu_node_accelerator_temperature_celsius{{{ONE_NODE}}}", "chip")],
                "celsius",
                limit=(85, "orange"),
            )
        )
        .with_panel(
            graph(
                "CPU",
                "Process CPU time per second (1 = one core)",
                [query(f"rate(process_cpu_seconds_total{{{ONE_NODE}}}[{RATE}])", "cpu")],
                "percentunit",
            )
        )
    )


def build() -> model.Dashboard:
    """The dashboard: fleet overview, fleet view and rollouts, then one node ($node)."""
    board = (
        dashboard.Dashboard("IMU edge fleet")
        .uid(UID)
        .description("imu-edge nodes (Prometheus scrapes) and the fleet view (imu-fleet dashboard)")
        .tags(["imu-edge"])
        .time("now-1h", "now")
        .refresh("30s")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .with_variable(
            dashboard.QueryVariable("node")
            .label("Node")
            .description("The node the bottom row shows")
            .datasource(DATASOURCE)
            .query(f"label_values(imu_node_info{{{NODE}}}, node_id)")
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(model.VariableSort.ALPHABETICAL_ASC)
        )
    )
    board = fleet_overview(board)
    board = fleet_view(board)
    board = node_detail(board)
    return board.build()


def render() -> str:
    """The dashboard as the JSON file Grafana provisions (stable: sorted keys, 2-space indent)."""
    encoded = json.dumps(build(), cls=JSONEncoder, indent=2, sort_keys=True, ensure_ascii=False)
    return encoded + "\n"


def main() -> None:
    """Write the dashboard JSON to standard output."""
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
