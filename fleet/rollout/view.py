"""What the fleet looks like from the broker: every node's status, model state and telemetry.

All three node topics are retained or periodic, so a controller that starts (or restarts) learns
the whole fleet from the broker alone; no database.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from pydantic import BaseModel, ValidationError

from common.mqtt.session import Handler, MqttSession
from fleet.rollout.health import Report
from schemas import topics
from schemas.messages import NodeModelState, NodeState, NodeStatus, Telemetry

HISTORY = 64
"""Telemetry messages kept per node: minutes at the default 10 s interval."""
SLACK_S = 0.05
"""Clock slack when placing a report's interval against a moment."""


@dataclass
class NodeView:
    """The latest of each message one node published."""

    node_id: str
    status: NodeStatus | None = None
    model: NodeModelState | None = None
    telemetry: Telemetry | None = None
    seen: float = 0.0
    history: deque[Report] = field(default_factory=lambda: deque(maxlen=HISTORY))
    """What the health gates read of its latest telemetry messages, oldest first."""
    last_offline: float = 0.0
    """When its status last said anything but online (0: never seen so)."""

    @property
    def online(self) -> bool:
        """True while the node's retained status says online."""
        return self.status is not None and self.status.state is NodeState.ONLINE

    @property
    def group(self) -> str | None:
        """The group from the node's birth message."""
        return self.status.group if self.status else None

    @property
    def site(self) -> str | None:
        """The site from the node's status (None: not at a bridged site)."""
        return self.status.site if self.status else None


def behind_down_link(view: NodeView, links: dict[str, bool]) -> bool:
    """True when the node names a site whose bridge reads down: what this broker holds of it is
    stale (a site no link was heard from counts as reachable)."""
    return view.site is not None and links.get(view.site) is False


SETTLE_S = 0.1
"""After a change, how long `wait_changed` lets more arrive before its caller looks again."""


class FleetView:
    """Subscribes to every node's status, model and telemetry and keeps the latest."""

    def __init__(self, session: MqttSession) -> None:
        self._session = session
        self._nodes: dict[str, NodeView] = {}
        self._links: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        for topic_filter, model, attribute in (
            (topics.NODES_STATUS_FILTER, NodeStatus, "status"),
            (topics.NODES_MODEL_FILTER, NodeModelState, "model"),
            (topics.NODES_TELEMETRY_FILTER, Telemetry, "telemetry"),
        ):
            session.route(topic_filter, self._handler(model, attribute))
        session.route(topics.SITE_LINKS_FILTER, self._on_link)

    def _on_link(self, message: mqtt.MQTTMessage) -> None:
        """A site bridge's notification: `1` up, `0` down; empty clears a retired site."""
        site = message.topic.split("/")[2]
        with self._changed:
            if message.payload in (b"1", b"0"):
                self._links[site] = message.payload == b"1"
            elif not message.payload:
                self._links.pop(site, None)
            self._changed.notify_all()

    def _handler(self, model: type[BaseModel], attribute: str) -> Handler:
        def on_message(message: mqtt.MQTTMessage) -> None:
            node_id = topics.node_of(message.topic)
            if node_id is None or not message.payload:
                return
            try:
                value = model.model_validate_json(message.payload)
            except ValidationError:
                return  # not ours to judge: a node of another version, or garbage
            with self._changed:
                view = self._nodes.setdefault(node_id, NodeView(node_id))
                setattr(view, attribute, value)
                view.seen = time.time()
                if isinstance(value, Telemetry):
                    view.history.append(Report.of(value))
                elif isinstance(value, NodeStatus) and value.state is not NodeState.ONLINE:
                    view.last_offline = view.seen
                self._changed.notify_all()

        return on_message

    def nodes(self) -> list[NodeView]:
        """Every node seen, sorted by id."""
        with self._lock:
            return [self._nodes[k] for k in sorted(self._nodes)]

    def links(self) -> dict[str, bool]:
        """Each bridged site's link to this broker: True up, False down."""
        with self._lock:
            return dict(self._links)

    def reachable(self, view: NodeView) -> bool:
        """False when the node is at a site whose bridge reads down: its status is stale."""
        with self._lock:
            return not behind_down_link(view, self._links)

    def get(self, node_id: str) -> NodeView | None:
        """One node's view."""
        with self._lock:
            return self._nodes.get(node_id)

    def soak_reports(self, node_id: str, start: float) -> tuple[Report | None, list[Report]]:
        """A node's reports about the time since `start`: those whose interval (telemetry
        reports on the `interval_s` before its stamp) began at or after it; and the report just
        before the first of them (its counters are where the soak's deltas start)."""
        with self._lock:
            view = self._nodes.get(node_id)
            history = list(view.history) if view else []
        inside = [t for t in history if t.ts - t.interval_s >= start - SLACK_S]
        first = history.index(inside[0]) if inside else len(history)
        return (history[first - 1] if first > 0 else None), inside

    def telemetry_between(self, node_id: str, start: float, end: float) -> list[Report]:
        """A node's kept telemetry stamped in [start, end), oldest first."""
        with self._lock:
            view = self._nodes.get(node_id)
            return [t for t in view.history if start <= t.ts < end] if view else []

    def wait_changed(self, timeout: float) -> None:
        """Block until any node message arrives (or timeout), then let more arrive for
        `SETTLE_S`: a waiting loop looks at most 1/SETTLE_S times a second, however many
        thousands of nodes report."""
        with self._changed:
            if not self._changed.wait(timeout):
                return
        time.sleep(SETTLE_S)
