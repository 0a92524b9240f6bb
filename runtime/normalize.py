"""Per-channel z-score normalisation, as the bundle manifest specifies it."""

from __future__ import annotations

import numpy as np

from runtime.backend import FloatArray
from schemas.manifest import Normalization


class Normalizer:
    """(x - mean) / std per channel, precomputed as a multiply."""

    def __init__(self, spec: Normalization) -> None:
        self._mean = np.asarray(spec.mean, dtype=np.float32)
        self._inv_std = (1.0 / np.asarray(spec.std, dtype=np.float64)).astype(np.float32)

    def apply(self, raw: FloatArray) -> FloatArray:
        """Normalise raw windows (..., 9) to float32."""
        return ((raw - self._mean) * self._inv_std).astype(np.float32, copy=False)
