"""The parts of an MQTT session that are settings and plumbing: how to reach and log in to the
broker, a paho client made from that, the counters telemetry reads, and acknowledgements."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from common.errors import EdgeError
from common.mqtt.address import BrokerAddress


class ConnectRefusedError(EdgeError, ConnectionError):
    """The broker answered CONNECT with a failure reason code."""

    def __init__(self, message: str, code: int | None = None, reason_text: str = "") -> None:
        super().__init__(message)
        self.code = code
        """The CONNACK reason code (MQTT 5), or return code (3.1.1)."""
        self.reason_text = reason_text


class ConnectionSettingsError(EdgeError, ValueError):
    """Connection settings that cannot work (e.g. a certificate and a key that do not match)."""


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """How to reach and talk to the broker."""

    address: BrokerAddress
    client_id: str
    protocol: str = "5"
    keepalive_s: int = 30
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    will: tuple[str, bytes] | None = None
    """Retained QoS 1 last will: (topic, payload)."""
    max_pending_publishes: int = 10_000
    session_expiry_s: int = 0
    """MQTT 5: how long the broker keeps the session (and queued QoS 1 input) after a drop,
    also across a restart of a broker with persistence. 0 for tools; a node keeps 300 s so a
    short outage loses no window. The client id must then be unique to this process."""
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 30.0
    manual_ack: bool = False
    """Acknowledge QoS 1 messages only when told (`ack_later`); routes added with
    `deferred_ack=False` are still acknowledged as soon as their handler returns."""


Ack = Callable[[], None]
"""Acknowledges one received QoS 1 message, once; a no-op after the connection it came on."""


@dataclass
class SessionCounters:
    """Connection-level counters for telemetry."""

    connects: int = 0
    disconnects: int = 0
    publish_dropped: int = 0
    publish_refused: int = 0
    """QoS 1 publishes the broker acknowledged with a failure reason (e.g. 135, not
    authorized by its ACL): delivered nowhere."""
    handler_errors: int = 0
    last_error: str | None = None
    connected_since: float | None = field(default=None)


def paho_client(s: SessionSettings) -> mqtt.Client:
    """A paho client for `s` (protocol, login, TLS, will, bounded out queue); the session adds
    its callbacks."""
    v5 = s.protocol == "5"
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=s.client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        clean_session=None if v5 else True,
        reconnect_on_failure=False,
        manual_ack=s.manual_ack,
    )
    client.max_queued_messages_set(s.max_pending_publishes)
    if s.username is not None:
        client.username_pw_set(s.username, s.password)
    if s.address.tls:
        try:
            client.tls_set(
                ca_certs=s.ca_file,
                certfile=s.cert_file,
                keyfile=s.key_file,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc):
                msg = (
                    f"cert_file {s.cert_file} and key_file {s.key_file} do not belong together: "
                    "give the .crt and .key that `imu-fleet pki add` made for the same client"
                )
            else:
                msg = f"cannot use ca_file/cert_file/key_file for TLS: {exc.reason or exc}"
            raise ConnectionSettingsError(msg) from exc
    if s.will is not None:
        client.will_set(s.will[0], s.will[1], qos=1, retain=True)
    return client


def no_ack() -> None:
    """Nothing to acknowledge (QoS 0, or a session that acknowledges by itself)."""
