"""An insider with a fleet login but not the fleet key: the key signs nothing they wrote.

The broker runs exactly compose/mosquitto-secure.conf with the credentials and ACL `imu-fleet
pki` makes (the secure broker of test_broker_security). The attacker is `fleet-ops`, a fleet
login (password on 8884) without the signing key; the controller is `fleet-ctl` (its certificate
on 8883) with the key, as the `imu-fleet controller` service runs. The node `n1` trusts the key.
"""

from __future__ import annotations

import ssl
import threading
import time
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_broker_security import SecureBroker, broker  # noqa: F401 (the secure broker fixture)
from test_node_e2e import raw_window
from test_secure_site import node_config

from common.bundle import read_bundle
from common.mqtt.address import BrokerAddress
from common.mqtt.connection import Connection, Credentials
from common.signing import generate_keys
from fleet.bundles.builder import sign_bundle
from fleet.bundles.reference import build_reference_bundle
from fleet.distribution import artifact_manifest, publish_bundle
from fleet.rollout.controller import Controller, RolloutError
from fleet.rollout.service import ControllerService
from helpers.waiting import wait_until
from node.app import NodeApp
from node.config import load_config
from schemas import topics
from schemas.codec import encode
from schemas.control import DesiredModel, NodeOutcome, NodeRolloutState, RolloutRecord

GROUP = "line-x"


def login(site: SecureBroker, username: str) -> Connection:
    """How `username` reaches the secure broker: its certificate, or its password."""
    layout = site.site
    if username == "fleet-ops":
        credentials = Credentials(
            username=username, password=site.password(username), ca_file=str(layout.ca_cert)
        )
        return Connection(
            BrokerAddress("localhost", site.ports["8884"], tls=True), "5", credentials
        )
    credentials = Credentials(
        ca_file=str(layout.ca_cert),
        cert_file=str(layout.client_file(username, "crt")),
        key_file=str(layout.client_file(username, "key")),
    )
    return Connection(BrokerAddress("localhost", site.ports["8883"], tls=True), "5", credentials)


@pytest.fixture(scope="module")
def fleet_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keys = tmp_path_factory.mktemp("fleet-keys")
    generate_keys(keys)
    return keys


