"""Cophenetic correlation of the samples' consensus matrix (Brunet et al., PNAS 2004).

Each replicate assigns every sample to the component of its largest usage; the consensus
(connectivity) matrix holds, for each pair of samples, the fraction of replicates that put
them together. Its cophenetic correlation -- how well an average-linkage tree on the
distances ``1 - consensus`` reproduces them -- is 1 for a perfectly stable assignment and
drops as replicates disagree. A samples x samples matrix does not fit in memory for large
data, so the measure is taken on a seeded random subset of at most ``max_samples`` samples
(2000 by default: 4 million pairs).
"""
from __future__ import annotations

import numpy as np

__all__ = ["MAX_SAMPLES", "subsample", "connectivity", "cophenetic_correlation"]

MAX_SAMPLES = 2000


def subsample(n: int, max_samples: int = MAX_SAMPLES, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``max_samples`` of ``n`` samples (all of them when ``n`` is not larger), seeded."""
    if n <= max_samples:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_samples, replace=False))


def connectivity(labels: np.ndarray, k: int) -> np.ndarray:
    """Fraction of replicates in which each pair of samples shares a cluster.

    Parameters
    ----------
    labels : ndarray of int, shape (R, n)
        Cluster of each sample in each replicate, in ``0..k-1``.
    k : int

    Returns
    -------
    ndarray, shape (n, n)
    """
    R, n = labels.shape
    onehot = np.zeros((R, n, k))
    onehot[np.arange(R)[:, None], np.arange(n)[None, :], labels] = 1.0
    flat = onehot.transpose(1, 0, 2).reshape(n, R * k)
    return flat @ flat.T / R


def cophenetic_correlation(H: np.ndarray, *, max_samples: int = MAX_SAMPLES, seed: int = 0) -> float:
    """Cophenetic correlation of the consensus matrix of the replicates' usages.

    Parameters
    ----------
    H : ndarray, shape (R, n_samples, k)
        Each replicate's usages.
    max_samples : int, default 2000
        Above this many samples, a random subset of this size (seeded by ``seed``) is used.
    seed : int, default 0

    Returns
    -------
    float
        In [-1, 1]; NaN when every pair has the same consensus value (nothing to correlate).
    """
    from scipy.cluster.hierarchy import cophenet, linkage
    from scipy.spatial.distance import squareform

    R, n, k = H.shape
    idx = subsample(n, max_samples, seed)
    labels = np.argmax(np.asarray(H[:, idx, :]), axis=2)
    D = 1.0 - connectivity(labels, k)
    np.fill_diagonal(D, 0.0)
    d = squareform(np.clip(D, 0.0, 1.0), checks=False)
    if d.size == 0 or np.ptp(d) == 0:
        return float("nan")
    c, _ = cophenet(linkage(d, "average"), d)
    return float(c)
