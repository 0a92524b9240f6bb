"""`python -m bench.sites` on tiny settings: every part a real process (a fleet broker, two
site brokers bridged over TLS as `imu-fleet pki bridge` writes them, two simulators), a by-site
rollout with gates; its report's shape and outcome, never timings."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_sites_bench_rolls_out_across_bridged_sites_and_reports_each_process(
    tmp_path: Path,
) -> None:
    if shutil.which("mosquitto") is None:
        pytest.skip("needs mosquitto")
    argv = ["--nodes", "30", "--sites", "2", "--telemetry-interval", "1", "--soak", "1",
            "--connect-timeout", "120", "--wave-timeout", "120",
            "--keep", str(tmp_path)]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "bench.sites", *argv], cwd=ROOT,
                          capture_output=True, timeout=600, check=False)  # fmt: skip
    lines = [orjson.loads(line) for line in done.stdout.splitlines() if line.startswith(b"{")]
    (result,) = [line["result"] for line in lines if "result" in line]
    assert done.returncode == 0, (result, done.stderr[-2000:])
    assert result["state"] == "succeeded"
    assert result["waves"] == [1, 14, 15]  # the canary, the rest of site-a, then site-b
    assert result["versions"] == {"site-a": {"1.1.0": 15}, "site-b": {"1.1.0": 15}}
    assert result["failed"] == {}
    assert len(result["wave_passed_at_s"]) == 3
    parts = {"fleet-broker", "site-a-broker", "site-b-broker", "site-a-nodes", "site-b-nodes",
             "controller"}  # fmt: skip
    assert set(result["processes"]) == parts
    assert all(p["peak_rss_mb"] > 0 and p["cpu_s"] >= 0 for p in result["processes"].values())
    assert 0 < result["record_bytes"] < 30 * 1000
