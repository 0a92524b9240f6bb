"""`python -m bench.cpu` end to end on tiny settings: every row is there, every window came
back, the figures are positive and the peer really served (its results carry its id). Never
timings."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson


def test_the_cpu_bench_measures_node_peer_floor_and_ort(tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.cpu", "--hidden", "32", "--windows", "600", "--warmup",
         "24", "--encodings", "json,binary", "--rounds", "2", "--zero-cost-hailo",
         "--json", str(out)],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = orjson.loads(out.read_bytes())
    assert math.isfinite(report["ort_us"])
    assert report["ort_us"] > 0
    assert set(report["floor_us"]) == {"json", "binary"}
    rows = {row["variant"]: row for row in report["rows"]}
    assert {row["server"] for row in rows.values()} == {"node", "peer"}
    assert set(rows) == {
        "peer json mqtt5", "node json qos1 workers1 mqtt5",
        "node json qos1 workers1 mqtt5 hailo-zero-cost",
        "peer binary mqtt5", "node binary qos1 workers1 mqtt5",
        "node binary qos1 workers1 mqtt5 hailo-zero-cost",
    }  # fmt: skip
    for name, row in rows.items():
        assert row["lost"] == 0, name
        assert len(row["runs"]) == 2, name  # one burst per round
        served = {who for run in row["runs"] for who in run["served_by"]}
        assert served, name
        assert all(who.startswith(f"{row['server']}-") for who in served), (name, served)
        for key in ("server_us", "broker_us", "generator_us", "windows_per_s"):
            assert math.isfinite(row[key]), (name, key)
            # /proc counts CPU in 10 ms ticks: the broker's ~0.1 ms per window over a short
            # burst can round to none, so it may be 0; the others cost more and may not
            assert row[key] >= 0 if key == "broker_us" else row[key] > 0, (name, key)
    assert "node overhead / peer overhead" in done.stdout
    assert "one core sustains" in done.stdout
