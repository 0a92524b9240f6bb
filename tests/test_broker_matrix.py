"""The broker matrix: which MQTT guarantees the node relies on hold on each broker available here.

Targets: mosquitto (MQTT 5 and 3.1.1), amqtt (the embedded pure-Python broker) and Debian's
RabbitMQ with its MQTT plugin, run as a 2-node cluster on this machine (`tests/brokers.py`):
`rabbitmq` puts every client of a test on one node, `rabbitmq-2nodes` puts the publisher on one
node and the subscriber on the other. Each broker starts once for the module.

Every test measures one guarantee on one target and compares what it observed with `EXPECTED`,
the record of what was measured (also the table in docs/scaling.md, kept equal by a test): a
broker that gains or loses a guarantee fails its test, which then says what it saw.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_node_e2e import window_json

from helpers.brokers import WAIT_S, Client, Protocol, RabbitCluster, rabbitmq_installed
from helpers.programs import require_program
from helpers.waiting import unique
from node.app import NodeApp
from node.config import load_config
from node.tools.local_broker import LocalBroker
from schemas import topics

YES = "yes"
QUIET_S = 1.0  # for what must not: how long a test listens before it says "nothing came"


@dataclass(frozen=True)
class Target:
    """One broker as a test's clients see it: where the publisher and the subscriber connect."""

    name: str
    broker: str
    protocol: Protocol
    pub_url: str
    sub_url: str


# target -> (broker, protocol, clients on two cluster nodes)
TARGETS: dict[str, tuple[str, Protocol, bool]] = {
    "mosquitto-5": ("mosquitto", "5", False),
    "mosquitto-3.1.1": ("mosquitto", "3.1.1", False),
    "amqtt-3.1.1": ("amqtt", "3.1.1", False),
    "rabbitmq-3.1.1": ("rabbitmq", "3.1.1", False),
    "rabbitmq-2nodes-3.1.1": ("rabbitmq", "3.1.1", True),
}
BROKERS = ("mosquitto", "amqtt", "rabbitmq")

MEASURED_ON = {"mosquitto": "2.0", "amqtt": "0.12", "rabbitmq": "3.10"}
"""Major.minor of the versions `EXPECTED` was measured on (Debian 12: mosquitto 2.0.11,
rabbitmq-server 3.10.8 on Erlang 25.2.3; amqtt 0.12.1 from PyPI)."""

GUARANTEES = {
    "mqtt5": "MQTT 5 CONNECT accepted",
    "retained": "retained message reaches a later subscriber, empty payload clears it",
    "retained+": "a retained message reaches a later subscriber through `+`",
    "will": "retained will (status `offline`) after an abrupt disconnect",
    "session": "QoS 1 messages queued for an offline persistent session, in order",
    "shared": "`$share/g/imu/+/window` splits messages between two subscribers",
    "ordering": "300 QoS 1 messages on one topic arrive complete and in order",
    "wildcards": "`+` and `#` match as the MQTT spec says (6 cases)",
    "properties": "content type and user properties on PUBLISH; message expiry in a session",
    "node": "imu-node: retained birth, a window in, its result out, `stopped` on stop",
}

NOT_V5 = "n/a (MQTT 3.1.1)"
RABBIT_2N = "rabbitmq-2nodes-3.1.1"
EXTRAS = "last value right, copies or replaced values before it"
NO_SHARE = "accepted, nothing delivered"
EXPECTED: dict[str, dict[str, str]] = {
    "mqtt5": {
        "mosquitto-5": YES,
        "mosquitto-3.1.1": YES,
        "amqtt-3.1.1": "refused: Unsupported protocol version",
        "rabbitmq-3.1.1": "refused: connection closed without CONNACK",
        RABBIT_2N: "refused: connection closed without CONNACK",
    },
    "retained": dict.fromkeys(TARGETS, YES)
    | {
        "amqtt-3.1.1": "last value right; not every run: copies or replaced values before it",
        RABBIT_2N: "not delivered to a later subscriber",
    },
    "retained+": dict.fromkeys(TARGETS, YES)
    | {
        "rabbitmq-3.1.1": "not delivered through a wildcard",
        RABBIT_2N: "not delivered through a wildcard",
    },
    "will": dict.fromkeys(TARGETS, YES)
    | {RABBIT_2N: "will published live, no retained status on the other node"},
    "session": dict.fromkeys(TARGETS, YES)
    | {"amqtt-3.1.1": "session resumed, 0 of 20 queued messages delivered"},
    "shared": {
        "mosquitto-5": YES,
        "mosquitto-3.1.1": YES,
        "amqtt-3.1.1": NO_SHARE,
        "rabbitmq-3.1.1": NO_SHARE,
        RABBIT_2N: NO_SHARE,
    },
    "ordering": dict.fromkeys(TARGETS, YES),
    "wildcards": dict.fromkeys(TARGETS, YES),
    "properties": dict.fromkeys(TARGETS, NOT_V5) | {"mosquitto-5": YES},
    "node": dict.fromkeys(TARGETS, YES)
    | {
        RABBIT_2N: "serves; no retained status for a later subscriber",
    },
}


