"""Compile a bundle's ONNX model to a Hailo HEF with Hailo's Dataflow Compiler (DFC).

Written against the DFC's Python API as `shared/hailo-notes.md` section 4 records it
(`hailo_sdk_client`, DFC 3.x for Hailo-8/8L; 3.33 pairs with HailoRT 4.23). The DFC runs on an
x86-64 Ubuntu machine, never on the Pi, and is imported only when a compile starts.

Steps (each reported through `progress` by the names in `STEPS`):

1. `translate`: write the bundle's ONNX to a temporary directory and parse it
   (`ClientRunner(hw_arch=...)`, `translate_onnx_model`); the network is named after the bundle.
2. `check_native`: run the normalised calibration windows through the DFC's full-precision
   emulator (SDK_NATIVE) and through ONNX Runtime; they must agree (translation check).
3. `optimize`: load a model script (calibration size, and `optimization_level` when given; no
   `normalization` layer, because nodes normalise before the model) and quantise on the
   calibration windows, normalised and shaped NHWC (N, 1, 100, 9).
4. `check_quantized`: run the same windows on the quantised emulator (SDK_QUANTIZED) and compare
   with the full-precision emulator; also predict the node's golden check on the bundle's golden
   windows, so a HEF the node would refuse is never written.
5. `compile`: `runner.compile()` returns the HEF bytes.
6. `write`: a new bundle, the input bundle plus `model.hef` and its `hef` manifest section
   (`fleet.bundles.builder.with_hef`); optionally the compiled HAR beside it.

A failed check raises `CompileValidationError` before anything is written.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Final, Literal, get_args

import numpy as np

from common.bundle import Bundle
from fleet.bundles.builder import with_hef
from fleet.bundles.calibration import CalibrationSet
from fleet.compile.dfc_api import (
    CompileError,
    CompileValidationError,
    dfc_errors,
    dfc_version,
    emulate,
    end_node_names,
    import_dfc,
    model_script,
    net_name_for,
    to_nhwc,
    translate,
)
from fleet.models.validate import Agreement, agreement
from runtime.backend import BackendOptions, FloatArray
from runtime.normalize import Normalizer
from runtime.onnx_backend import OnnxBackend
from runtime.pipeline import cosine_similarity
from schemas.limits import CHANNELS, WINDOW_LENGTH
from schemas.manifest import HefInfo

logger = logging.getLogger(__name__)

HwArch = Literal["hailo8", "hailo8l"]
HW_ARCHS: Final[tuple[str, ...]] = get_args(HwArch)
STEPS: Final = ("translate", "check_native", "optimize", "check_quantized", "compile", "write")
"""Step names passed to `progress`, in order."""
MIN_COSINE_QUANTIZED: Final = 0.95
"""Mean cosine the quantised emulator must reach against full precision, per window."""
MIN_COSINE_NATIVE: Final = 0.99
"""Mean cosine the translated model (SDK_NATIVE) must reach against ONNX Runtime."""
RECOMMENDED_CALIBRATION: Final = 1024
"""Hailo recommends at least this many calibration samples (model zoo OPTIMIZATION.rst)."""


@dataclass(frozen=True, slots=True)
class CompileReport:
    """What a compile produced and how close the compiled model came to its ONNX twin."""

    hw_arch: str
    net_name: str
    compiler: str
    calibration_size: int
    cosine_mean: float
    """Quantised vs full-precision emulator, mean over the calibration windows."""
    cosine_min: float
    max_abs_error: float
    """Largest |quantised - full precision| over all calibration latents."""
    native_cosine_mean: float
    """Full-precision emulator vs ONNX Runtime (translation check)."""
    native_max_abs_error: float
    golden_cosine_min: float
    """Quantised emulator vs the bundle's golden latents (what the node checks at load)."""
    optimization_level: int | None
    out: Path
    durations: dict[str, float] = field(default_factory=dict)
    """Seconds per step, by the names in `STEPS`."""


class _Steps:
    """Reports each step through `progress`, logs it and times it."""

    def __init__(self, progress: Callable[[str], None] | None, label: str) -> None:
        self._progress = progress
        self._label = label
        self.durations: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        logger.info("compile %s: %s", self._label, name)
        if self._progress is not None:
            self._progress(name)
        start = time.monotonic()
        try:
            yield
        finally:
            self.durations[name] = time.monotonic() - start


