"""Fetch a desired bundle: from the local cache, a URL, or the retained artifact chunks.

Every path ends in the same checks: the size within the node's limit, the whole file's sha256
equal to what the desired state names (and, for chunks, each chunk's sha256 equal to the
artifact manifest's). Verified bundles are cached on disk by name, version and hash, so a
rollback to a previous version needs no download.

Nothing a source sends can hurt the node (docs/security.md): a source is read in pieces, never
more than the desired state's size (itself within `max_bundle_bytes`) plus one byte, with
connect/read timeouts and an overall deadline. `file://` is off unless `file_url_root` names a
folder, and then reads only regular files inside it. Artifact chunks are taken only after their
manifest (subscribed to first) names their sha256; anything else on the artifact topics is
dropped and counted, never held.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from common.bundle import sha256_hex
from common.errors import BundleError
from common.mqtt.session import MqttSession
from schemas import topics
from schemas.control import ArtifactManifest, DesiredModel
from schemas.manifest import SEMVER
from schemas.topics import is_valid_id

logger = logging.getLogger(__name__)


class FetchError(BundleError):
    """The bundle could not be fetched, or what arrived does not match what was asked for."""


READ_PIECE = 1 << 16


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    """Where a node may fetch bundles from, and how long it waits."""

    file_root: Path | None = None
    """`file://` sources must be regular files under this folder; None turns file:// off."""
    connect_timeout_s: float = 10.0
    """http(s): connecting, and each read (a server that stops sending)."""
    total_timeout_s: float = 300.0
    """http(s) and file: the whole transfer (a server that trickles forever)."""


def cache_path(cache_dir: Path, name: str, version: str, sha256: str) -> Path:
    """Where a verified bundle lives in the node's cache (names that could leave it: refused)."""
    if not is_valid_id(name) or not SEMVER.match(version) or name in {".", ".."}:
        msg = f"bundle name {name!r} / version {version!r} is not a valid name and semver"
        raise FetchError(msg)
    return cache_dir / f"{name}-{version}-{sha256[:12]}.tar"


def redact(url: str) -> str:
    """`url` without credentials or query (it goes to logs and the errors topic)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


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
    policy: FetchPolicy | None = None,
) -> Path:
    """A verified local copy of the desired bundle (cache, URL, or artifact chunks)."""
    policy = policy or FetchPolicy()
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
        data = _from_url(desired.url, desired.bundle_size, policy)
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


def _from_url(url: str, size: int, policy: FetchPolicy) -> bytes:
    """The bytes at `url`, refused past `size` bytes or the policy's limits."""
    parts = urllib.parse.urlsplit(url)
    shown = redact(url)
    if parts.scheme == "file":
        with _open_file(shown, Path(urllib.parse.unquote(parts.path)), policy) as handle:
            return _read_bounded(handle, shown, size, policy.total_timeout_s)
    if parts.scheme not in {"http", "https"}:
        msg = f"unsupported bundle URL {shown!r} (http://, https://, or file:// where allowed)"
        raise FetchError(msg)
    try:
        response = urllib.request.urlopen(url, timeout=policy.connect_timeout_s)  # noqa: S310
    except OSError as exc:
        msg = f"cannot download {shown}: {type(exc).__name__}"
        raise FetchError(msg) from exc
    with response:
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > size:
            msg = f"{shown} announces {declared} bytes; the desired state names {size}"
            raise FetchError(msg)
        return _read_bounded(response, shown, size, policy.total_timeout_s)


