"""Clustering of the replicates' components into consensus components (cNMF's ``consensus``).

For one rank K and R replicates, the R*K components (rows of each replicate's ``W.T``) are
scaled to unit L2 norm. Stability is the silhouette score of a K-means clustering of *all*
of them (cNMF's ``k_selection_plot`` computes it with the density filter off). Then the
outliers are dropped: a component's local density is its mean Euclidean distance to its
``round(local_neighborhood_size * R)`` nearest neighbours (itself counted with distance 0,
divided by the neighbour count, exactly as cNMF), and components with density at or above
``density_threshold`` go. The survivors are clustered again into K groups; each group's
element-wise median, normalised to sum 1, is a consensus component.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Clustering", "l2_normalize", "local_density", "cluster_components", "sklearn_cluster"]

N_INIT = 10  # k-means restarts, as cNMF


def sklearn_cluster():
    """``(KMeans, silhouette_score)`` from scikit-learn, with a clear message when it is missing."""
    try:
        from sklearn.cluster import KMeans
        from sklearn.metrics import silhouette_score
    except ImportError:  # pragma: no cover - optional dependency
        raise ImportError("consensus NMF clusters components with scikit-learn's KMeans: "
                          "pip install scikit-learn (or torchnmf[sklearn])") from None
    return KMeans, silhouette_score


@dataclass
class Clustering:
    """The clustering of one rank's replicate components.

    Attributes
    ----------
    k : int
    components : ndarray, shape (R*k, n_features), float32
        Every replicate's components scaled to unit L2 norm (replicate r's are rows r*k..r*k+k-1).
    density : ndarray, shape (R*k,)
        Local density (mean distance to the nearest neighbours); low is dense.
    kept : ndarray of bool, shape (R*k,)
        Survivors of the density filter.
    labels : ndarray of int, shape (R*k,)
        Consensus cluster of each kept component, -1 for a removed one.
    stability : float
        Silhouette score of the k-means clustering of all components (before the filter).
    consensus : ndarray, shape (k, n_features)
        The consensus components, each summing to 1.
    density_threshold : float
    """

    k: int
    components: np.ndarray
    density: np.ndarray
    kept: np.ndarray
    labels: np.ndarray
    stability: float
    consensus: np.ndarray
    density_threshold: float


def l2_normalize(C: np.ndarray) -> np.ndarray:
    """Rows of ``C`` (n, m) scaled to unit L2 norm (an all-zero row stays zero)."""
    norm = np.sqrt((C ** 2).sum(axis=1, keepdims=True))
    return C / np.where(norm > 0, norm, 1.0)


def _distances(C: np.ndarray) -> np.ndarray:
    sq = (C ** 2).sum(1)
    D2 = sq[:, None] + sq[None, :] - 2.0 * (C @ C.T)
    np.fill_diagonal(D2, 0.0)
    return np.sqrt(np.maximum(D2, 0.0))


def local_density(C: np.ndarray, n_neighbors: int) -> np.ndarray:
    """Mean distance of each row of ``C`` to its ``n_neighbors`` nearest rows, as cNMF.

    Parameters
    ----------
    C : ndarray, shape (n, m)
    n_neighbors : int
        At least 1 and below ``n``.

    Returns
    -------
    ndarray, shape (n,)
        cNMF's value: the sum of the ``n_neighbors + 1`` smallest distances (the row's own 0
        included) divided by ``n_neighbors``.
    """
    D = _distances(C)
    nearest = np.partition(D, n_neighbors, axis=1)[:, : n_neighbors + 1]
    return nearest.sum(1) / n_neighbors


def _kmeans(C: np.ndarray, k: int, seed: int) -> np.ndarray:
    KMeans, _ = sklearn_cluster()
    return KMeans(n_clusters=k, n_init=N_INIT, random_state=seed).fit(C).labels_


def cluster_components(W: np.ndarray, *, density_threshold: float = 0.5, local_neighborhood_size: float = 0.3,
                       seed: int = 1) -> Clustering:
    """Consensus components of one rank from its replicates' ``W``.

    Parameters
    ----------
    W : ndarray, shape (R, n_features, k)
        Each replicate's W (``components_ = W.T``).
    density_threshold : float, default 0.5
        Components with local density at or above it are dropped (>= 2 keeps all: unit
        vectors are at most 2 apart).
    local_neighborhood_size : float, default 0.3
        Neighbours for the density, as a fraction of R.
    seed : int, default 1
        Seed of the k-means (cNMF uses 1).

    Returns
    -------
    Clustering

    Raises
    ------
    ValueError
        Fewer than k components survive the filter (the message names the rank and what to change).
    """
    _, silhouette_score = sklearn_cluster()
    R, _, k = W.shape
    C = l2_normalize(np.ascontiguousarray(np.transpose(W, (0, 2, 1))).reshape(R * k, -1).astype(np.float64))
    labels_all = _kmeans(C, k, seed)
    n_labels = np.unique(labels_all).size  # identical replicates can leave fewer than k clusters
    stability = (float(silhouette_score(C, labels_all, metric="euclidean")) if 2 <= n_labels < R * k
                 else float("nan"))
    n_neighbors = int(local_neighborhood_size * R)  # cNMF: int(size * n_components_total / k)
    if n_neighbors < 1 or n_neighbors >= R * k:
        raise ValueError(f"local_neighborhood_size={local_neighborhood_size} gives {n_neighbors} neighbours "
                         f"with {R} replicates at rank {k}; it needs at least 1 (raise local_neighborhood_size "
                         f"or n_replicates)")
    density = local_density(C, n_neighbors)
    kept = density < density_threshold
    if int(kept.sum()) < k:
        raise ValueError(f"density_threshold={density_threshold} leaves {int(kept.sum())} of {R * k} components "
                         f"at rank {k}, fewer than the {k} clusters needed; raise density_threshold (the "
                         f"smallest local density there is {density.min():.3g}; 2 keeps every component)")
    labels = np.full(R * k, -1)
    labels[kept] = _kmeans(C[kept], k, seed)
    consensus = np.zeros((k, C.shape[1]))
    for c in range(k):
        members = C[labels == c]
        med = np.median(members, axis=0)
        if med.sum() <= 0:  # a sparse cluster whose median is all zeros: its mean instead
            med = members.mean(axis=0)
        consensus[c] = med / med.sum()
    return Clustering(k, C.astype(np.float32), density, kept, labels, stability, consensus, float(density_threshold))


def clustered_order(clustering: Clustering) -> np.ndarray:
    """Indices of the kept components, cluster by cluster, each cluster in average-linkage order (as cNMF draws it)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    kept = np.flatnonzero(clustering.kept)
    C = clustering.components[kept].astype(np.float64)
    labels = clustering.labels[kept]
    order = []
    for c in range(clustering.k):
        idx = np.flatnonzero(labels == c)
        if idx.size > 1:
            d = squareform(_distances(C[idx]), checks=False)
            idx = idx[leaves_list(linkage(d, "average"))]
        order.extend(kept[idx])
    return np.asarray(order, dtype=int)
