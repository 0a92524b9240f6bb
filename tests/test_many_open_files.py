"""A session in a process with more than 1,023 open files: paho's `loop()` waits in select(),
which cannot watch such descriptors, so every connection used to fail before its CONNACK. A
controller in a bench process holding 3,000 simulated nodes' sockets never connected.
"""

from __future__ import annotations

import os
import resource
import select
import threading
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from common.mqtt.connection import Connection
from common.mqtt.session import MqttSession
from fleet.rollout.controller import Controller
from helpers.waiting import unique, wait_until
from node.tools.local_broker import LocalBroker

SELECT_LIMIT = 1024
"""FD_SETSIZE on Linux: select() refuses descriptors from here on."""


@pytest.fixture
def crowded() -> Iterator[None]:
    """This process with every descriptor below `SELECT_LIMIT` taken, so the next socket's
    number is above it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < SELECT_LIMIT + 64:
        pytest.skip(f"the hard open-file limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, SELECT_LIMIT + 64), hard))
    taken = []
    while (fd := os.open(os.devnull, os.O_RDONLY)) < SELECT_LIMIT:
        taken.append(fd)
    os.close(fd)
    try:
        yield
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_select_itself_refuses_such_a_descriptor(crowded: None) -> None:
    """What the session works around (if select() stops refusing, this test says so)."""
    left, right = os.pipe()
    try:
        assert left >= SELECT_LIMIT
        with pytest.raises(ValueError, match="filedescriptor out of range"):
            select.select([left], [], [], 0)
    finally:
        os.close(left)
        os.close(right)


def test_a_session_above_descriptor_1023_connects_publishes_and_receives(
    broker: LocalBroker, crowded: None
) -> None:
    session = MqttSession(Connection.of(broker.url).session_settings(unique("crowded")))
    got: list[bytes] = []
    topic = f"test/{unique('fd')}"
    session.route(topic, lambda message: got.append(bytes(message.payload)))
    session.start()
    try:
        assert session.wait_connected(10), "no CONNACK above descriptor 1023"
        wait_until(  # until subscribed: a ping comes back
            lambda: bool(session.publish(topic, b"ping", qos=1)) and b"ping" in got, 10, "a ping"
        )
        payloads = [f"m{i}".encode() for i in range(50)]

        def send() -> None:  # from another thread: the wake-up must end the session's wait
            for payload in payloads:
                session.publish(topic, payload, qos=1)

        sender = threading.Thread(target=send)
        sender.start()
        sender.join()
        assert session.wait_published(10), "publishes not acknowledged"

        def back() -> list[bytes]:
            return [p for p in got if p != b"ping"]

        wait_until(lambda: len(back()) == len(payloads), 10, "every message back")
        assert back() == payloads
    finally:
        session.stop()


def test_a_controller_connects_in_a_process_holding_thousands_of_sockets(
    broker: LocalBroker, crowded: None
) -> None:
    controller = Controller.connect(broker.url, client_id=unique("ctl"), timeout_s=10)
    try:
        assert controller.session.is_connected
    finally:
        controller.close()


def test_paho_loop_alone_still_fails_there(broker: LocalBroker, crowded: None) -> None:
    """The cause, shown: the same connection driven by paho's own `loop()` never connects."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, unique("paho"))
    host, port = broker.url.removeprefix("mqtt://").split(":")
    client.connect(host, int(port))
    try:
        assert client.loop(0.5) == mqtt.MQTT_ERR_CONN_LOST
    finally:
        if (sock := client.socket()) is not None:
            sock.close()
