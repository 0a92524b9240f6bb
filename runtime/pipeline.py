"""A loaded model: normalisation -> backend -> motif head, proven on its golden vectors.

`load_model` is the only way a model reaches the worker: it opens the backend, warms it up and
runs the golden check, and closes the backend again if any step fails.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from common.bundle import Bundle
from runtime.backend import BackendInfo, BackendOptions, FloatArray, InferenceBackend
from runtime.errors import BackendError, GoldenCheckError
from runtime.motif_head import MotifHead
from runtime.normalize import Normalizer
from runtime.registry import BackendChoice, choose_backend, open_backend
from schemas.messages import ModelRef

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GoldenReport:
    """How closely a backend reproduced the bundle's golden latents."""

    count: int
    max_abs_error: float
    min_cosine: float
    passed: bool
    ms_per_window: float
    """Wall time of the check (the first call: a warm-up, so an upper bound) per window."""


@dataclass(frozen=True, slots=True)
class BatchResult:
    """Latents (n, 64) and motif scores (n, 12) for one batch."""

    latent: FloatArray
    scores: FloatArray


class ModelPipeline:
    """One model version ready to serve: normalise, infer, score."""

    def __init__(self, bundle: Bundle, backend: InferenceBackend) -> None:
        self.bundle = bundle
        self.ref: ModelRef = bundle.ref
        self.backend = backend
        self.info: BackendInfo = backend.describe()
        self.normalizer = Normalizer(bundle.manifest.normalization)
        self._head = MotifHead(bundle.manifest)
        self.ms_per_window: float | None = None
        """Measured at the golden check (warm-up included); the watchdog's deadline uses it."""

    def run(self, raw: FloatArray) -> BatchResult:
        """Raw windows (n, 100, 9) -> latents and motif scores."""
        out = self.backend.infer(self.normalizer.apply(raw))
        return BatchResult(
            latent=out.latent, scores=self._head.scores(out.latent, out.motif_logits)
        )

    def golden_check(self) -> GoldenReport:
        """Run the golden windows and compare with the expected latents."""
        inputs, expected = self.bundle.golden()
        started = time.perf_counter()
        got = self.backend.infer(self.normalizer.apply(inputs)).latent
        ms_per_window = (time.perf_counter() - started) * 1000 / max(len(inputs), 1)
        self.ms_per_window = ms_per_window
        spec = self.bundle.manifest.golden
        max_err = float(np.max(np.abs(got - expected)))
        cosine = float(np.min(cosine_similarity(got, expected)))
        if self.info.quantized:  # quantised outputs are judged by direction, not digits
            passed = cosine >= spec.min_cosine_quantized
        else:
            passed = max_err <= spec.atol and cosine >= spec.min_cosine
        return GoldenReport(len(inputs), max_err, cosine, passed, ms_per_window)

    def close(self) -> None:
        """Release the backend."""
        self.backend.close()


def cosine_similarity(a: FloatArray, b: FloatArray) -> FloatArray:
    """Row-wise cosine similarity of two (n, d) arrays."""
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    similarity: FloatArray = (num / np.maximum(den, 1e-12)).astype(np.float32)
    return similarity


def load_model(bundle: Bundle, backend: str, options: BackendOptions) -> ModelPipeline:
    """Open, warm up and prove a model; raises GoldenCheckError when it does not reproduce."""
    pipeline = ModelPipeline(bundle, open_backend(backend, bundle, options))
    try:
        report = pipeline.golden_check()  # the first run doubles as the warm-up
        if not report.passed:
            spec = bundle.manifest.golden
            limits = (
                f"min cosine limit {spec.min_cosine_quantized:g}"
                if pipeline.info.quantized
                else f"limits: max abs error {spec.atol:g}, min cosine {spec.min_cosine:g}"
            )
            msg = (
                f"{bundle.ref.name} {bundle.ref.version} on {backend} failed its golden check: "
                f"max abs error {report.max_abs_error:.3g}, min cosine {report.min_cosine:.5f} "
                f"({limits})"
            )
            raise GoldenCheckError(msg)
    except BaseException:
        pipeline.close()
        raise
    logger.info(
        "model %s %s loaded on %s; golden check passed (max abs error %.2g, min cosine %.6f)",
        bundle.ref.name,
        bundle.ref.version,
        backend,
        report.max_abs_error,
        report.min_cosine,
    )
    return pipeline


def open_pipeline(
    bundle: Bundle, requested: str, options: BackendOptions, *, fallback: str = "none"
) -> tuple[ModelPipeline, BackendChoice]:
    """Choose the backend (`auto` resolved), load and prove the model; fall back if allowed.

    With `fallback="onnx"`, a Hailo backend that cannot be opened or fails its golden check gives
    way to ONNX Runtime, and the returned choice says why.
    """
    choice = choose_backend(requested, bundle)
    try:
        return load_model(bundle, choice.name, options), choice
    except BackendError as exc:
        if fallback != "onnx" or choice.name == "onnx" or bundle.onnx is None:
            raise
        logger.error("%s backend unavailable (%s); falling back to onnx", choice.name, exc)
        reason = f"fallback from {choice.name}: {exc}"
        return load_model(bundle, "onnx", options), BackendChoice("onnx", reason)
