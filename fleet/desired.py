"""Desired-state messages: build them from a bundle, sign them, publish or clear them."""

from __future__ import annotations

import time
from pathlib import Path

from node.model.bundle import parse_bundle, sha256_hex
from node.model.signing import load_private_key, sign_desired
from node.mqtt.session import MqttSession
from schemas import topics
from schemas.codec import encode
from schemas.messages import DesiredModel


def desired_for(
    bundle_path: Path,
    *,
    url: str | None = None,
    rollback: bool = False,
    rollout_id: str | None = None,
    sign_key: Path | None = None,
) -> DesiredModel:
    """A desired state naming the bundle at `bundle_path` (verified first)."""
    data = bundle_path.read_bytes()
    manifest = parse_bundle(data, path=bundle_path).manifest
    desired = DesiredModel(
        name=manifest.name,
        version=manifest.version,
        bundle_sha256=sha256_hex(data),
        bundle_size=len(data),
        url=url,
        rollback=rollback,
        rollout_id=rollout_id,
        issued_at=time.time(),
    )
    return sign_desired(desired, load_private_key(sign_key)) if sign_key else desired


def desired_topic(level: str, target: str = "") -> str:
    """`fleet` (fleet-wide), `group` (target = group name) or `node` (target = node id)."""
    if level == "fleet":
        return topics.FLEET_DESIRED
    if level == "group":
        return topics.group_desired(target)
    if level == "node":
        return topics.node_desired(target)
    msg = f"desired-state level must be fleet, group or node, not {level!r}"
    raise ValueError(msg)


def publish_desired(
    session: MqttSession, desired: DesiredModel | None, level: str, target: str = ""
) -> bool:
    """Set (retained) or clear (empty retained) the desired state at one level."""
    payload = encode(desired) if desired is not None else b""
    return session.publish(desired_topic(level, target), payload, retain=True)