def _check_inputs(
    bundle: Bundle, calibration: CalibrationSet, hw_arch: str, optimization_level: int | None
) -> bytes:
    if hw_arch not in HW_ARCHS:
        msg = f"hw_arch must be one of {list(HW_ARCHS)}, not {hw_arch!r}"
        raise CompileError(msg)
    if optimization_level is not None and not 0 <= optimization_level <= 4:
        msg = f"optimization_level must be 0..4, not {optimization_level}"
        raise CompileError(msg)
    if bundle.onnx is None:
        msg = f"bundle {bundle.ref.name} {bundle.ref.version} has no model.onnx to compile"
        raise CompileError(msg)
    windows = calibration.windows
    if windows.ndim != 3 or windows.shape[1:] != (WINDOW_LENGTH, CHANNELS) or len(windows) < 1:
        msg = f"calibration windows have shape {windows.shape}; expected (N >= 1, 100, 9)"
        raise CompileError(msg)
    if not np.isfinite(windows).all():
        msg = "calibration windows hold NaN or infinity"
        raise CompileError(msg)
    if len(windows) < RECOMMENDED_CALIBRATION:
        logger.warning(
            "calibrating on %d windows; Hailo recommends at least %d (quantisation ranges from a "
            "small set may clip real data)",
            len(windows),
            RECOMMENDED_CALIBRATION,
        )
    return bundle.onnx


def _onnx_latents(bundle: Bundle, onnx_bytes: bytes, windows: FloatArray) -> FloatArray:
    """ONNX Runtime's latents for normalised windows: the reference the emulator must match."""
    backend = OnnxBackend(onnx_bytes, bundle.manifest.outputs, BackendOptions(threads=2))
    try:
        return backend.infer(windows).latent
    finally:
        backend.close()


def _translate_step(
    dfc: ModuleType, bundle: Bundle, onnx_bytes: bytes, hw_arch: str, tmp: Path
) -> Any:
    """A runner holding the translated model."""
    manifest = bundle.manifest
    onnx_path = tmp / "model.onnx"
    onnx_path.write_bytes(onnx_bytes)
    output_names = [manifest.outputs.latent.name]
    if manifest.outputs.motif_logits is not None:
        output_names.append(manifest.outputs.motif_logits.name)
    ends = end_node_names(onnx_bytes, output_names)
    with dfc_errors("start"):
        runner = dfc.ClientRunner(hw_arch=hw_arch)
    with dfc_errors("translate the ONNX model"):
        translate(runner, onnx_path, net_name_for(manifest.name), manifest.input.name, ends)
    return runner


def _check_native(
    runner: Any, dfc: ModuleType, data: FloatArray, reference: FloatArray
) -> tuple[FloatArray, Agreement]:
    """Full-precision emulator latents, checked against ONNX Runtime's (translation check)."""
    with dfc_errors("run the full-precision emulator"):
        native = emulate(runner, dfc.InferenceContext.SDK_NATIVE, data)
    parity = agreement(native, reference)
    logger.info(
        "native vs ONNX Runtime: cosine mean %.5f min %.5f, max abs error %.3g",
        parity.cosine_mean,
        parity.cosine_min,
        parity.max_abs_error,
    )
    if not parity.cosine_mean >= MIN_COSINE_NATIVE:
        msg = (
            f"the translated model does not match ONNX Runtime: mean cosine "
            f"{parity.cosine_mean:.4f} (min {parity.cosine_min:.4f}, max abs error "
            f"{parity.max_abs_error:.3g}) on the full-precision emulator, below "
            f"{MIN_COSINE_NATIVE}. The parser changed the model: check the input layout (the DFC "
            "input is NHWC (1, 100, 9), H=1, W=100, C=9) and ops it handles partly (Transpose, "
            "Reshape, Squeeze; run onnx-simplifier first)"
        )
        raise CompileValidationError(msg)
    return native, parity


