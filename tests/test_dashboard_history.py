"""The dashboard's per-node sparkline history: one point per step, bounded to the last hour,
errors counted per point from the node's running totals."""

from __future__ import annotations

from fleet.dashboard.rows import HISTORY_POINTS, HISTORY_STEP_S, NodeRow


def test_one_point_per_step_and_errors_between_points_count_in_the_later_one() -> None:
    row = NodeRow("pi-1")
    row.errors = 5  # since the node started, before the page saw it
    row.record(1000.0, 40.0, 3.0)
    row.errors = 7
    row.record(1000.0 + HISTORY_STEP_S / 2, 41.0, 3.1)  # within the step: no point
    row.errors = 9
    row.record(1000.0 + HISTORY_STEP_S, 42.0, None)
    assert list(row.history) == [(1000.0, 40.0, 3.0, 0), (1000.0 + HISTORY_STEP_S, 42.0, None, 4)]


def test_a_node_restart_resets_its_totals_without_negative_errors() -> None:
    row = NodeRow("pi-1")
    row.errors = 50
    row.record(0.0, 1.0, 1.0)
    row.errors = 2  # restarted: its totals begin again
    row.record(HISTORY_STEP_S, 1.0, 1.0)
    assert row.history[-1][3] == 0


def test_history_is_bounded_and_a_delta_carries_only_the_newest_point() -> None:
    row = NodeRow("pi-1")
    for i in range(HISTORY_POINTS * 2):
        row.record(i * HISTORY_STEP_S, float(i), 1.0)
    assert len(row.history) == HISTORY_POINTS
    assert len(row.as_json(full_history=True)["history"]) == HISTORY_POINTS
    assert row.as_json()["history"] == [[(HISTORY_POINTS * 2 - 1) * HISTORY_STEP_S,
                                         float(HISTORY_POINTS * 2 - 1), 1.0, 0]]  # fmt: skip
