"""The node's presence on the broker: its retained status, and one node id in one process only.

The status topic (`fleet/nodes/{id}/status`, retained) carries the birth (`online`, on every
connection), the will (`offline`: a crash or a lost link), `stopping` (a share group member
handing its windows on) and `stopped` (a clean exit). Two processes with one node id share one
client id, so the broker keeps the session of the one that connected last; `Presence` watches
the status topic for the other, reports `duplicate_node_id`, and the older one gives way.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from common.mqtt.session import MqttSession
from common.version import software_version
from node.config import NodeConfig
from node.reporting import ErrorReporter
from runtime.pipeline import ModelPipeline
from schemas import topics
from schemas.codec import encode
from schemas.messages import ErrorKind, NodeState, NodeStatus

logger = logging.getLogger(__name__)

NODE_SESSION_EXPIRY_S = 300
"""The broker keeps a node's session, and the windows queued for it, through 5-minute outages."""
SHARE_LEAVE_S = 5.0
"""Share group, clean stop: how long to wait for the `stopping` status to come back (until then
the windows cut are this node's to serve)."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who this process is, as its status says it."""

    node_id: str
    instance: str
    """A per-process id (12 hex), told apart from earlier and later runs of the same node."""
    started_at: float
    config_digest: str
    group: str | None
    share_group: str | None
    hop: int
    site: str | None = None

    @classmethod
    def of(cls, config: NodeConfig, node_id: str, instance: str, started_at: float) -> Identity:
        """This process's identity under `config`."""
        return cls(
            node_id=node_id,
            instance=instance,
            started_at=started_at,
            config_digest=config.digest(),
            group=config.group,
            share_group=config.share_group,
            hop=config.hop,
            site=config.site,
        )


def status_message(
    me: Identity,
    state: NodeState,
    pipeline: ModelPipeline,
    backend_reason: str,
    reason: str | None = None,
) -> bytes:
    """The encoded status of this process in `state`, serving `pipeline`."""
    return encode(
        NodeStatus(
            state=state,
            node_id=me.node_id,
            instance=me.instance,
            ts=time.time(),
            started_at=me.started_at,
            software_version=software_version(),
            backend=pipeline.info.name,
            backend_reason=backend_reason,
            device=pipeline.info.detail if pipeline.info.name != "onnx" else None,
            model=pipeline.ref,
            config_digest=me.config_digest,
            group=me.group,
            site=me.site,
            share_group=me.share_group,
            hop=me.hop,
            host=socket.gethostname(),
            reason=reason,
        )
    )


def client_id_for(node_id: str) -> str:
    """The MQTT client id of a node: stable, so a restarted node resumes its session."""
    return f"imu-node-{node_id}"


def node_session(
    config: NodeConfig,
    me: Identity,
    pipeline: ModelPipeline,
    backend_reason: str,
    on_connected: Callable[[], None],
) -> MqttSession:
    """The node's MQTT session: its stable client id, manual acknowledgements, a session the
    broker keeps through outages, and a retained `offline` will."""
    will = status_message(me, NodeState.OFFLINE, pipeline, backend_reason, "connection lost (will)")
    return MqttSession(
        config.connection().session_settings(
            client_id=client_id_for(me.node_id),
            manual_ack=True,
            keepalive_s=config.keepalive_s,
            will=(topics.node_status(me.node_id), will),
            max_pending_publishes=config.max_pending_publishes,
            session_expiry_s=NODE_SESSION_EXPIRY_S,
        ),
        on_connected=on_connected,
    )


def _started_later(status: NodeStatus, started_at: float, instance: str) -> bool:
    """True when the process behind `status` started after this one (ties: by instance id)."""
    theirs = status.started_at if status.started_at is not None else status.ts
    return (theirs, status.instance) > (started_at, instance)


