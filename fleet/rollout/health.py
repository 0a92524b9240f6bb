"""Health gates: does a node that took the new version still serve as well as before?

A wave's nodes report the new version active; then the wave soaks (`RolloutGates.soak_s`) and
each moved node's telemetry over the soak is compared with two references: its own numbers before
the move, and the nodes of the rollout not moved yet over the same soak (the cohort, when there
is one). A node fails the gate when, over the soak:

* it restarted (its uptime went back, or a new process instance) or went offline;
* it sent no telemetry at all;
* its node-side error rate (errors per window in, input errors such as malformed payloads not
  counted: the model does not cause those) rose by more than `max_error_rate` over the worse of
  the references;
* its latency p95 (the median of its telemetry p95s) is over `max_p95_ratio` times the worse of
  the references, and over `p95_floor_ms` (below that, differences are noise);
* its results per window in fell below `min_results_ratio` of its own ratio before the move.

Each verdict keeps the figures, so the rollout record shows why a node passed or failed.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from schemas.control import NodeHealth, RolloutGates
from schemas.messages import ErrorKind, Telemetry

INPUT_ERRORS = frozenset(
    {
        ErrorKind.MALFORMED,
        ErrorKind.INVALID,
        ErrorKind.NON_FINITE,
        ErrorKind.OVERSIZED,
        ErrorKind.BAD_TOPIC,
        ErrorKind.SEQUENCE_GAP,
        ErrorKind.SEQUENCE_RESET,
        ErrorKind.SHUTTING_DOWN,
    }
)
"""Errors about what sensors sent, not about what the node did with it."""


@dataclass(frozen=True, slots=True)
class Report:
    """What the gates read of one telemetry message. The controller keeps dozens per node, and
    a parsed `Telemetry` takes ~5 KB: at 10,000 nodes the full messages held 1.4 GB."""

    ts: float
    interval_s: float
    uptime_s: float
    windows_in: int
    results_published: int
    node_errors: int
    """Errors since start that the node, not its input, is answerable for."""
    p95_ms: float | None

    @classmethod
    def of(cls, telemetry: Telemetry) -> Report:
        """The gates' part of a message."""
        return cls(
            ts=telemetry.ts,
            interval_s=telemetry.interval_s,
            uptime_s=telemetry.uptime_s,
            windows_in=telemetry.windows_in,
            results_published=telemetry.results_published,
            node_errors=node_errors(telemetry),
            p95_ms=telemetry.latency_ms.p95,
        )


@dataclass(frozen=True, slots=True)
class Figures:
    """What a run of telemetry messages says about a node over their span."""

    samples: int
    windows: int
    error_rate: float | None
    """Node-side errors per window in (None: no window)."""
    p95_ms: float | None
    """Median of the messages' latency p95 (None: no latency reported)."""
    results_ratio: float | None
    """Results published per window in (None: no window)."""
    restarted: bool


def restarted_between(a: Report, b: Report) -> bool:
    """True when the node's process restarted between two of its messages: its uptime grew by
    less than half the time that passed, or a counter since start went back."""
    return (
        b.uptime_s - a.uptime_s < 0.5 * (b.ts - a.ts)
        or b.windows_in < a.windows_in
        or b.node_errors < a.node_errors
    )


def node_errors(telemetry: Telemetry) -> int:
    """Errors since start that the node, not its input, is answerable for."""
    return sum(count for kind, count in telemetry.errors.items() if kind not in INPUT_ERRORS)


