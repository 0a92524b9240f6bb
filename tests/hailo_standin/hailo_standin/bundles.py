"""Stand-in Hailo bundles: a bundle plus a HEF that the runtime stand-in runs as its ONNX twin."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from common.bundle import Bundle
from fleet.bundles.builder import with_hef
from fleet.bundles.calibration import simulated_calibration
from hailo_standin.fake_hef import make_hef
from runtime.backend import BackendOptions
from runtime.pipeline import load_model
from schemas.manifest import HefInfo


def hailo_bundle(
    bundle: Bundle, out: Path, *, hw_arch: Literal["hailo8", "hailo8l"] = "hailo8l"
) -> Bundle:
    """`bundle` plus a stand-in HEF whose uint8 outputs span the calibration latents' range."""
    assert bundle.onnx is not None
    pipeline = load_model(bundle, "onnx", BackendOptions())
    latents = pipeline.run(simulated_calibration(16).windows).latent
    pipeline.close()
    spec = bundle.manifest
    hef = make_hef(
        bundle.onnx,
        onnx_input=spec.input.name,
        onnx_outputs={spec.outputs.latent.name: 64},
        output_ranges={spec.outputs.latent.name: (float(latents.min()), float(latents.max()))},
        hw_arch=hw_arch,
    )
    return with_hef(bundle, hef, HefInfo(hw_arch=hw_arch, compiler="stand-in"), out)
