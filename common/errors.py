"""The errors of the shared parts (bundle format, signing), under the project's one root."""

from __future__ import annotations

from schemas.errors import EdgeError


class BundleError(EdgeError):
    """A model bundle is unreadable, corrupt, or breaks the manifest contract."""


class ModelContractError(BundleError):
    """The model file's inputs/outputs do not match the contract or its manifest."""


__all__ = ["BundleError", "EdgeError", "ModelContractError"]
