"""Building blocks of the Grafana dashboard (fleet/monitoring/grafana.py): the datasource, the
label selectors, queries, thresholds and the three panel shapes it uses."""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, table, timeseries
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
