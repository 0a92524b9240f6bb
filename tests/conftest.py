"""Shared fixtures: a real mosquitto per test session, the reference bundle, nodes, MQTT probes.

Node tests run once per backend (`backend` fixture): on ONNX Runtime, and "on Hailo" through the
`hailo_platform` stand-in in tests/hailo_standin (put on sys.path here, and on PYTHONPATH for
nodes started as subprocesses), with a bundle whose stand-in HEF runs the same ONNX twin.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from common.bundle import Bundle, read_bundle
from common.mqtt.address import BrokerAddress
from fleet.bundles.reference import build_reference_bundle
from node.app import NodeApp
from node.config import load_config
from node.tools.local_broker import LocalBroker
from schemas import topics

STANDIN = Path(__file__).resolve().parent / "hailo_standin"
sys.path.insert(0, str(STANDIN))

from hailo_standin import faults  # noqa: E402 (needs the path above)
from hailo_standin.bundles import hailo_bundle  # noqa: E402
from hailo_standin.fake_hef import parse_hef  # noqa: E402

BACKENDS = ("onnx", "hailo")


def unique(prefix: str) -> str:
    """A fresh id for sensors and nodes, so tests on one broker never see each other."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session", autouse=True)
def state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Nodes (in process or spawned) keep their result spools here, not in the home folder."""
    folder = tmp_path_factory.mktemp("state")
    before = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = before


@pytest.fixture(scope="session")
def broker() -> Iterator[LocalBroker]:
    """One real mosquitto on a free loopback port for the whole session."""
    if not shutil.which("mosquitto"):
        pytest.fail("mosquitto is required for the tests: apt-get install -y mosquitto")
    with LocalBroker("mosquitto") as running:
        yield running


@pytest.fixture(scope="session")
def reference_bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference model as a bundle file, built once per session."""
    return build_reference_bundle(tmp_path_factory.mktemp("bundles") / "tcn-reference-1.0.0.tar")


@pytest.fixture(scope="session")
def reference_bundle(reference_bundle_path: Path) -> Bundle:
    """The verified reference bundle."""
    return read_bundle(reference_bundle_path)


@pytest.fixture(scope="session")
def hailo_bundle_path(reference_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference bundle plus a stand-in HEF (uint8 outputs scaled to the calibration range)."""
    out = tmp_path_factory.mktemp("bundles") / "tcn-reference-hailo-1.0.0.tar"
    hailo_bundle(reference_bundle, out)
    return out


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each node test runs on ONNX Runtime and on the Hailo stand-in."""
    return str(request.param)


@pytest.fixture(scope="session")
def serving_bundle_path(backend: str, reference_bundle_path: Path, hailo_bundle_path: Path) -> Path:
    """The bundle a node on `backend` serves."""
    return hailo_bundle_path if backend == "hailo" else reference_bundle_path


def latent_tolerance(backend: str, bundle_path: Path) -> float:
    """How far a node's latent may be from ONNX Runtime's: 1e-4, or one uint8 step on Hailo."""
    if backend != "hailo":
        return 1e-4
    hef = read_bundle(bundle_path).hef
    assert hef is not None
    return max(stream.qp_scale for stream in parse_hef(hef).outputs)


def subprocess_env(backend: str) -> dict[str, str]:
    """Environment for a node started as a subprocess on `backend`."""
    env = dict(os.environ)
    if backend == "hailo":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(STANDIN), env.get("PYTHONPATH")]))
    return env


@dataclass
class Received:
    """One message a probe saw."""

    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        """The payload parsed as JSON."""
        return orjson.loads(self.payload)


