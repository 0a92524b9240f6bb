"""The controller's mirror of retained rollout records and published artifact manifests.

Two controllers may write one record (a take-over while the old one was only cut off): of two
writes, the one with the higher `(epoch, controller)` wins, here and in `Controller`; of one
writer's writes, the later. A late write of a superseded controller, or an echo of an earlier
write, never replaces a newer one.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from common.mqtt.session import MqttSession
from common.signing import SignatureError, SignedMessage, Trust, verify_message
from schemas import topics
from schemas.control import ArtifactManifest, RolloutRecord

logger = logging.getLogger(__name__)


def ownership(record: RolloutRecord) -> tuple[int, str]:
    """Which of two writers of one rollout record wins: the higher epoch, then controller id."""
    return record.epoch, record.controller or ""


def newer(record: RolloutRecord, known: RolloutRecord) -> bool:
    """True when `record` may replace `known`: a winning writer, or the same writer's later
    (or same-moment, as an operator's command) write."""
    if ownership(record) != ownership(known):
        return ownership(record) > ownership(known)
    return record.updated_at >= known.updated_at


def superseded(latest: RolloutRecord, ours: RolloutRecord, controller_id: str) -> bool:
    """True when `latest` shows another controller took over the rollout we wrote as `ours`."""
    if latest.controller in (None, controller_id):
        return False
    return ownership(latest) > (ours.epoch, controller_id)


@dataclass(frozen=True, slots=True)
class Refused:
    """A retained message the book would not take: what it claimed and why it was refused."""

    topic: str
    reason: str
    record: RolloutRecord | None = None


class RolloutBook:
    """Rollout records and artifact manifests as the broker retains them (thread-safe).

    With `trust`, a record or manifest is taken only when a trusted fleet key signed it; the
    others (a fleet login without the key wrote them, or they were altered) are kept apart in
    `refused()`, never acted on."""

    def __init__(self, session: MqttSession, trust: Trust | None = None) -> None:
        self._records: dict[str, RolloutRecord] = {}
        self._artifacts: dict[tuple[str, str], ArtifactManifest] = {}
        self._refused: dict[str, Refused] = {}
        self._sent: dict[str, bytes] = {}
        """Topic -> the record payload this process last published there."""
        self._trust = trust
        self._lock = threading.Lock()
        session.route(topics.ROLLOUTS_FILTER, self._on_record)
        session.route(topics.artifact("+", "+", "manifest"), self._on_artifact)

    def get(self, rollout_id: str) -> RolloutRecord | None:
        """One record."""
        with self._lock:
            return self._records.get(rollout_id)

    def all(self) -> list[RolloutRecord]:
        """Every record, newest first."""
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.created_at, reverse=True)

    def artifact(self, name: str, version: str) -> ArtifactManifest | None:
        """The published manifest of a version, once its retained message has arrived (and,
        with a trust store, only when it verified)."""
        with self._lock:
            return self._artifacts.get((name, version))

    def refused(self, topic: str | None = None) -> list[Refused]:
        """Records and manifests on the broker that are not signed by a trusted key (all, or
        the one on `topic`)."""
        with self._lock:
            if topic is not None:
                return [self._refused[topic]] if topic in self._refused else []
            return list(self._refused.values())

    def put(self, record: RolloutRecord) -> None:
        """Take `record` as the current state of its rollout."""
        with self._lock:
            self._records[record.rollout_id] = record

    def save(
        self, record: RolloutRecord, controller_id: str
    ) -> tuple[RolloutRecord, RolloutRecord | None]:
        """Store our next write of a record, keeping any command an operator set since.

        Returns (what to publish, None), or (record, the newer record) when another controller
        has taken the rollout over; nothing is stored then.
        """
        with self._lock:
            current = self._records.get(record.rollout_id)
            if current is not None and superseded(current, record, controller_id):
                return record, current
            if current is not None and current.command is not None:
                record = record.model_copy(update={"command": current.command})
            self._records[record.rollout_id] = record
            return record, None

    def sent(self, topic: str, payload: bytes) -> None:
        """Note a record this process publishes: its echo from the broker is skipped unparsed
        (a record names every node, and parsing a 10,000-node one takes a quarter second)."""
        with self._lock:
            self._sent[topic] = payload

    def _on_record(self, message: mqtt.MQTTMessage) -> None:
        if not message.payload:
            return
        with self._lock:
            if self._sent.get(message.topic) == message.payload:
                return  # our own write: already held
        try:
            record = RolloutRecord.model_validate_json(message.payload)
        except ValidationError:
            return
        if not self._trusted(message.topic, record, f"rollout record {record.rollout_id}", record):
            return
        with self._lock:
            known = self._records.get(record.rollout_id)
            if known is None or newer(record, known):
                self._records[record.rollout_id] = record

    def _on_artifact(self, message: mqtt.MQTTMessage) -> None:
        try:
            manifest = ArtifactManifest.model_validate_json(message.payload)
        except ValidationError:
            return
        what = f"the artifact manifest of {manifest.name} {manifest.version}"
        if not self._trusted(message.topic, manifest, what):
            return
        with self._lock:
            self._artifacts[(manifest.name, manifest.version)] = manifest

    def _trusted(
        self,
        topic: str,
        message: SignedMessage,
        what: str,
        record: RolloutRecord | None = None,
    ) -> bool:
        """True when no trust store is set or a trusted key signed `message`; else it is kept
        in `refused()` (and logged once per topic)."""
        if self._trust is None:
            return True
        try:
            verify_message(message, self._trust, what)
        except SignatureError as exc:
            with self._lock:
                first = topic not in self._refused
                self._refused[topic] = Refused(topic, str(exc), record)
            if first:
                logger.error("ignored %s on %s: %s", what, topic, exc)
            return False
        with self._lock:
            self._refused.pop(topic, None)
        return True
