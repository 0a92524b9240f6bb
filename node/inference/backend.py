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

from common.bundle import Bundle
from node.errors import BackendUnavailableError

FloatArray = NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class BackendOptions:
    """Backend-independent tuning knobs from the node config."""

    threads: int = 1
    """CPU threads for backends that compute on the CPU (ONNX Runtime intra-op threads)."""
    timeout_ms: int = 1000
    """Accelerators: how long one device call may take before it counts as failed."""
    max_jobs: int = 4
    """Accelerators: asynchronous jobs in flight at once."""
    frames_per_job: int = 8
    """Accelerators: frames submitted per asynchronous job."""
    batch_size: int = 0
    """Accelerators: device batch (HailoRT burst size); 0 lets the runtime choose."""


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
    quantized: bool = False
    """True when outputs only approximate the float model (judged by cosine, not abs error)."""
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

    def abort(self) -> None:  # noqa: B027 (optional: not every backend can abort a call)
        """Make an `infer` call stuck in another thread return with an error, where the backend
        can (the watchdog calls this); the default cannot, and the watchdog then escalates."""

    def temperature(self) -> float | None:
        """Accelerator temperature in Celsius, where the device has a sensor."""
        return None


BackendFactory = Callable[[Bundle, BackendOptions], InferenceBackend]


def _open_onnx(bundle: Bundle, options: BackendOptions) -> InferenceBackend:
    from node.inference.onnx_backend import OnnxBackend  # noqa: PLC0415 (keeps import light)

    return OnnxBackend.from_bundle(bundle, options)


def _open_hailo(bundle: Bundle, options: BackendOptions) -> InferenceBackend:
    from node.inference.hailo_backend import HailoBackend  # noqa: PLC0415 (optional SDK)

    return HailoBackend(bundle, options)


BACKENDS: dict[str, BackendFactory] = {"onnx": _open_onnx, "hailo": _open_hailo}
"""Explicit registry: backend name -> factory."""


@dataclass(frozen=True, slots=True)
class BackendChoice:
    """Which backend to open and why (status and telemetry say it)."""

    name: str
    reason: str


def choose_backend(requested: str, bundle: Bundle) -> BackendChoice:
    """Resolve `auto`: Hailo when the bundle has a HEF, HailoRT imports and a device is present."""
    if requested != "auto":
        return BackendChoice(requested, "requested")
    if bundle.hef is None:
        return BackendChoice("onnx", "auto: the bundle has no HEF")
    from node.inference.hailo_backend import find_devices, import_hailo  # noqa: PLC0415

    try:
        import_hailo()
    except BackendUnavailableError:
        return BackendChoice("onnx", "auto: hailo_platform is not installed")
    devices = find_devices()
    if not devices:
        return BackendChoice("onnx", "auto: no Hailo device found")
    return BackendChoice("hailo", f"auto: Hailo device {devices[0]}")


def open_backend(name: str, bundle: Bundle, options: BackendOptions) -> InferenceBackend:
    """Open the named backend on a bundle; raises BackendUnavailableError for unknown names."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        msg = f"unknown backend {name!r}; available here: {', '.join(sorted(BACKENDS))}"
        raise BackendUnavailableError(msg) from None
    return factory(bundle, options)
