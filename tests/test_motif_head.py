"""MotifHead: prototype and linear heads, the model's own logits, and a stable softmax."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from runtime.motif_head import MotifHead, softmax, squared_distances
from schemas.limits import LATENT_DIM, MOTIF_COUNT
from schemas.manifest import Manifest

FloatArray = NDArray[np.float32]


def manifest(head: dict[str, Any] | None, *, model_logits: bool = False) -> Manifest:
    """A minimal valid manifest with the given motif head."""
    entry = {"sha256": "0" * 64, "size": 0}
    outputs: dict[str, Any] = {"latent": {"name": "latent", "dim": LATENT_DIM}}
    if model_logits:
        outputs["motif_logits"] = {"name": "logits", "dim": MOTIF_COUNT}
    return Manifest.model_validate(
        {
            "name": "head-test",
            "version": "1.0.0",
            "created_at": "2024-01-01T00:00:00+00:00",
            "files": {n: entry for n in ("model.onnx", "golden_inputs.npy", "golden_latents.npy")},
            "input": {"name": "imu_window", "shape": [1, 100, 9]},
            "normalization": {"mean": [0.0] * 9, "std": [1.0] * 9},
            "outputs": outputs,
            "motif_head": head,
            "golden": {"count": 1},
        }
    )


def prototypes(seed: int = 0) -> FloatArray:
    return np.random.default_rng(seed).standard_normal((MOTIF_COUNT, LATENT_DIM)).astype(np.float32)


def prototype_head(protos: FloatArray, temperature: float) -> MotifHead:
    return MotifHead(
        manifest({"kind": "prototypes", "prototypes": protos.tolist(), "temperature": temperature})
    )


def latents(n: int, seed: int = 1, scale: float = 1.0) -> FloatArray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, LATENT_DIM)) * scale).astype(np.float32)


def reference_softmax(logits: NDArray[np.float64]) -> NDArray[np.float64]:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    out: NDArray[np.float64] = exp / exp.sum(axis=1, keepdims=True)
    return out


@settings(deadline=None, max_examples=60)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 16),
    temperature=st.floats(1e-3, 1e3),
    scale=st.floats(1e-2, 1e2),
)
def test_prototype_head_scores(seed: int, n: int, temperature: float, scale: float) -> None:
    protos = prototypes(seed)
    z = latents(n, seed + 1, scale)
    scores = prototype_head(protos, temperature).scores(z)
    assert scores.shape == (n, MOTIF_COUNT)
    assert scores.dtype == np.float32
    assert np.isfinite(scores).all()
    assert (scores >= 0).all()
    assert (scores <= 1).all()
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)
    distances = ((z[:, None, :].astype(np.float64) - protos[None, :, :]) ** 2).sum(axis=2)
    nearest = distances.argmin(axis=1)
    top = scores.argmax(axis=1)
    # ties in float32 aside, the top score is the nearest prototype
    assert (scores[np.arange(n), nearest] >= scores[np.arange(n), top] - 1e-6).all()
    head_logits = prototype_head(protos, temperature).logits(z)
    np.testing.assert_allclose(head_logits, -distances / temperature, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        scores, reference_softmax(head_logits.astype(np.float64)), atol=1e-6, rtol=0
    )


def test_a_latent_on_a_prototype_scores_that_motif_highest() -> None:
    protos = prototypes(3)
    head = prototype_head(protos, temperature=1.0)
    scores = head.scores(protos + np.float32(0.01))
    assert (scores.argmax(axis=1) == np.arange(MOTIF_COUNT)).all()
    assert (scores.max(axis=1) > 0.99).all()


def test_temperature_softens_the_scores() -> None:
    protos = prototypes(4)
    z = latents(8, seed=5)
    sharp = prototype_head(protos, temperature=1.0).scores(z)
    soft = prototype_head(protos, temperature=1e4).scores(z)
    assert (soft.max(axis=1) < sharp.max(axis=1)).all()
    np.testing.assert_allclose(soft, 1 / MOTIF_COUNT, atol=0.05)
    assert (soft.argmax(axis=1) == sharp.argmax(axis=1)).all()


@settings(deadline=None, max_examples=40)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 16))
def test_linear_head_is_softmax_of_w_z_plus_b(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((MOTIF_COUNT, LATENT_DIM)) * 0.3).astype(np.float32)
    bias = rng.standard_normal(MOTIF_COUNT).astype(np.float32)
    head = MotifHead(manifest({"kind": "linear", "weight": weight.tolist(), "bias": bias.tolist()}))
    z = latents(n, seed + 7)
    want_logits = z.astype(np.float64) @ weight.T.astype(np.float64) + bias
    np.testing.assert_allclose(head.logits(z), want_logits, rtol=1e-5, atol=1e-4)
    scores = head.scores(z)
    np.testing.assert_allclose(scores, reference_softmax(want_logits), atol=1e-5, rtol=0)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", ["prototypes", "linear", "none"])
def test_model_logits_take_precedence(kind: str) -> None:
    heads: dict[str, dict[str, Any] | None] = {
        "prototypes": {"kind": "prototypes", "prototypes": prototypes().tolist(), "temperature": 1},
        "linear": {
            "kind": "linear",
            "weight": prototypes().tolist(),
            "bias": [0.0] * MOTIF_COUNT,
        },
        "none": None,
    }
    head = MotifHead(manifest(heads[kind], model_logits=True))
    z = latents(4)
    logits = np.random.default_rng(2).standard_normal((4, MOTIF_COUNT)).astype(np.float32)
    np.testing.assert_array_equal(head.logits(z, logits), logits)
    np.testing.assert_allclose(head.scores(z, logits), reference_softmax(logits), atol=1e-6)


def test_no_head_and_no_model_logits_is_an_error() -> None:
    head = MotifHead(manifest(None, model_logits=True))
    with pytest.raises(ValueError, match="no motif head"):
        head.scores(latents(2))


@pytest.mark.parametrize("magnitude", [1e4, -1e4, 1e30])
def test_softmax_is_stable_for_large_logits(magnitude: float) -> None:
    logits = np.array(
        [
            [magnitude, 0.0, -magnitude],
            [magnitude, magnitude, magnitude],
            [magnitude, magnitude - 1, 0.0],
        ],
        dtype=np.float32,
    )
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        scores = softmax(logits)
    assert scores.dtype == np.float32
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(scores, reference_softmax(logits.astype(np.float64)), atol=1e-6)
    if magnitude > 0:
        np.testing.assert_allclose(scores[0], [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(scores[1], [1 / 3] * 3, atol=1e-6)


def test_softmax_ignores_a_constant_shift() -> None:
    logits = np.random.default_rng(0).standard_normal((5, MOTIF_COUNT)).astype(np.float32)
    np.testing.assert_allclose(softmax(logits), softmax(logits + np.float32(1e4)), atol=1e-4)


def test_squared_distances() -> None:
    points = np.array([[0.0, 0.0], [3.0, 4.0]], dtype=np.float32)
    centres = np.array([[0.0, 0.0], [1.0, 1.0], [3.0, 4.0]], dtype=np.float32)
    np.testing.assert_array_equal(
        squared_distances(points, centres), [[0.0, 2.0, 25.0], [25.0, 13.0, 0.0]]
    )
