"""Desired-state messages: build them from a bundle, sign them, publish or clear them."""

from __future__ import annotations

import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.bundle import parse_bundle, sha256_hex
from common.mqtt.session import MqttSession
from common.signing import load_private_key, sign_desired
from schemas import topics
from schemas.codec import encode
from schemas.control import DesiredModel

DESIRED_TTL_S = 3600.0
"""A signed desired state expires an hour after it is issued unless renewed."""


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


def scoped(
    desired: DesiredModel,
    level: str,
    target: str = "",
    key: Ed25519PrivateKey | None = None,
    *,
    expires_in_s: float | None = None,
) -> DesiredModel:
    """`desired` issued now for one topic: scope and target set, signed when a key is given.

    Nodes refuse a signed message on any other topic, and one older than what they already
    followed on this topic (docs/security.md), so every publication is issued afresh. A signed
    one expires after `expires_in_s` (`DESIRED_TTL_S` unless given): the controller service
    renews the current ones (fleet/rollout/renewal.py), and a node whose order expired without
    a renewal reports a stale control plane."""
    desired_topic(level, target)  # validates the level
    if key is not None and expires_in_s is None:
        expires_in_s = DESIRED_TTL_S
    now = time.time()
    body = desired.model_copy(
        update={
            "scope": level,
            "target": target or None if level != "fleet" else None,
            "issued_at": now,
            "expires_at": now + expires_in_s if expires_in_s else None,
            "signature": None,
            "key_id": None,
        }
    )
    return sign_desired(body, key) if key is not None else body


def cleared() -> DesiredModel:
    """A clear, to issue (`scoped`) for the topic it clears: nodes with a trust key take only
    signed clears, never an empty retained message."""
    return DesiredModel(
        name="cleared",
        version="0.0.0",
        bundle_sha256="0" * 64,
        bundle_size=0,
        cleared=True,
        issued_at=time.time(),
    )


def clear_payload(level: str, target: str = "", key: Ed25519PrivateKey | None = None) -> bytes:
    """What clears one level: a signed clear with a key, else an empty retained message."""
    return encode(scoped(cleared(), level, target, key)) if key is not None else b""


def publish_desired(
    session: MqttSession,
    desired: DesiredModel | None,
    level: str,
    target: str = "",
    key: Ed25519PrivateKey | None = None,
) -> bool:
    """Set (retained, issued now for this topic) or clear one level (a signed clear with a key,
    else an empty retained message)."""
    if desired is None:
        payload = clear_payload(level, target, key)
    else:
        payload = encode(scoped(desired, level, target, key))
    return session.publish(desired_topic(level, target), payload, retain=True)