# -- brokers, started once for the module -------------------------------------------------------


def _unavailable(reason: str) -> None:
    """Skip locally, fail under CI (`CI` set), where scripts/test installs every broker."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass
class Brokers:
    """Starts each broker on first use and keeps it for the module."""

    mosquitto: LocalBroker | None = None
    amqtt: LocalBroker | None = None
    rabbitmq: RabbitCluster | None = None
    versions: dict[str, str] = field(default_factory=dict)
    start_s: dict[str, float] = field(default_factory=dict)

    def urls(self, broker: str) -> list[str]:
        """The MQTT URLs of `broker` (one per cluster node), starting it if needed."""
        began = time.monotonic()
        if broker == "mosquitto":
            if self.mosquitto is None:
                require_program("mosquitto")
                self.mosquitto = LocalBroker("mosquitto").start()
                self.versions[broker] = mosquitto_version()
            urls = [self.mosquitto.url]
        elif broker == "amqtt":
            if self.amqtt is None:
                try:
                    self.versions[broker] = importlib.metadata.version("amqtt")
                except importlib.metadata.PackageNotFoundError:
                    _unavailable("amqtt is not installed (pip install -e '.[demo]')")
                self.amqtt = LocalBroker("amqtt").start()
            urls = [self.amqtt.url]
        else:
            if self.rabbitmq is None:
                if not rabbitmq_installed():
                    _unavailable("apt-get install -y rabbitmq-server: it is not installed")
                cluster = self.rabbitmq = RabbitCluster(2).start()
                self.versions[broker] = cluster.version
                print(f"\nrabbitmq {cluster.version}: 2 nodes booted in {cluster.boot_s:.1f} s, "
                      f"clustered in {cluster.join_s:.1f} s")  # fmt: skip
            urls = [node.url for node in self.rabbitmq.nodes]
        self.start_s.setdefault(broker, time.monotonic() - began)
        return urls

    def target(self, name: str) -> Target:
        """The target `name` of `TARGETS`."""
        broker, protocol, across = TARGETS[name]
        urls = self.urls(broker)
        return Target(name, broker, protocol, urls[0], urls[1] if across else urls[0])

    def stop(self) -> None:
        """Stop whatever was started."""
        for running in (self.mosquitto, self.amqtt, self.rabbitmq):
            if running is not None:
                running.stop()


def mosquitto_version() -> str:
    """`2.0.11` from `mosquitto -h`."""
    done = subprocess.run(["mosquitto", "-h"], capture_output=True, check=False, timeout=10)
    found = re.search(r"mosquitto version (\S+)", done.stdout.decode())
    return found.group(1) if found else "unknown"


@pytest.fixture(scope="module")
def brokers() -> Iterator[Brokers]:
    """Every broker of the matrix, each started on first use."""
    running = Brokers()
    yield running
    running.stop()
    print(f"\nbroker versions {running.versions}; start "
          f"{ {k: round(v, 1) for k, v in running.start_s.items()} } s")  # fmt: skip


@pytest.fixture(params=list(TARGETS))
def target(request: pytest.FixtureRequest, brokers: Brokers) -> Target:
    """Each test runs on every target."""
    return brokers.target(str(request.param))


ALSO_SEEN: dict[tuple[str, str], set[str]] = {("retained", "amqtt-3.1.1"): {YES, EXTRAS}}
"""Where a broker is not deterministic: every outcome seen there (EXPECTED describes them)."""


def expect(guarantee: str, target: Target, observed: str) -> None:
    """Compare what a test observed with the record."""
    expected = EXPECTED[guarantee][target.name]
    if (guarantee, target.name) in ALSO_SEEN:
        assert observed in ALSO_SEEN[guarantee, target.name], f"{target.name}: {observed!r}"
        return
    assert observed == expected, f"{guarantee} on {target.name}: observed {observed!r}"


# -- a small MQTT client that records what the broker said -----------------------------------


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    """Make clients; every one still open is closed at the end of the test."""
    made: list[Client] = []

    def make(*args: Any, **kwargs: Any) -> Client:
        made.append(Client(*args, **kwargs))
        return made[-1]

    yield make
    for client in made:
        client.close()


# -- the matrix ----------------------------------------------------------------------------------


@pytest.mark.parametrize("broker", BROKERS)
def test_measured_versions_are_the_recorded_ones(broker: str, brokers: Brokers) -> None:
    """A new broker release means measuring again: this says so."""
    brokers.urls(broker)
    version = brokers.versions[broker]
    assert version.startswith(MEASURED_ON[broker] + "."), f"{broker} is now {version}"


def test_rabbitmq_nodes_form_one_cluster(brokers: Brokers) -> None:
    brokers.urls("rabbitmq")
    assert brokers.rabbitmq is not None
    assert brokers.rabbitmq.running_nodes() == sorted(n.name for n in brokers.rabbitmq.nodes)


def test_mqtt5_connect(target: Target, clients: Callable[..., Client]) -> None:
    client = clients(target.pub_url, "5")
    if client.connected:
        observed = YES
    elif client.connack is not None:
        observed = f"refused: {client.connack}"
    else:
        observed = "refused: connection closed without CONNACK"
    expect("mqtt5", target, observed)


def test_retained_message(target: Target, clients: Callable[..., Client]) -> None:
    """A later subscriber gets exactly the last retained value of each of 5 topics, each set
    twice by a client that then leaves (as `imu-fleet` does with desired states), and an empty
    payload clears them."""
    prefix, count = unique("matrix"), 5
    names = [f"{prefix}/fleet/groups/g{i}/desired" for i in range(count)]
    publisher = Client(target.pub_url, target.protocol)
    for name in names:
        publisher.publish(name, b"v1", retain=True)
        publisher.publish(name, b"v2", retain=True)
    publisher.close()
    late = clients(target.sub_url, target.protocol)
    for name in names:
        late.subscribe(name)
    late.wait(count * 3, QUIET_S)
    got = [[m.payload for m in late.messages if m.topic == name] for name in names]
    if not any(got):
        observed = "not delivered to a later subscriber"
    elif any(values[-1:] != [b"v2"] for values in got):
        observed = f"last value received per topic {[v[-1:] for v in got]}"
    elif got != [[b"v2"]] * count:
        observed = EXTRAS
        print(f"\n{target.name}: retained values received per topic {got}")
    else:
        clearer = clients(target.pub_url, target.protocol)
        for name in names:
            clearer.publish(name, b"", retain=True)
        later = clients(target.sub_url, target.protocol)
        later.subscribe(*names)
        observed = YES if not later.wait(1, QUIET_S) else "not cleared by an empty payload"
    expect("retained", target, observed)


def test_retained_message_through_a_wildcard(
    target: Target, clients: Callable[..., Client]
) -> None:
    """What the dashboard does: `fleet/nodes/+/status` for every node's retained status."""
    prefix = unique("matrix")
    publisher = clients(target.pub_url, target.protocol)
    publisher.publish(f"{prefix}/fleet/nodes/pi-1/status", b"online", retain=True)
    late = clients(target.pub_url, target.protocol)
    late.subscribe(f"{prefix}/fleet/nodes/+/status")
    got = late.wait(1, QUIET_S)
    observed = YES if got and got[-1].payload == b"online" else "not delivered through a wildcard"
    expect("retained+", target, observed)


