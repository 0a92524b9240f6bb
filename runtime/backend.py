"""The backend interface every accelerator implements, and what each declares for the registry.

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
Probe = Callable[[Bundle], tuple[bool, str]]
"""Can this backend run `bundle` on this machine, and why (or why not), in a few words."""


@dataclass(frozen=True, slots=True)
class BackendKind:
    """What a backend declares of itself for the registry (runtime/registry.py)."""

    name: str
    open: BackendFactory
    """Load a verified bundle's model on this backend."""
    probe: Probe
    """Whether it can run a bundle here; `auto` takes the first kind whose probe says yes."""
    shares_session: bool
    """True when one loaded model takes calls from several threads at once (the node's
    workers then share it); False for a device that keeps its own jobs in flight."""
    options: tuple[str, ...]
    """The `BackendOptions` fields this backend reads."""
