"""Usages refitted with the consensus components held fixed, and the error of the result.

cNMF (``refit_usage``) fits the usages of every sample to the consensus components by
scikit-learn's multiplicative updates with the spectra fixed; here the same fit is
:meth:`torchnmf.nmf.NMF.fit` with ``W`` not trainable, run to the stop rule (``tol``) or
``max_iter`` iterations. The error is the beta-divergence of the prepared matrix from
``usages @ components`` (for Frobenius half the sum of squares; cNMF's ``prediction_error``
is the full sum of squares, twice this).
"""
from __future__ import annotations

import warnings
from typing import Tuple

import numpy as np
import torch

from .. import data
from ..nmf import NMF
from ..updates import mu_statistics

__all__ = ["REFIT_MAX_ITER", "to_tensor", "refit_usages"]

REFIT_MAX_ITER = 1000  # at least this many iterations for the refit (cNMF's default max_iter)


def to_tensor(X, device=None, dtype=None) -> torch.Tensor:
    """A prepared numpy / scipy CSR matrix as a torch tensor (sparse stays sparse)."""
    return data.as_tensor(X, "X", dtype=dtype or torch.float64, device=device)


def refit_usages(X: torch.Tensor, components: np.ndarray, *, beta: float, tol: float, max_iter: int,
                 seed: int = 0) -> Tuple[np.ndarray, float]:
    """Usages of ``X`` with the components fixed, and the beta-divergence of the reconstruction.

    Parameters
    ----------
    X : Tensor, shape (n_samples, n_features)
        Prepared data (dense or sparse), on the device and in the dtype of the fit.
    components : ndarray, shape (k, n_features)
        Fixed components.
    beta : float
    tol : float
        Stop rule of :meth:`NMF.fit`.
    max_iter : int
        Iteration limit (raised to :data:`REFIT_MAX_ITER`).
    seed : int, default 0
        Seed of the random initial usages.

    Returns
    -------
    usages : ndarray, shape (n_samples, k)
    error : float
    """
    W = torch.as_tensor(np.ascontiguousarray(components.T), dtype=X.dtype, device=X.device)
    n, k = X.shape[0], W.shape[1]
    g = torch.Generator().manual_seed(int(seed))
    if data.is_sparse(X):
        rows = torch.sparse.sum(X, dim=1).to_dense()
    else:
        rows = X.sum(1)
    # components sum to 1, so a row's usages sum to about its total: start there, randomly split
    H0 = (torch.rand(n, k, generator=g, dtype=torch.float64).to(X.device, X.dtype) + 0.5) * (rows[:, None] / k)
    layer = NMF(W=W, H=H0.clamp_min(1e-12), trainable_W=False)
    with warnings.catch_warnings():  # hitting max_iter is reported by the estimator, not per rank
        warnings.simplefilter("ignore")
        layer.fit(X, beta=beta, tol=tol, max_iter=max(int(max_iter), REFIT_MAX_ITER))
    H = layer.H.detach()
    loss = mu_statistics(X, W, H, beta, with_loss=True)[2]
    error = float(loss)
    if not np.isfinite(error):
        raise FloatingPointError("the usage refit gave a non-finite error; try dtype='float64'")
    return H.cpu().numpy().astype(np.float64), error
