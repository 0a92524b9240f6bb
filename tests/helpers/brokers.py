"""Brokers for the broker matrix (tests/test_broker_matrix.py) besides `LocalBroker`.

`RabbitCluster` runs Debian's rabbitmq-server with its MQTT plugin as N nodes clustered on this
machine: every node has its own node name, data folder, MQTT port and Erlang distribution port,
one private epmd (on a free port, so nothing else on the machine is touched) and one Erlang
cookie. The nodes boot in parallel; the second and later join the first with `rabbitmqctl
join_cluster` (about 2.5 s measured, against about 10 s for a node to boot on 2 cores).

`Client` is a plain paho-mqtt client that records what the broker answered (CONNACK, session
present, SUBACK codes) and every message, for tests that compare brokers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from common.mqtt.address import BrokerAddress
from helpers.waiting import unique
from node.tools.local_broker import free_port, wait_for_port

logger = logging.getLogger(__name__)

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
"""Where Debian's package keeps the scripts that run as the calling user (the ones in /usr/sbin
switch to the `rabbitmq` user and its system-wide data folder)."""

RABBITMQ_CONF = """\
listeners.tcp = none
mqtt.listeners.tcp.default = 127.0.0.1:{mqtt_port}
mqtt.allow_anonymous = true
log.console = false
log.file.level = warning
"""

BOOT_TIMEOUT_S = 60.0
WAIT_S = 5.0
"""How long a `Client` waits for what must arrive (CONNACK, SUBACK, PUBACK, messages)."""

Protocol = Literal["5", "3.1.1"]


def rabbitmq_installed() -> bool:
    """Whether Debian's rabbitmq-server (with its MQTT plugin) is installed."""
    return (RABBITMQ_BIN / "rabbitmq-server").exists() and shutil.which("epmd") is not None


@dataclass
class RabbitNode:
    """One RabbitMQ node of a `RabbitCluster`."""

    name: str
    mqtt_port: int
    dist_port: int
    base: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """`mqtt://127.0.0.1:PORT` of this node's MQTT listener."""
        return f"mqtt://127.0.0.1:{self.mqtt_port}"


