"""An MQTT 5 test client that records what it sees (`Probe`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from common.mqtt.address import BrokerAddress
from helpers.waiting import unique


@dataclass
class Received:
    """One message a probe saw."""

    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        """The payload parsed as JSON."""
        return orjson.loads(self.payload)


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
