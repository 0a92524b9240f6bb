"""Process lifecycle: SIGTERM drains and says `stopped`, a crash leaves the will's `offline`,
a broker restart is survived."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_node_e2e import raw_window

from helpers.mqtt import Probe
from helpers.nodes import NodeFactory
from helpers.programs import subprocess_env
from helpers.waiting import unique, wait_until
from node.app import NodeApp
from node.mqtt.spool import SpoolStats
from node.tools.local_broker import LocalBroker, free_port
from node.work import WorkItem
from schemas import topics
from schemas.messages import ErrorKind, NodeStatus


def spawn_node(
    broker: LocalBroker, bundle: Path, node_id: str, *extra: str, backend: str = "onnx"
) -> subprocess.Popen[bytes]:
    """`imu-node run` in its own process (Hailo stand-in on its path for the hailo backend)."""
    command = [sys.executable, "-m", "node.cli", "run", "--broker", broker.url, "--node-id",
               node_id, "--model", str(bundle), "--backend", backend, *extra]  # fmt: skip
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env(backend)
    )


def wait_online(probe: Probe, node_id: str) -> NodeStatus:
    message = probe.wait_for(
        topics.node_status(node_id), timeout=20, where=lambda m: m.json()["state"] == "online"
    )[-1]
    return NodeStatus.model_validate_json(message.payload)


def test_sigterm_drains_publishes_stopped_and_exits_zero(
    broker: LocalBroker, serving_bundle_path: Path, backend: str, probe: Probe
) -> None:
    node_id, sensor = unique("proc"), unique("imu")
    probe.subscribe(topics.node_status(node_id), topics.motifs(sensor))
    process = spawn_node(broker, serving_bundle_path, node_id, backend=backend)
    try:
        wait_online(probe, node_id)
        sent = 200
        for seq in range(sent):
            body = orjson.dumps({"x": raw_window(seq % 10).tolist(), "seq": seq})
            probe.client.publish(topics.window(sensor), body, qos=1).wait_for_publish(5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    results = probe.wait_for(topics.motifs(sensor), sent)
    assert sorted(m.json()["seq"] for m in results) == list(range(sent))  # none lost, none twice
    stopped = probe.wait_for(
        topics.node_status(node_id), where=lambda m: m.json()["state"] == "stopped"
    )[0]
    assert stopped.json()["reason"] == "SIGTERM received"
    # the retained status is `stopped`, not the will's `offline`
    late = Probe(broker.url).subscribe(topics.node_status(node_id))
    retained = late.wait_for(topics.node_status(node_id))[0]
    late.close()
    assert retained.retain
    assert retained.json()["state"] == "stopped"


def test_crash_leaves_the_will_offline(
    broker: LocalBroker, serving_bundle_path: Path, backend: str, probe: Probe
) -> None:
    node_id = unique("crash")
    probe.subscribe(topics.node_status(node_id))
    process = spawn_node(broker, serving_bundle_path, node_id, backend=backend)
    try:
        online = wait_online(probe, node_id)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
    will = probe.wait_for(
        topics.node_status(node_id), where=lambda m: m.json()["state"] == "offline"
    )[0].json()
    assert will["instance"] == online.instance


def test_missing_model_fails_with_a_clear_message(broker: LocalBroker, tmp_path: Path) -> None:
    process = spawn_node(broker, tmp_path / "absent.tar", unique("n"))
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 1
    assert b"cannot read bundle" in stderr


def persistent_broker(tmp_path: Path, port: int | None = None) -> LocalBroker:
    """A mosquitto keeping its state in `tmp_path`: start it again on `port` to restart it."""
    state = tmp_path / "broker-state"
    state.mkdir(exist_ok=True)
    return LocalBroker("mosquitto", port=port, state_dir=state).start()


def test_node_reconnects_and_resubscribes_after_a_broker_restart(
    start_node: NodeFactory, reference_bundle_path: Path
) -> None:
    own = LocalBroker("mosquitto").start()
    try:
        app = start_node(broker=own.url)
        sensor = unique("imu")
        probe = Probe(own.url).subscribe(topics.motifs(sensor))
        probe.publish(topics.window(sensor), orjson.dumps({"x": raw_window(1).tolist(), "seq": 1}))
        probe.wait_for(topics.motifs(sensor))
        probe.close()

        own.stop()
        wait_until(lambda: not app.session.is_connected, what="the node to see the broker go")
        own = LocalBroker("mosquitto", port=own.port).start()

        assert app.session.wait_connected(30), "node did not reconnect"
        # The birth may reach this first probe live (retain flag cleared) if it subscribes before
        # the node republishes it; once seen, a fresh subscriber must get it as the retained state.
        probe = Probe(own.url).subscribe(topics.motifs(sensor), topics.node_status(app.node_id))
        assert probe.wait_for(topics.node_status(app.node_id))[0].json()["state"] == "online"
        late = Probe(own.url).subscribe(topics.node_status(app.node_id))
        birth = late.wait_for(topics.node_status(app.node_id))[0]
        late.close()
        assert birth.retain
        assert birth.json()["state"] == "online"
        probe.publish(topics.window(sensor), orjson.dumps({"x": raw_window(2).tolist(), "seq": 2}))
        assert probe.wait_for(topics.motifs(sensor))[0].json()["seq"] == 2
        assert app.session.counters.connects >= 2
        probe.close()
        app.stop("test finished")  # before its broker goes: no drain timeout in teardown
    finally:
        own.stop()


def test_no_window_or_result_is_lost_across_a_broker_restart(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    """A broker with persistence restarts mid-stream: the node's queued input, its unacknowledged
    results and a persistent dashboard's queue all survive, so every window gets its result."""
    own = persistent_broker(tmp_path)
    try:
        app = start_node(broker=own.url)
        sensor = unique("imu")
        dashboard = Probe(own.url, session_expiry_s=300).subscribe(topics.motifs(sensor))
        sender = Probe(own.url)
        sent = 1000  # about a second of work for the node: the restart lands mid-stream
        for seq in range(sent):
            payload = orjson.dumps({"x": raw_window(seq).tolist(), "seq": seq})
            sender.client.publish(topics.window(sensor), payload, qos=1)
        sender.client.publish(topics.window(sensor), b"", qos=1).wait_for_publish(10)
        sender.close()  # every window is on the broker (the empty one only orders the acks)
        served_before = len(dashboard.on(topics.motifs(sensor)))
        own.stop()  # mid-stream: windows queued for the node, results on their way back
        own = persistent_broker(tmp_path, own.port)

        # none lost; a result whose PUBACK the stop swallowed comes twice (QoS 1 is at least once)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            seqs = {m.json()["seq"] for m in dashboard.on(topics.motifs(sensor))}
            if len(seqs) == sent:
                break
            time.sleep(0.1)
        assert seqs == set(range(sent))
        assert served_before < sent, "the restart came too late to test anything"
        assert app.session.counters.connects >= 2
        _, served, _, dropped, errors = app.metrics.totals()
        assert served == sent  # re-sent windows are skipped, none is run twice
        assert dropped == {}
        assert ErrorKind.SEQUENCE_RESET not in errors
        dashboard.close()
        app.stop("test finished")
    finally:
        own.stop()


