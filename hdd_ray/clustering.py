"""The clustering math of the prepare stage: hierarchical k-means, assignment, held-out split.

Pure functions on arrays, no I/O: :mod:`hdd_ray.prepare` fits the centroids on the driver and
computes the distances in a Ray Data pass, then calls :func:`assign_clusters` and
:func:`heldout_mask` (ARCHITECTURE.md describes the stage).
"""

from __future__ import annotations

import math

import numpy as np

from hdd_ray.corpus import key_priority
from hdd_ray.errors import PrepareError

__all__ = [
    "assign_clusters",
    "fit_hierarchical_kmeans",
    "heldout_mask",
    "squared_distances",
]


def squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``[N, D] x [K, D] -> [N, K]`` squared L2 distances (float32, clipped at 0)."""
    x = np.asarray(x, np.float32)
    c = np.asarray(centroids, np.float32)
    d = (x * x).sum(1, keepdims=True) - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _kmeans(x: np.ndarray, k: int, iters: int, seed: int, weights: np.ndarray | None = None):
    import faiss

    n = len(x)
    # faiss subsamples to max_points_per_centroid * k points unless told otherwise; the caller
    # already capped the sample, so use all of it.
    km = faiss.Kmeans(
        x.shape[1], k, niter=iters, seed=seed, verbose=False,
        min_points_per_centroid=1, max_points_per_centroid=max(1, math.ceil(n / k)) + 1,
    )
    km.train(np.ascontiguousarray(x, np.float32), weights=weights)
    return km


def fit_hierarchical_kmeans(
    x: np.ndarray, k: int, fine: int, iters: int = 50, seed: int = 0
) -> dict[str, np.ndarray]:
    """Fine k-means on ``x``, then K coarse clusters = weighted k-means of the fine centroids.

    Returns ``{"coarse": [K, D], "fine": [F, D], "fine_counts": [F], "fine_to_coarse": [F]}``
    (F = non-empty fine centroids, at most ``min(fine, N)``). Deterministic for a given
    ``seed`` and row order.
    """
    x = np.ascontiguousarray(x, np.float32)
    fine = min(fine, len(x))
    km = _kmeans(x, fine, iters, seed)
    _, nearest = km.index.search(x, 1)
    counts = np.bincount(nearest[:, 0], minlength=fine)
    keep = counts > 0
    fine_c, fine_n = km.centroids[keep], counts[keep]
    if len(fine_c) < k:
        raise PrepareError(
            f"clustering.k={k}: the embeddings have only {len(fine_c)} distinct groups "
            "(too many identical samples); lower clustering.k"
        )
    coarse = _kmeans(fine_c, k, iters, seed, weights=fine_n.astype(np.float32))
    _, f2c = coarse.index.search(np.ascontiguousarray(fine_c), 1)
    return {
        "coarse": coarse.centroids.copy(),
        "fine": fine_c.copy(),
        "fine_counts": fine_n,
        "fine_to_coarse": f2c[:, 0].astype(np.int64),
    }


def assign_clusters(
    dists: np.ndarray, balance_cap: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster of each sample from its ``[N, K]`` distances -> ``(cluster [N], distance [N])``.

    Without a cap: the nearest centroid. With ``balance_cap``: in round r = 0..K-1 every
    still unplaced sample asks its r-th nearest cluster, which takes the closest askers while
    it has room; so overflow goes to the next-nearest cluster with room. Deterministic (ties
    by sample index). Needs ``balance_cap * K >= N``.
    """
    n, k = dists.shape
    if balance_cap is None:
        cluster = np.argmin(dists, axis=1)
        return cluster, dists[np.arange(n), cluster]
    if balance_cap * k < n:
        raise PrepareError(
            f"clustering.balance_cap={balance_cap}: {k} clusters hold at most "
            f"{balance_cap * k} samples, the corpus has {n}"
        )
    ranked = np.argsort(dists, axis=1, kind="stable")
    cluster = np.full(n, -1, np.int64)
    room = np.full(k, balance_cap, np.int64)
    for r in range(k):
        idx = np.flatnonzero(cluster < 0)
        if idx.size == 0:
            break
        cand = ranked[idx, r]
        order = np.lexsort((idx, dists[idx, cand], cand))  # by cluster, distance, index
        idx, cand = idx[order], cand[order]
        rank = np.arange(len(cand)) - np.searchsorted(cand, cand, side="left")
        take = rank < room[cand]
        cluster[idx[take]] = cand[take]
        room -= np.bincount(cand[take], minlength=k)
    return cluster, dists[np.arange(n), cluster]


def heldout_mask(keys: list[str], cluster: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Stratified held-out split: ``round(fraction * n_k)`` samples of each cluster k.

    The held-out samples of a cluster are those with the smallest ``sha256(seed:key)``, so the
    split does not depend on row order; every non-empty cluster keeps at least one training
    sample.
    """
    n = len(keys)
    if n == 0 or fraction <= 0:
        return np.zeros(n, bool)
    prio = np.array([key_priority(f"{seed}:{key}") for key in keys], np.int64)
    order = np.lexsort((prio, cluster))
    sorted_c = cluster[order]
    rank = np.arange(n) - np.searchsorted(sorted_c, sorted_c, side="left")
    counts = np.bincount(cluster, minlength=int(cluster.max()) + 1)
    want = np.minimum(np.floor(fraction * counts + 0.5).astype(np.int64), np.maximum(counts - 1, 0))
    mask = np.zeros(n, bool)
    mask[order] = rank < want[sorted_c]
    return mask