class Presence:
    """Builds and publishes the node's status; detects a second process with this node id."""

    def __init__(
        self,
        identity: Identity,
        session: MqttSession,
        reporter: ErrorReporter,
        *,
        pipeline: Callable[[], ModelPipeline],
        on_taken_over: Callable[[str], None],
        backend_reason: str = "requested",
    ) -> None:
        self.identity = identity
        self.backend_reason = backend_reason
        """Why this backend serves (requested, auto's choice, a fallback); status says it."""
        self._session = session
        self._reporter = reporter
        self._pipeline = pipeline
        self._on_taken_over = on_taken_over
        self._conflicts: set[str] = set()
        self._birth_seen = False
        session.on_taken_over(self.taken_over)

    def status(
        self, state: NodeState, pipeline: ModelPipeline | None = None, reason: str | None = None
    ) -> bytes:
        """The encoded status message for `state` (the serving model unless one is given)."""
        return status_message(
            self.identity, state, pipeline or self._pipeline(), self.backend_reason, reason
        )

    def publish(self, state: NodeState, reason: str | None = None) -> None:
        """Publish a retained status (birth, stopping, stopped)."""
        self._session.publish(
            topics.node_status(self.identity.node_id),
            self.status(state, reason=reason),
            retain=True,
        )

    def on_status(self, payload: bytes, topic: str) -> None:
        """A retained status on our own topic: ours, an earlier run's, or another live process.

        Both processes use the node's one client id, so the broker gives the session to the one
        that connected last and disconnects the other (which then stops: `taken_over`). The
        newcomer finds the other's retained `online` birth (a crash or a clean stop leaves
        `offline` or `stopped`) and reports it; a birth from another process after ours (one
        that took our session while we still run) is reported too."""
        me = self.identity
        try:
            status = NodeStatus.model_validate_json(payload)
        except ValidationError:
            return
        if status.instance == me.instance:
            self._birth_seen = True
            return
        if status.state is not NodeState.ONLINE or status.instance in self._conflicts:
            return  # a previous run that crashed (offline) or stopped, or known already
        if self._birth_seen and _started_later(status, me.started_at, me.instance):
            self._give_way(status)
            return
        self._conflicts.add(status.instance)
        when = "is online" if self._birth_seen else "was online when this process connected"
        reason = (
            f"another process (instance {status.instance} on host {status.host}) {when} as "
            f"node {me.node_id}; the broker keeps one session per node id, so the process that "
            "connected last serves and the other stops (exit status 76). Give each node its own "
            "node_id"
        )
        logger.error("duplicate node id: %s", reason)
        self._reporter.report(ErrorKind.DUPLICATE_NODE_ID, reason, topic=topic)
        self.publish(NodeState.ONLINE)  # once, so the other process learns about us as well

    def on_message(self, message: mqtt.MQTTMessage) -> None:
        """A message on our own status topic (network thread)."""
        self.on_status(bytes(message.payload), message.topic)

    def on_group_status(
        self, member_status: Callable[[str, bytes], None], message: mqtt.MQTTMessage
    ) -> None:
        """Share groups: every node's retained status goes to `member_status`; ours also here."""
        node_id = topics.node_of(message.topic)
        if node_id is None:
            return
        if node_id == self.identity.node_id:
            self.on_message(message)
        member_status(node_id, bytes(message.payload))

    def leave(
        self, reason: str, left: Callable[[], bool], timeout_s: float = SHARE_LEAVE_S
    ) -> None:
        """Share groups: say `stopping` and wait until `left()` (the status came back, so every
        member cut the same windows before it), the link is lost, or `timeout_s` passed."""
        self.publish(NodeState.STOPPING, reason)
        deadline = time.monotonic() + timeout_s
        while not left() and time.monotonic() < deadline:
            if not self._session.is_connected:
                break  # the will tells the group
            time.sleep(0.02)

    def taken_over(self, reason: str) -> None:
        """Another process connected with this node's client id: the same node id twice."""
        message = (
            f"node {self.identity.node_id}: {reason}. Another process runs with this node id "
            "(the other one keeps serving); give each node its own node_id"
        )
        logger.error("%s", message)
        self._on_taken_over(message)

    def _give_way(self, newer: NodeStatus) -> None:
        """A process started after this one serves as this node: stop, do not take turns."""
        me = self.identity
        reason = (
            f"a process started later (instance {newer.instance} on host {newer.host}) serves as "
            f"node {me.node_id}: this one ({me.instance}) stops"
        )
        self._session.give_up(reason)  # first: a clean DISCONNECT before the process may exit
        self.taken_over(reason)
