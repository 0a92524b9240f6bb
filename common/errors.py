"""The errors of the shared parts (bundle format, signing), under the project's one root."""

from __future__ import annotations

from schemas.errors import EdgeError


class BundleError(EdgeError):
    """A model bundle is unreadable, corrupt, or breaks the manifest contract."""


class ModelContractError(BundleError):
    """The model file's inputs/outputs do not match the contract or its manifest."""


class MissingExtraError(EdgeError):
    """A command needs a package that this installation left out (the node image installs only
    what `imu-node run` imports); the message names the extra that brings it."""

    def __init__(self, package: str, *, extra: str, needed_for: str) -> None:
        super().__init__(
            f"{needed_for} needs the {package} package, which this installation does not have "
            f"(the node image leaves it out): pip install 'imu-edge[{extra}]'"
        )
        self.package = package
        self.extra = extra


__all__ = ["BundleError", "EdgeError", "MissingExtraError", "ModelContractError"]
