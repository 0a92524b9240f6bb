"""The root of every error the system raises on purpose, and the errors of the shared parts."""

from __future__ import annotations


class EdgeError(Exception):
    """Root of every error the node, the fleet tools and their shared parts raise on purpose."""


class BundleError(EdgeError):
    """A model bundle is unreadable, corrupt, or breaks the manifest contract."""


class ModelContractError(BundleError):
    """The model file's inputs/outputs do not match the contract or its manifest."""
