"""One rank of a consensus study: replicates, clustering, refitted usages and the rank's scores."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..engine import ConvergenceWarning
from .cluster import Clustering, cluster_components
from .cophenetic import MAX_SAMPLES, cophenetic_correlation, subsample
from .refit import refit_usages

__all__ = ["RankResult", "fit_rank"]


@dataclass
class RankResult:
    """Everything a consensus study keeps about one rank.

    The rank and the consensus components (k, n_features) are ``clustering.k`` and
    ``clustering.consensus``.

    Attributes
    ----------
    usages : ndarray, shape (n_samples, k)
        Usages refitted with the components fixed.
    stability : float
        Silhouette score of the clustering of all replicates' components.
    error : float
        Beta-divergence of the prepared matrix from ``usages @ components``.
    cophenetic : float
        Cophenetic correlation of the samples' consensus matrix (on at most 2000 samples).
    kept : int
        Components (of ``n_replicates * k``) that survived the density filter.
    n_converged : int
        Replicates that met the stop rule before ``max_iter``.
    clustering : Clustering
    """

    usages: np.ndarray
    stability: float
    error: float
    cophenetic: float
    kept: int
    n_converged: int
    clustering: Clustering

def fit_rank(X: torch.Tensor, k: int, *, n_replicates: int, beta: float, tol: float, max_iter: int, seed: int,
             density_threshold: float, local_neighborhood_size: float, device=None, dtype=None,
             verbose: bool = False, solver: str = "mu", refit_tol: Optional[float] = None) -> RankResult:
    """Fit ``n_replicates`` NMFs of rank ``k`` to the prepared ``X`` and form their consensus.

    Parameters
    ----------
    X : Tensor, shape (n_samples, n_features)
        Prepared data (dense or sparse) on its device and in its dtype.
    k : int
    n_replicates, beta, tol, max_iter
        As :func:`torchnmf.replicates.fit_replicates`.
    seed : int
        Seeds the replicates (from ``(seed, k, r)``), the k-means and the refit.
    density_threshold, local_neighborhood_size : float
        As :func:`~torchnmf.consensus.cluster.cluster_components`.
    device, dtype, verbose, solver
        Passed to :func:`~torchnmf.replicates.fit_replicates`.
    refit_tol : float, optional
        Stop rule of the usage refit (default ``tol``).

    Returns
    -------
    RankResult
    """
    from ..replicates import fit_replicates

    with warnings.catch_warnings():  # the estimator reports unconverged replicates once per rank, by rank
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = fit_replicates(X, k, n_replicates, beta=beta, tol=tol, max_iter=max_iter, random_state=seed,
                             device=device, dtype=dtype, verbose=verbose, solver=solver)
    if not (bool(torch.isfinite(fit.W).all()) and bool(torch.isfinite(fit.H).all())):
        raise FloatingPointError(f"a replicate at rank {k} diverged (non-finite factors); try dtype='float64'")
    W = fit.W.detach().to("cpu", torch.float64).numpy()
    # only the subsampled rows of the usages leave the device (R x samples x k can be large)
    idx = torch.as_tensor(subsample(fit.H.shape[1], MAX_SAMPLES, seed), device=fit.H.device)
    H = fit.H.detach()[:, idx].to("cpu", torch.float64).numpy()
    clustering = cluster_components(W, density_threshold=density_threshold,
                                    local_neighborhood_size=local_neighborhood_size, seed=seed + 1)
    coph = cophenetic_correlation(H, max_samples=MAX_SAMPLES, seed=seed)
    n_converged = int(fit.converged.sum())
    del fit, W, H  # R x samples x k: free it before the refit
    usages, error = refit_usages(X, clustering.consensus, beta=beta, tol=tol if refit_tol is None else refit_tol, max_iter=max_iter, seed=seed)
    return RankResult(usages, clustering.stability, error, coph, int(clustering.kept.sum()), n_converged, clustering)
