"""The node's exception hierarchy: one root, structured fields, `raise ... from` at boundaries.

The root and the bundle errors are the shared ones (common/errors.py): `except NodeError` also
catches what the bundle reader and signing raise.
"""

from __future__ import annotations

from common.errors import BundleError, EdgeError, ModelContractError

NodeError = EdgeError
"""Root of every error the node raises on purpose (the shared root)."""


class ConfigError(NodeError):
    """The configuration is invalid; the message says which setting and how to fix it."""


class GoldenCheckError(BundleError):
    """A freshly loaded model did not reproduce its golden vectors."""


class BackendError(NodeError):
    """An inference backend failed to load or to run a batch."""


class BackendUnavailableError(BackendError):
    """The requested backend cannot run on this machine (missing package or device)."""


__all__ = [
    "BackendError",
    "BackendUnavailableError",
    "BundleError",
    "ConfigError",
    "GoldenCheckError",
    "ModelContractError",
    "NodeError",
]
