"""The explicit registry of inference backends, and `auto`: which one runs a bundle here.

Each backend module declares a `BackendKind` (its name, a probe saying whether it can run a
bundle on this machine, whether threads may share one loaded model, the options it reads); this
module lists them in the order `auto` prefers them. A plain dict, no discovery by subclassing.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.bundle import Bundle
from runtime import hailo_backend, onnx_backend
from runtime.backend import BackendKind, BackendOptions, InferenceBackend
from runtime.errors import BackendUnavailableError

BACKENDS: dict[str, BackendKind] = {
    kind.name: kind for kind in (hailo_backend.KIND, onnx_backend.KIND)
}
"""Backend name -> its declaration, in the order `auto` tries them (accelerators first)."""


@dataclass(frozen=True, slots=True)
class BackendChoice:
    """Which backend to open and why (status and telemetry say it)."""

    name: str
    reason: str


def choose_backend(requested: str, bundle: Bundle) -> BackendChoice:
    """Resolve `auto`: the first registered backend whose probe can run the bundle here; the
    reason names what ruled out the ones before it (e.g. "auto: the bundle has no HEF")."""
    if requested != "auto":
        return BackendChoice(requested, "requested")
    ruled_out: list[str] = []
    for kind in BACKENDS.values():
        usable, why = kind.probe(bundle)
        if usable:
            return BackendChoice(kind.name, f"auto: {'; '.join(ruled_out) or why}")
        ruled_out.append(why)
    msg = f"no backend can run this bundle here: {'; '.join(ruled_out)}"
    raise BackendUnavailableError(msg)


def backend_kind(name: str) -> BackendKind:
    """The registered backend called `name`; BackendUnavailableError for unknown names."""
    try:
        return BACKENDS[name]
    except KeyError:
        msg = f"unknown backend {name!r}; available here: {', '.join(sorted(BACKENDS))}"
        raise BackendUnavailableError(msg) from None


def shares_session(name: str) -> bool:
    """True when several threads may call one loaded model of backend `name` at once (an
    unknown name: False, the safe answer)."""
    kind = BACKENDS.get(name)
    return kind is not None and kind.shares_session


def open_backend(name: str, bundle: Bundle, options: BackendOptions) -> InferenceBackend:
    """Open the named backend on a bundle; raises BackendUnavailableError for unknown names."""
    return backend_kind(name).open(bundle, options)