@pytest.mark.parametrize("backend", ["onnx"], indirect=True)  # the session is backend-blind
def test_a_clean_stop_leaves_no_session_on_the_broker(start_node: NodeFactory) -> None:
    """The node keeps a 300 s session for reconnects; a clean stop must end it."""
    own = LocalBroker("mosquitto").start()
    total = "$SYS/broker/clients/total"  # connected clients plus kept sessions, every second
    try:
        probe = Probe(own.url).subscribe(total)

        def settles_at(expected: int) -> bool:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                values = [int(m.payload) for m in probe.on(total)]
                if values and values[-1] == expected:
                    time.sleep(1.5)  # and stays there over another update
                    return int(probe.on(total)[-1].payload) == expected
                time.sleep(0.1)
            return False

        assert settles_at(1)  # the probe alone
        app = start_node(broker=own.url)
        assert settles_at(2)
        app.stop("test finished")
        assert settles_at(1), "the node's session outlived its clean stop"
        probe.close()
    finally:
        own.stop()


def wait_disconnected(app: NodeApp) -> None:
    wait_until(lambda: not app.session.is_connected, what="the node to see the broker gone")


def serve_offline(app: NodeApp, sensor: str, count: int) -> None:
    """Windows the node took before the link dropped: results are made while it is down."""
    for seq in range(count):
        app.queue.put(WorkItem(sensor, seq, None, None, raw_window(seq), time.perf_counter_ns()))
    wait_until(lambda: app.outbox.spooled == count, 20, f"{count} results in the spool")