def test_retained_will_on_abrupt_disconnect(target: Target, clients: Callable[..., Client]) -> None:
    status = topics.node_status(unique("matrix-node"))
    watcher = clients(target.sub_url, target.protocol)
    watcher.subscribe(status)
    node = Client(target.pub_url, target.protocol, will=(status, b'{"state":"offline"}'))
    node.publish(status, b'{"state":"online"}', retain=True)
    node.drop()
    live = [m.payload for m in watcher.wait(2)]
    late = clients(target.sub_url, target.protocol)
    late.subscribe(status)
    got = late.wait(1, QUIET_S)
    if live != [b'{"state":"online"}', b'{"state":"offline"}']:
        observed = f"live subscriber got {live}"
    elif not got:
        observed = "will published live, no retained status on the other node"
    elif got[-1].payload == b'{"state":"online"}':
        observed = "will published live, `online` stays retained"
    elif not got[-1].retain:
        observed = "will published but not retained"
    else:
        observed = YES
    expect("will", target, observed)


def test_persistent_session_queues_qos1(target: Target, clients: Callable[..., Client]) -> None:
    topic, sent = f"{unique('matrix')}/imu/s1/window", 20
    subscriber = Client(target.sub_url, target.protocol, persistent=True)
    subscriber.subscribe(topic)
    subscriber.close()
    publisher = clients(target.pub_url, target.protocol)
    for seq in range(sent):
        publisher.publish(topic, str(seq).encode())
    # in a cluster the subscriber comes back on the publisher's node
    back = clients(target.pub_url, target.protocol, subscriber.client_id, persistent=True)
    got = [int(m.payload) for m in back.wait(sent, QUIET_S * 2)]
    if not back.session_present:
        observed = f"session not resumed (session present 0), {len(got)} of {sent} delivered"
    elif got != list(range(sent)):
        observed = f"session resumed, {len(got)} of {sent} queued messages delivered"
    else:
        observed = YES
    back.close()
    expect("session", target, observed)


