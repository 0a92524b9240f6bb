"""`imu-node check` against running nodes: a demo node passes, a throttled one fails clearly."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from hailo_standin import faults
from helpers.mqtt import Probe
from helpers.nodes import NodeFactory
from helpers.processes import stop_process
from helpers.programs import subprocess_env
from node.tools.local_broker import LocalBroker
from schemas import topics

HAILO = pytest.mark.parametrize("backend", ["hailo"], indirect=True)


def check(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "node.cli", "check", "--no-progress", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=subprocess_env("onnx"),
        check=False,
    )  # fmt: skip


def test_check_passes_against_a_demo_node(broker: LocalBroker, probe: Probe) -> None:
    probe.subscribe(topics.node_telemetry("demo-node"))
    demo = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "demo", "--broker", broker.url, "--duration", "60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=subprocess_env("onnx"),
    )  # fmt: skip
    try:
        probe.wait_for(topics.node_telemetry("demo-node"), timeout=30)  # live, not retained
        done = check("--broker", broker.url, "--node", "demo-node", "--rate", "40",
                     "--duration", "6", "--json")  # fmt: skip
    finally:
        stop_process(demo, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    report = orjson.loads(done.stdout)
    outcomes = {v["target"]: v["outcome"] for v in report["verdicts"]}
    assert outcomes["latency p95"] == "pass"
    assert outcomes["throughput"] == "pass"
    assert outcomes["memory (RSS)"] == "pass"
    assert report["passed"] is True
    assert report["nodes"] == ["demo-node"]
    assert (report["sent"], report["lost"], report["duplicates"]) == (240, 0, 0)
    assert report["rate"] >= 20
    assert 0 < report["rss_mb"] < 512
    # what could not be measured is listed, not passed
    assert (outcomes["temperature"] == "not measured") == ("temperature" in report["unmeasured"])


@HAILO
def test_check_fails_clearly_against_a_throttled_node(
    broker: LocalBroker, start_node: NodeFactory, hailo_bundle_path: Path
) -> None:
    faults.set_faults(latency_ms=80)  # 80 ms of device time per call: ~12 windows/s at most
    app = start_node(backend="hailo", model=hailo_bundle_path, max_batch=1)
    done = check("--broker", broker.url, "--node", app.node_id, "--rate", "30",
                 "--duration", "3", "--grace", "1")  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert "[    FAIL    ] latency p95" in out
    assert "[    FAIL    ] throughput" in out
    assert "[    PASS    ] memory (RSS)" in out
    assert "[    PASS    ] temperature    45.0 C (chip)" in out
    assert "FAIL: missed latency p95, throughput" in out


def test_check_without_a_broker_says_so(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = check("--broker", f"mqtt://127.0.0.1:{port}", "--duration", "1", timeout=60)
    assert done.returncode == 2
    assert "cannot connect" in done.stderr


def test_check_refuses_nonsense_arguments() -> None:
    done = check("--rate", "0")
    assert done.returncode == 2
    assert "--rate" in done.stderr
