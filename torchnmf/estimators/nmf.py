"""Beta-divergence NMF with the scikit-learn API, over torchnmf's NMF layers and BetaMu."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from ..data import check_beta, check_positive, is_sparse
from ..engine import STOP_RULES
from ..init import initialize
from ..metrics import beta_div
from ._base import TorchFactorization, check_is_fitted

__all__ = ["BetaNMF", "beta_from_loss"]

_LOSSES = {"frobenius": 2.0, "kullback-leibler": 1.0, "itakura-saito": 0.0}


def beta_from_loss(beta_loss) -> float:
    """``'frobenius'`` -> 2, ``'kullback-leibler'`` -> 1, ``'itakura-saito'`` -> 0, a number -> itself."""
    if isinstance(beta_loss, str):
        if beta_loss not in _LOSSES:
            raise ValueError(f"beta_loss must be a real number or one of {', '.join(map(repr, _LOSSES))}; got {beta_loss!r}")
        return _LOSSES[beta_loss]
    if isinstance(beta_loss, bool) or not isinstance(beta_loss, numbers.Real):
        raise TypeError(f"beta_loss must be a real number or a loss name, got {beta_loss!r}")
    return check_beta(beta_loss, "beta_loss")


def _dense(X: Tensor) -> Tensor:
    return X.to_dense() if is_sparse(X) else X


class BetaNMF(TorchFactorization):
    r"""Non-negative matrix factorization with a beta-divergence, scikit-learn style.

    Fits ``X ≈ H Wᵀ`` (``X`` of shape ``(n_samples, n_features)``, ``H`` the transformed data
    of shape ``(n_samples, n_components)``, ``W`` of shape ``(n_features, n_components)``)
    with a layer of the NMF family (:class:`torchnmf.nmf.NMF`, or :class:`torchnmf.nmf.NMFD`
    for rows that are consecutive time frames) trained by beta-divergence multiplicative
    updates (:meth:`torchnmf.nmf.BaseComponent.fit`; :class:`torchnmf.trainer.BetaMu` for
    the convolutional layer), which never increase the divergence. Named ``BetaNMF`` so it
    does not clash with the layer ``torchnmf.NMF``.

    Parameters
    ----------
    n_components : int, optional
        Rank, at most ``min(n_samples, n_features)``. Default: ``min(n_samples, n_features)``.
    beta_loss : float or {'frobenius', 'kullback-leibler', 'itakura-saito'}, default 'kullback-leibler'
        The beta of the divergence (2, 1 and 0 for the names). ``beta <= 0`` needs a
        strictly positive ``X``.
    init : {'nndsvda', 'nndsvd', 'nndsvdar', 'random', 'k-means'}, optional
        See :func:`torchnmf.init.initialize`; ``None`` picks as scikit-learn does.
    max_iter : int, default 2000
        Maximum number of updates (of both factors) in :meth:`fit`; the number of updates
        of ``H`` in :meth:`transform`. Large enough for typical data to meet the default
        ``tol`` (scikit-learn's digits at KL: 960 updates; a 1500 x 800 single-cell-like count
        matrix: 160), so the warning marks a fit that really did not converge.
    tol : float, default 1e-5
        Stop :meth:`fit` when the divergence changes by at most ``tol`` per iteration,
        relative to its current value (see ``stop_rule``); 0 runs ``max_iter`` updates.
        Reaching ``max_iter`` first warns with :class:`~torchnmf.engine.ConvergenceWarning`
        (see :ref:`default-tolerances` for every fit's defaults). The default is smaller than scikit-learn's 1e-4 because the rule is per iteration and
        multiplicative updates slow down gradually: with ``tol=1e-4`` a fit of scikit-learn's
        digits given ``max_iter=1000`` would stop at iteration 269 with its divergence 2.7%
        above the 1000-iteration one; with 1e-5 it stops at iteration 960, 0.04% above the
        1000-iteration divergence and 0.6% above the 1500-iteration one.
    stop_rule : {'relative', 'sklearn'}, default 'relative'
        ``'relative'``: the rule of :mod:`torchnmf.engine`, the change per iteration relative
        to the *current* divergence. ``'sklearn'``: scikit-learn's semantics of ``tol``
        for :class:`sklearn.decomposition.NMF`, the decrease between two checks relative
        to the *initial* divergence (which stops early when the initial error is large).
    alpha : float, default 0
        Regularization strength of both factors, ``l1 = alpha * l1_ratio`` and
        ``l2 = alpha * (1 - l1_ratio)`` (not rescaled by the data size, unlike scikit-learn).
    l1_ratio : float in [0, 1], default 0
    layer : {'nmf', 'nmfd'}, default 'nmf'
        ``'nmfd'`` treats the rows of ``X`` as consecutive time frames and fits
        ``X[n, c] ≈ Σ_r Σ_t W[c, r, t] H[n - t, r]`` (templates ``T`` frames long, ``H`` as
        long as ``X``).
    T : int, default 1
        Template length for ``layer='nmfd'``.
    random_state : None, int, numpy or torch generator
        For random inits.
    device : 'auto', None, str or torch.device, default 'auto'
        ``'auto'``: cuda if available; ``None``: the input tensor's device.
    dtype : None, 'float32' or 'float64'
        ``None`` keeps float32/float64 input as is (others become float64).
    check_every : int, optional
        Measure the divergence (for ``tol``, ``history_`` and the progress bar) every this
        many iterations; default: every iteration for beta = 2 (free in the Gram form),
        every 10th otherwise (a pass of logarithms/powers over ``X``, as scikit-learn).
    verbose : bool, default False
        tqdm progress bar with the current divergence.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        ``Wᵀ``, as in :class:`sklearn.decomposition.NMF` (for ``'nmfd'``: summed over the
        template frames).
    module_ : torchnmf.nmf.NMF or torchnmf.nmf.NMFD
        The fitted layer (factors on ``device``), for further use in torch.
    n_components_ : int
    n_iter_ : int
    reconstruction_err_ : float
        Final beta-divergence (``sqrt(2 * divergence)`` for ``beta = 2``, as scikit-learn).
    history_ : torchnmf.history.History
        Divergence at the initial point, after every ``check_every``-th iteration and at the end
        (with steps, wall times and relative changes; ``history_.converged_`` tells whether
        ``tol`` was met).
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only for input with string column names.

    Examples
    --------
    >>> import numpy as np
    >>> from torchnmf.estimators import BetaNMF
    >>> X = np.random.RandomState(0).poisson(3.0, size=(50, 8)).astype(float)
    >>> est = BetaNMF(n_components=3, max_iter=50, random_state=0, device="cpu")
    >>> H = est.fit_transform(X)
    >>> H.shape, est.components_.shape
    ((50, 3), (3, 8))
    """

    def __init__(self, n_components: Optional[int] = None, *, beta_loss="kullback-leibler", init: Optional[str] = None,
                 max_iter: int = 2000, tol: float = 1e-5, alpha: float = 0.0, l1_ratio: float = 0.0,
                 layer: str = "nmf", T: int = 1, random_state=None, device="auto", dtype=None,
                 check_every: Optional[int] = None, verbose: bool = False, stop_rule: str = "relative"):
        self.n_components = n_components
        self.beta_loss = beta_loss
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.alpha = alpha
        self.l1_ratio = l1_ratio
        self.layer = layer
        self.T = T
        self.random_state = random_state
        self.device = device
        self.dtype = dtype
        self.check_every = check_every
        self.verbose = verbose
        self.stop_rule = stop_rule

    # -- parameter checks ------------------------------------------------------
    def _check_params(self, X: Tensor):
        from ..data import check_int, check_option, check_rank, check_real

        beta = beta_from_loss(self.beta_loss)
        check_option(self.layer, ("nmf", "nmfd"), "layer")
        check_option(self.stop_rule, STOP_RULES, "stop_rule")
        n_samples, n_features = X.shape
        top = min(n_samples, n_features)
        rank = top if self.n_components is None else check_rank(self.n_components, "n_components")
        if rank > top:  # the factors' columns could not be independent; nndsvd has no such start
            raise ValueError(f"n_components={rank} is larger than min(n_samples, n_features) = {top} "
                             f"(n_samples={n_samples}, n_features={n_features})")
        check_int(self.max_iter, "max_iter", low=1)
        check_positive(self.tol, "tol", allow_zero=True)
        check_positive(self.alpha, "alpha", allow_zero=True)
        check_real(self.l1_ratio, "l1_ratio", 0, 1)
        T = check_rank(self.T, "T")
        if self.check_every is not None:
            check_rank(self.check_every, "check_every")
        if self.layer == "nmfd" and T > X.shape[0]:
            raise ValueError(f"T={T} is longer than X ({X.shape[0]} rows = frames)")
        if beta <= 0:
            if is_sparse(X) or bool((X == 0).any()):
                raise ValueError(f"beta_loss={self.beta_loss!r} (beta <= 0) needs a strictly positive X; X has zeros")
        return beta, rank, T

    # -- layers ----------------------------------------------------------------
    def _layer(self, W: Tensor, H: Tensor, T: int, trainable_W: bool = True):
        """The layer for factors in the estimator's layout: W (C, R), H (N, R)."""
        from ..nmf import NMF, NMFD

        if self.layer == "nmf":
            return NMF(W=W, H=H, trainable_W=trainable_W)
        Wc = W[:, :, None].expand(-1, -1, T).contiguous() / T if W.dim() == 2 else W
        return NMFD(W=Wc, H=H.t()[None].contiguous(), T=T, same_length=True, trainable_W=trainable_W)

    def _target(self, V: Tensor) -> Tensor:
        if self.layer == "nmf":
            return V
        return _dense(V).t()[None]  # (1, C, N): frames along the last dim

    def _rows(self, module) -> Tensor:
        H = module.H.detach()
        return H if self.layer == "nmf" else H[0].t()

    # -- fitting ---------------------------------------------------------------
    def fit(self, X, y=None, *, layer: Optional[str] = None, use_highly_variable: Optional[bool] = None):
        """Fit the factorization to ``X`` of shape ``(n_samples, n_features)``; return ``self``.

        ``X`` may be an :class:`anndata.AnnData` (``layer``, ``use_highly_variable`` as in
        :meth:`fit_transform`).
        """
        self.fit_transform(X, layer=layer, use_highly_variable=use_highly_variable)
        return self

    def fit_transform(self, X, y=None, W=None, H=None, *, layer: Optional[str] = None,
                      use_highly_variable: Optional[bool] = None):
        """Fit and return ``H`` of shape ``(n_samples, n_components)``.

        Parameters
        ----------
        X : array-like, sparse matrix, Tensor or AnnData, shape (n_samples, n_features)
        y : ignored
        W : array-like, shape (n_features, n_components), optional
            Initial column factors (with ``H``, replaces ``init``).
        H : array-like, shape (n_samples, n_components), optional
            Initial row factors.
        layer : str, optional
            AnnData input only: the layer to factorize (default ``adata.X``).
        use_highly_variable : bool, optional
            AnnData input only: fit the genes flagged in ``var['highly_variable']`` (default:
            when that column exists, as :func:`scanpy.tl.pca`).

        Returns
        -------
        ndarray or Tensor, shape (n_samples, n_components)
        """
        X = self._adata_in(X, layer, use_highly_variable, reset=True)
        V = self._check_X(X, reset=True)
        beta, rank, T = self._check_params(V)
        n_samples, n_features = V.shape
        if (W is None) != (H is None):
            raise ValueError("give both W and H as initial factors, or neither")
        if W is None:
            W0, H0 = initialize(V, rank, method=self.init, random_state=self._generator())
        else:
            from ..data import as_tensor, check_nonnegative, check_shape

            W0 = check_shape(check_nonnegative(as_tensor(W, "W", ndim=2, float_only=False), "W"), (n_features, rank), "W")
            H0 = check_shape(check_nonnegative(as_tensor(H, "H", ndim=2, float_only=False), "H"), (n_samples, rank), "H")
        module = self._layer(W0.to(device=V.device, dtype=V.dtype), H0.to(device=V.device, dtype=V.dtype), T)
        self.history_ = self._new_history("beta-divergence", total=self.max_iter)
        target = self._target(V)
        try:
            self.n_iter_ = module.fit(target, beta=beta, tol=self.tol, max_iter=self.max_iter,
                                      alpha=self.alpha, l1_ratio=self.l1_ratio, history=self.history_,
                                      check_every=self.check_every, stop_rule=self.stop_rule)
        finally:
            self.history_.close()
        with torch.no_grad():
            err = float(beta_div(module(), _dense(target), beta))
        if not math.isfinite(err):
            raise FloatingPointError("the fit diverged (non-finite divergence); try another init or beta_loss")
        self.reconstruction_err_ = (2 * err) ** 0.5 if beta == 2 else err
        self.module_ = module
        self.beta_ = beta
        self.n_components_ = rank
        Wf = module.W.detach()
        self.components_ = self._to_numpy((Wf if Wf.dim() == 2 else Wf.sum(-1)).t())
        return self._output(self._rows(module), X, "fit_transform")

    def transform(self, X, *, layer: Optional[str] = None):
        """Row factors ``H`` of new data with ``W`` fixed: shape ``(n_samples, n_components)``.

        Runs exactly ``max_iter`` multiplicative updates of ``H`` alone from the constant
        ``sqrt(mean(X) / n_components)`` (scikit-learn's start). For ``layer='nmf'`` each row
        is updated on its own, so a row's result does not depend on the other rows.

        Parameters
        ----------
        X : array-like, sparse matrix, Tensor or AnnData, shape (n_samples, n_features)
        layer : str, optional
            AnnData input only: the layer to read (default ``adata.X``); the fitted genes are
            taken by name.

        Returns
        -------
        ndarray or Tensor, shape (n_samples, n_components)
        """
        check_is_fitted(self, "module_")
        X = self._adata_in(X, layer, reset=False)
        V = self._check_X(X, reset=False)
        beta, _, T = self._check_params(V)
        W = self.module_.W.detach().to(device=V.device, dtype=V.dtype).clone()
        rank = self.n_components_
        vals = V.coalesce().values() if V.layout == torch.sparse_coo else (V.values() if is_sparse(V) else V)
        mean = float(vals.sum()) / (V.shape[0] * V.shape[1])  # CSR/CSC input has no coalesce()
        H0 = torch.full((V.shape[0], rank), (mean / rank) ** 0.5, dtype=V.dtype, device=V.device)
        if mean == 0:
            return self._output(torch.zeros_like(H0), X)
        module = self._layer(W, H0, T, trainable_W=False)
        module.fit(self._target(V), beta=beta, tol=0.0, max_iter=self.max_iter, alpha=self.alpha,
                   l1_ratio=self.l1_ratio, verbose=bool(self.verbose))
        return self._output(self._rows(module), X)

    def inverse_transform(self, X):
        """Reconstruction from row factors ``X`` of shape ``(n_samples, n_components)``.

        Returns
        -------
        ndarray or Tensor, shape (n_samples, n_features)
            ``X Wᵀ`` (for ``'nmfd'`` the convolution with the templates).
        """
        check_is_fitted(self, "module_")
        from ..data import as_tensor, check_finite, check_shape

        Ht = as_tensor(X, "X", ndim=2, float_only=False)
        check_shape(Ht, (None, self.n_components_), "X")
        check_finite(Ht, "X")  # a NaN row factor would give a NaN reconstruction without a word
        W = self.module_.W.detach()
        Ht = Ht.to(device=W.device, dtype=W.dtype)
        with torch.no_grad():
            if self.layer == "nmf":
                out = Ht @ W.t()
            else:
                out = self.module_(H=Ht.t()[None])[0].t()
        return self._output(out, X, "inverse_transform")
