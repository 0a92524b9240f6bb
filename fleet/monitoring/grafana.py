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

from grafana_foundation_sdk.builders import dashboard
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model

from fleet.monitoring.node_row import node_detail
from fleet.monitoring.panels import (
    DATASOURCE,
    LATENCY_TARGET_S,
    NODE,
    RATE,
    UID,
    graph,
    grid,
    query,
    single,
    table_query,
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
