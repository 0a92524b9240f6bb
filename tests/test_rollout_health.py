"""Health gates (fleet/rollout/health.py): the verdict on a moved node, from its telemetry."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fleet.rollout.health import Report, cohort_figures, figures, judge
from schemas.control import RolloutGates
from schemas.messages import LatencySummary, Telemetry

GATES = RolloutGates(soak_s=10)


def report(
    t: float,
    *,
    windows: int,
    errors: dict[str, int] | None = None,
    results: int | None = None,
    p95: float | None = 3.0,
    uptime: float | None = None,
) -> Report:
    """What the gates keep of one telemetry message at time `t` with counters since start."""
    return Report.of(Telemetry(
        node_id="n", ts=t, interval_s=1.0, uptime_s=uptime if uptime is not None else t,
        backend="onnx", model=None, windows_in=windows, windows_done=windows,
        results_published=windows if results is None else results, windows_per_s=10.0,
        latency_ms=LatencySummary(count=10, p50=p95, p95=p95, p99=p95, max=p95),
        batch_mean=1.0, queue_depth=0, queue_capacity=512, dropped={}, redelivered=0,
        errors=errors or {}, cpu_percent=None, rss_mb=80.0, peak_rss_mb=80.0, temperature_c=None,
    ))  # fmt: skip


def healthy_run(start: float, count: int = 5, p95: float = 3.0) -> list[Report]:
    return [report(start + i, windows=int(10 * (start + i)), p95=p95) for i in range(count)]


def test_a_node_serving_as_before_passes() -> None:
    verdict = judge(GATES, before=healthy_run(100), soak=healthy_run(110), cohort=None,
                    went_offline=False)  # fmt: skip
    assert verdict.passed, verdict.reason
    assert verdict.soak_samples == 5
    assert verdict.windows == 40
    assert verdict.error_rate == 0
    assert verdict.p95_ms == verdict.reference_p95_ms == 3.0


def test_inference_errors_fail_but_sensor_junk_does_not() -> None:
    soak = [report(110 + i, windows=1100 + 10 * i, errors={"inference": 5 * i}) for i in range(5)]
    verdict = judge(GATES, before=healthy_run(100), soak=soak, cohort=None, went_offline=False)
    assert not verdict.passed
    assert verdict.error_rate == 0.5
    assert "error rate 0.500 per window" in (verdict.reason or "")
    junk = [report(110 + i, windows=1100 + 10 * i, errors={"malformed": 50 * i}) for i in range(5)]
    assert judge(GATES, before=healthy_run(100), soak=junk, cohort=None, went_offline=False).passed


def test_latency_is_judged_against_the_worse_of_before_and_the_cohort() -> None:
    slow = healthy_run(110, p95=12.0)
    verdict = judge(GATES, before=healthy_run(100, p95=3.0), soak=slow, cohort=None,
                    went_offline=False)  # fmt: skip
    assert not verdict.passed
    assert "p95 12.0 ms, over 1.5 x 3.0 ms" in (verdict.reason or "")
    # the unmoved nodes got as slow over the same soak (load, not the model): it passes
    cohort = cohort_figures([healthy_run(110, p95=10.0), healthy_run(110, p95=9.0)])
    assert judge(GATES, before=healthy_run(100), soak=slow, cohort=cohort,
                 went_offline=False).passed  # fmt: skip
    # under the floor, a threefold rise is noise
    tiny = judge(GATES, before=healthy_run(100, p95=0.5), soak=healthy_run(110, p95=1.5),
                 cohort=None, went_offline=False)  # fmt: skip
    assert tiny.passed


def test_a_restart_offline_or_silence_fails() -> None:
    restarted = [*healthy_run(110, 2), report(113, windows=5, uptime=1.0)]
    verdict = judge(GATES, before=healthy_run(100), soak=restarted, cohort=None,
                    went_offline=False)  # fmt: skip
    assert not verdict.passed
    assert "restarted" in (verdict.reason or "")
    offline = judge(GATES, before=healthy_run(100), soak=healthy_run(110), cohort=None,
                    went_offline=True)  # fmt: skip
    assert "went offline" in (offline.reason or "")
    silent = judge(GATES, before=healthy_run(100), soak=[], cohort=None, went_offline=False)
    assert "no telemetry" in (silent.reason or "")


def test_results_falling_behind_windows_fails() -> None:
    soak = [report(110 + i, windows=1100 + 10 * i, results=1100 + 5 * i) for i in range(5)]
    verdict = judge(GATES, before=healthy_run(100), soak=soak, cohort=None, went_offline=False)
    assert not verdict.passed
    assert verdict.results_ratio == 0.5
    assert verdict.reference_results_ratio == 1.0


STEPS = st.lists(st.tuples(st.integers(0, 50), st.integers(0, 5), st.booleans()), max_size=30)


@given(STEPS.filter(bool))
def test_figures_count_from_the_last_restart(steps: list[tuple[int, int, bool]]) -> None:
    """Counters restart with the process: figures never go negative, whatever the run."""
    run, t, uptime, windows, errors = [], 0.0, 0.0, 0, 0
    for more, errs, restart in steps:
        t += 1
        uptime = 0.5 if restart else uptime + 1
        windows, errors = (more, errs) if restart else (windows + more, errors + errs)
        run.append(report(t, windows=windows, errors={"inference": errors}, uptime=uptime))
    found = figures(run)
    assert found.windows >= 0
    assert found.error_rate is None or found.error_rate >= 0
