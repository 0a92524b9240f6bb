"""Renewing the fleet's current desired states before they expire (the controller service).

Signed desired states expire (`DESIRED_TTL_S`), so that a captured order cannot be replayed for
long and a freeze shows (node/updates/freshness.py). The controller service re-issues every
current one every `RENEW_S`: the same content, issued now, expiring an hour from now, signed.

It renews only what it may: a message on a desired-state topic that a trusted fleet key signed
for that very topic, not expired, and not older than the newest it has seen there (an old order
someone re-retained is never brought back to life). Everything else is left alone; nodes refuse
it themselves.
"""

from __future__ import annotations

import logging
import threading
import time

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from common.mqtt.session import MqttSession
from common.signing import SignatureError, Trust, verify_desired
from fleet.desired import desired_topic, scoped
from schemas import topics
from schemas.codec import encode
from schemas.control import DesiredModel

logger = logging.getLogger(__name__)

RENEW_S = 600.0
"""How often a current desired state is issued again (well inside its hour)."""
FILTERS = (topics.FLEET_DESIRED, topics.group_desired("+"), topics.node_desired("+"))


def _level_of(topic: str) -> tuple[str, str] | None:
    """(level, target) of a desired-state topic."""
    parts = topic.split("/")
    if topic == topics.FLEET_DESIRED:
        return "fleet", ""
    if len(parts) == 4 and parts[0] == "fleet" and parts[3] == "desired":
        level = {"groups": "group", "nodes": "node"}.get(parts[1])
        return (level, parts[2]) if level else None
    return None


class DesiredBook:
    """The current desired state on every desired-state topic, as the broker retains it
    (thread-safe). With `trust`, only messages a trusted key signed for that very topic count;
    an older message re-retained over a newer one never replaces it."""

    def __init__(self, session: MqttSession, trust: Trust | None) -> None:
        self._trust = trust
        self._current: dict[str, DesiredModel] = {}
        self._lock = threading.Lock()
        for topic_filter in FILTERS:
            session.route(topic_filter, self._on_desired)

    def current(self, topic: str) -> DesiredModel | None:
        """What `topic` holds now (None: nothing, or a clear)."""
        with self._lock:
            desired = self._current.get(topic)
        return None if desired is None or desired.cleared else desired

    def items(self) -> dict[str, DesiredModel]:
        """Topic -> its current message (clears included)."""
        with self._lock:
            return dict(self._current)

    def replace(self, topic: str, desired: DesiredModel) -> None:
        """Take our own new message for `topic` at once."""
        with self._lock:
            self._current[topic] = desired

    def _on_desired(self, message: mqtt.MQTTMessage) -> None:
        where = _level_of(message.topic)
        if where is None:
            return
        if not message.payload:  # an unsigned clear
            if self._trust is None:
                with self._lock:
                    self._current.pop(message.topic, None)
            return
        try:
            desired = DesiredModel.model_validate_json(message.payload)
            if self._trust is not None:
                verify_desired(desired, self._trust)
        except (ValidationError, SignatureError):
            return  # not the fleet's: nodes refuse it themselves
        level, target = where
        if self._trust is not None and (
            desired.scope != level or (desired.target or "") != (target if level != "fleet" else "")
        ):
            return  # signed for another topic: moved
        with self._lock:
            known = self._current.get(message.topic)
            if known is not None and known.issued_at > desired.issued_at:
                return  # an older order re-retained: never taken back
            self._current[message.topic] = desired


class Renewer:
    """Keeps the current signed desired states from expiring (thread-safe)."""

    def __init__(
        self,
        session: MqttSession,
        key: Ed25519PrivateKey,
        book: DesiredBook,
        renew_s: float = RENEW_S,
    ) -> None:
        self._session = session
        self._key = key
        self._book = book
        self.renew_s = renew_s
        self.renewed = 0
        """Messages re-issued since start."""

    def renew_due(self, now: float | None = None) -> int:
        """Re-issue every current message issued `renew_s` ago or more; how many."""
        now = time.time() if now is None else now
        due = {
            topic: desired
            for topic, desired in self._book.items().items()
            if now - desired.issued_at >= self.renew_s
            and (desired.expires_at is None or desired.expires_at > now)
            and desired.signature is not None
        }
        for topic, desired in due.items():
            where = _level_of(topic)
            if where is None:
                continue
            level, target = where
            renewed = scoped(desired, level, target, self._key)
            self._book.replace(topic, renewed)
            self._session.publish(desired_topic(level, target), encode(renewed), retain=True)
            self.renewed += 1
            logger.info("renewed %s (%s %s)", topic, desired.name, desired.version)
        return len(due)
