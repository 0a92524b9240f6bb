"""Backend parity: run a bundle on every backend available here and compare with ONNX Runtime.

The reference is ONNX Runtime on the bundle's `model.onnx`. Each backend runs the bundle's golden
windows and a calibration set (the simulator's activities unless given); the report gives, per
backend, the cosine similarity of each latent to the reference (mean and worst) and the largest
absolute error. The bar: mean cosine >= 0.99 for float backends, >= 0.95 for quantised ones
(a compiled HEF), and the golden check the node itself runs before serving.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from common.bundle import Bundle
from common.errors import EdgeError
from fleet.bundles.calibration import CalibrationSet, simulated_calibration
from runtime.backend import BackendOptions, FloatArray
from runtime.pipeline import ModelPipeline, cosine_similarity, load_model
from runtime.registry import BACKENDS

logger = logging.getLogger(__name__)

FLOAT_BAR = 0.99
QUANTIZED_BAR = 0.95


@dataclass(frozen=True, slots=True)
class Agreement:
    """How one backend's latents compare with the reference on one set of windows."""

    windows: int
    cosine_mean: float
    cosine_min: float
    max_abs_error: float


@dataclass(frozen=True, slots=True)
class BackendParity:
    """One row of the parity table."""

    backend: str
    status: str
    """`ok`, `below bar`, `golden check failed`, or why the backend could not run."""
    device: str = ""
    quantized: bool = False
    golden: Agreement | None = None
    calibration: Agreement | None = None

    @property
    def bar(self) -> float:
        """Mean cosine this backend must reach."""
        return QUANTIZED_BAR if self.quantized else FLOAT_BAR

    @property
    def passed(self) -> bool:
        """True when the backend ran and met its bar."""
        return self.status == "ok"


def available_backends(bundle: Bundle) -> dict[str, str]:
    """Backend name -> "" when it can run this bundle here, else the reason it cannot."""
    found: dict[str, str] = {}
    for name, kind in BACKENDS.items():
        usable, why = kind.probe(bundle)
        found[name] = "" if usable else why
    return found


def validate_bundle(
    bundle: Bundle,
    calibration: CalibrationSet | None = None,
    options: BackendOptions | None = None,
) -> list[BackendParity]:
    """The parity table for every backend this machine has (unavailable ones say why)."""
    if bundle.onnx is None:
        msg = "parity needs the bundle's ONNX twin as the reference, and it has no model.onnx"
        raise EdgeError(msg)
    calib = calibration or simulated_calibration(32)
    options = options or BackendOptions()
    reference = load_model(bundle, "onnx", options)
    try:
        golden_inputs, _ = bundle.golden()
        expected = _Reference(
            golden_inputs,
            reference.run(golden_inputs).latent,
            calib.windows,
            reference.run(calib.windows).latent,
        )
    finally:
        reference.close()
    rows = []
    for name, unavailable in available_backends(bundle).items():
        if unavailable:
            rows.append(BackendParity(name, f"skipped: {unavailable}"))
        else:
            rows.append(_measure(bundle, name, options, expected))
    return rows


@dataclass(frozen=True, slots=True)
class _Reference:
    golden_inputs: FloatArray
    golden_latents: FloatArray
    calib_inputs: FloatArray
    calib_latents: FloatArray


def _measure(
    bundle: Bundle, name: str, options: BackendOptions, expected: _Reference
) -> BackendParity:
    try:
        pipeline = ModelPipeline(bundle, BACKENDS[name].open(bundle, options))
    except EdgeError as exc:
        return BackendParity(name, f"failed to load: {exc}")
    try:
        golden = agreement(pipeline.run(expected.golden_inputs).latent, expected.golden_latents)
        calibration = agreement(pipeline.run(expected.calib_inputs).latent, expected.calib_latents)
        check = pipeline.golden_check()
    except EdgeError as exc:
        return BackendParity(name, f"failed to run: {exc}", pipeline.info.device)
    finally:
        pipeline.close()
    quantized = pipeline.info.quantized
    bar = QUANTIZED_BAR if quantized else FLOAT_BAR
    if not check.passed:
        status = "golden check failed"
    elif min(golden.cosine_mean, calibration.cosine_mean) < bar:
        status = "below bar"
    else:
        status = "ok"
    return BackendParity(name, status, pipeline.info.device, quantized, golden, calibration)


def agreement(got: FloatArray, expected: FloatArray) -> Agreement:
    """Cosine (mean, worst) and max abs error of `got` against `expected`, row by row."""
    cosine = cosine_similarity(got, expected)
    return Agreement(
        windows=len(got),
        cosine_mean=float(np.mean(cosine)),
        cosine_min=float(np.min(cosine)),
        max_abs_error=float(np.max(np.abs(got - expected))),
    )


def format_table(rows: list[BackendParity], calibration_source: str) -> str:
    """The parity table as text."""
    header = (
        f"{'backend':<8} {'status':<12} {'bar':>5} {'golden cos mean/min':>20} {'max err':>9} "
        f"{'calib cos mean/min':>19} {'max err':>9}  device"
    )
    lines = [f"parity vs ONNX Runtime (calibration: {calibration_source})", header]
    for row in rows:
        if row.golden is None or row.calibration is None:
            lines.append(f"{row.backend:<8} {row.status}")
            continue
        g, c = row.golden, row.calibration
        lines.append(
            f"{row.backend:<8} {row.status:<12} {row.bar:>5.2f} "
            f"{g.cosine_mean:>10.5f}/{g.cosine_min:<9.5f} {g.max_abs_error:>9.2e} "
            f"{c.cosine_mean:>9.5f}/{c.cosine_min:<9.5f} {c.max_abs_error:>9.2e}  {row.device}"
        )
    return "\n".join(lines)
