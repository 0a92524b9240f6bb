"""The MQTT session a recorder or a replay uses: protocol check, client, connection."""

from __future__ import annotations

import uuid
from typing import Final

from common.mqtt.connection import Connection
from common.mqtt.session import MqttSession

CONNECT_TIMEOUT_S: Final = 10.0
PROTOCOLS: Final = ("5", "3.1.1")


def check_protocol(protocol: str) -> None:
    """Raise ValueError for an MQTT protocol version the tools do not speak."""
    if protocol not in PROTOCOLS:
        msg = f"MQTT protocol {protocol!r} is not supported; use one of {', '.join(PROTOCOLS)}"
        raise ValueError(msg)


def new_session(broker: str | Connection, role: str, protocol: str) -> MqttSession:
    """An unstarted session to `broker` with a fresh client id `imu-<role>-<8 hex digits>`."""
    client_id = f"imu-{role}-{uuid.uuid4().hex[:8]}"
    return MqttSession(Connection.of(broker, protocol).session_settings(client_id))


def connect(session: MqttSession) -> None:
    """Start the session and wait for the broker; ConnectionError when it does not answer."""
    session.connect(CONNECT_TIMEOUT_S)
