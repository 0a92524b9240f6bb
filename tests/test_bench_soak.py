"""`python -m bench.soak` on tiny settings: its report's shape and sane figures, never timings."""

from __future__ import annotations

from pathlib import Path

import orjson

from bench import soak


def test_the_soak_reports_rss_over_time_and_results(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    argv = ["--sensors", "20", "--rate", "50", "--minutes", "0.12", "--every", "2"]
    assert soak.main([*argv, "--json", str(out)]) == 0
    report = orjson.loads(out.read_bytes())
    series = report["series"]
    assert len(series) >= 3
    assert [p["s"] for p in series] == sorted(p["s"] for p in series)
    assert series[-1]["results"] > 0  # 20 sensors at 50 Hz: a window each per second
    node = report["soak-n0"]
    assert 0 < node["peak_mb"] < 4096
    assert all(0 < p["rss"]["soak-n0"]["rss"] <= node["peak_mb"] for p in series)
