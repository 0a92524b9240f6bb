"""`imu-fleet nodes forget ID`: clear a retired node's retained state from the broker.

A node that is gone for good leaves retained messages behind: its status (`offline`, so the
node-down alert fires forever), its model state and any node-level desired state. The broker's
ACL lets only the node write its status and model state, so those are cleared by logging in
as the node, with the certificate `imu-fleet pki add site/ node ID` made for it (kept in the
site's `clients/` folder); the desired state is cleared with the operator's fleet login. Nothing
is cleared while the node is online (it would publish its state again, and logging in as it
would take its session over). What was cleared is confirmed by reading the topics back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.mqtt.connection import Connection
from common.mqtt.session import MqttSession
from fleet.pki.login import client_login
from fleet.rollout.controller import Controller
from schemas import topics

CONNECT_TIMEOUT_S = 10.0


@dataclass
class Forgotten:
    """What `forget` did per node."""

    cleared: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    """node id -> why it was left as it is."""


def forget(
    controller: Controller,
    fleet: Connection,
    node_ids: list[str],
    credentials: Path,
    node_broker: str | None = None,
) -> Forgotten:
    """Clear each offline node's retained status, model state and node-level desired state."""
    done = Forgotten()
    for node_id in node_ids:
        view = controller.view.get(node_id)
        if view is None:
            done.refused[node_id] = "no state of it on the broker (check the id: imu-fleet nodes)"
            continue
        if view.online:
            done.refused[node_id] = "online: stop it first (it would publish its state again)"
            continue
        try:
            login = client_login(fleet, f"node-{node_id}", credentials, node_broker)
        except FileNotFoundError as exc:
            done.refused[node_id] = str(exc)
            continue
        session = MqttSession(login.session_settings(f"imu-node-{node_id}"))
        try:
            session.connect(CONNECT_TIMEOUT_S)
        except ConnectionError as exc:
            session.stop()
            done.refused[node_id] = f"cannot log in as the node: {exc}"
            continue
        try:
            for topic in (topics.node_status(node_id), topics.node_model(node_id)):
                session.publish(topic, b"", retain=True)
            session.wait_published(CONNECT_TIMEOUT_S)
        finally:
            session.stop()
        controller.session.publish(topics.node_desired(node_id), b"", retain=True)
        controller.session.wait_published(CONNECT_TIMEOUT_S)
        done.cleared.append(node_id)
    return done