@pytest.fixture(scope="module")
def signed_start(
    reference_bundle_path: Path, fleet_key: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The reference model 1.0.0, signed: what n1 serves at the start of each test."""
    out = tmp_path_factory.mktemp("signed") / "start.tar"
    sign_bundle(read_bundle(reference_bundle_path), fleet_key / "fleet.key", out)
    return out


@pytest.fixture
def node(broker: SecureBroker, signed_start: Path, fleet_key: Path, tmp_path: Path):  # noqa: F811
    app = NodeApp.open(
        load_config(
            **node_config(
                broker,
                "n1",
                signed_start,
                trust_key=fleet_key / "fleet.pub",
                group=GROUP,
                state_dir=tmp_path / "state",
                cache_dir=tmp_path / "cache",
            )
        )
    )
    app.start()
    assert app.session.wait_connected(30)
    yield app
    app.stop()


def test_a_forged_rollout_record_is_reported_and_never_executed(
    broker: SecureBroker,  # noqa: F811
    node: NodeApp,
    fleet_key: Path,
    signed_start: Path,
) -> None:
    """The red team's record: retained, naming a ghost controller, an unsigned group-wide
    rollback. The controller service with the key neither takes it over nor signs anything."""
    attacker = broker.session("fleet-ops")  # also sees any desired state the service publishes
    attacker.client.subscribe("fleet/+/+/desired", qos=1)
    attacker.client.subscribe(topics.FLEET_DESIRED, qos=1)
    start = read_bundle(signed_start)
    rollback = DesiredModel(
        name="tcn-reference",
        version="0.9.0",
        bundle_sha256="a" * 64,
        bundle_size=1234,
        rollback=True,
        issued_at=time.time(),
    )
    forged = RolloutRecord(
        rollout_id="r-forged-1",
        desired=rollback,
        group=GROUP,
        waves=[["n1"]],
        max_failures=0,
        wave_timeout_s=30,
        nodes={"n1": NodeOutcome(wave=0, state=NodeRolloutState.ACTIVE, previous=rollback)},
        command="rollback",
        controller="imu-fleet-controller-ghost",
        created_at=time.time(),
        updated_at=time.time() - 60,  # stale: "its controller is gone"
    )
    topic = topics.rollout(forged.rollout_id)
    attacker.client.publish(topic, encode(forged), qos=1, retain=True).wait_for_publish(5)
    service = ControllerService(
        login(broker, "fleet-ctl"),
        name="insider-test",
        sign_key=fleet_key / "fleet.key",
        poll_s=0.2,
    )
    try:
        wait_until(lambda: service.controller.book.refused(topic), what="the refusal")
        time.sleep(1.0)  # five polls: long enough to take it over, were it taken
        refused = service.controller.book.refused(topic)[0]
        assert "not signed by the fleet key" in refused.reason
        assert service.stats.takeovers == 0
        assert service.controller.record(forged.rollout_id) is None
        assert not [m for t, m in attacker.messages if t.endswith("/desired")]
        assert node.worker.pipeline.ref.version == start.manifest.version
    finally:
        service.close()
        attacker.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)


def test_a_swapped_artifact_manifest_is_refused_and_the_key_signs_nothing(
    broker: SecureBroker,  # noqa: F811
    node: NodeApp,
    fleet_key: Path,
    tmp_path: Path,
) -> None:
    """A signed 1.1.0 is published; a fleet login without the key replaces its retained
    manifest with one for other bytes. A rollout with the key refuses to start."""
    new = build_reference_bundle(tmp_path / "new.tar", version="1.1.0", seed=8)
    sign_bundle(read_bundle(new), fleet_key / "fleet.key", new)
    publish_bundle(new, login(broker, "fleet-ctl"), sign_key=fleet_key / "fleet.key")
    swapped = artifact_manifest(b"\0" * 30_000, "tcn-reference", "1.1.0", 64 * 1024)
    attacker = broker.session("fleet-ops")
    manifest_topic = topics.artifact_manifest("tcn-reference", "1.1.0")
    attacker.client.publish(manifest_topic, encode(swapped), qos=1, retain=True).wait_for_publish(5)
    controller = Controller.connect(
        login(broker, "fleet-ctl"),
        client_id="imu-fleet-controller-x",
        sign_key=fleet_key / "fleet.key",
    )
    try:
        wait_until(lambda: controller.view.get("n1") is not None, what="the node's state")
        wait_until(lambda: controller.book.refused(manifest_topic), what="the refusal")
        with pytest.raises(RolloutError, match="not signed by the fleet key"):
            controller.start("tcn-reference", "1.1.0", group=GROUP, canary=1)
        assert controller.records() == []
        assert node.worker.pipeline.ref.version == "1.0.0"
    finally:
        controller.close()


def machine_client(
    site: SecureBroker, username: str, client_id: str, *, expiry_s: int = 0
) -> mqtt.Client:
    """A paho MQTT 5 client with `username`'s certificate asking for `client_id`, and a
    persistent session when `expiry_s` is set (clean start 0, as a node connects)."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id, protocol=MQTTProtocolVersion.MQTTv5
    )
    client.tls_set(
        ca_certs=str(site.site.ca_cert),
        certfile=str(site.site.client_file(username, "crt")),
        keyfile=str(site.site.client_file(username, "key")),
        tls_version=ssl.PROTOCOL_TLS_CLIENT,
    )
    properties = None
    if expiry_s:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = expiry_s
    client.connect("127.0.0.1", site.ports["8883"], clean_start=not expiry_s, properties=properties)
    return client


