"""First boot from the fleet: a node with no model of its own starts, says it waits, and serves
once its signed desired state arrives (the operator's report: the runbook's node TOML has no
`model`, and the node exited with `no model: pass --model`)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from common.bundle import read_bundle
from common.signing import generate_keys, load_private_key
from fleet.bundles.builder import sign_bundle
from fleet.desired import desired_for, scoped
from fleet.distribution import publish_bundle
from helpers.mqtt import Probe
from helpers.processes import stop_process
from helpers.programs import subprocess_env
from helpers.waiting import unique
from node.app import NodeApp
from node.config import load_config
from node.tools.local_broker import LocalBroker
from schemas import topics
from schemas.codec import encode


@pytest.mark.parametrize("backend", ["onnx"], indirect=True)
def test_a_node_without_a_model_waits_then_serves_what_the_fleet_orders(
    broker: LocalBroker, reference_bundle_path: Path, tmp_path: Path, backend: str
) -> None:
    keys = tmp_path / "keys"
    generate_keys(keys)
    signed = sign_bundle(read_bundle(reference_bundle_path), keys / "fleet.key", tmp_path / "s.tar")
    assert signed.path is not None
    node_id, group = unique("first"), unique("grp")
    probe = Probe(broker.url).subscribe(
        topics.node_model(node_id), topics.node_status(node_id), topics.node_errors(node_id)
    )
    config = load_config(
        broker=broker.url, node_id=node_id, group=group, trust_key=keys / "fleet.pub",
        backend=backend, state_dir=tmp_path / "state", cache_dir=tmp_path / "cache",
        spool_dir=tmp_path / "spool",
    )  # fmt: skip
    opened: list[NodeApp | None] = []
    opener = threading.Thread(target=lambda: opened.append(NodeApp.open(config)), daemon=True)
    opener.start()
    try:
        waiting = probe.wait_for(
            topics.node_model(node_id), where=lambda m: m.json()["state"] == "waiting"
        )[-1].json()
        assert waiting["active"] is None
        assert topics.group_desired(group) in waiting["last_error"]
        birth = probe.wait_for(topics.node_status(node_id))[-1].json()
        assert (birth["state"], birth["model"]) == ("online", None)
        publish_bundle(signed.path, broker.url, sign_key=keys / "fleet.key")
        # an insider's unsigned order for this node: refused, reported, the node waits on
        probe.publish(topics.node_desired(node_id), encode(desired_for(signed.path)), retain=True)
        refused = probe.wait_for(topics.node_errors(node_id))[-1].json()
        assert refused["kind"] == "desired_refused", refused
        assert opener.is_alive()
        assert not opened
        order = scoped(
            desired_for(signed.path), "group", group, load_private_key(keys / "fleet.key")
        )
        probe.publish(topics.group_desired(group), encode(order), retain=True)
        opener.join(60)
        assert opened
        assert opened[0] is not None
        app = opened[0]
        assert app.worker.pipeline.ref.version == "1.0.0"
        app.start()
        following = probe.wait_for(
            topics.node_model(node_id),
            where=lambda m: m.json()["state"] == "active" and m.json().get("following"),
        )[-1].json()["following"]
        assert (following["scope"], following["version"]) == ("group", "1.0.0")
        app.stop("test finished")
        again = NodeApp.open(config)  # restarted: it starts on what it served, at once
        assert again is not None
        assert again.worker.pipeline.ref.version == "1.0.0"
        again.worker.pipeline.close()
        again.outbox.stop()
    finally:
        probe.publish(topics.group_desired(group), b"", retain=True)
        probe.publish(topics.node_desired(node_id), b"", retain=True)
        probe.close()


def test_a_waiting_node_stops_cleanly_on_sigterm(broker: LocalBroker, tmp_path: Path) -> None:
    node_id = unique("first")
    probe = Probe(broker.url).subscribe(topics.node_model(node_id))
    process = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "run", "--broker", broker.url, "--node-id", node_id],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**subprocess_env("onnx"), "XDG_STATE_HOME": str(tmp_path / "state"),
             "IMU_NODE_CACHE_DIR": str(tmp_path / "cache")},
    )  # fmt: skip
    try:
        probe.wait_for(topics.node_model(node_id), timeout=30)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        assert "Traceback" not in output
    finally:
        stop_process(process, signal.SIGKILL, 10)
        probe.close()
