"""The backend interface every accelerator implements, and the registry that picks one.

A backend turns a batch of normalised windows (n, 100, 9) into latents (n, 64) and, when the model
has them, motif logits (n, 12). It is opened from a verified bundle, describes itself for status
and telemetry, and is closed explicitly (devices are released in `close`, never in `__del__`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from node.errors import BackendUnavailableError
from node.model.bundle import Bundle

FloatArray = NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class BackendOptions:
    """Backend-independent tuning knobs from the node config."""

    threads: int = 1
    """CPU threads for backends that compute on the CPU (ONNX Runtime intra-op threads)."""


@dataclass(frozen=True, slots=True)
class InferenceOutput:
    """What a backend returns for one batch."""

    latent: FloatArray
    motif_logits: FloatArray | None = None


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """How a loaded backend describes itself in status and telemetry."""

    name: str
    device: str
    max_batch: int | None
    """Largest batch one device call takes (1 for a fixed-batch model); None = unbounded."""
    detail: dict[str, str | int | float] = field(default_factory=dict)


class InferenceBackend(ABC):
    """One loaded model on one device."""

    @abstractmethod
    def infer(self, windows: FloatArray) -> InferenceOutput:
        """Run a batch of normalised windows (n, 100, 9) float32."""

    @abstractmethod
    def describe(self) -> BackendInfo:
        """Name, device and limits, for status and telemetry."""

    @abstractmethod
    def close(self) -> None:
        """Release the device and every resource; idempotent."""


BackendFactory = Callable[[Bundle, BackendOptions], InferenceBackend]


def _open_onnx(bundle: Bundle, options: BackendOptions) -> InferenceBackend:
    from node.inference.onnx_backend import OnnxBackend  # noqa: PLC0415 (keeps import light)

    return OnnxBackend.from_bundle(bundle, options)


BACKENDS: dict[str, BackendFactory] = {"onnx": _open_onnx}
"""Explicit registry: backend name -> factory."""


def open_backend(name: str, bundle: Bundle, options: BackendOptions) -> InferenceBackend:
    """Open the named backend on a bundle; raises BackendUnavailableError for unknown names."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        msg = f"unknown backend {name!r}; available here: {', '.join(sorted(BACKENDS))}"
        raise BackendUnavailableError(msg) from None
    return factory(bundle, options)
