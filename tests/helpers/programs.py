"""Real programs the tests drive, and how a node started as a subprocess finds the Hailo
stand-in."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from common.bundle import read_bundle

STANDIN = Path(__file__).resolve().parent.parent / "hailo_standin"
"""The `hailo_platform` and `hailo_sdk_client` stand-ins (tests/hailo_standin)."""


def subprocess_env(backend: str) -> dict[str, str]:
    """Environment for a node started as a subprocess on `backend`."""
    env = dict(os.environ)
    if backend == "hailo":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(STANDIN), env.get("PYTHONPATH")]))
    return env


def require_program(name: str, package: str | None = None) -> str:
    """The path of a real program a test drives (Prometheus, Chromium, ...). Where it is not
    installed the test is skipped, except under CI (`CI` set), where `scripts/test` installs it
    and its absence is a failure."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (apt-get install -y {package or name})"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def latent_tolerance(backend: str, bundle_path: Path) -> float:
    """How far a node's latent may be from ONNX Runtime's: 1e-4, or one uint8 step on Hailo."""
    if backend != "hailo":
        return 1e-4
    from hailo_standin.fake_hef import parse_hef

    hef = read_bundle(bundle_path).hef
    assert hef is not None
    return max(stream.qp_scale for stream in parse_hef(hef).outputs)