def _check_quantized(
    runner: Any, dfc: ModuleType, data: FloatArray, native: FloatArray, bundle: Bundle
) -> tuple[Agreement, float]:
    """Quantised vs full-precision emulator on `data`, and min cosine on the golden windows."""
    golden_raw, golden_latents = bundle.golden()
    golden = to_nhwc(Normalizer(bundle.manifest.normalization).apply(golden_raw))
    with dfc_errors("run the quantized emulator"):
        quantized = emulate(runner, dfc.InferenceContext.SDK_QUANTIZED, data)
        quantized_golden = emulate(runner, dfc.InferenceContext.SDK_QUANTIZED, golden)
    parity = agreement(quantized, native)
    golden_min = float(cosine_similarity(quantized_golden, golden_latents).min())
    logger.info(
        "quantized vs native: cosine mean %.5f min %.5f, max abs error %.3g; golden min "
        "cosine %.5f",
        parity.cosine_mean,
        parity.cosine_min,
        parity.max_abs_error,
        golden_min,
    )
    if not parity.cosine_mean >= MIN_COSINE_QUANTIZED:
        msg = (
            f"quantization loses too much: mean cosine {parity.cosine_mean:.4f} (min "
            f"{parity.cosine_min:.4f}, max abs error {parity.max_abs_error:.3g}) of the quantized "
            f"emulator vs full precision, below {MIN_COSINE_QUANTIZED}. Try a larger, "
            "representative calibration set (Hailo recommends >= 1024 windows), a higher "
            "optimization_level (needs a GPU), or 16-bit layers (quantization_param)"
        )
        raise CompileValidationError(msg)
    floor = bundle.manifest.golden.min_cosine_quantized
    if not golden_min >= floor:
        msg = (
            f"the quantized model reaches only cosine {golden_min:.4f} on the bundle's golden "
            f"windows, below their min_cosine_quantized {floor}: nodes would refuse the HEF at "
            "load. Calibrate on data that covers the golden windows"
        )
        raise CompileValidationError(msg)
    return parity, golden_min


def compile_bundle(
    bundle: Bundle,
    calibration: CalibrationSet,
    *,
    hw_arch: HwArch,
    out: Path,
    optimization_level: int | None = None,
    progress: Callable[[str], None] | None = None,
    har_out: Path | None = None,
) -> CompileReport:
    """Compile `bundle`'s ONNX for `hw_arch` and write it, with its HEF, to `out`.

    `calibration` holds raw windows (N, 100, 9); they are normalised with the bundle's own
    normalisation, as a node would. `optimization_level` (0..4) goes into the model script when
    given (the DFC's default otherwise; on a machine without a GPU the DFC may lower it).
    `progress` receives each step's name from `STEPS` as it starts. `har_out`, when given,
    receives the compiled HAR.

    Raises CompilerUnavailableError without the DFC, CompileValidationError when the translated
    or quantised model strays from the ONNX model (nothing is written then), and CompileError
    when the DFC itself fails.
    """
    onnx_bytes = _check_inputs(bundle, calibration, hw_arch, optimization_level)
    dfc = import_dfc()
    compiler = f"hailo_sdk_client {dfc_version(dfc)}"
    manifest = bundle.manifest
    steps = _Steps(progress, f"{manifest.name} {manifest.version} for {hw_arch}")
    windows = Normalizer(manifest.normalization).apply(calibration.windows)
    data = to_nhwc(windows)
    logger.info("compiling with %s, %d calibration windows", compiler, len(data))

    with tempfile.TemporaryDirectory(prefix="imu-compile-") as tmp:
        with steps.step("translate"):
            runner = _translate_step(dfc, bundle, onnx_bytes, hw_arch, Path(tmp))
        with steps.step("check_native"):
            reference = _onnx_latents(bundle, onnx_bytes, windows)
            native, translation = _check_native(runner, dfc, data, reference)
        with steps.step("optimize"):
            with dfc_errors("load the model script"):
                runner.load_model_script(model_script(len(data), optimization_level))
            with dfc_errors("optimize (quantize) the model"):
                runner.optimize(data)
        with steps.step("check_quantized"):
            parity, golden_min = _check_quantized(runner, dfc, data, native, bundle)
        with steps.step("compile"), dfc_errors("compile the model to a HEF"):
            hef = runner.compile()
        if not isinstance(hef, bytes | bytearray) or not hef:
            msg = f"the Dataflow Compiler returned {type(hef).__name__}, not HEF bytes"
            raise CompileError(msg)
        with steps.step("write"):
            if har_out is not None:
                with dfc_errors("save the HAR"):
                    runner.save_har(str(har_out))
            info = HefInfo(
                hw_arch=hw_arch,
                compiler=compiler,
                quantized=True,
                cosine_mean=parity.cosine_mean,
                max_abs_error=parity.max_abs_error,
            )
            with_hef(bundle, bytes(hef), info, out)
    logger.info("wrote %s for %s, cosine mean %.4f", out, hw_arch, parity.cosine_mean)
    return CompileReport(
        hw_arch=hw_arch,
        net_name=net_name_for(manifest.name),
        compiler=compiler,
        calibration_size=len(data),
        cosine_mean=parity.cosine_mean,
        cosine_min=parity.cosine_min,
        max_abs_error=parity.max_abs_error,
        native_cosine_mean=translation.cosine_mean,
        native_max_abs_error=translation.max_abs_error,
        golden_cosine_min=golden_min,
        optimization_level=optimization_level,
        out=out,
        durations=dict(steps.durations),
    )
