"""Gamma-Poisson factorization of counts with the scikit-learn API."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..data import check_option, check_positive, check_rank
from ._base import TorchFactorization, check_is_fitted

__all__ = ["GammaPoissonFactorization"]

#: The valid ``init`` values of :class:`GammaPoissonFactorization`.
INITS = ("nmf", "nndsvda", "random")


class GammaPoissonFactorization(TorchFactorization):
    r"""Bayesian Poisson factorization of counts, ``X ~ Poisson(U αᵀ)`` with Gamma priors.

    A scikit-learn front end to the layer :class:`torchnmf.poisson.gamma.GammaPoisson`
    fitted by coordinate-ascent variational inference (:class:`torchnmf.trainer.CAVI`), on the
    nonzeros of ``X`` only. ``X`` has shape ``(n_samples, n_features)``; ``U`` (rows,
    ``n_samples x K``) and ``α`` (columns, ``n_features x K``) have independent Gamma priors
    with shapes ``a``, ``b`` and per-row/per-column rates fitted by empirical Bayes.

    Parameters
    ----------
    n_components : int, default 10
        Number of factors ``K``, at most ``min(n_samples, n_features)``.
    a, b : float, default 0.3
        Prior shapes of the row and column factors (below 1: sparse factors).
    learn_kappa, learn_lambda : bool, default True
        Fit the prior rates of rows / columns by maximum likelihood after each sweep.
    init : {'nmf', 'nndsvda', 'random'}, default 'nmf'
        Start of the posteriors (see :meth:`torchnmf.poisson.gamma.GammaPoisson.set_means`):

        - ``'nmf'``: posterior means equal to a KL-NMF solution of ``X`` (:class:`~torchnmf.estimators.BetaNMF`,
          ``beta_loss='kullback-leibler'``, ``init='nndsvda'``, at most ``init_max_iter``
          updates). Deterministic, and it gives more coherent, reproducible topics than
          random starts (benchmarks/README.md, examples/topics_compare.py).
        - ``'nndsvda'``: posterior means equal to the NNDSVDa factors (:func:`torchnmf.init.initialize`).
        - ``'random'``: shapes ``prior + Uniform(0, 1)``, rates equal to the prior rates
          (:meth:`~torchnmf.poisson.gamma.GammaPoisson.reset_parameters`), drawn from ``random_state``.
    init_max_iter : int, default 100
        Maximum multiplicative updates of the KL-NMF start (``init='nmf'``), which stops
        earlier at a relative change of 1e-4 per update; stopping at the cap does not warn.
    max_iter : int, default 1000
        Maximum CAVI sweeps in :meth:`fit`; typical data meets the default ``tol`` well before
        (scikit-learn's digits: 339 sweeps, a 1500 x 800 single-cell-like count matrix: 86).
    tol : float, default 1e-6
        Stop :meth:`fit` when the ELBO changes by at most ``tol`` relative to ``|ELBO|`` over a
        sweep (the rule of :mod:`torchnmf.engine`); reaching ``max_iter`` first warns with
        :class:`~torchnmf.engine.ConvergenceWarning`. Smaller than the NMF fits' tolerances
        because the ELBO holds large terms no sweep changes (see :ref:`default-tolerances`).
    transform_max_iter : int, default 100
        Coordinate-ascent iterations of the new rows' ``q(U)`` in :meth:`transform`, always
        run in full so a row's result does not depend on the other rows.
    allow_noninteger : bool, default False
        Accept non-integer ``X`` (the Poisson likelihood is then a quasi-likelihood).
    chunk_size : int, optional
        Bound on the nonzeros processed at once (peak memory).
    random_state : None, int, numpy or torch generator
        For ``init='random'`` (and the randomized SVD of the other starts on inputs above
        4e6 entries).
    device : 'auto', None, str or torch.device, default 'auto'
    dtype : None, 'float32' or 'float64'
        ``None``: float32 for float32 input, float64 otherwise.
    verbose : bool, default False
        tqdm progress bars, one per phase, labelled: the KL-NMF start (``init='nmf'``), the
        CAVI sweeps (with the ELBO), and the row factors of :meth:`transform`.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        Posterior means of the column factors, ``E[α]ᵀ``.
    module_ : torchnmf.poisson.gamma.GammaPoisson
        The fitted layer.
    elbo_ : float
        The evidence lower bound after the last sweep.
    history_ : torchnmf.history.History
        One :class:`torchnmf.ELBO` record per sweep (``history_.elbos``).
    n_iter_ : int
    n_components_ : int
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> from torchnmf.estimators import GammaPoissonFactorization
    >>> X = np.random.RandomState(0).poisson(2.0, size=(40, 12))
    >>> est = GammaPoissonFactorization(n_components=3, max_iter=20, random_state=0, device="cpu")
    >>> U = est.fit_transform(X)
    >>> U.shape, est.components_.shape
    ((40, 3), (3, 12))
    """

    def __init__(self, n_components: int = 10, *, a: float = 0.3, b: float = 0.3, learn_kappa: bool = True,
                 learn_lambda: bool = True, init: str = "nmf", init_max_iter: int = 100, max_iter: int = 1000, tol: float = 1e-6, transform_max_iter: int = 100,
                 allow_noninteger: bool = False, chunk_size: Optional[int] = None, random_state=None,
                 device="auto", dtype=None, verbose: bool = False):
        self.n_components = n_components
        self.a = a
        self.b = b
        self.learn_kappa = learn_kappa
        self.learn_lambda = learn_lambda
        self.init = init
        self.init_max_iter = init_max_iter
        self.max_iter = max_iter
        self.tol = tol
        self.transform_max_iter = transform_max_iter
        self.allow_noninteger = allow_noninteger
        self.chunk_size = chunk_size
        self.random_state = random_state
        self.device = device
        self.dtype = dtype
        self.verbose = verbose

    def _check_params(self):
        rank = check_rank(self.n_components, "n_components")
        check_positive(self.a, "a")
        check_positive(self.b, "b")
        check_rank(self.max_iter, "max_iter")
        check_option(self.init, INITS, "init")
        check_rank(self.init_max_iter, "init_max_iter")
        check_rank(self.transform_max_iter, "transform_max_iter")
        check_positive(self.tol, "tol", allow_zero=True)
        if self.chunk_size is not None:
            check_rank(self.chunk_size, "chunk_size")
        return rank

    def _start(self, V: torch.Tensor, rank: int):
        """Posterior means ``(E[U], E[α])`` of shapes ``(n_samples, rank)``, ``(n_features, rank)`` for ``init``."""
        if self.init == "nndsvda":
            from ..init import initialize

            W, H = initialize(V, rank, method="nndsvda", random_state=self._generator())
        else:
            import warnings

            from ..engine import ConvergenceWarning
            from .nmf import BetaNMF

            # tol 1e-4 (fixed, not BetaNMF's default): a rough start leaves the ascent room to
            # move; longer NMF runs gave less coherent topics (benchmarks/README.md)
            nmf = BetaNMF(rank, beta_loss="kullback-leibler", init="nndsvda", max_iter=self.init_max_iter,
                          tol=1e-4, random_state=self._generator(), device=V.device, dtype=V.dtype,
                          verbose=self.verbose)
            nmf._phase = f"{type(self).__name__}: initialising from KL-NMF"  # the start can take long: say so
            with warnings.catch_warnings():
                # a start, not a result: stopping at init_max_iter is intended
                warnings.filterwarnings("ignore", category=ConvergenceWarning)
                H = nmf.fit_transform(V)
            W = nmf.module_.W.detach()
        # Poisson NMF fixes only the products H[:, k] W[:, k]ᵀ: give both factors the same
        # total per component so that neither prior sees a rescaled factor
        scale = (W.sum(0) / H.sum(0).clamp_min(torch.finfo(H.dtype).tiny)).sqrt()
        scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
        return H * scale, W / scale

    def fit(self, X, y=None, *, layer: Optional[str] = None, use_highly_variable: Optional[bool] = None):
        """Fit the posterior to counts ``X`` of shape ``(n_samples, n_features)``; return ``self``.

        ``X`` may be an :class:`anndata.AnnData` (``layer``, ``use_highly_variable`` as in
        :meth:`fit_transform`).
        """
        self.fit_transform(X, layer=layer, use_highly_variable=use_highly_variable)
        return self

    def fit_transform(self, X, y=None, *, layer: Optional[str] = None, use_highly_variable: Optional[bool] = None):
        """Fit and return the posterior means of the row factors ``E[U]``.

        Parameters
        ----------
        X : counts, array-like, sparse matrix, Tensor or AnnData, shape (n_samples, n_features)
        y : ignored
        layer : str, optional
            AnnData input only: the layer to factorize (default ``adata.X``).
        use_highly_variable : bool, optional
            AnnData input only: fit the genes flagged in ``var['highly_variable']`` (default:
            when that column exists, as :func:`scanpy.tl.pca`).

        Returns
        -------
        ndarray or Tensor, shape (n_samples, n_components)
        """
        from ..poisson.gamma import GammaPoisson

        rank = self._check_params()
        X = self._adata_in(X, layer, use_highly_variable, reset=True, counts=not self.allow_noninteger)
        V = self._check_X(X, reset=True, counts=True, allow_noninteger=bool(self.allow_noninteger),
                         escape="allow_noninteger=True")
        if rank > min(V.shape):
            raise ValueError(f"n_components={rank} is larger than min(n_samples, n_features) = {min(V.shape)} "
                             f"(n_samples={V.shape[0]}, n_features={V.shape[1]})")
        layer = GammaPoisson(V.shape[0], V.shape[1], rank, a=self.a, b=self.b, learn_kappa=self.learn_kappa,
                             learn_lambda=self.learn_lambda, allow_noninteger=bool(self.allow_noninteger),
                             generator=self._generator(), dtype=V.dtype, device=V.device)
        if self.init != "random":
            from ..data import _values

            if not bool((_values(V) > 0).any()):  # set_means would say "U is all zero"
                raise ValueError(f"X is all zero: init={self.init!r} starts from factors of X's counts and has "
                                 "none; pass X with at least one positive count, or init='random'")
            layer.set_means(*self._start(V, rank))
        self.history_ = self._new_history("elbo", maximize=True, total=self.max_iter)
        # The layer works on nonzeros: hand it those once, whatever the input layout.
        layer.fit(layer.prepare(V), max_iter=self.max_iter, tol=self.tol, history=self.history_, chunk_size=self.chunk_size)
        self.module_ = layer
        self.n_iter_ = len(self.history_)
        self.elbo_ = float(self.history_[-1])
        if not math.isfinite(self.elbo_):
            raise FloatingPointError(f"the ELBO became {self.elbo_}")
        self.n_components_ = rank
        with torch.no_grad():
            self.components_ = self._to_numpy(layer.mean_alpha().t())
            U = layer.mean_U()
        return self._output(U, X)

    def transform(self, X, *, layer: Optional[str] = None):
        """Posterior means ``E[U]`` of the row factors of new rows, column factors fixed.

        Parameters
        ----------
        X : counts, shape (n_samples, n_features)
        layer : str, optional
            AnnData input only: the layer to read (default ``adata.X``); the fitted genes are
            taken by name.

        Returns
        -------
        ndarray or Tensor, shape (n_samples, n_components)
        """
        check_is_fitted(self, "module_")
        X = self._adata_in(X, layer, reset=False, counts=not self.allow_noninteger)
        V = self._check_X(X, reset=False, counts=True, allow_noninteger=bool(self.allow_noninteger),
                         escape="allow_noninteger=True")
        V = V.to(device=self.module_.device, dtype=self.module_.dtype)
        bar = self._bar(self.transform_max_iter, "inferring row factors (components fixed)")
        try:
            U = self.module_.transform(V, max_iter=self.transform_max_iter, tol=0.0, chunk_size=self.chunk_size,
                                       progress=None if bar is None else lambda: bar.update(1))
        finally:
            if bar is not None:
                bar.close()
        return self._output(U, X)

    def inverse_transform(self, X):
        """Expected counts ``X E[α]ᵀ`` for row factors ``X`` of shape ``(n_samples, n_components)``.

        Returns
        -------
        ndarray or Tensor, shape (n_samples, n_features)
        """
        check_is_fitted(self, "module_")
        from ..data import as_tensor, check_finite, check_shape

        Ut = check_finite(check_shape(as_tensor(X, "X", ndim=2, float_only=False), (None, self.n_components_), "X"),
                          "X")
        with torch.no_grad():
            A = self.module_.mean_alpha()
            out = Ut.to(device=A.device, dtype=A.dtype) @ A.t()
        return self._output(out, X)
