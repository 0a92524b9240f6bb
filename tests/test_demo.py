"""The demo cleans up whichever way it ends, and two run side by side (the operator's report:
SIGTERM left mosquitto and /tmp/imu-broker-* behind, and a second demo failed)."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from helpers.processes import stop_process
from helpers.programs import subprocess_env
from helpers.waiting import wait_until


def demo(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "node.cli", "demo", "--sensors", "1", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=subprocess_env("onnx"),
    )


def brokers_of(process: subprocess.Popen[str]) -> list[psutil.Process]:
    """The mosquitto processes a demo started (in a session of their own: found by parent)."""
    try:
        return [c for c in psutil.Process(process.pid).children() if c.name() == "mosquitto"]
    except psutil.NoSuchProcess:
        return []


def test_sigterm_stops_the_demo_its_broker_and_its_files() -> None:
    before = set(Path(tempfile.gettempdir()).glob("imu-broker-*"))
    process = demo("--duration", "60")
    try:
        wait_until(lambda: brokers_of(process) != [], 30, "the demo's broker")
        broker = brokers_of(process)[0]
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output
        assert "demo done:" in output  # a summary, and what to try next
        assert "Traceback" not in output
        wait_until(lambda: not broker.is_running() or broker.status() == "zombie", 10)
        assert set(Path(tempfile.gettempdir()).glob("imu-broker-*")) <= before
    finally:
        stop_process(process, signal.SIGKILL, 10)


def test_two_demos_run_side_by_side() -> None:
    first, second = demo("--duration", "8"), demo("--duration", "8")
    try:
        for process in (first, second):
            output, _ = process.communicate(timeout=90)
            assert process.returncode == 0, output
            assert "demo done:" in output
    finally:
        for process in (first, second):
            stop_process(process, signal.SIGKILL, 10)