def require_program(name: str, package: str | None = None) -> str:
    """The path of a real program a test drives (Prometheus, Chromium, ...). Where it is not
    installed the test is skipped, except under CI (`CI` set), where `scripts/test` installs it
    and its absence is a failure."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (apt-get install -y {package or name})"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def wait_until(done: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `done` every 50 ms; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}")
        time.sleep(0.05)


class Probe:
    """An MQTT 5 test client that records everything on its subscriptions."""

    def __init__(self, url: str, protocol: str = "5", *, session_expiry_s: int = 0) -> None:
        """Connect; with `session_expiry_s` (MQTT 5) the broker keeps the session and queues
        messages for it while the probe is away, and paho resumes it on reconnect."""
        self.messages: list[Received] = []
        self._cv = threading.Condition()
        self._subscribed = threading.Event()
        address = BrokerAddress.parse(url)
        version = MQTTProtocolVersion.MQTTv5 if protocol == "5" else MQTTProtocolVersion.MQTTv311
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, unique("probe"), protocol=version)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_connect = self._on_connect
        self._filters: list[str] = []
        self.client.reconnect_delay_set(0.1, 1)
        properties = None
        if session_expiry_s:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = session_expiry_s
        clean_start = False if session_expiry_s else mqtt.MQTT_CLEAN_START_FIRST_ONLY
        self.client.connect(
            address.host, address.port, clean_start=clean_start, properties=properties
        )
        self.client.loop_start()

    def subscribe(self, *filters: str) -> Probe:
        """Subscribe (QoS 1) and wait for the SUBACK."""
        for topic_filter in filters:
            self._filters.append(topic_filter)
            self._subscribed.clear()
            self.client.subscribe(topic_filter, qos=1)
            assert self._subscribed.wait(5), f"no SUBACK for {topic_filter}"
        return self

    def _on_connect(self, client: Any, userdata: Any, flags: Any, *_: Any) -> None:
        """A broker that lost the session (restarted without saving it): subscribe again."""
        if not flags.session_present:
            for topic_filter in self._filters:
                client.subscribe(topic_filter, qos=1)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish and wait until the broker has it."""
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(5)

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cv:
            self.messages.append(Received(message.topic, bytes(message.payload), message.retain))
            self._cv.notify_all()

    def on(self, topic_filter: str) -> list[Received]:
        """Messages so far whose topic matches `topic_filter`."""
        with self._cv:
            return [m for m in self.messages if mqtt.topic_matches_sub(topic_filter, m.topic)]

    def wait_for(
        self,
        topic_filter: str,
        count: int = 1,
        timeout: float = 10.0,
        where: Callable[[Received], bool] = lambda m: True,
    ) -> list[Received]:
        """Block until `count` matching messages arrived; fails the test on timeout."""
        deadline = time.monotonic() + timeout

        def matching() -> list[Received]:
            return [
                m
                for m in self.messages
                if mqtt.topic_matches_sub(topic_filter, m.topic) and where(m)
            ]

        with self._cv:
            while len(found := matching()) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(
                        f"waited {timeout} s for {count} message(s) on {topic_filter}, "
                        f"got {len(found)}"
                    )
                self._cv.wait(remaining)
            return found

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def probe(broker: LocalBroker) -> Iterator[Probe]:
    """A recording MQTT client on the session broker."""
    client = Probe(broker.url)
    yield client
    client.close()


NodeFactory = Callable[..., NodeApp]


@pytest.fixture
def start_node(
    broker: LocalBroker,
    backend: str,
    serving_bundle_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[NodeFactory]:
    """Start nodes on the session broker; each is stopped at the end of the test.

    The factory returns once the node's birth message and model state are on the broker, which
    the broker orders after the node's subscriptions: windows published from then on are served,
    and a later subscriber gets both as retained messages.
    """
    apps: list[NodeApp] = []

    def start(**settings: Any) -> NodeApp:
        settings.setdefault("node_id", unique("node"))
        settings.setdefault("model", serving_bundle_path)
        settings.setdefault("backend", backend)
        settings.setdefault("broker", broker.url)
        settings.setdefault("telemetry_interval_s", 0.5)
        # bundles the tests write live under pytest's temp folder: file:// may point there
        settings.setdefault("file_url_root", tmp_path_factory.getbasetemp())
        app = NodeApp.open(load_config(**settings))
        config = app.config
        watcher = Probe(config.broker).subscribe(
            topics.node_status(app.node_id), topics.node_model(app.node_id)
        )
        app.start()
        apps.append(app)
        watcher.wait_for(
            topics.node_status(app.node_id),
            where=lambda m: m.json()["instance"] == app.instance and m.json()["state"] == "online",
        )
        watcher.wait_for(topics.node_model(app.node_id))
        watcher.close()
        return app

    yield start
    for app in apps:
        app.stop("test finished")
    faults.reset()
