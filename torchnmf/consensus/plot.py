"""The two figures of a consensus study, drawn as cNMF draws them.

- the k-selection plot: stability (left axis) and error (right axis) against the rank;
- the clustering of one rank: the distance matrix of the replicates' kept components, ordered
  cluster by cluster (average linkage inside each), with the clusters as a colour bar, and
  the histogram of the local densities with the threshold.
"""
from __future__ import annotations

import numpy as np

from .cluster import Clustering, _distances, clustered_order

__all__ = ["plot_k_selection", "plot_clustering"]


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - optional dependency
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from None
    return plt


def plot_k_selection(table, ax=None):
    """Stability and error against k, two y-axes.

    Parameters
    ----------
    table : pandas.DataFrame or dict of lists
        ``k_selection_`` (keys ``k``, ``stability``, ``error``).
    ax : matplotlib Axes, optional
        Where to draw (its twin carries the error); a new figure otherwise.

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    k = np.asarray(table["k"], dtype=int)
    stability = np.asarray(table["stability"], dtype=float)
    error = np.asarray(table["error"], dtype=float)
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4))
    else:
        fig = ax.figure
    blue, red = "#1f77b4", "#d62728"
    ax.plot(k, stability, "o-", color=blue, label="stability")
    ax.set_xlabel("number of components k")
    ax.set_ylabel("stability (silhouette score)", color=blue)
    ax.tick_params(axis="y", colors=blue)
    ax.set_xticks(k)
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(k, error, "s--", color=red, label="error")
    ax2.set_ylabel("error (beta-divergence)", color=red)
    ax2.tick_params(axis="y", colors=red)
    ax.set_title("consensus NMF: choose k where stability is high and the error stops falling", fontsize=9)
    fig.tight_layout()
    return fig


def plot_clustering(clustering: Clustering):
    """The clustered distance matrix of one rank's replicate components and their local densities.

    Parameters
    ----------
    clustering : Clustering
        ``ConsensusNMF.clusterings_[k]``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    from matplotlib import gridspec

    order = clustered_order(clustering)
    C = clustering.components[order].astype(np.float64)
    D = _distances(C)
    labels = clustering.labels[order]
    fig = plt.figure(figsize=(11, 7))
    gs = gridspec.GridSpec(2, 3, figure=fig, width_ratios=[0.4, 9, 5], height_ratios=[0.4, 9],
                           wspace=0.02, hspace=0.02, left=0.05, right=0.93, bottom=0.2, top=0.9)
    cmap = plt.get_cmap("tab20", max(clustering.k, 2))
    top = fig.add_subplot(gs[0, 1])
    top.imshow(labels[None, :], aspect="auto", cmap=cmap, interpolation="none", vmin=0, vmax=clustering.k - 1)
    left = fig.add_subplot(gs[1, 0])
    left.imshow(labels[:, None], aspect="auto", cmap=cmap, interpolation="none", vmin=0, vmax=clustering.k - 1)
    for a in (top, left):
        a.set_xticks([])
        a.set_yticks([])
    ax = fig.add_subplot(gs[1, 1])
    im = ax.imshow(D, aspect="auto", cmap="viridis", interpolation="none", rasterized=True)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{len(order)} kept components, cluster by cluster", fontsize=9, y=-0.06)
    cax = ax.inset_axes([0.0, -0.13, 1.0, 0.03])
    fig.colorbar(im, cax=cax, orientation="horizontal", label="Euclidean distance between unit-norm components")
    hist = fig.add_subplot(gs[1, 2])
    hist.hist(clustering.density, bins=min(50, max(10, clustering.density.size // 4)), color="grey")
    hist.axvline(clustering.density_threshold, color="red", linestyle="--",
                 label=f"density threshold {clustering.density_threshold:g}")
    hist.set_xlabel("local density (mean distance to neighbours)")
    hist.set_ylabel("components")
    hist.yaxis.set_label_position("right")
    hist.yaxis.tick_right()
    hist.legend(fontsize=8)
    fig.suptitle(f"rank {clustering.k}: stability {clustering.stability:.3f}, "
                 f"{int(clustering.kept.sum())} of {clustering.kept.size} components kept")
    return fig
