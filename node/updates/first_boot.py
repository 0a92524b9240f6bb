"""First boot from the fleet: a node with no model of its own waits for one.

A node started without `model` (and with no bundle it served before) connects as itself,
says it waits (a retained `online` status without a model, and a retained model state
`waiting` that names the topics it follows), and follows the desired-state topics with the
same guard as a serving node (signature, scope, freshness). The first order it takes names a
bundle: fetched, verified (its signature before its files), and the node then starts serving
it. A refused order or bundle is reported (errors topic, `failed` with the reason) and the node
goes on waiting.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt

from common.bundle import read_bundle
from common.errors import EdgeError
from common.mqtt.session import MqttSession
from common.signing import load_trust
from common.version import software_version
from node.config import NodeConfig, default_state_dir
from node.metrics import NodeMetrics
from node.presence import NODE_SESSION_EXPIRY_S, client_id_for
from node.reporting import ErrorReporter
from node.updates.desired_guard import (
    LEVELS,
    DesiredGuard,
    DesiredRefusedError,
    Scope,
    parse_desired,
)
from node.updates.fetch import FetchPolicy, fetch_bundle
from node.updates.last_served import remember_active
from schemas import topics
from schemas.codec import encode
from schemas.control import DesiredModel
from schemas.messages import (
    ErrorKind,
    ModelLifecycle,
    NodeModelState,
    NodeState,
    NodeStatus,
)

logger = logging.getLogger(__name__)


class FirstBoot:
    """Waits for the node's first model; `wait()` returns the verified bundle's path."""

    def __init__(
        self, config: NodeConfig, node_id: str, stopping: threading.Event | None = None
    ) -> None:
        self.config = config
        self.node_id = node_id
        trust = load_trust(config.trust_key) if config.trust_key is not None else None
        self._trust = trust
        state_dir = config.state_dir or default_state_dir(node_id)
        self._state_dir = state_dir
        self._guard = DesiredGuard(
            trust, state_dir / "desired-history.json", fresh_s=config.desired_fresh_s
        )
        self._desired: dict[str, DesiredModel | None] = dict.fromkeys(LEVELS)
        self._changed = threading.Event()
        self._lock = threading.Lock()
        self.stopping = stopping or threading.Event()
        """Set it (SIGTERM) to stop waiting."""
        self._instance = uuid.uuid4().hex[:12]
        self._started = time.time()
        will = (topics.node_status(node_id), self._status(NodeState.OFFLINE, "connection lost"))
        self.session = MqttSession(
            config.connection().session_settings(
                client_id=client_id_for(node_id),
                keepalive_s=config.keepalive_s,
                will=will,
                session_expiry_s=NODE_SESSION_EXPIRY_S,
            ),
            on_connected=self._announce,
        )
        self._reporter = ErrorReporter(node_id, self.session.publish, NodeMetrics())
        """The errors topic, rate-limited as a serving node's (an insider may flood the
        desired topics)."""
        for level in LEVELS:
            scope = Scope.of(level, config.group, node_id)
            self.session.route(scope.topic, self._handler(scope))

    def wait(self) -> Path | None:
        """The first model's verified bundle (cached); None when stopped before one came."""
        self.session.start()
        try:
            while not self.stopping.is_set():
                self._changed.wait(1.0)
                self._changed.clear()
                desired = self._effective()
                if desired is None:
                    continue
                path = self._fetch(desired)
                if path is not None:
                    remember_active(self._state_dir, path)
                    # hand over: the serving node announces itself next, on its own session
                    topic = topics.node_status(self.node_id)
                    stopped = self._status(NodeState.STOPPED, "first model fetched: serving next")
                    self.session.publish(topic, stopped, retain=True)
                    return path
            return None
        finally:
            self.session.wait_published(5)
            self.session.stop()

    def _fetch(self, desired: DesiredModel) -> Path | None:
        self._report_model(ModelLifecycle.DOWNLOADING, desired)
        try:
            path = fetch_bundle(
                desired,
                self.session,
                self.config.cache_dir,
                max_bytes=self.config.max_bundle_bytes,
                timeout_s=self.config.fetch_timeout_s,
                policy=FetchPolicy(
                    file_root=self.config.file_url_root,
                    total_timeout_s=self.config.fetch_timeout_s,
                ),
            )
            bundle = read_bundle(path, max_bytes=self.config.max_bundle_bytes, trust=self._trust)
        except EdgeError as exc:
            self._refused(desired, str(exc))
            return None
        if (bundle.ref.name, bundle.ref.version) != (desired.name, desired.version):
            self._refused(desired, f"the bundle is {bundle.ref.name} {bundle.ref.version}")
            return None
        logger.info("first model: %s %s (%s)", desired.name, desired.version, path)
        return path

    def _refused(self, desired: DesiredModel, reason: str) -> None:
        logger.error("first model %s %s refused: %s", desired.name, desired.version, reason)
        self._report_model(ModelLifecycle.FAILED, desired, reason)
        self._reporter.report(
            ErrorKind.MODEL, f"{desired.name} {desired.version} refused: {reason}"
        )
        with self._lock:  # wait for another order, not this one again
            for level, known in self._desired.items():
                if known == desired:
                    self._desired[level] = None

    def _handler(self, scope: Scope) -> Callable[[mqtt.MQTTMessage], None]:
        def on_desired(message: mqtt.MQTTMessage) -> None:
            self._on_desired(scope, message)

        return on_desired

    def _on_desired(self, scope: Scope, message: mqtt.MQTTMessage) -> None:
        try:
            desired = parse_desired(message.payload)
            admitted = self._guard.admit(scope, desired, bytes(message.payload))
        except ValueError as exc:
            self._reporter.report(ErrorKind.INVALID, str(exc), topic=scope.topic)
            return
        except DesiredRefusedError as exc:
            self._reporter.report(ErrorKind.DESIRED_REFUSED, str(exc), topic=scope.topic)
            return
        with self._lock:
            self._desired[scope.level] = admitted
        self._changed.set()

    def _effective(self) -> DesiredModel | None:
        with self._lock:
            return next((d for level in LEVELS if (d := self._desired[level]) is not None), None)

    def _announce(self) -> None:
        topic = topics.node_status(self.node_id)
        self.session.publish(topic, self._status(NodeState.ONLINE, WAITING), retain=True)
        self._report_model(ModelLifecycle.WAITING, None)

    def _status(self, state: NodeState, reason: str) -> bytes:
        return encode(
            NodeStatus(
                state=state,
                node_id=self.node_id,
                instance=self._instance,
                ts=time.time(),
                started_at=self._started,
                software_version=software_version(),
                group=self.config.group,
                site=self.config.site,
                host=socket.gethostname(),
                reason=reason,
            )
        )

    def _report_model(
        self, state: ModelLifecycle, target: DesiredModel | None, error: str | None = None
    ) -> None:
        waiting = (
            f"no model yet: waiting for a desired state on {topics.node_desired(self.node_id)}, "
            f"{topics.group_desired(self.config.group)} or {topics.FLEET_DESIRED}"
            + (" signed by the fleet key" if self._trust is not None else "")
        )
        model = NodeModelState(
            node_id=self.node_id,
            ts=time.time(),
            state=state,
            active=None,
            target=target.ref if target is not None else None,
            last_error=error or (waiting if state is ModelLifecycle.WAITING else None),
            signatures_required=self._trust is not None,
        )
        self.session.publish(topics.node_model(self.node_id), encode(model), retain=True)


WAITING = "waiting for its first model from the fleet"