def test_another_login_cannot_take_a_nodes_session_over(
    broker: SecureBroker,  # noqa: F811
    node: NodeApp,
) -> None:
    """The red team's sensor certificate reconnected as `imu-node-n1` every 0.5 s: n1 then
    served 9 of 50 windows. The broker now gives every login its own session whatever client id
    it asks for, so n1 stays connected and serves every window."""
    watcher = broker.session("dashboard-d1")
    watcher.client.subscribe(topics.motifs("s2"), qos=1)
    sensor = broker.session("sensor-s2")
    for round_ in range(5):
        impostor = machine_client(broker, "sensor-s1", "imu-node-n1")
        impostor.loop_start()
        for seq in range(round_ * 10, round_ * 10 + 10):
            window = orjson.dumps({"x": raw_window(seq).tolist(), "seq": seq})
            sensor.client.publish(topics.window("s2"), window, qos=1).wait_for_publish(5)
        impostor.disconnect()
        impostor.loop_stop()
    wait_until(
        lambda: (
            len({orjson.loads(m)["seq"] for t, m in watcher.messages if t.endswith("s2/motifs")})
            == 50
        ),
        30,
        "a result for each of the 50 windows",
    )
    assert node.session.counters.connects == 1  # never kicked off
    assert not node.session.taken_over.is_set()


def test_another_login_cannot_resume_a_dead_nodes_session(broker: SecureBroker) -> None:  # noqa: F811
    """A node dies with windows queued for it; a read-only login connects with its client id
    and clean start 0. It gets a session of its own: the node, back, finds all its windows."""
    node = machine_client(broker, "node-n2", "imu-node-n2", expiry_s=300)
    node.loop_start()
    got: list[bytes] = []
    subscribed = threading.Event()
    node.on_subscribe = lambda *_: subscribed.set()
    node.on_message = lambda _c, _u, message: got.append(bytes(message.payload))
    node.subscribe(topics.window("s1"), qos=1)
    assert subscribed.wait(5)
    node.loop_stop()
    node.socket().close()  # dies without a DISCONNECT: the broker keeps its session
    sensor = broker.session("sensor-s1")
    sent = [orjson.dumps({"x": raw_window(seq).tolist(), "seq": seq}) for seq in range(5)]
    for body in sent:
        sensor.client.publish(topics.window("s1"), body, qos=1).wait_for_publish(5)
    thief: list[bytes] = []
    dashboard = mqtt.Client(
        CallbackAPIVersion.VERSION2, "imu-node-n2", protocol=MQTTProtocolVersion.MQTTv5
    )
    dashboard.tls_set(ca_certs=str(broker.site.ca_cert), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    dashboard.username_pw_set("dashboard-d2", broker.password("dashboard-d2"))
    dashboard.on_message = lambda _c, _u, message: thief.append(bytes(message.payload))
    dashboard.connect("127.0.0.1", broker.ports["8884"], clean_start=False)
    dashboard.loop_start()
    time.sleep(1.0)  # what the broker would hand over arrives at once
    dashboard.disconnect()
    dashboard.loop_stop()
    assert thief == []
    back = machine_client(broker, "node-n2", "imu-node-n2", expiry_s=300)
    back.on_message = lambda _c, _u, message: got.append(bytes(message.payload))
    back.loop_start()
    try:
        wait_until(lambda: len(got) == len(sent), 10, "the node's queued windows")
        assert got == sent
    finally:
        back.disconnect()
        back.loop_stop()


def test_a_forged_result_is_attributable_to_the_login_that_sent_it(
    broker: SecureBroker,  # noqa: F811
) -> None:
    """Any node may publish any sensor's result (share groups move sensors between nodes), so a
    forged one cannot be refused; it is attributable: every connection's client id is its
    login, whatever id it asked for, and mosquitto names it in its log (`log_type debug` adds a
    line per PUBLISH: docs/security.md)."""
    forger = machine_client(broker, "node-n2", "imu-node-n1")  # pretends to be n1
    forger.loop_start()
    try:
        forged = orjson.dumps({"sensor_id": "s1", "node_id": "n1", "seq": 1})
        forger.publish(topics.motifs("s1"), forged, qos=1).wait_for_publish(5)
        wait_until(
            lambda: "as node-n2 (" in broker.log.read_text(),
            what="the broker naming the forger's login",
        )
        assert "as imu-node-n1" not in broker.log.read_text()
    finally:
        forger.disconnect()
        forger.loop_stop()
