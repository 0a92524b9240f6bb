"""Publish a bundle as retained chunks under `fleet/artifacts/{name}/{version}/`.

Brokers and managed services cap message sizes (often 128 KB to 1 MB, some 256 KB), so the
bundle travels as retained chunks of `chunk_size` bytes plus a retained `ArtifactManifest` with
the sha256 of every chunk and of the whole file. The manifest goes last: a node that sees it
finds every chunk already retained. A node that reaches an HTTP server instead can take `url`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from common.bundle import parse_bundle, sha256_hex
from common.errors import BundleError
from common.mqtt.connection import Connection
from common.mqtt.session import MqttSession
from common.signing import load_private_key, sign_message
from schemas import topics
from schemas.codec import encode
from schemas.control import ArtifactManifest
from schemas.messages import NodeModelState, NodeState, NodeStatus

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 64 * 1024


def chunk_bundle(data: bytes, chunk_size: int) -> list[bytes]:
    """Consecutive slices of `chunk_size` bytes (the last one shorter)."""
    if chunk_size <= 0:
        msg = "chunk size must be positive"
        raise ValueError(msg)
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]


def artifact_manifest(
    data: bytes, name: str, version: str, chunk_size: int, url: str | None = None
) -> ArtifactManifest:
    """The reassembly manifest for a bundle's bytes."""
    return ArtifactManifest(
        name=name,
        version=version,
        bundle_sha256=sha256_hex(data),
        bundle_size=len(data),
        chunk_size=chunk_size,
        chunks=[sha256_hex(chunk) for chunk in chunk_bundle(data, chunk_size)],
        url=url,
        published_at=time.time(),
    )


def publish_bundle(
    path: Path,
    broker: str | Connection,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    url: str | None = None,
    protocol: str = "5",
    progress: Callable[[int, int], None] | None = None,
    timeout_s: float = 60.0,
    sign_key: Path | None = None,
) -> ArtifactManifest:
    """Verify the bundle, publish its chunks and manifest retained (QoS 1), wait for the acks.

    With `sign_key` the artifact manifest is signed: a controller holding the fleet key signs
    desired states only from a manifest it verified."""
    key = load_private_key(sign_key) if sign_key is not None else None
    data = path.read_bytes()
    bundle = parse_bundle(data, path=path)
    name, version = bundle.manifest.name, bundle.manifest.version
    manifest = artifact_manifest(data, name, version, chunk_size, url)
    signature = bundle.manifest.signature
    manifest = manifest.model_copy(
        update={"bundle_key_id": signature.key_id if signature is not None else None}
    )
    if key is not None:
        manifest = sign_message(manifest, key)
    connection = Connection.of(broker, protocol)
    session = MqttSession(
        connection.session_settings(f"imu-fleet-publish-{time.monotonic_ns() % 10**8}")
    )
    strict = _StrictNodes()
    if signature is None:  # would an online node refuse it? (their retained states say)
        session.route(topics.NODES_MODEL_FILTER, strict.on_model, qos=0)
        session.route(topics.NODES_STATUS_FILTER, strict.on_status, qos=0)
    session.connect(10)
    try:
        if signature is None and strict.settled():
            msg = (
                f"{name} {version} is unsigned and {len(strict.nodes())} online nodes take only "
                f"signed bundles ({', '.join(strict.nodes()[:5])}): sign it first (`imu-fleet "
                "bundle sign "
                f"{path} --key fleet.key`)"
            )
            raise BundleError(msg)
        chunks = chunk_bundle(data, chunk_size)
        for index, chunk in enumerate(chunks):
            if not session.publish(topics.artifact_chunk(name, version, index), chunk, retain=True):
                msg = f"chunk {index} of {name} {version} could not be queued"
                raise BundleError(msg)
            if progress is not None:
                progress(index + 1, len(chunks))
        session.publish(topics.artifact_manifest(name, version), encode(manifest), retain=True)
        if not session.wait_published(timeout_s):
            msg = f"the broker did not acknowledge every chunk within {timeout_s:.0f} s"
            raise BundleError(msg)
        if session.counters.publish_refused:
            msg = (
                f"the broker refused {session.counters.publish_refused} of the {len(chunks) + 1} "
                f"messages of {name} {version} ({session.counters.last_error}): publish with a "
                "fleet identity (docs/security.md)"
            )
            raise BundleError(msg)
    finally:
        session.stop()
    logger.info(
        "published %s %s: %d bytes in %d chunks of %d",
        name,
        version,
        len(data),
        len(manifest.chunks),
        chunk_size,
    )
    return manifest


STRICT_WAIT_S = 0.5
"""How long publish listens for the nodes' retained states before an unsigned bundle."""


class _StrictNodes:
    """Online nodes whose retained model state says they take only signed bundles."""

    def __init__(self) -> None:
        self._strict: set[str] = set()
        self._online: set[str] = set()

    def on_model(self, message: mqtt.MQTTMessage) -> None:
        try:
            state = NodeModelState.model_validate_json(message.payload)
        except ValidationError:
            return
        if state.signatures_required:
            self._strict.add(state.node_id)

    def on_status(self, message: mqtt.MQTTMessage) -> None:
        try:
            status = NodeStatus.model_validate_json(message.payload)
        except ValidationError:
            return
        if status.state is NodeState.ONLINE:
            self._online.add(status.node_id)
        else:
            self._online.discard(status.node_id)

    def nodes(self) -> list[str]:
        return sorted(self._strict & self._online)

    def settled(self) -> bool:
        """After the retained states had time to arrive: True when an online node is strict."""
        time.sleep(STRICT_WAIT_S)
        return bool(self.nodes())