def test_shared_subscription_splits_messages(
    target: Target, clients: Callable[..., Client]
) -> None:
    prefix, sent = unique("matrix"), 40
    shared = f"$share/{unique('g')}/{prefix}/imu/+/window"
    subscribers = [clients(url, target.protocol) for url in (target.pub_url, target.sub_url)]
    codes = [s.subscribe(shared)[0] for s in subscribers]
    if any(code.is_failure for code in codes):
        expect("shared", target, f"refused: SUBACK {[str(c) for c in codes]}")
        return
    publisher = clients(target.pub_url, target.protocol)
    for seq in range(sent):
        publisher.publish(f"{prefix}/imu/s{seq % 4}/window", str(seq).encode())
    time.sleep(QUIET_S)
    per_subscriber = [[int(m.payload) for m in s.messages] for s in subscribers]
    every = sorted(seq for got in per_subscriber for seq in got)
    counts = [len(got) for got in per_subscriber]
    print(f"\n{target.name}: shared subscription split {counts}")
    if not every:
        observed = "accepted, nothing delivered"
    elif every == sorted(list(range(sent)) * 2):
        observed = "not shared: each subscriber gets every message"
    elif every != list(range(sent)):
        observed = f"{len(every)} deliveries of {sent} messages"
    elif 0 in counts:
        observed = "one subscriber gets every message"
    else:
        observed = YES
    expect("shared", target, observed)


def test_qos1_order_on_one_topic(target: Target, clients: Callable[..., Client]) -> None:
    topic, sent = f"{unique('matrix')}/imu/s1/motifs", 300
    subscriber = clients(target.sub_url, target.protocol)
    subscriber.subscribe(topic)
    publisher = clients(target.pub_url, target.protocol)
    began = time.monotonic()
    infos = [publisher.client.publish(topic, str(seq).encode(), qos=1) for seq in range(sent)]
    for info in infos:
        info.wait_for_publish(WAIT_S)
    got = [int(m.payload) for m in subscriber.wait(sent)]
    print(f"\n{target.name}: {len(got)} of {sent} in {time.monotonic() - began:.2f} s")
    if got == list(range(sent)):
        observed = YES
    elif sorted(got) == list(range(sent)):
        observed = "complete, reordered"
    else:
        observed = f"{len(got)} of {sent} delivered"
    expect("ordering", target, observed)


WILDCARDS = [  # (filter, topic, matches) under a unique prefix
    ("imu/+/window", "imu/s1/window", True),
    ("imu/+/window", "imu/s1/extra/window", False),
    ("imu/+/window", "imu//window", True),
    ("fleet/nodes/+/status", "fleet/nodes/pi-1/status", True),
    ("fleet/#", "fleet", True),
    ("fleet/#", "fleet/rollouts/r1/wave/2", True),
]


def test_wildcard_rules(target: Target, clients: Callable[..., Client]) -> None:
    prefix = unique("matrix")
    subscriber = clients(target.sub_url, target.protocol)
    subscriber.subscribe(*(f"{prefix}/{i}/{f}" for i, (f, _, _) in enumerate(WILDCARDS)))
    publisher = clients(target.pub_url, target.protocol)
    for i, (_, topic, _) in enumerate(WILDCARDS):
        publisher.publish(f"{prefix}/{i}/{topic}", str(i).encode())
    expected = {i for i, (_, _, matches) in enumerate(WILDCARDS) if matches}
    subscriber.wait(len(expected))
    time.sleep(0.3)
    got = [int(m.payload) for m in subscriber.messages]
    wrong = [
        f"{WILDCARDS[i][0]} {'misses' if i in expected else 'matches'} {WILDCARDS[i][1]}"
        for i in range(len(WILDCARDS))
        if (i in got) != (i in expected)
    ]
    twice = sorted({i for i in got if got.count(i) > 1})
    observed = "; ".join(wrong + [f"duplicates {twice}"] * bool(twice)) or YES
    expect("wildcards", target, observed)


