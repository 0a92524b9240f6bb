"""The supervisor: systemd's notify protocol, a dead thread, a stall (node/supervisor.py)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.mqtt import Probe
from helpers.nodes import NodeFactory
from helpers.waiting import wait_until
from node.supervisor import Supervisor, Watched
from schemas import topics

ONNX = pytest.mark.parametrize("backend", ["onnx"], indirect=True)


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A notify socket as systemd offers one (WatchdogSec=1), and what the node sent to it."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    received: list[str] = []
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            try:
                received.append(sock.recv(4096).decode())
            except TimeoutError:
                continue

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    yield received
    stop.set()
    thread.join(2)
    sock.close()


@ONNX
def test_the_node_tells_systemd_it_is_ready_and_alive(
    start_node: NodeFactory, systemd: list[str]
) -> None:
    app = start_node()
    wait_until(lambda: systemd.count("WATCHDOG=1") >= 3, what="three watchdog pings")
    assert systemd[0] == "READY=1"
    assert app.readiness()["supervised"]
    app.stop()
    wait_until(lambda: "STOPPING=1" in systemd, what="STOPPING=1")


@ONNX
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # on purpose
def test_a_dead_thread_is_reported_and_ends_the_node_for_a_restart(
    start_node: NodeFactory, systemd: list[str], probe: Probe
) -> None:
    app = start_node()
    fatal = threading.Event()
    app.on_fatal = fatal.set
    probe.subscribe(topics.node_errors(app.node_id))

    def crash() -> None:
        raise SystemExit  # not an Exception: the telemetry loop does not catch it

    app.telemetry.build = crash  # type: ignore[method-assign]
    assert fatal.wait(15)
    assert app.fatal == "the telemetry thread died"
    assert app.fatal_status == 70
    assert not app.readiness()["supervised"]
    report = probe.wait_for(topics.node_errors(app.node_id))[0].json()
    assert report["kind"] == "watchdog"
    assert "the telemetry thread died" in report["reason"]
    pings = systemd.count("WATCHDOG=1")
    time.sleep(1.5)
    assert systemd.count("WATCHDOG=1") == pings  # systemd would kill it now


def test_work_that_stops_moving_is_a_stall() -> None:
    clock = [0.0]
    failures: list[str] = []
    state = {"waiting": 3, "done": 10, "busy": False}
    supervisor = Supervisor(
        [Watched("worker", lambda: True)],
        lambda: (state["waiting"], state["done"], state["busy"]),  # type: ignore[return-value]
        stall_s=30,
        on_failure=failures.append,
        clock=lambda: clock[0],
    )
    assert supervisor.check() is None
    clock[0] = 20.0
    state["busy"] = True  # a backend call in progress is the inference watchdog's business
    assert supervisor.check() is None
    state["busy"] = False
    clock[0] = 45.0
    assert supervisor.check() is None  # 25 s since the last sign of life
    clock[0] = 60.0
    reason = supervisor.check()
    assert reason is not None
    assert "3 windows waiting and none finished for 40 s" in reason
    assert failures == [reason]
