"""`python -m bench.e2e` end to end on tiny settings, against the session's real mosquitto.

Checks the report's structure and that its numbers are sane and consistent (positive rates,
ratios computed from the figures of the same run, every window served once); never timings.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench import e2e
from bench.e2e_load import sensor_ids
from node.inference.workers import shard_of
from node.tools.local_broker import LocalBroker
from runtime.reference import build_reference_onnx, make_reference_weights

TINY = [
    "--raw-seconds", "0.1", "--rate", "100", "--seconds", "0.3", "--burst", "60",
    "--sensors", "4", "--sweep", "0.5,1", "--sweep-seconds", "0.2", "--groups", "2",
    "--workers", "1", "--flood", "40",
]  # fmt: skip


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def report(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny run on an ONNX file (bundled by the bench), with --json and --plot."""
    tmp = tmp_path_factory.mktemp("bench")
    model = tmp / "encoder.onnx"
    model.write_bytes(build_reference_onnx(make_reference_weights()))
    plot = ["--plot", str(tmp / "latency.png")] if _has_matplotlib() else []
    argv = [*TINY, "--broker", broker.url, "--model", str(model), "--json", str(tmp / "r.json")]
    assert e2e.main([*argv, *plot]) == 0
    if plot:
        assert (tmp / "latency.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    return dict(orjson.loads((tmp / "r.json").read_bytes()))


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_the_report_holds_every_figure(report: dict[str, Any]) -> None:
    assert report["model"]["description"] == "encoder.onnx (bundled here)"
    raw = report["raw"]
    passes = (raw["before"], raw["after"])
    keys = ("batch1_1thread", "batch1_2threads")
    parallel = ("parallel_2x1thread_shared_session", "parallel_2x1thread_two_sessions")
    for suite in passes:
        for key in (*keys, *parallel):
            assert _positive(suite[key]["windows_per_s"]), key
        assert suite["batch8_dynamic"] is None  # the export has a fixed batch of 1
    assert raw["best_intra_op"]["windows_per_s"] == max(
        suite[key]["windows_per_s"] for suite in passes for key in keys
    )
    assert raw["best_parallel"]["windows_per_s"] == max(
        suite[key]["windows_per_s"] for suite in passes for key in parallel
    )
    node = report["node"]
    assert set(node["throughput"]) == set(node["flood"]) == {"json", "binary"}
    for phase in (node["paced"], *node["throughput"].values()):
        assert phase["received"] == phase["sent"] > 0  # QoS 1: nothing lost
        assert phase["duplicates"] == 0
        assert _positive(phase["windows_per_s"])
        e2e_ms = phase["e2e_ms"]
        assert 0 < e2e_ms["p50"] <= e2e_ms["p95"] <= e2e_ms["p99"] <= e2e_ms["max"]
    for phase in node["flood"].values():  # QoS 0 may lose windows, never invent them
        assert 0 <= phase["received"] <= phase["sent"]
        assert phase["lost"] == phase["sent"] - phase["received"]
    assert _positive(node["rss_mb"]["peak"])
    assert node["rss_mb"]["peak"] >= node["rss_mb"]["rss"]
    assert report["machine"]["cpu_count"] >= 1
    assert len(report["machine"]["load_average"]) == 3


def test_the_sweep_offers_fractions_of_the_nodes_own_maximum(report: dict[str, Any]) -> None:
    sweep = report["sweep"]
    assert sweep["node_max_per_s"] == report["node"]["throughput"]["json"]["windows_per_s"]
    assert [p["fraction"] for p in sweep["points"]] == [0.5, 1.0]
    for point in sweep["points"]:
        assert point["offered_per_s"] == pytest.approx(point["fraction"] * sweep["node_max_per_s"])
        assert point["received"] > 0


def test_a_group_shares_the_windows_and_serves_each_once(report: dict[str, Any]) -> None:
    (group,) = report["groups"]
    assert group["nodes"] == 2
    assert group["mode"] == "window"
    assert len(group["rss_mb"]) == 2
    for phase in group["throughput"].values():
        assert phase["received"] == phase["sent"]
        assert phase["duplicates"] == 0
        assert set(phase["served_by"]) == set(group["rss_mb"])  # both nodes took a share
        assert sum(phase["served_by"].values()) == phase["received"]


def test_ratios_come_from_the_same_run(report: dict[str, Any]) -> None:
    best = report["raw"]["best_intra_op"]["windows_per_s"]
    parallel = report["raw"]["best_parallel"]["windows_per_s"]
    phases = {f"node_{k}": v for k, v in report["node"]["throughput"].items()}
    phases |= {f"node_flood_{k}": v for k, v in report["node"]["flood"].items()}
    phases |= {f"group2_{k}": v for k, v in report["groups"][0]["throughput"].items()}
    assert set(report["ratios"]) == set(phases)
    for name, phase in phases.items():
        row = report["ratios"][name]
        assert row["windows_per_s"] == phase["windows_per_s"]
        assert row["vs_best_raw"] == pytest.approx(phase["windows_per_s"] / best)
        assert row["vs_parallel_raw"] == pytest.approx(phase["windows_per_s"] / parallel)


def test_bench_sensors_share_any_worker_count_evenly() -> None:
    ids = sensor_ids("bench-x", 12)
    assert len(set(ids)) == 12
    for workers in (1, 2, 3, 4):
        counts = [0] * workers
        for sensor in ids:
            counts[shard_of(sensor, workers)] += 1
        assert counts == [12 // workers] * workers


def test_plot_without_matplotlib_fails_at_once_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert e2e.main(["--plot", str(tmp_path / "p.png")]) == 2
    assert "pip install -e '.[bench]'" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_a_group_dividing_sample_runs_serves_every_window_once(
    broker: LocalBroker, tmp_path: Path
) -> None:
    """`--share-mode samples`: runs of 50 samples, each completing one window, to a group."""
    model = tmp_path / "encoder.onnx"
    model.write_bytes(build_reference_onnx(make_reference_weights()))
    out = tmp_path / "r.json"
    argv = [
        *TINY[: TINY.index("--flood")], "--broker", broker.url, "--model", str(model),
        "--share-mode", "samples", "--sweep", "", "--json", str(out),
    ]  # fmt: skip
    assert e2e.main(argv) == 0
    (group,) = orjson.loads(out.read_bytes())["groups"]
    assert group["mode"] == "samples"
    (phase,) = group["throughput"].values()  # JSON only: sample runs are JSON
    assert phase["topic"] == "samples"
    assert phase["received"] == phase["sent"] == 60
    assert phase["duplicates"] == 0
    assert sum(phase["served_by"].values()) == 60
