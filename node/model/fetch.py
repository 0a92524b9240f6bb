"""Fetch a desired bundle: from the local cache, a URL, or the retained artifact chunks.

Every path ends in the same checks: the size within the node's limit, the whole file's sha256
equal to what the desired state names (and, for chunks, each chunk's sha256 equal to the
artifact manifest's). Verified bundles are cached on disk by name, version and hash, so a
rollback to a previous version needs no download.
"""

from __future__ import annotations

import logging
import os
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from node.errors import BundleError
from node.model.bundle import sha256_hex
from node.mqtt.session import MqttSession
from schemas import topics
from schemas.messages import ArtifactManifest, DesiredModel

logger = logging.getLogger(__name__)


class FetchError(BundleError):
    """The bundle could not be fetched, or what arrived does not match what was asked for."""


def cache_path(cache_dir: Path, name: str, version: str, sha256: str) -> Path:
    """Where a verified bundle lives in the node's cache."""
    return cache_dir / f"{name}-{version}-{sha256[:12]}.tar"


def add_to_cache(cache_dir: Path, name: str, version: str, data: bytes) -> Path:
    """Keep a verified bundle's bytes in the cache (atomic); returns its path."""
    digest = sha256_hex(data)
    target = cache_path(cache_dir, name, version, digest)
    if target.exists() and sha256_hex(target.read_bytes()) == digest:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)  # absent, or damaged on disk: (re)write it
    partial = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.partial")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def fetch_bundle(
    desired: DesiredModel,
    session: MqttSession,
    cache_dir: Path,
    *,
    max_bytes: int,
    timeout_s: float = 120.0,
) -> Path:
    """A verified local copy of the desired bundle (cache, URL, or artifact chunks)."""
    if desired.bundle_size > max_bytes:
        msg = (
            f"{desired.name} {desired.version} is {desired.bundle_size} bytes, over this node's "
            f"{max_bytes}-byte limit (max_bundle_bytes)"
        )
        raise FetchError(msg)
    target = cache_path(cache_dir, desired.name, desired.version, desired.bundle_sha256)
    if target.exists() and sha256_hex(target.read_bytes()) == desired.bundle_sha256:
        return target
    if desired.url:
        data = _from_url(desired.url, max_bytes)
    else:
        data = _ArtifactCollector(session, desired, max_bytes).collect(timeout_s)
    _check(data, desired)
    return add_to_cache(cache_dir, desired.name, desired.version, data)


def _check(data: bytes, desired: DesiredModel) -> None:
    if len(data) != desired.bundle_size or sha256_hex(data) != desired.bundle_sha256:
        msg = (
            f"{desired.name} {desired.version}: the bundle's sha256/size do not match the "
            "desired state (corrupt transfer or altered artifact)"
        )
        raise FetchError(msg)


def _from_url(url: str, max_bytes: int) -> bytes:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        path = Path(urllib.parse.unquote(parts.path))
        try:
            return path.read_bytes()
        except OSError as exc:
            msg = f"cannot read {url}: {exc.strerror}"
            raise FetchError(msg) from exc
    if parts.scheme not in {"http", "https"}:
        msg = f"unsupported bundle URL {url!r} (file://, http:// or https://)"
        raise FetchError(msg)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 (scheme checked)
            data: bytes = response.read(max_bytes + 1)
    except OSError as exc:
        msg = f"cannot download {url}: {exc}"
        raise FetchError(msg) from exc
    if len(data) > max_bytes:
        msg = f"{url} is larger than this node's {max_bytes}-byte limit"
        raise FetchError(msg)
    return data


class _ArtifactCollector:
    """Gathers the retained manifest and chunks of one published bundle."""

    def __init__(self, session: MqttSession, desired: DesiredModel, max_bytes: int) -> None:
        self._session = session
        self._desired = desired
        self._max_bytes = max_bytes
        self._prefix = topics.artifact(desired.name, desired.version, "")
        self._manifest: ArtifactManifest | None = None
        self._chunks: dict[int, bytes] = {}
        self._error: str | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()

    def collect(self, timeout_s: float) -> bytes:
        topic_filter = self._prefix + "#"
        self._session.route(topic_filter, self._on_message)
        try:
            if not self._done.wait(timeout_s):
                have = len(self._chunks)
                want = len(self._manifest.chunks) if self._manifest else "?"
                msg = (
                    f"{self._desired.name} {self._desired.version} not complete after "
                    f"{timeout_s:.0f} s ({have}/{want} chunks): is it published?"
                )
                raise FetchError(msg)
        finally:
            self._session.unroute(topic_filter)
        if self._error is not None:
            raise FetchError(self._error)
        assert self._manifest is not None
        return b"".join(self._chunks[i] for i in range(len(self._manifest.chunks)))

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        part = message.topic.removeprefix(self._prefix)
        with self._lock:
            if part == "manifest":
                self._take_manifest(bytes(message.payload))
            elif part.startswith("chunks/") and part[7:].isdigit():
                self._take_chunk(int(part[7:]), bytes(message.payload))
            self._finish_if_complete()

    def _take_manifest(self, payload: bytes) -> None:
        try:
            manifest = ArtifactManifest.model_validate_json(payload)
        except ValidationError as exc:
            self._fail(f"invalid artifact manifest: {exc.errors()[0]['msg']}")
            return
        if manifest.bundle_sha256 != self._desired.bundle_sha256:
            self._fail("the published artifact is not the bundle the desired state names")
            return
        if manifest.bundle_size > self._max_bytes:
            self._fail(f"artifact of {manifest.bundle_size} bytes exceeds {self._max_bytes}")
            return
        self._manifest = manifest
        self._chunks = {i: c for i, c in self._chunks.items() if self._chunk_ok(i, c)}

    def _take_chunk(self, index: int, payload: bytes) -> None:
        if self._manifest is None or self._chunk_ok(index, payload):
            self._chunks[index] = payload  # checked again when the manifest arrives
        else:
            self._fail(f"chunk {index} does not match its sha256 in the artifact manifest")

    def _chunk_ok(self, index: int, payload: bytes) -> bool:
        assert self._manifest is not None
        return index < len(self._manifest.chunks) and (
            sha256_hex(payload) == self._manifest.chunks[index]
        )

    def _finish_if_complete(self) -> None:
        if self._manifest is not None and len(self._chunks) >= len(self._manifest.chunks):
            self._done.set()

    def _fail(self, reason: str) -> None:
        self._error = f"{self._desired.name} {self._desired.version}: {reason}"
        self._done.set()