class RabbitCluster:
    """`with RabbitCluster(2) as cluster:` N clustered RabbitMQ nodes serving MQTT on loopback."""

    def __init__(self, size: int = 2) -> None:
        """Plan `size` nodes (started by `start()`)."""
        self._workdir = Path(tempfile.mkdtemp(prefix="imu-rabbitmq-"))
        self.epmd_port = free_port()
        self.nodes = [
            RabbitNode(
                name=f"imu{i}-{self.epmd_port}@localhost",
                mqtt_port=free_port(),
                dist_port=free_port(),
                base=self._workdir / f"node{i}",
            )
            for i in range(size)
        ]
        self.boot_s = 0.0
        self.join_s = 0.0
        self.version = ""

    def _env(self, node: RabbitNode | None = None) -> dict[str, str]:
        env = {
            **os.environ,
            "HOME": str(self._workdir),  # the shared .erlang.cookie, for servers and CLI alike
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_CONF_ENV_FILE": str(self._workdir / "rabbitmq-env.conf"),
        }
        if node is not None:
            env |= {
                "RABBITMQ_NODENAME": node.name,
                "RABBITMQ_DIST_PORT": str(node.dist_port),
                "RABBITMQ_CONFIG_FILE": str(node.base / "rabbitmq"),
                "RABBITMQ_MNESIA_BASE": str(node.base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(node.base / "log"),
                "RABBITMQ_PLUGINS_EXPAND_DIR": str(node.base / "plugins"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.base / "enabled_plugins"),
                "RABBITMQ_ENABLED_PLUGINS": "rabbitmq_mqtt",
                "RABBITMQ_PID_FILE": str(node.base / "pid"),
            }
        return env

    def ctl(self, node: RabbitNode, *args: str) -> str:
        """Run `rabbitmqctl -n NODE ARGS...` and return its output (CalledProcessError if it
        fails)."""
        done = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-q", "-n", node.name, *args],
            env=self._env(),
            capture_output=True,
            check=True,
            timeout=30,
        )
        return done.stdout.decode().strip()

    def start(self) -> RabbitCluster:
        """Boot every node, cluster them and wait until each serves MQTT."""
        cookie = self._workdir / ".erlang.cookie"
        cookie.write_text(f"imuedgematrix{self.epmd_port}")
        cookie.chmod(0o400)
        (self._workdir / "rabbitmq-env.conf").write_text("")
        began = time.monotonic()
        for node in self.nodes:
            node.base.mkdir()
            conf = RABBITMQ_CONF.format(mqtt_port=node.mqtt_port)
            (node.base / "rabbitmq.conf").write_text(conf)
            log = (node.base / "console.log").open("wb")
            node.process = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                env=self._env(node),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped as one in stop()
            )
        for node in self.nodes:
            wait_for_port(node.mqtt_port, BOOT_TIMEOUT_S)
        self.boot_s = time.monotonic() - began
        first, *others = self.nodes
        began = time.monotonic()
        for node in others:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
            wait_for_port(node.mqtt_port, BOOT_TIMEOUT_S)
        self.join_s = time.monotonic() - began
        self.version = self.ctl(first, "eval", "rabbit:product_version().").strip('"')
        logger.info("rabbitmq %s: %d nodes", self.version, len(self.nodes))
        return self

    def running_nodes(self) -> list[str]:
        """The cluster's running nodes, as the first node sees them."""
        listed = self.ctl(self.nodes[0], "eval", "rabbit_nodes:all_running().")
        return sorted(part.strip(" []'\n") for part in listed.split(","))

    def stop(self) -> None:
        """Stop every node (SIGTERM: a clean shutdown, then SIGKILL), the private epmd, and
        delete the data folders."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.process.pid, signal.SIGTERM)
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                node.process.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.process.pid, signal.SIGKILL)
                node.process.wait()
            node.process = None
        epmd = shutil.which("epmd")
        if epmd is not None:
            subprocess.run(
                [epmd, "-kill"], env=self._env(), capture_output=True, timeout=10, check=False
            )
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> RabbitCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass
class Message:
    """One received message."""

    topic: str
    payload: bytes
    retain: bool
    properties: Any = None


class Client:
    """A paho client on `url` speaking `protocol`; with `persistent` its session outlives it
    (MQTT 5: clean start 0 and a 300 s session expiry; 3.1.1: clean session 0)."""

    def __init__(
        self,
        url: str,
        protocol: Protocol,
        client_id: str | None = None,
        *,
        persistent: bool = False,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        """Connect and wait for the CONNACK (or for the broker to close the connection)."""
        self.client_id = client_id or unique("matrix")
        self.messages: list[Message] = []
        self.connack: ReasonCode | None = None
        self.session_present = False
        self.suback: list[ReasonCode] = []
        self._cv = threading.Condition()
        self._closed = threading.Event()
        v5 = protocol == "5"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else not persistent,
            reconnect_on_failure=False,
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *args: self._closed.set()
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.max_inflight_messages_set(100)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        properties = None
        if v5 and persistent:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 300
        address = BrokerAddress.parse(url)
        if v5:
            self.client.connect(
                address.host, address.port, clean_start=not persistent, properties=properties
            )
        else:
            self.client.connect(address.host, address.port)
        self.client.loop_start()
        with self._cv:
            self._cv.wait_for(lambda: self.connack is not None or self._closed.is_set(), WAIT_S)

    @property
    def connected(self) -> bool:
        """Whether the broker accepted the connection."""
        return self.connack is not None and not self.connack.is_failure

    def _on_connect(
        self, client: Any, userdata: Any, flags: Any, code: ReasonCode, *_: Any
    ) -> None:
        with self._cv:
            self.connack = code
            self.session_present = bool(flags.session_present)
            self._cv.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, *_: Any) -> None:
        with self._cv:
            self.suback = list(codes)
            self._cv.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cv:
            self.messages.append(
                Message(message.topic, bytes(message.payload), bool(message.retain),
                        getattr(message, "properties", None))
            )  # fmt: skip
            self._cv.notify_all()

    def subscribe(self, *filters: str) -> list[ReasonCode]:
        """Subscribe at QoS 1 and return the SUBACK's codes."""
        with self._cv:
            self.suback = []
            self.client.subscribe([(f, 1) for f in filters])
            self._cv.wait_for(lambda: bool(self.suback), WAIT_S)
            assert self.suback, f"no SUBACK for {filters}"
            return self.suback

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, properties: Any = None
    ) -> None:
        """Publish at QoS 1 and wait for the PUBACK."""
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        info.wait_for_publish(WAIT_S)
        assert info.is_published(), f"no PUBACK for {topic}"

    def wait(self, count: int, timeout: float = WAIT_S) -> list[Message]:
        """Up to `timeout` for `count` messages; returns what arrived."""
        with self._cv:
            self._cv.wait_for(lambda: len(self.messages) >= count, timeout)
            return list(self.messages)

    def close(self) -> None:
        """A clean DISCONNECT (no will)."""
        self.client.disconnect()
        self.client.loop_stop()

    def drop(self) -> None:
        """Lose the connection without a DISCONNECT, as a crash or a pulled cable does."""
        self.client.loop_stop()
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
