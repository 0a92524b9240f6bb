"""Which rollout controllers are alive: retained presence cleared by an empty will.

A controller publishes `ControllerPresence` on the retained `fleet/controllers/{id}` topic on
every connection. Its will is an empty retained message on the same topic, so the broker clears
the presence as soon as the connection dies: at once for a killed process (the kernel closes the
socket), after 1.5 keepalives for a host that vanished. A clean exit withdraws it the same way.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time

import paho.mqtt.client as mqtt

from common.mqtt.connection import Connection
from common.mqtt.session import MqttSession
from schemas import topics
from schemas.codec import encode
from schemas.control import ControllerPresence


def presence_will(controller_id: str) -> tuple[str, bytes]:
    """The last will that clears `controller_id`'s presence."""
    return topics.controller(controller_id), b""


def presence_session(
    broker: str | Connection, *, protocol: str = "5", client_id: str | None = None
) -> MqttSession:
    """A (not yet started) session for a controller, with its presence will set."""
    client_id = client_id or f"imu-fleet-{secrets.token_hex(4)}"
    settings = Connection.of(broker, protocol).session_settings(
        client_id, will=presence_will(client_id)
    )
    return MqttSession(settings)


class Presence:
    """This controller's own presence, and the set of controllers the broker says are alive."""

    def __init__(self, session: MqttSession) -> None:
        self.session = session
        self.controller_id = session.settings.client_id
        self.announces = session.settings.will == presence_will(self.controller_id)
        """False for a session made without the will: then nothing is announced."""
        self._live: set[str] = set()
        self._lock = threading.Lock()
        session.route(topics.CONTROLLERS_FILTER, self._on_message)
        session.on_connected(self._forget)  # retained presences arrive again after resubscribing
        if self.announces:
            session.on_connected(self._announce)

    def is_live(self, controller_id: str) -> bool:
        """True while `controller_id`'s presence is retained on the broker."""
        with self._lock:
            return controller_id in self._live

    def withdraw(self) -> None:
        """Clear our presence before a clean disconnect (the will covers every other exit)."""
        if self.announces and self.session.is_connected:
            self.session.publish(topics.controller(self.controller_id), b"", retain=True)

    def _announce(self) -> None:
        presence = ControllerPresence(
            controller_id=self.controller_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=time.time(),
        )
        self.session.publish(topics.controller(self.controller_id), encode(presence), retain=True)

    def _forget(self) -> None:
        with self._lock:
            self._live.clear()

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        controller_id = message.topic.rsplit("/", 1)[-1]
        with self._lock:
            if message.payload:
                self._live.add(controller_id)
            else:
                self._live.discard(controller_id)
