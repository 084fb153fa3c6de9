"""Preparation of a count matrix as cNMF does it: over-dispersed features, unit variance.

cNMF (Kotliar et al. 2019, ``cnmf.cNMF.get_norm_counts``) factorizes not the counts but

1. the ``n_top_features`` features with the highest Fano factor relative to the one expected
   from their mean (``get_highvar_genes``), measured on the counts normalised to 10^6 per
   sample (TPM), and
2. those features' counts, each column divided by its standard deviation (ddof 1) without
   centring, so that every kept feature weighs alike in the factorization.

Samples with no count left in the kept features cannot be factorized (their usages are
undefined): they are refused by name. Sparse input stays sparse: only the kept columns are
ever copied, and the statistics are sums over the non-zeros.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["Prepared", "fano_selection", "prepare", "as_matrix", "apply_preparation"]

TPM_TOTAL = 1e6  # cNMF selects features on counts scaled to this total per sample


@dataclass
class Prepared:
    """A matrix ready for consensus NMF and how it was made.

    Attributes
    ----------
    X : ndarray or scipy.sparse.csr_matrix, shape (n_samples, n_kept)
        The prepared matrix (float64).
    features : ndarray of int, shape (n_kept,)
        Columns of the input kept, in the input's order.
    scale : ndarray, shape (n_kept,)
        What each kept column was divided by (1 where nothing was scaled).
    feature_names : ndarray of str, shape (n_kept,)
    sample_names : ndarray of str, shape (n_samples,)
    prepared : bool
        Whether selection and scaling were done (False: ``X`` is the input, checked).
    n_features_in : int
        Columns of the input.
    """

    X: object
    features: np.ndarray
    scale: np.ndarray
    feature_names: np.ndarray
    sample_names: np.ndarray
    prepared: bool
    n_features_in: int = 0


def _sparse():
    import scipy.sparse as sp

    return sp


def _names(names, n: int, what: str, arg: str) -> np.ndarray:
    if names is None:
        return np.array([str(i) for i in range(n)], dtype=object)
    out = np.asarray([str(v) for v in names], dtype=object)
    if out.shape != (n,):
        raise ValueError(f"{arg} has {out.size} names, but X has {n} {what}")
    return out


def as_matrix(X, feature_names: Optional[Sequence] = None, sample_names: Optional[Sequence] = None
              ) -> Tuple[object, np.ndarray, np.ndarray]:
    """Check ``X`` and return it as float64 numpy or CSR, with its feature and sample names.

    Parameters
    ----------
    X : array-like, pandas DataFrame, scipy.sparse matrix or torch tensor, shape (n_samples, n_features)
        Non-negative and finite. Never modified.
    feature_names, sample_names : sequence of str, optional
        Override the DataFrame's columns / index; default ``'0', '1', ...``.

    Returns
    -------
    X : ndarray or scipy.sparse.csr_matrix, shape (n_samples, n_features)
    feature_names : ndarray of str, shape (n_features,)
    sample_names : ndarray of str, shape (n_samples,)

    Raises
    ------
    TypeError
        Non-numeric input.
    ValueError
        Not 2-D, empty, negative or non-finite values (the first one is named), or names of
        the wrong length.
    """
    sp = _sparse()
    if hasattr(X, "columns") and hasattr(X, "index"):  # pandas DataFrame
        feature_names = X.columns if feature_names is None else feature_names
        sample_names = X.index if sample_names is None else sample_names
        X = X.to_numpy()
    if hasattr(X, "detach"):  # torch tensor
        X = X.detach().cpu()
        X = X.to_dense().numpy() if X.layout != __import__("torch").strided else X.numpy()
    if sp.issparse(X):
        M = sp.csr_matrix(X, dtype=np.float64, copy=True)
        M.sum_duplicates()
        vals = M.data
    else:
        try:
            A = np.asarray(X)
        except Exception as err:  # ragged lists and the like
            raise TypeError(f"X could not be read as an array: {err}") from None
        if A.dtype == np.bool_ or A.dtype.kind not in "iuf":
            raise TypeError(f"X must hold real numbers, got dtype {A.dtype}")
        M = np.array(A, dtype=np.float64)  # a copy: X is never modified
        vals = M
    if M.ndim != 2:
        raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {M.shape}")
    if min(M.shape) == 0:
        raise ValueError(f"X is empty (shape {M.shape})")
    for bad, what in ((~np.isfinite(vals), "NaN or infinite"), (vals < 0, "negative")):
        if bad.any():
            i, j, v = _first(M, bad)
            raise ValueError(f"X has {what} values (non-negative finite data is required), first at "
                             f"row {i}, column {j}: {v}")
    return M, _names(feature_names, M.shape[1], "features", "feature_names"), \
        _names(sample_names, M.shape[0], "samples", "sample_names")


def _first(M, mask) -> Tuple[int, int, float]:
    sp = _sparse()
    if sp.issparse(M):
        k = int(np.flatnonzero(mask)[0])
        i = int(np.searchsorted(M.indptr, k, side="right") - 1)
        return i, int(M.indices[k]), float(M.data[k])
    i, j = np.argwhere(mask)[0]
    return int(i), int(j), float(M[i, j])


def _column_moments(M) -> Tuple[np.ndarray, np.ndarray]:
    """Column means and variances (ddof 0) without densifying a sparse ``M``."""
    sp = _sparse()
    if sp.issparse(M):
        mean = np.asarray(M.mean(axis=0)).ravel()
        mean2 = np.asarray(M.multiply(M).mean(axis=0)).ravel()
        return mean, np.maximum(mean2 - mean ** 2, 0.0)
    return M.mean(axis=0), M.var(axis=0)


def fano_selection(X, n_top: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    """The ``n_top`` most over-dispersed columns of ``X``, by cNMF's ``get_highvar_genes`` rule.

    Each feature's Fano factor ``var / mean`` (ddof 0) is divided by the one expected from
    its mean, ``A² mean + B²``: ``A`` the smallest coefficient of variation among the 20
    features of highest mean, ``B²`` the median Fano factor of the features inside the
    10-90% quantile box of both mean and Fano factor (all as cNMF computes them).
    Features with zero mean rank last.

    Parameters
    ----------
    X : ndarray or scipy.sparse matrix, shape (n_samples, n_features)
        Non-negative (cNMF passes counts normalised to 10^6 per sample).
    n_top : int or None
        How many to keep; ``None`` or more than ``n_features`` keeps all.

    Returns
    -------
    features : ndarray of int, shape (n_kept,)
        The kept columns, in increasing order.
    ratio : ndarray, shape (n_features,)
        Each feature's Fano factor over the expected one (NaN where the mean is 0).
    """
    mean, var = _column_moments(X)
    with np.errstate(divide="ignore", invalid="ignore"):
        fano = var / mean
        cv = np.sqrt(var) / mean
    top = np.argsort(-mean, kind="stable")[:20]
    A = np.nanmin(cv[top]) if np.isfinite(cv[top]).any() else 0.0
    mean_lo, mean_hi = np.nanquantile(mean, [0.10, 0.90])
    with np.errstate(invalid="ignore"):
        fano_lo, fano_hi = np.nanquantile(fano, [0.10, 0.90]) if np.isfinite(fano).any() else (np.nan, np.nan)
        box = (fano > fano_lo) & (fano < fano_hi) & (mean > mean_lo) & (mean < mean_hi)
    B2 = float(np.median(fano[box])) if box.any() else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = fano / (A ** 2 * mean + B2)
    n = X.shape[1]
    if n_top is None or n_top >= n:
        return np.arange(n), ratio
    order = np.argsort(-np.where(np.isnan(ratio), -np.inf, ratio), kind="stable")
    return np.sort(order[:n_top]), ratio


def _tpm(M):
    sp = _sparse()
    total = np.asarray(M.sum(axis=1)).ravel()
    with np.errstate(divide="ignore"):
        f = np.where(total > 0, TPM_TOTAL / total, 0.0)
    return sp.diags(f) @ M if sp.issparse(M) else M * f[:, None]


def _columns(M, idx: np.ndarray):
    sp = _sparse()
    return M.tocsc()[:, idx].tocsr() if sp.issparse(M) else M[:, idx]


def _scale_columns(M, scale: np.ndarray):
    sp = _sparse()
    if sp.issparse(M):
        out = M.copy()
        out.data /= scale[out.indices]
        return out
    return M / scale


def _refuse_empty_rows(M, sample_names: np.ndarray, n_kept: int) -> None:
    empty = np.flatnonzero(np.asarray(M.sum(axis=1)).ravel() <= 0)
    if empty.size:
        shown = ", ".join(repr(str(sample_names[i])) for i in empty[:5])
        more = f" and {empty.size - 5} more" if empty.size > 5 else ""
        raise ValueError(f"{empty.size} samples have no counts in the {n_kept} selected features "
                         f"(e.g. {shown}{more}); remove them from X or keep more features "
                         f"(n_top_features)")


def prepare(X, n_top_features: Optional[int] = 2000, *, feature_names: Optional[Sequence] = None,
            sample_names: Optional[Sequence] = None, enabled: bool = True) -> Prepared:
    """Select the over-dispersed features of ``X`` and scale them to unit variance, as cNMF.

    Parameters
    ----------
    X : array-like, DataFrame, scipy.sparse matrix or tensor, shape (n_samples, n_features)
        Non-negative counts (or any non-negative matrix). Never modified; sparse input is
        never densified.
    n_top_features : int or None, default 2000
        Features kept (all if fewer); ``None`` skips selection and scaling.
    feature_names, sample_names : sequence of str, optional
        Names (default: a DataFrame's columns and index, else ``'0', '1', ...``).
    enabled : bool, default True
        ``False`` only checks ``X`` and keeps it as it is.

    Returns
    -------
    Prepared

    Raises
    ------
    ValueError
        Invalid ``X`` (see :func:`as_matrix`), ``n_top_features`` below 1, or samples left
        without any count in the kept features (some of them are named).
    """
    M, fnames, snames = as_matrix(X, feature_names, sample_names)
    n = M.shape[1]
    if not enabled or n_top_features is None:
        _refuse_empty_rows(M, snames, n)
        return Prepared(M, np.arange(n), np.ones(n), fnames, snames, False, n)
    keep, _ = fano_selection(_tpm(M), int(n_top_features))
    Y = _columns(M, keep)
    _, var = _column_moments(Y)
    m = Y.shape[0]
    std = np.sqrt(var * m / max(m - 1, 1))  # ddof 1, as cNMF (pandas / scanpy)
    scale = np.where(std > 0, std, 1.0)  # a constant column stays as it is (cNMF would divide by 0)
    Y = _scale_columns(Y, scale)
    _refuse_empty_rows(Y, snames, keep.size)
    return Prepared(Y, keep, scale, fnames[keep], snames, True, n)


def apply_preparation(prep: Prepared, X, n_features_in: int):
    """Apply a fitted preparation (the same columns and scales) to new data ``X``.

    Parameters
    ----------
    prep : Prepared
        From :func:`prepare` on the training data.
    X : array-like or sparse, shape (n_samples', n_features_in)
    n_features_in : int
        The training data's number of features.

    Returns
    -------
    ndarray or scipy.sparse.csr_matrix, shape (n_samples', n_kept)
    sample names : ndarray of str
    """
    M, _, snames = as_matrix(X)
    if M.shape[1] != n_features_in:
        raise ValueError(f"X has {M.shape[1]} features, but the model was fitted on {n_features_in}")
    Y = _scale_columns(_columns(M, prep.features), prep.scale)
    _refuse_empty_rows(Y, snames, prep.features.size)
    return Y, snames