def wait_seqs(probe: Probe, sensor: str, count: int) -> set[int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seqs = {m.json()["seq"] for m in probe.on(topics.motifs(sensor))}
        if len(seqs) >= count:
            break
        time.sleep(0.1)
    return seqs


def test_results_made_while_the_broker_is_away_wait_on_disk_then_arrive(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    own = persistent_broker(tmp_path)
    try:
        app = start_node(broker=own.url, spool_dir=tmp_path / "spool")
        sensor = unique("imu")
        dashboard = Probe(own.url, session_expiry_s=300).subscribe(topics.motifs(sensor))
        own.stop()
        wait_disconnected(app)
        serve_offline(app, sensor, 60)
        held = app.outbox.stats()
        assert held is not None
        assert held == SpoolStats(messages=60, bytes=held.bytes, segments=1)
        assert app.session.pending_publishes() == 0  # on disk, not in paho's memory

        own = persistent_broker(tmp_path, own.port)
        assert wait_seqs(dashboard, sensor, 60) == set(range(60))
        wait_until(lambda: app.outbox.replayed == 60, what="the spool to be replayed")
        assert list((tmp_path / "spool").glob("*.spool")) == []
        assert app.telemetry.build().spooled == 0
        dashboard.close()
        app.stop("test finished")
    finally:
        own.stop()


def test_a_node_restarted_during_an_outage_delivers_what_the_old_one_spooled(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    own = persistent_broker(tmp_path)
    node_id, spool = unique("node"), tmp_path / "spool"
    try:
        first = start_node(broker=own.url, node_id=node_id, spool_dir=spool, drain_timeout_s=1)
        sensor = unique("imu")
        dashboard = Probe(own.url, session_expiry_s=300).subscribe(topics.motifs(sensor))
        own.stop()
        wait_disconnected(first)
        serve_offline(first, sensor, 30)
        first.stop("restarted while the broker is away")

        own = persistent_broker(tmp_path, own.port)
        second = start_node(broker=own.url, node_id=node_id, spool_dir=spool)
        assert wait_seqs(dashboard, sensor, 30) == set(range(30))
        assert {m.json()["node_id"] for m in dashboard.on(topics.motifs(sensor))} == {node_id}
        wait_until(lambda: second.outbox.replayed == 30, what="the old spool to be replayed")
        dashboard.close()
        second.stop("test finished")
    finally:
        own.stop()


@pytest.mark.parametrize("embedded", ["mosquitto", "amqtt"])
def test_demo_runs_and_shows_live_results(embedded: str, tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    completed = subprocess.run(
        [sys.executable, "-m", "node.cli", "demo", "--duration", "4", "--sensors", "2",
         "--embedded", embedded],
        capture_output=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    out = completed.stdout.decode()
    assert completed.returncode == 0, completed.stderr.decode()
    assert f"({embedded})" in out
    assert "sim-000" in out
    assert "sim-001" in out
    assert (tmp_path / "imu-edge" / "tcn-reference-1.0.0.tar").exists()


def test_demo_serves_http_when_asked(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    demo = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "demo", "--duration", "8", "--sensors", "1",
         "--http", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip

    def inferred() -> float:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
                text = answer.read().decode()
        except OSError:
            return 0.0
        return next(
            (s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == "imu_node_windows_inferred_total"), 0.0,
        )  # fmt: skip

    try:
        wait_until(lambda: inferred() > 0, 30, "the demo node to serve windows over HTTP")
        out, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0, err.decode()
    assert f"curl http://127.0.0.1:{port}/metrics" in out.decode()