def figures(run: Sequence[Report], prior: Report | None = None) -> Figures:
    """Figures over consecutive telemetry of one node (oldest first). Counters count from
    `prior` (the report just before the run) when given, else from the run's first report; from
    the last restart when the process restarted in between."""
    if not run:
        return Figures(0, 0, None, None, None, restarted=False)
    chain = [prior, *run] if prior is not None else list(run)
    starts = [i for i, (a, b) in enumerate(itertools.pairwise(chain), 1) if restarted_between(a, b)]
    restarted = bool(starts)
    first, last = chain[starts[-1]] if restarted else chain[0], chain[-1]
    windows = last.windows_in - first.windows_in
    errors = last.node_errors - first.node_errors
    results = last.results_published - first.results_published
    p95s = [r.p95_ms for r in run if r.p95_ms is not None]
    return Figures(
        samples=len(run),
        windows=windows,
        error_rate=errors / windows if windows > 0 else (1.0 if errors > 0 else None),
        p95_ms=statistics.median(p95s) if p95s else None,
        results_ratio=results / windows if windows > 0 else None,
        restarted=restarted,
    )


def cohort_figures(runs: Sequence[Sequence[Report]]) -> Figures | None:
    """The typical unmoved node over the soak: median error rate and p95 (None: no cohort)."""
    each = [figures(run) for run in runs if run]
    if not each:
        return None
    rates = [f.error_rate for f in each if f.error_rate is not None]
    p95s = [f.p95_ms for f in each if f.p95_ms is not None]
    return Figures(
        samples=sum(f.samples for f in each),
        windows=sum(f.windows for f in each),
        error_rate=statistics.median(rates) if rates else None,
        p95_ms=statistics.median(p95s) if p95s else None,
        results_ratio=None,
        restarted=False,
    )


def judge(
    gates: RolloutGates,
    *,
    before: Sequence[Report],
    soak: Sequence[Report],
    cohort: Figures | None,
    went_offline: bool,
    prior: Report | None = None,
) -> NodeHealth:
    """The verdict on one moved node, with the figures it rests on. `soak` holds its reports
    over the soak (with the first one after it: telemetry reports on the interval before its
    stamp), `prior` the last one before it; `before` its reports before the move."""
    own, after = figures(before), figures(soak, prior)
    reference_rate = max(
        (f.error_rate for f in (own, cohort) if f is not None and f.error_rate is not None),
        default=0.0,
    )
    reference_p95 = max(
        (f.p95_ms for f in (own, cohort) if f is not None and f.p95_ms is not None),
        default=None,
    )
    health = NodeHealth(
        passed=True,
        soak_samples=after.samples,
        windows=after.windows,
        error_rate=after.error_rate,
        reference_error_rate=reference_rate,
        p95_ms=after.p95_ms,
        reference_p95_ms=reference_p95,
        results_ratio=after.results_ratio,
        reference_results_ratio=own.results_ratio,
    )
    reasons: list[str] = []
    if went_offline:
        reasons.append("went offline during the soak")
    if after.restarted:
        reasons.append("restarted during the soak (a crash?)")
    if after.samples == 0:
        reasons.append(f"no telemetry during the {gates.soak_s:g} s soak")
    if after.error_rate is not None and after.error_rate > reference_rate + gates.max_error_rate:
        reasons.append(
            f"error rate {after.error_rate:.3f} per window, over {reference_rate:.3f} + "
            f"{gates.max_error_rate:g} allowed"
        )
    if (
        after.p95_ms is not None
        and reference_p95 is not None
        and after.p95_ms > gates.p95_floor_ms
        and after.p95_ms > gates.max_p95_ratio * reference_p95
    ):
        reasons.append(
            f"p95 {after.p95_ms:.1f} ms, over {gates.max_p95_ratio:g} x {reference_p95:.1f} ms"
        )
    if (
        after.results_ratio is not None
        and own.results_ratio is not None
        and after.windows > 0
        and after.results_ratio < gates.min_results_ratio * own.results_ratio
    ):
        reasons.append(
            f"results per window in {after.results_ratio:.3f}, under {gates.min_results_ratio:g}"
            f" x {own.results_ratio:.3f} before the move"
        )
    if reasons:
        return health.model_copy(update={"passed": False, "reason": "; ".join(reasons)})
    return health
