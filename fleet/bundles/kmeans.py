"""Deterministic k-means (k-means++ seeding, Lloyd iterations) for the motif prototypes."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from runtime.motif_head import squared_distances

FloatArray = NDArray[np.float32]


def kmeans(
    points: FloatArray, k: int, *, seed: int = 0, iterations: int = 100
) -> tuple[FloatArray, NDArray[np.int64]]:
    """Cluster rows of `points` into k centroids; returns (centroids, labels).

    Needs at least k distinct points. Empty clusters are re-seeded with the point farthest from
    its centroid, so exactly k centroids always come back.
    """
    data = np.asarray(points, dtype=np.float64)
    if len(np.unique(data, axis=0)) < k:
        msg = f"k-means needs at least {k} distinct points, got {len(np.unique(data, axis=0))}"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    centroids = _plus_plus(data, k, rng)
    labels = np.zeros(len(data), dtype=np.int64)
    for _ in range(iterations):
        dist = squared_distances(data, centroids)
        new_labels = np.argmin(dist, axis=1)
        for cluster in range(k):
            members = data[new_labels == cluster]
            if len(members):
                centroids[cluster] = members.mean(axis=0)
            else:
                farthest = int(np.argmax(dist[np.arange(len(data)), new_labels]))
                centroids[cluster] = data[farthest]
                new_labels[farthest] = cluster
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
    return centroids.astype(np.float32), labels


def _plus_plus(data: NDArray[np.float64], k: int, rng: np.random.Generator) -> NDArray[np.float64]:
    centroids = np.empty((k, data.shape[1]), dtype=np.float64)
    centroids[0] = data[rng.integers(len(data))]
    closest = squared_distances(data, centroids[:1])[:, 0].astype(np.float64)
    for i in range(1, k):
        total = closest.sum()
        index = int(rng.choice(len(data), p=closest / total)) if total > 0 else i
        centroids[i] = data[index]
        closest = np.minimum(closest, squared_distances(data, centroids[i : i + 1])[:, 0])
    return centroids
