"""The installed software version, as nodes report it and the fleet tools show it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def software_version() -> str:
    """The installed package version."""
    try:
        return version("imu-edge")
    except PackageNotFoundError:
        return "0+unknown"
