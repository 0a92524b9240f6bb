"""Helpers of the stand-in DFC: fault switches, fake quantisation, the ONNX "emulator"."""

from __future__ import annotations

import os
import re

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from hailo_standin.fake_hef import uint8_quantization

ENV = "HAILO_SDK_STANDIN"
FloatArray = NDArray[np.float32]


def faults() -> dict[str, str]:
    """The fault switches currently set in `HAILO_SDK_STANDIN`."""
    switches: dict[str, str] = {}
    for item in os.environ.get(ENV, "").split(","):
        key, _, value = item.strip().partition("=")
        if key:
            switches[key.strip()] = value.strip() or "1"
    return switches


def fault_on(name: str) -> bool:
    return faults().get(name, "0") not in {"0", "", "false", "no"}


def fake_quantize(values: FloatArray, low: float, high: float) -> FloatArray:
    """Quantise to uint8 and back: q = clip(round(x/scale + zp), 0, 255); (q - zp) * scale."""
    scale, zp = uint8_quantization(low, high)
    q = np.clip(np.round(values / scale + zp), 0, 255)
    return ((q - zp) * scale).astype(np.float32)


def onnx_session(onnx_bytes: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])


def run_windows(
    session: ort.InferenceSession, onnx_input: str, windows: FloatArray, outputs: list[str]
) -> dict[str, FloatArray]:
    """Run (N, 100, 9) windows one by one (our exports have a fixed batch of 1)."""
    rows: dict[str, list[FloatArray]] = {name: [] for name in outputs}
    for window in windows:
        results = session.run(outputs, {onnx_input: window[None].astype(np.float32)})
        for name, value in zip(outputs, results, strict=True):
            rows[name].append(np.asarray(value, dtype=np.float32).reshape(-1))
    return {name: np.stack(values) for name, values in rows.items()}


def calibset_size(script: list[str]) -> int | None:
    """`calibset_size=N` from a `model_optimization_config(calibration, ...)` line, if any."""
    size = None
    for line in script:
        if "model_optimization_config" in line and "calibration" in line:
            match = re.search(r"calibset_size\s*=\s*(\d+)", line)
            if match:
                size = int(match[1])
    return size
