"""Model state shared by simulated nodes: one proven ONNX Runtime session per bundle version,
and bundle fetches in single flight over one cache (each node still checks the sha256).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from common.bundle import Bundle, sha256_hex
from common.errors import EdgeError
from common.mqtt.session import MqttSession
from node.updates.fetch import FetchPolicy, cache_path, fetch_bundle
from runtime.backend import (
    BackendInfo,
    BackendOptions,
    FloatArray,
    InferenceBackend,
    InferenceOutput,
)
from runtime.pipeline import ModelPipeline, load_model
from schemas.control import DesiredModel


class _Borrowed(InferenceBackend):
    """A node's handle on a shared backend: closing it leaves the shared session open."""

    def __init__(self, shared: InferenceBackend) -> None:
        self._shared = shared

    def infer(self, windows: FloatArray) -> InferenceOutput:
        """Run on the shared session."""
        return self._shared.infer(windows)

    def describe(self) -> BackendInfo:
        """The shared backend's description."""
        return self._shared.describe()

    def close(self) -> None:
        """Nothing to release: the fleet closes the shared backend when it stops."""


@dataclass
class _Flight:
    """One fetch under way, and its refusal if it failed."""

    done: threading.Event = field(default_factory=threading.Event)
    error: EdgeError | None = None


class SharedModels:
    """Each bundle fetched in single flight, and opened and golden-checked once per sha256."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._loaded: dict[str, ModelPipeline | EdgeError] = {}
        self._flights: dict[str, _Flight] = {}

    def load(self, bundle: Bundle) -> ModelPipeline:
        """The manager's loader: this node's pipeline on the shared model, or the same refusal."""
        key = sha256_hex(bundle.path.read_bytes()) if bundle.path else str(id(bundle))
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if (entry := self._loaded.get(key)) is None:
                try:
                    entry = load_model(bundle, "onnx", BackendOptions())
                except EdgeError as exc:
                    entry = exc
                self._loaded[key] = entry
        if isinstance(entry, EdgeError):
            raise type(entry)(*entry.args)
        return ModelPipeline(entry.bundle, _Borrowed(entry.backend))

    def fetch(
        self,
        desired: DesiredModel,
        session: MqttSession,
        cache_dir: Path,
        *,
        max_bytes: int,
        timeout_s: float = 120.0,
        policy: FetchPolicy | None = None,
    ) -> Path:
        """`fetch_bundle` in single flight: one node fetches, nodes asking meanwhile wait.

        After a success they find the file in the cache (and check its sha256); after a
        refusal they raise the same one, as each would have found it.
        """
        target = cache_path(cache_dir, desired.name, desired.version, desired.bundle_sha256)
        key = f"{target} {desired.bundle_size} {desired.url}"
        with self._lock:
            leader = (flight := self._flights.get(key)) is None
            flight = flight or self._flights.setdefault(key, _Flight())
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise type(flight.error)(*flight.error.args)
        try:
            return fetch_bundle(
                desired,
                session,
                cache_dir,
                max_bytes=max_bytes,
                timeout_s=timeout_s,
                policy=policy,
            )
        except EdgeError as exc:
            flight.error = exc
            raise
        finally:
            if leader:
                with self._lock:
                    del self._flights[key]
                flight.done.set()

    def close(self) -> None:
        """Close every shared backend."""
        with self._lock:
            for entry in self._loaded.values():
                if isinstance(entry, ModelPipeline):
                    entry.close()
            self._loaded.clear()
