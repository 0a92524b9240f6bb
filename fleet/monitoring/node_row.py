"""The bottom row of the Grafana dashboard: one node ($node) in detail."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard

from fleet.monitoring.panels import (
    LATENCY_TARGET_S,
    ONE_NODE,
    RATE,
    graph,
    grid,
    query,
    single,
    table_query,
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
