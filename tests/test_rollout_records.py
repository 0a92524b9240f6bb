"""Rollout records at fleet scale: a record names every node of its rollout, so its size and
the work of writing it grow with the fleet.

- On the wire (`schemas.codec.encode`) an outcome leaves out its defaults; parsing fills them
  in, and a signature, made over the full form, still verifies.
- A controller refuses, before moving anyone, a rollout whose record would outgrow the
  broker's `max_packet_size` once every node has moved: a larger packet would close its
  connection, and it would retry for ever (seen with 10,000 nodes on a 1.1 MB limit).
- A controller skips the echo of its own writes unparsed.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.mqtt.connection import Connection
from common.mqtt.session import MqttSession
from common.signing import sign_message, trust_of, verify_message
from fleet.bundles.reference import build_reference_bundle
from fleet.distribution import publish_bundle
from fleet.rollout.controller import Controller, RolloutError
from fleet.rollout.records import RolloutBook
from fleet.simulate.nodes import SimulatedFleet
from helpers.mqtt import Probe
from helpers.processes import stop_process
from helpers.waiting import unique, wait_until
from node.tools.local_broker import LocalBroker, free_port, wait_for_port
from schemas import topics
from schemas.codec import encode
from schemas.control import (
    DesiredModel,
    NodeHealth,
    NodeOutcome,
    NodeRolloutState,
    RolloutGates,
    RolloutRecord,
)

DESIRED = DesiredModel(name="m", version="1.1.0", bundle_sha256="a" * 64, bundle_size=1,
                       issued_at=1.0, rollout_id="r1")  # fmt: skip


def a_record(nodes: dict[str, NodeOutcome]) -> RolloutRecord:
    return RolloutRecord(rollout_id="r1", desired=DESIRED, waves=[sorted(nodes)],
                         max_failures=0, wave_timeout_s=60, nodes=nodes, created_at=1.0,
                         updated_at=2.0)  # fmt: skip


def test_an_outcome_leaves_its_defaults_off_the_wire_and_parses_back_whole() -> None:
    health = NodeHealth(passed=True, soak_samples=3, windows=30, p95_ms=2.5)
    previous = DESIRED.model_copy(update={"version": "1.0.0", "rollback": True})
    record = a_record({
        "n1": NodeOutcome(wave=0),
        "n2": NodeOutcome(wave=0, state=NodeRolloutState.ACTIVE, moved_at=5.0,
                          previous=previous, health=health),
    })  # fmt: skip
    wire = orjson.loads(encode(record))
    assert wire["nodes"]["n1"] == {"wave": 0}
    assert set(wire["nodes"]["n2"]) == {"wave", "state", "moved_at", "previous", "health"}
    assert RolloutRecord.model_validate(wire) == record
    full = record.model_dump(mode="json")  # what `imu-fleet status --json` and signatures see
    assert set(full["nodes"]["n1"]) == set(NodeOutcome.model_fields)
    key = Ed25519PrivateKey.generate()
    signed = sign_message(record, key)
    verify_message(RolloutRecord.model_validate_json(encode(signed)), trust_of(key), "record")


def test_a_planned_record_of_10000_nodes_is_small() -> None:
    record = a_record({f"site-a-{i:05d}": NodeOutcome(wave=i % 3) for i in range(10_000)})
    assert len(encode(record)) < 500_000  # ~41 bytes a node (outcome, place in a wave); was 1.7 MB


def test_the_echo_of_a_record_this_process_wrote_is_not_parsed_again() -> None:
    session = MqttSession(Connection.of("mqtt://127.0.0.1:1").session_settings("book"))
    book = RolloutBook(session)
    topic = topics.rollout("r1")
    ours = encode(a_record({"n1": NodeOutcome(wave=0)}))
    book.sent(topic, ours)
    message = mqtt.MQTTMessage(topic=topic.encode())
    message.payload = ours
    book._on_record(message)  # the handler the session routes fleet/rollouts/+ to
    assert book.get("r1") is None, "parsed and taken although it is our own write"
    other = a_record({"n1": NodeOutcome(wave=0, state=NodeRolloutState.ACTIVE)})
    message.payload = encode(other)
    book._on_record(message)
    assert book.get("r1") == other


@pytest.fixture
def small_packets(tmp_path: Path) -> Iterator[str]:
    """A mosquitto that takes packets of at most 20,000 bytes."""
    if shutil.which("mosquitto") is None:
        pytest.skip("needs mosquitto")
    port = free_port()
    conf = tmp_path / "small.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_packet_size 20000\n")
    process = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_port(port)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        stop_process(process)


def test_a_rollout_whose_record_would_outgrow_the_brokers_packets_is_refused_before_moving(
    small_packets: str, tmp_path: Path
) -> None:
    base = build_reference_bundle(tmp_path / "base.tar")
    new = build_reference_bundle(tmp_path / "new.tar", version="1.1.0", seed=8)
    publish_bundle(new, small_packets, chunk_size=8192)
    fleet = SimulatedFleet(small_packets, base, count=80, prefix=unique("big"),
                           cache_dir=tmp_path / "cache", telemetry_interval_s=5)  # fmt: skip
    probe = Probe(small_packets)
    try:
        fleet.start(timeout_s=60)
        controller = Controller.connect(small_packets, client_id=unique("ctl"))
        try:
            assert controller.session.max_packet_size == 20000
            wait_until(lambda: len([v for v in controller.view.nodes() if v.model]) == 80, 30,
                       "every node's model state")  # fmt: skip
            probe.subscribe("fleet/rollouts/+", "fleet/nodes/+/desired")
            with pytest.raises(RolloutError, match="max_packet_size") as refused:
                controller.start("tcn-reference", "1.1.0", canary=1,
                                 gates=RolloutGates(soak_s=5.0))  # fmt: skip
            assert "80 nodes" in str(refused.value)
            assert "--group" in str(refused.value)
            time.sleep(1.0)
            assert not probe.messages, "nothing was written and no node was told"
            assert controller.session.is_connected
        finally:
            controller.close()
    finally:
        probe.close()
        fleet.stop()


@pytest.mark.parametrize("soak_s", [1.0, 2.0])
def test_a_soak_shorter_than_the_nodes_telemetry_interval_is_refused_before_moving(
    broker: LocalBroker, tmp_path: Path, soak_s: float
) -> None:
    """No report of a node reporting every 3 s lies inside a 2 s soak: each node would fail
    "no telemetry during the soak" (seen with bench.sites: 2 s on nodes reporting every 5 s).
    Refused up front, with what to do."""
    base = build_reference_bundle(tmp_path / "base.tar")
    new = build_reference_bundle(tmp_path / "new.tar", version="1.1.0", seed=8)
    publish_bundle(new, broker.url)
    group = unique("slow")
    fleet = SimulatedFleet(broker.url, base, count=3, prefix=group, cache_dir=tmp_path / "cache",
                           telemetry_interval_s=3)  # fmt: skip
    probe = Probe(broker.url)
    try:
        fleet.start(timeout_s=60)
        controller = Controller.connect(broker.url, client_id=unique("ctl"))
        try:

            def reported() -> bool:
                return all(len(controller.view.telemetry_between(n, 0, math.inf)) >= 2
                           for n in fleet.node_ids)  # fmt: skip

            wait_until(reported, 30, "two reports of every node (the first covers its start)")
            probe.subscribe("fleet/rollouts/+", f"fleet/groups/{group}-g0/desired")
            with pytest.raises(RolloutError, match="shorter than the telemetry interval") as no:
                controller.start("tcn-reference", "1.1.0", group=f"{group}-g0", canary=1,
                                 gates=RolloutGates(soak_s=soak_s))  # fmt: skip
            assert f"{group}-0000, {group}-0001, {group}-0002 (up to 3." in str(no.value)
            assert re.search(r"Soak at least \d+ s", str(no.value)), no.value
            time.sleep(0.5)
            assert not [m for m in probe.messages if group in m.topic or group in str(m.payload)]
        finally:
            controller.close()
    finally:
        probe.close()
        fleet.stop()