V5_TARGETS = [name for name, (_, protocol, _) in TARGETS.items() if protocol == "5"]


@pytest.mark.parametrize("target", V5_TARGETS, indirect=True)
def test_mqtt5_properties_and_message_expiry(
    target: Target, clients: Callable[..., Client]
) -> None:
    topic = f"{unique('matrix')}/imu/s1/window"
    live = clients(target.sub_url, "5")
    live.subscribe(topic)
    offline = Client(target.sub_url, "5", persistent=True)
    offline.subscribe(topic)
    offline.close()
    publisher = clients(target.pub_url, "5")
    marked = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    marked.ContentType = "application/x-imu-window-f32"
    marked.UserProperty = [("seq", "7")]
    publisher.publish(topic, b"\x00" * 16, properties=marked)
    short = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    short.MessageExpiryInterval = 1
    publisher.publish(topic, b"expires", properties=short)
    got = live.wait(2)
    props = got[0].properties if got else None
    time.sleep(2.1)
    back = clients(target.sub_url, "5", offline.client_id, persistent=True)
    queued = [m.payload for m in back.wait(2, QUIET_S)]
    if props is None or getattr(props, "ContentType", None) != "application/x-imu-window-f32":
        observed = "content type lost"
    elif getattr(props, "UserProperty", None) != [("seq", "7")]:
        observed = "user properties lost"
    elif queued != [b"\x00" * 16]:
        observed = f"queued for the session: {queued}"
    else:
        observed = YES
    expect("properties", target, observed)


def poll(done: Callable[[], bool], timeout: float) -> bool:
    """Whether `done` came true within `timeout` seconds (checked every 50 ms)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def states(client: Client, node_id: str) -> list[str]:
    """The node states `client` received on the node's status topic."""
    status = topics.node_status(node_id)
    return [orjson.loads(m.payload)["state"] for m in client.messages if m.topic == status]


def test_node_serves_through_the_broker(
    target: Target, reference_bundle_path: Path, clients: Callable[..., Client]
) -> None:
    """The real node: birth status (retained), a window in (from the subscriber's node in a
    cluster), its result out, and the retained `stopped` status after a clean stop."""
    node_id, sensor = unique("matrix-node"), unique("imu")
    watcher = clients(target.sub_url, target.protocol)
    watcher.subscribe(topics.node_status(node_id), topics.motifs(sensor))
    app = NodeApp.open(
        load_config(
            node_id=node_id,
            model=reference_bundle_path,
            backend="onnx",
            broker=target.pub_url,
            mqtt_protocol=target.protocol,
            telemetry_interval_s=5,
        )
    )
    app.start()
    try:
        born = poll(lambda: "online" in states(watcher, node_id), 20)
        sensor_client = clients(target.sub_url, target.protocol)
        sensor_client.publish(topics.window(sensor), window_json(1))
        poll(lambda: any(m.topic == topics.motifs(sensor) for m in watcher.messages), WAIT_S)
    finally:
        app.stop("test finished")
    results = [
        orjson.loads(m.payload) for m in watcher.messages if m.topic == topics.motifs(sensor)
    ]
    late = clients(target.sub_url, target.protocol)
    late.subscribe(topics.node_status(node_id))
    retained = [orjson.loads(m.payload)["state"] for m in late.wait(1, QUIET_S) if m.retain]
    if not born:
        observed = "no birth status"
    elif [r["seq"] for r in results] != [1]:
        observed = f"results {results}"
    elif not retained:
        observed = "serves; no retained status for a later subscriber"
    elif retained[-1] != "stopped":
        observed = f"retained status after stop: {retained}"
    else:
        observed = YES
    expect("node", target, observed)


# -- the table in docs/scaling.md ----------------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"
BEGIN, END = "<!-- broker-matrix:begin -->", "<!-- broker-matrix:end -->"


def matrix_table() -> str:
    """The markdown table of `EXPECTED`: guarantees down, targets across."""
    names = list(TARGETS)
    lines = [
        "| guarantee | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key, what in GUARANTEES.items():
        cells = [EXPECTED[key][n] for n in names]
        lines.append(f"| **{key}**: {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_scaling_doc_shows_the_measured_matrix() -> None:
    text = DOC.read_text()
    table = text.split(BEGIN, 1)[-1].split(END, 1)[0].strip()
    assert table == matrix_table(), f"paste into docs/scaling.md:\n{matrix_table()}"
