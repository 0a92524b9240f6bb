"""Motif scores from the latent: the manifest's prototype or linear head, then softmax."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from runtime.backend import FloatArray
from schemas.manifest import LinearHead, Manifest, PrototypeHead

AnyFloatArray = NDArray[np.floating[Any]]


def softmax(logits: FloatArray) -> FloatArray:
    """Row-wise softmax, numerically stable."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    scores: FloatArray = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
    return scores


class MotifHead:
    """Turns (n, 64) latents, or the model's own (n, 12) logits, into (n, 12) scores."""

    def __init__(self, manifest: Manifest) -> None:
        head = manifest.motif_head
        self._prototypes: FloatArray | None = None
        self._weight: FloatArray | None = None
        self._bias: FloatArray | None = None
        self._temperature = 1.0
        if isinstance(head, PrototypeHead):
            self._prototypes = np.asarray(head.prototypes, dtype=np.float32)
            self._temperature = head.temperature
        elif isinstance(head, LinearHead):
            self._weight = np.asarray(head.weight, dtype=np.float32)
            self._bias = np.asarray(head.bias, dtype=np.float32)

    def scores(self, latent: FloatArray, model_logits: FloatArray | None = None) -> FloatArray:
        """Motif scores in [0, 1] summing to 1 per row."""
        return softmax(self.logits(latent, model_logits))

    def logits(self, latent: FloatArray, model_logits: FloatArray | None = None) -> FloatArray:
        """Pre-softmax logits: the model's own when it has them, else the manifest head's."""
        if model_logits is not None:
            return model_logits
        if self._prototypes is not None:
            return -squared_distances(latent, self._prototypes) / self._temperature
        if self._weight is not None and self._bias is not None:
            return (latent @ self._weight.T + self._bias).astype(np.float32)
        msg = "manifest has no motif head and the model gave no motif logits"
        raise ValueError(msg)


def squared_distances(points: AnyFloatArray, centres: AnyFloatArray) -> FloatArray:
    """(n, k) squared Euclidean distances between rows of `points` and `centres`."""
    diff = points[:, None, :] - centres[None, :, :]
    distances: FloatArray = np.einsum("nkd,nkd->nk", diff, diff).astype(np.float32)
    return distances