def _open_file(url: str, path: Path, policy: FetchPolicy) -> BinaryIO:
    if policy.file_root is None:
        msg = (
            f"file:// sources are off on this node ({url}); set file_url_root to a folder to "
            "allow bundles from it"
        )
        raise FetchError(msg)
    root = policy.file_root.resolve()
    real = path.resolve()
    if not real.is_relative_to(root):
        msg = f"{url} is outside this node's file_url_root {root}"
        raise FetchError(msg)
    try:  # O_NONBLOCK: a FIFO or a device cannot hold the open; then only regular files pass
        descriptor = os.open(real, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        msg = f"cannot read {url}: {exc.strerror}"
        raise FetchError(msg) from exc
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        msg = f"{url} is not a regular file"
        raise FetchError(msg)
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")


def _read_bounded(source: BinaryIO, url: str, size: int, total_timeout_s: float) -> bytes:
    """Read `size` bytes in pieces; refuse one byte more, or a transfer past the deadline."""
    deadline = time.monotonic() + total_timeout_s
    pieces: list[bytes] = []
    received = 0
    digest = hashlib.sha256()
    read = getattr(source, "read1", source.read)  # what has arrived: a trickle cannot stall us
    while True:
        try:
            piece = read(min(READ_PIECE, size + 1 - received))
        except OSError as exc:  # includes socket timeouts between pieces
            msg = f"reading {url} failed after {received} bytes: {exc}"
            raise FetchError(msg) from exc
        if not piece:
            break
        received += len(piece)
        if received > size:
            msg = f"{url} sends more than the {size} bytes the desired state names"
            raise FetchError(msg)
        digest.update(piece)
        pieces.append(piece)
        if time.monotonic() > deadline:
            msg = f"{url} did not finish within {total_timeout_s:.0f} s ({received} bytes)"
            raise FetchError(msg)
    logger.debug("read %d bytes from %s (sha256 %s)", received, url, digest.hexdigest()[:12])
    return b"".join(pieces)


class _ArtifactCollector:
    """Gathers the retained manifest, then the chunks it names, of one published bundle.

    The chunk topics are subscribed to only once a manifest naming the desired bundle is in, so
    nothing published on them is held unchecked: a chunk whose index or sha256 the manifest
    does not name is dropped and counted (a flood costs CPU, never memory), and memory is
    bounded by the manifest's size, which must equal the desired state's."""

    def __init__(self, session: MqttSession, desired: DesiredModel, max_bytes: int) -> None:
        self._session = session
        self._desired = desired
        self._max_bytes = max_bytes
        self._prefix = topics.artifact(desired.name, desired.version, "")
        self._manifest: ArtifactManifest | None = None
        self._chunks: dict[int, bytes] = {}
        self.dropped = 0
        """Messages on the chunk topics that were not a chunk the manifest names."""
        self._error: str | None = None
        self._have_manifest = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()

    def collect(self, timeout_s: float) -> bytes:
        deadline = time.monotonic() + timeout_s
        manifest_topic = self._prefix + "manifest"
        self._session.route(manifest_topic, self._on_manifest)
        try:
            if not self._have_manifest.wait(timeout_s):
                msg = (
                    f"{self._desired.name} {self._desired.version}: no artifact manifest after "
                    f"{timeout_s:.0f} s: is it published (imu-fleet publish)?"
                )
                raise FetchError(msg)
            if self._error is None:
                self._collect_chunks(deadline - time.monotonic())
        finally:
            self._session.unroute(manifest_topic)
        if self._error is not None:
            raise FetchError(self._error)
        assert self._manifest is not None
        if self.dropped:
            logger.warning("%d messages on the artifact chunk topics were dropped", self.dropped)
        return b"".join(self._chunks[i] for i in range(len(self._manifest.chunks)))

    def _collect_chunks(self, remaining_s: float) -> None:
        chunk_filter = self._prefix + "chunks/#"
        self._session.route(chunk_filter, self._on_chunk)
        try:
            self._finish_if_complete()
            if not self._done.wait(max(remaining_s, 0.0)):
                assert self._manifest is not None
                msg = (
                    f"{self._desired.name} {self._desired.version} not complete "
                    f"({len(self._chunks)}/{len(self._manifest.chunks)} chunks, {self.dropped} "
                    "dropped as not matching the manifest): is it published?"
                )
                raise FetchError(msg)
        finally:
            self._session.unroute(chunk_filter)

    def _on_manifest(self, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            if self._manifest is not None:
                return
            try:
                manifest = ArtifactManifest.model_validate_json(message.payload)
            except ValidationError as exc:
                self._fail(f"invalid artifact manifest: {exc.errors()[0]['msg']}")
                return
            if (manifest.bundle_sha256, manifest.bundle_size) != (
                self._desired.bundle_sha256,
                self._desired.bundle_size,
            ):
                self._fail("the published artifact is not the bundle the desired state names")
                return
            if manifest.bundle_size > self._max_bytes:
                self._fail(f"artifact of {manifest.bundle_size} bytes exceeds {self._max_bytes}")
                return
            needed = -(-manifest.bundle_size // manifest.chunk_size)  # chunks of chunk_size
            if len(manifest.chunks) != max(needed, 1):
                self._fail(
                    f"the artifact manifest lists {len(manifest.chunks)} chunks; "
                    f"{manifest.bundle_size} bytes in chunks of {manifest.chunk_size} need {needed}"
                )
                return
            self._manifest = manifest
            self._have_manifest.set()

    def _on_chunk(self, message: mqtt.MQTTMessage) -> None:
        part = message.topic.removeprefix(self._prefix + "chunks/")
        payload = bytes(message.payload)
        with self._lock:
            manifest = self._manifest
            if (
                manifest is None
                or not part.isdigit()
                or int(part) >= len(manifest.chunks)
                or int(part) in self._chunks
                or len(payload) > manifest.chunk_size  # memory: never past the bundle's size
                or sha256_hex(payload) != manifest.chunks[int(part)]
            ):
                self.dropped += 1
                return
            self._chunks[int(part)] = payload
            self._finish_if_complete()

    def _finish_if_complete(self) -> None:
        if self._manifest is not None and len(self._chunks) >= len(self._manifest.chunks):
            self._done.set()

    def _fail(self, reason: str) -> None:
        self._error = f"{self._desired.name} {self._desired.version}: {reason}"
        self._have_manifest.set()
        self._done.set()
