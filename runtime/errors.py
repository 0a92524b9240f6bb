"""Errors of the model runtime: a backend that cannot load or run, a model that fails its proof.

They sit under the project's one root (`EdgeError`); the bundle errors they extend come from the
shared bundle format (common/errors.py).
"""

from __future__ import annotations

from common.errors import BundleError, EdgeError, ModelContractError


class GoldenCheckError(BundleError):
    """A freshly loaded model did not reproduce its golden vectors."""


class BackendError(EdgeError):
    """An inference backend failed to load or to run a batch."""


class BackendUnavailableError(BackendError):
    """The requested backend cannot run on this machine (missing package or device)."""


__all__ = [
    "BackendError",
    "BackendUnavailableError",
    "BundleError",
    "GoldenCheckError",
    "ModelContractError",
]
