"""The node's exception hierarchy: one root, structured fields, `raise ... from` at boundaries."""

from __future__ import annotations


class NodeError(Exception):
    """Root of every error the node raises on purpose."""


class ConfigError(NodeError):
    """The configuration is invalid; the message says which setting and how to fix it."""


class BundleError(NodeError):
    """A model bundle is unreadable, corrupt, or breaks the manifest contract."""


class ModelContractError(BundleError):
    """The model file's inputs/outputs do not match the contract or its manifest."""


class GoldenCheckError(BundleError):
    """A freshly loaded model did not reproduce its golden vectors."""


class BackendError(NodeError):
    """An inference backend failed to load or to run a batch."""


class BackendUnavailableError(BackendError):
    """The requested backend cannot run on this machine (missing package or device)."""
