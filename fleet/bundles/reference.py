"""The reference bundle: the built-in TCN encoder, packaged like any other model version."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fleet.bundles.builder import build_bundle, normalization_from
from fleet.bundles.calibration import simulated_calibration
from runtime.reference import REFERENCE_SEED, build_reference_onnx, make_reference_weights

REFERENCE_NAME = "tcn-reference"
REFERENCE_VERSION = "1.0.0"


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/imu-edge` (or `~/.cache/imu-edge`)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "imu-edge"


def build_reference_bundle(
    out: Path,
    *,
    version: str = REFERENCE_VERSION,
    seed: int = REFERENCE_SEED,
    batch: int | None = 1,
) -> Path:
    """Write the reference model as a bundle (simulator calibration, derived normalisation)."""
    onnx_bytes = build_reference_onnx(make_reference_weights(seed), batch=batch)
    with tempfile.TemporaryDirectory(prefix="imu-ref-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        onnx_path.write_bytes(onnx_bytes)
        build_bundle(
            onnx_path=onnx_path,
            name=REFERENCE_NAME,
            version=version,
            out=out,
            normalization=normalization_from(simulated_calibration()),
            description=f"Reference TCN encoder (seed {seed}), untrained; for tests and the demo",
        )
    return out


def ensure_reference_bundle(directory: Path | None = None) -> Path:
    """The cached reference bundle, built on first use (about half a second)."""
    path = (directory or cache_dir()) / f"{REFERENCE_NAME}-{REFERENCE_VERSION}.tar"
    if not path.exists():
        build_reference_bundle(path)
    return path
