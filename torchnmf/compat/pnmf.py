"""The PNMF package's API (``from PNMF import PNMF``, ``PNMF.transforms``, ``PNMF.initialization``,
``PNMF.priors``) over torchnmf's estimators.

Code written for PNMF runs with its import lines changed to this module::

    from torchnmf.compat.pnmf import PNMF, initialize_factors, log_factors, transform_W

:class:`PNMF` has PNMF's signature and defaults and translates them to
:class:`torchnmf.estimators.PNMF` (``spatial=False``) or
:class:`torchnmf.estimators.SpatialPNMF` (``spatial=True``), which do the work; the functions
read the fitted estimator. torchnmf's own estimators keep their own defaults. Where the
document's behaviour differs from torchnmf's, this module follows the document and keeps
torchnmf's beside it: :meth:`PNMF.transform` runs the document's NNLS multiplicative updates
(``method='variational'`` refits ``q(F)``), with mini-batches one iteration is one batch step
(torchnmf's estimators count epochs), ``n_components`` above ``min(n_samples, n_features)``
warns instead of failing, results are ndarrays for tensor input too, and non-integer data
(the document's own example fits ``np.random.rand(100, 50)``) is fitted as given with a warning,
where torchnmf's count models refuse it (counts stored as floats are rounded in both).

Which options to use: this :class:`PNMF` keeps the document's defaults (Adam with the
one-cycle schedule at ``learning_rate=0.01``, ``mode='expanded'``, ``tol=1e-4``), which
recover simulated factors poorly: matched correlation 0.12 for ``F`` and 0.23 for ``W``
(300 x 60 counts, K=5, 4 seeds; ``benchmarks/pnmf_recovery.py``), stopping after about 100
epochs while the ELBO still creeps up. For recovery use::

    PNMF(n_components, training_mode='natural', loadings_mode='multiplicative',
         mode='lower-bound', learning_rate=0.5, scheduler=None)

(0.93 for ``F``, 0.99 for ``W``; ``spatial=False``): natural steps for ``q(F)``, which
want step sizes near 1 and no warm-up, multiplicative updates for ``W``, and the analytic
bound (natural steps on the Monte Carlo ``expanded`` ELBO at step 0.5 are noisy: 0.21). These are the
defaults of torchnmf's own :class:`torchnmf.estimators.PNMF`.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Optional, Tuple, Union

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted
from torch import Tensor, nn
from torch.distributions import Normal

from ..data import (_user_stacklevel, as_tensor, check_counts, check_int, check_nonnegative, check_option,
                    check_positive, check_rank, check_real)
from ..estimators.pnmf import PNMF as _CorePNMF
from ..estimators.spatial import SpatialPNMF as _CoreSpatialPNMF
from ..init import initialize
from ..nmf import NMF
from ..poisson.lognormal import IndependentNormal, LogNormalPoisson, inv_softplus

__all__ = ["PNMF", "OPTIMIZERS", "GaussianPrior", "initialize_factors", "log_factors", "factor_uncertainty",
           "factor_samples", "get_loadings", "get_factors", "get_prior", "transform_F", "transform_W",
           "log_factors_from_prior", "factors_from_prior", "uncertainty_from_prior", "ConstrainedParameter",
           "PositiveParameter", "PoissonFactorization"]

#: PNMF's optimizer names
OPTIMIZERS = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "NAdam": torch.optim.NAdam,
              "SGD": torch.optim.SGD, "RMSprop": torch.optim.RMSprop}
KERNELS = ("Matern32",)
NEIGHBORS = ("knn",)


def _document_rule(check, *args, **kwargs):
    """``check(*args, **kwargs)`` under the document's data rule.

    The PNMF package fits any non-negative data (its own example feeds ``np.random.rand(100, 50)``),
    so the adapter does too: counts stored as floats are rounded by torchnmf's rule
    (:func:`torchnmf.data.check_counts`), and other non-integer data are fitted as given (a Poisson
    quasi-likelihood) with a warning, where torchnmf's own :class:`~torchnmf.estimators.PNMF`
    refuses them.
    """
    try:
        return check(*args, **kwargs)
    except ValueError as err:
        if "must hold counts" not in str(err):
            raise
    warnings.warn("X does not hold integer counts: it is fitted as given (a Poisson quasi-likelihood), as the "
                  "PNMF package does; torchnmf.estimators.PNMF refuses such data", UserWarning,
                  stacklevel=_user_stacklevel())
    return check(*args, **{**kwargs, "allow_noninteger": True})


class _Knobs:
    """Scheduler knobs and fixed kernel hyperparameters for the core estimators."""

    def _check_X(self, X, **kwargs):
        if not kwargs.get("counts"):
            return super()._check_X(X, **kwargs)
        return _document_rule(super()._check_X, X, **kwargs)

    _overcomplete_ok = True  # the document allows n_components > min(n_samples, n_features); fit warns
    _batch_iterations = True  # the document's iteration is one mini-batch step

    def _make_scheduler(self, opt, total_steps, **options):
        k = self._compat_knobs
        if self.scheduler == "one_cycle":
            options.update(pct_start=k["scheduler_pct_start"], div_factor=k["scheduler_div_factor"],
                           final_div_factor=k["scheduler_final_div_factor"])
        else:
            options.update(patience=k["scheduler_patience"], factor=k["scheduler_factor"], min_lr=k["min_lr"])
        return super()._make_scheduler(opt, total_steps, **options)

    def _init_layer(self, T, g):
        layer = super()._init_layer(T, g)
        kernel = getattr(layer.factors, "kernel", None)
        if kernel is not None and not self._compat_knobs["train_lengthscale"]:
            kernel.requires_grad_(False)  # PNMF keeps the kernel hyperparameters fixed
        return layer


class _Plain(_Knobs, _CorePNMF):
    _display_name = "PNMF"  # messages and progress bars name the class the user made


class _Spatial(_Knobs, _CoreSpatialPNMF):
    _display_name = "PNMF"


def _bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


class PNMF(TransformerMixin, BaseEstimator):
    r"""PNMF's estimator: ``X ≈ exp(F) @ W.T`` by variational inference, PNMF's signature and defaults.

    Parameters
    ----------
    n_components : int, default 10
    loadings_mode : {'softplus', 'exp', 'projected', 'multiplicative'}, default 'projected'
    mode : {'simple', 'expanded', 'lower-bound'}, default 'expanded'
    training_mode : {'standard', 'natural'}, default 'standard'
        ``'natural'``: natural-gradient steps for ``q(F)`` (with ``spatial=True``, for the
        inducing values of an SVGP with ``diagonal_only=True``; other GP parameters take
        ``optimizer`` steps), ``optimizer`` or multiplicative updates for ``W``.
    E : int, default 3
        Monte Carlo samples per ELBO estimate.
    max_iter : int, default 200
        Iterations, as the document counts them: with ``batch_size``/``y_batch_size`` one
        iteration is one mini-batch step (so are ``n_iter_``, the entries of the history,
        ``callback_interval``, the schedules' steps and ``scheduler_patience``), without them one
        full-data step. (torchnmf's own estimators count epochs.)
    tol : float, default 1e-4
        Relative change of the epoch ELBO at which the fit stops, read over windows of 5
        epochs and never during the one-cycle schedule's warm-up (see
        :class:`torchnmf.estimators.PNMF`).
    learning_rate : float, default 0.01
    optimizer : {'Adam', 'AdamW', 'NAdam', 'SGD', 'RMSprop'}, default 'Adam'
        Applies to W (and to every parameter with ``training_mode='standard'``). ``'SGD'``
        at the default ``learning_rate=0.01`` hardly moves the ELBO (the loss is the mean per
        entry) and warns: give it ``learning_rate`` of about 1 to 10.
    random_state : int, optional
    verbose : bool, default False
    device : {'cpu', 'cuda', 'mps', 'auto'}, default 'auto'
    init : {'random', 'nndsvd', 'nndsvda', 'nndsvdar', 'k-means', None}, default 'random'
    scheduler : {'one_cycle', 'plateau', None}, default 'one_cycle'
    scheduler_patience : int, default 200
        Epochs without improvement before the LR is reduced (``'plateau'``).
    scheduler_factor : float, default 0.8
        ``new_lr = old_lr * factor`` (``'plateau'``).
    scheduler_pct_start : float, default 0.3
        Fraction of the steps spent warming up (``'one_cycle'``).
    scheduler_div_factor : float, default 25
        Initial LR is ``learning_rate / div_factor`` (``'one_cycle'``).
    scheduler_final_div_factor : float, default 1e4
        Final LR is ``initial_lr / final_div_factor`` (``'one_cycle'``).
    min_lr : float, default 1e-5
        Floor of the LR (``'plateau'``).
    batch_size, y_batch_size : int, optional
        Mini-batches of samples / features (capped at their number).
    shuffle : bool, default True
    spatial : bool, default False
        GP prior over ``coordinates`` given to :meth:`fit`.
    local : bool, default False
        LCGP instead of SVGP.
    kernel : {'Matern32'}, default 'Matern32'
    multigroup : bool, default False
        Multi-group GP; :meth:`fit` then needs ``groups``.
    num_inducing : int, default 3000
        SVGP inducing points (at most the number of samples).
    lengthscale, sigma : float, default 1
        Kernel lengthscale and output scale.
    group_diff_param : float, default 10
    jitter : float, default 1e-5
    train_lengthscale : bool, default False
        Kernel hyperparameters are fixed unless True.
    cholesky_mode : {'exp', 'softplus'}, default 'exp'
    diagonal_only : bool, default False
    inducing_allocation : {'proportional', 'equal', 'derived'}, default 'proportional'
        ``'derived'``: k-means on all spots, centroids assigned to groups by their nearest spots.
    K : int, default 50
        Neighbours of the LCGP (capped at the number of samples).
    precompute_knn : bool, default True
    neighbors : {'knn'}, default 'knn'
        How LCGP neighbours are found.
    scale_ll_D, scale_kl_NM : bool, default True
        Normalisation of the two parts of the loss, after their names (the document gives
        the names only; its ``M`` is the feature dimension ``D``). With ``ll`` the expected
        log-likelihood of all the data and ``kl`` the KL of ``q(F)`` from ``p(F)``, gradient
        steps minimise ``-ll / (N a) + kl / b``: ``scale_ll_D=True`` sets ``a = D`` (False:
        1), ``scale_kl_NM=True`` sets ``b = N M = N D`` (False: 1). Both True (the default)
        is the negative ELBO per data entry, ``-(ll - kl) / (N D)``, with the ELBO's optimum;
        ``scale_ll_D=False`` weighs the log-likelihood ``D`` times more against the KL,
        ``scale_kl_NM=False`` the KL ``N D`` times more (tempered objectives; natural steps
        follow the same objective rescaled to a KL of weight 1). ``elbo_`` and the history
        always record the ELBO itself.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        ``W.T``.
    n_components_, n_features_in_, elbo_, n_iter_
    estimator_ : torchnmf.estimators.PNMF or SpatialPNMF
        The fitted torchnmf estimator doing the work.
    """

    def __init__(self, n_components=10, loadings_mode='projected', mode='expanded', training_mode='standard', E=3,
                 max_iter=200, tol=0.0001, learning_rate=0.01, optimizer='Adam', random_state=None, verbose=False,
                 device='auto', init='random', scheduler='one_cycle', scheduler_patience=200, scheduler_factor=0.8,
                 scheduler_pct_start=0.3, scheduler_div_factor=25.0, scheduler_final_div_factor=10000.0,
                 min_lr=1e-05, batch_size=None, y_batch_size=None, shuffle=True, spatial=False, local=False,
                 kernel='Matern32', multigroup=False, num_inducing=3000, lengthscale=1.0, sigma=1.0,
                 group_diff_param=10.0, jitter=1e-05, train_lengthscale=False, cholesky_mode='exp',
                 diagonal_only=False, inducing_allocation='proportional', K=50, precompute_knn=True, neighbors='knn',
                 scale_ll_D=True, scale_kl_NM=True):
        self.n_components = n_components
        self.loadings_mode = loadings_mode
        self.mode = mode
        self.training_mode = training_mode
        self.E = E
        self.max_iter = max_iter
        self.tol = tol
        self.learning_rate = learning_rate
        self.optimizer = optimizer
        self.random_state = random_state
        self.verbose = verbose
        self.device = device
        self.init = init
        self.scheduler = scheduler
        self.scheduler_patience = scheduler_patience
        self.scheduler_factor = scheduler_factor
        self.scheduler_pct_start = scheduler_pct_start
        self.scheduler_div_factor = scheduler_div_factor
        self.scheduler_final_div_factor = scheduler_final_div_factor
        self.min_lr = min_lr
        self.batch_size = batch_size
        self.y_batch_size = y_batch_size
        self.shuffle = shuffle
        self.spatial = spatial
        self.local = local
        self.kernel = kernel
        self.multigroup = multigroup
        self.num_inducing = num_inducing
        self.lengthscale = lengthscale
        self.sigma = sigma
        self.group_diff_param = group_diff_param
        self.jitter = jitter
        self.train_lengthscale = train_lengthscale
        self.cholesky_mode = cholesky_mode
        self.diagonal_only = diagonal_only
        self.inducing_allocation = inducing_allocation
        self.K = K
        self.precompute_knn = precompute_knn
        self.neighbors = neighbors
        self.scale_ll_D = scale_ll_D
        self.scale_kl_NM = scale_kl_NM

    # -- translation -------------------------------------------------------------------
    def _core(self, n_samples: int, n_features: int):
        """The torchnmf estimator with these settings (PNMF names and defaults translated)."""
        if isinstance(self.optimizer, str):
            opt = OPTIMIZERS.get(self.optimizer)
            if opt is None:
                raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {self.optimizer!r}")
        elif isinstance(self.optimizer, type) and issubclass(self.optimizer, torch.optim.Optimizer):
            opt = self.optimizer
        else:
            raise TypeError(f"optimizer must be one of {tuple(OPTIMIZERS)} or an Optimizer class, "
                            f"got {self.optimizer!r}")
        check_option(self.kernel, KERNELS, "kernel")
        check_option(self.neighbors, NEIGHBORS, "neighbors")
        for name in ("verbose", "shuffle", "spatial", "local", "multigroup", "train_lengthscale", "diagonal_only",
                     "precompute_knn", "scale_ll_D", "scale_kl_NM"):
            _bool(getattr(self, name), name)
        knobs = dict(scheduler_patience=check_int(self.scheduler_patience, "scheduler_patience", low=0),
                     scheduler_factor=check_real(self.scheduler_factor, "scheduler_factor", 0, 1, closed="neither"),
                     scheduler_pct_start=check_real(self.scheduler_pct_start, "scheduler_pct_start", 0, 1,
                                                    closed="neither"),
                     scheduler_div_factor=check_positive(self.scheduler_div_factor, "scheduler_div_factor"),
                     scheduler_final_div_factor=check_positive(self.scheduler_final_div_factor,
                                                               "scheduler_final_div_factor"),
                     min_lr=check_positive(self.min_lr, "min_lr", allow_zero=True),
                     train_lengthscale=bool(self.train_lengthscale))
        common = dict(n_components=self.n_components, loadings_mode=self.loadings_mode, mode=self.mode,
                      training_mode=self.training_mode, E=self.E, max_iter=self.max_iter, tol=self.tol,
                      learning_rate=self.learning_rate, optimizer=opt, random_state=self.random_state,
                      verbose=self.verbose, device=self.device, init=self.init, scheduler=self.scheduler,
                      batch_size=None if self.batch_size is None else min(check_rank(self.batch_size, "batch_size"),
                                                                          n_samples),
                      y_batch_size=None if self.y_batch_size is None else min(
                          check_rank(self.y_batch_size, "y_batch_size"), n_features),
                      shuffle=self.shuffle)
        if self.spatial:
            core = _Spatial(spatial=True, local=self.local, multigroup=self.multigroup,
                            num_inducing=min(check_rank(self.num_inducing, "num_inducing"), n_samples),
                            lengthscale=self.lengthscale, sigma=self.sigma, group_diff_param=self.group_diff_param,
                            jitter=self.jitter, cholesky_mode=self.cholesky_mode, diagonal_only=self.diagonal_only,
                            inducing_allocation=self.inducing_allocation,
                            K=min(check_rank(self.K, "K"), max(n_samples - 1, 1)),
                            precompute_knn=self.precompute_knn, **common)
        else:
            core = _Plain(**common)
        core._compat_knobs = knobs
        # the documented loss -ll / (N a) + kl / b (a = D or 1, b = N D or 1) is the core's
        # -(w_ll ll - w_kl kl) / (N D) with w_ll = D / a and w_kl = N D / b
        core._ll_weight = 1.0 if self.scale_ll_D else float(n_features)
        core._kl_weight = 1.0 if self.scale_kl_NM else float(n_samples * n_features)
        return core

    # -- scikit-learn API ----------------------------------------------------------------
    def fit(self, X, y=None, coordinates=None, groups=None, return_history=False, callback=None,
            callback_interval=100):
        """Fit the model to ``X`` (n_samples, n_features).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Non-negative; never modified.
        y : ignored
        coordinates : array-like of shape (n_samples, 2), optional
            Needed with ``spatial=True``.
        groups : array-like of shape (n_samples,), optional
            Needed with ``spatial=True, multigroup=True``.
        return_history : bool, default False
            Return ``(history, self)`` with ``history`` the list of ELBO values (one per epoch).
        callback : callable, optional
            ``callback(estimator, iteration, elbo)`` every ``callback_interval`` epochs (with the
            torchnmf estimator doing the fit); returning ``False`` stops the fit.
        callback_interval : int, default 100

        Returns
        -------
        self, or ``(history, self)``
        """
        shape = getattr(X, "shape", None)
        if shape is None or len(shape) != 2:
            shape = as_tensor(X, "X", ndim=2, float_only=False).shape
        core = self._core(int(shape[0]), int(shape[1]))
        K = check_rank(self.n_components, "n_components")
        if K > min(int(shape[0]), int(shape[1])):
            warnings.warn(f"n_components={K} is larger than min(n_samples, n_features) = "
                          f"{min(int(shape[0]), int(shape[1]))}: the factorization is over-complete (components "
                          "are not identifiable); fitting anyway, as PNMF does", UserWarning, stacklevel=2)
        kwargs = dict(callback=callback, callback_interval=callback_interval)
        if self.spatial:
            core.fit(X, coordinates=coordinates, groups=groups, **kwargs)
        else:
            if coordinates is not None or groups is not None:
                raise ValueError("coordinates/groups are for spatial=True")
            core.fit(X, **kwargs)
        self.estimator_ = core
        self.components_ = core.components_
        self.n_components_ = core.n_components_
        self.n_features_in_ = core.n_features_in_
        self.elbo_ = core.elbo_
        self.n_iter_ = core.n_iter_
        if hasattr(core, "feature_names_in_"):
            self.feature_names_in_ = core.feature_names_in_
        if return_history:
            return [float(r) for r in core.history_], self
        return self

    def _spatial_args(self, coordinates, groups) -> dict:
        if self.spatial:
            return dict(coordinates=coordinates, groups=groups)
        if coordinates is not None or groups is not None:
            raise ValueError("coordinates/groups are for spatial=True")
        return {}

    def transform(self, X, coordinates=None, groups=None, *, method="nnls", max_iter=100):
        """``exp(F)`` for ``X`` with ``W`` fixed, an ndarray of shape (n_samples, n_components)
        (for tensor input too, as documented).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Non-negative; never modified.
        coordinates, groups : array-like, optional
            New samples' coordinates (and groups) for ``spatial=True``: their factors come from
            the GP predictive equations (``method`` is not used).
        method : {'nnls', 'variational'}, default 'nnls'
            Non-spatial models: ``'nnls'`` is the document's non-negative least squares by
            multiplicative updates, ``H ← H ∘ (X W) / (H WᵀW)`` from a random start
            (``random_state``); ``'variational'`` is torchnmf's refit of ``q(F)`` with ``W``
            fixed, returning ``E[exp F]`` (the Poisson model's answer).
        max_iter : int, default 100
            Multiplicative updates of ``'nnls'``.
        """
        check_is_fitted(self, "estimator_")
        check_option(method, ("nnls", "variational"), "method")
        if self.spatial or method == "variational":
            return _ndarray(self.estimator_.transform(X, **self._spatial_args(coordinates, groups)))
        self._spatial_args(coordinates, groups)
        return _nnls(self.estimator_, X, check_rank(max_iter, "max_iter"), self.random_state)

    def fit_transform(self, X, coordinates=None, groups=None, **kwargs):
        """Fit, then :meth:`transform` ``X``; shape (n_samples, n_components).

        ``**kwargs`` go to :meth:`fit` (``y`` is accepted there and ignored).
        """
        kwargs.pop("return_history", None)
        self.fit(X, coordinates=coordinates, groups=groups, **kwargs)
        return self.transform(X, coordinates=coordinates, groups=groups)

    def inverse_transform(self, transformed):
        """``transformed @ W.T``, an ndarray of shape (n_samples, n_features) (for tensor input too)."""
        check_is_fitted(self, "estimator_")
        return _ndarray(self.estimator_.inverse_transform(transformed))


def _nnls(core, X, max_iter: int, random_state) -> np.ndarray:
    """``H >= 0`` minimising ``||X - H Wᵀ||²`` by multiplicative updates (Euclidean NMF with
    ``W`` fixed), ``H`` uniform in ``[0, 0.1)`` at the start."""
    T = core._check_X(X, reset=False).to(torch.float64)
    T = T.to_dense() if T.layout != torch.strided else T
    W = core.layer_.W.detach().to(device=T.device, dtype=torch.float64)
    g = torch.Generator().manual_seed(0 if random_state is None else int(random_state))
    H0 = 0.1 * torch.rand(T.shape[0], W.shape[1], dtype=torch.float64, generator=g).to(T.device)
    m = NMF(W=W, H=H0, trainable_W=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ConvergenceWarning: a fixed number of updates
        m.fit(T, beta=2, tol=0, max_iter=max_iter)
    return m.H.detach().cpu().numpy()


def _ndarray(x) -> np.ndarray:
    """The document's return type: an ndarray whatever the input's type."""
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


# -- PNMF.initialization ----------------------------------------------------------------
def initialize_factors(X, n_components, init=None, random_state=None, scale_log_mu=True,
                       target_std=1.0) -> Tuple[np.ndarray, np.ndarray]:
    """Initial ``W`` (n_features, n_components) and ``exp(F)`` (n_samples, n_components).

    Parameters
    ----------
    X : ndarray or Tensor of shape (n_samples, n_features)
        Non-negative; never modified.
    n_components : int
    init : {None, 'random', 'nndsvd', 'nndsvda', 'nndsvdar', 'k-means'}, default None
        ``None``: ``'nndsvda'`` if ``n_components <= min(n_samples, n_features)``, else ``'random'``.
    random_state : int, optional
    scale_log_mu : bool, default True
        Rescale ``exp_F`` so that ``log(exp_F)`` has mean 0 and standard deviation
        ``target_std`` (zeros floored first).
    target_std : float, default 1

    Returns
    -------
    W : ndarray of shape (n_features, n_components)
    exp_F : ndarray of shape (n_samples, n_components)
    """
    T = _document_rule(check_counts, as_tensor(X, "X", ndim=2, sparse="dense", float_only=False).to(torch.float64), "X")
    K = check_rank(n_components, "n_components")
    target_std = check_positive(target_std, "target_std")
    _bool(scale_log_mu, "scale_log_mu")
    if init is None:
        init = "nndsvda" if K <= min(T.shape) else "random"
    W, H = initialize(T, K, init, random_state=random_state)
    if scale_log_mu:
        pos = H[H > 0]
        logH = torch.log(H.clamp_min(float(pos.min()) if pos.numel() else 1e-12))
        sd = float(logH.std()) if logH.numel() > 1 else 0.0
        logH = (logH - logH.mean()) * (target_std / sd if sd > 0 else 1.0)
        H = torch.exp(logH)
    return W.numpy(), H.numpy()


# -- PNMF.transforms ----------------------------------------------------------------------
def _fitted(model):
    """The torchnmf estimator behind ``model`` (a compat PNMF or a torchnmf PNMF)."""
    if isinstance(model, PNMF) and not hasattr(model, "estimator_"):
        raise NotFittedError(f"This {type(model).__name__} instance is not fitted yet: call fit(X) (or "
                             "fit_transform(X)) before reading its loadings or factors")
    core = getattr(model, "estimator_", model)
    if not isinstance(core, _CorePNMF):
        raise TypeError(f"model must be a PNMF estimator (torchnmf.compat.pnmf.PNMF or torchnmf.estimators.PNMF), "
                        f"got {type(model).__name__}")
    check_is_fitted(core, "layer_")
    return core


def _out(t: Tensor, return_tensor: bool):
    t = t.detach()
    return t if return_tensor else t.cpu().numpy()


def _marginals(model, coordinates=None, groups=None) -> Tuple[Tensor, Tensor]:
    """Mean and variance of ``q(F)``, each (n_samples, n_components)."""
    core = _fitted(model)
    if coordinates is not None:
        if not isinstance(core, _CoreSpatialPNMF) or not core.spatial:
            raise ValueError("coordinates are for spatial models")
        C, codes = core._covariates(coordinates, coordinates, groups, fitting=False)
        mean, var = core._predictive(C, codes)
        return mean.t(), var.t()
    mu, var = core.layer_.factors.marginals()
    return mu.t(), var.t()


def log_factors(model, coordinates=None, groups=None, return_tensor=False):
    """Means ``mu`` of ``q(F)`` (log-space factors), shape (n_samples, n_components)."""
    return _out(_marginals(model, coordinates, groups)[0], return_tensor)


def factor_uncertainty(model, return_variance=False, coordinates=None, groups=None, return_tensor=False):
    """Standard deviations (or variances) of ``q(F)``, shape (n_samples, n_components)."""
    var = _marginals(model, coordinates, groups)[1]
    return _out(var if return_variance else var.sqrt(), return_tensor)


def factor_samples(model, n_samples=100, return_exp=False, coordinates=None, groups=None, return_tensor=False):
    """Draws of ``F`` (or ``exp(F)``) from ``q(F)``, shape (n_samples, n_data_samples, n_components)."""
    n = check_rank(n_samples, "n_samples")
    mu, var = _marginals(model, coordinates, groups)
    F = mu + var.sqrt() * torch.randn((n, *mu.shape), dtype=mu.dtype, device=mu.device)
    return _out(torch.exp(F) if return_exp else F, return_tensor)


def get_loadings(model, return_tensor=False):
    """The loadings ``W``, shape (n_features, n_components)."""
    return _out(_fitted(model).layer_.W, return_tensor)


def get_factors(model, return_tensor=False):
    """``E[exp F] = exp(mu + sigma^2 / 2)`` of the training samples, shape (n_samples, n_components)."""
    mu, var = _marginals(model)
    return _out(torch.exp(mu + var / 2), return_tensor)


class _NaturalNormal(IndependentNormal):
    """:class:`IndependentNormal` parametrised by its natural parameters ``theta1 = mu / s^2`` and
    ``theta2 = -1 / (2 s^2)`` (leaf parameters, each (L, N)): ``loc`` and ``scale`` are derived,
    so gradients of anything computed from ``q(F)`` reach ``theta1``/``theta2``."""

    def __init__(self, base: IndependentNormal):
        super().__init__(base.n_components, base.n_samples, prior_scale=float(base.prior_scale),
                         prior_loc=float(base.prior_loc), dtype=base.loc.dtype, device=base.loc.device)
        with torch.no_grad():
            loc, scale = base.loc_scale()
            prec = scale.detach().square().reciprocal()
            theta1, theta2 = loc.detach() * prec, -0.5 * prec
        del self.loc, self.raw_scale
        self.theta1 = nn.Parameter(theta1.clone())
        self.theta2 = nn.Parameter(theta2.clone())

    @property
    def loc(self) -> Tensor:  # type: ignore[override]
        return self.theta1 / (-2 * self.theta2)

    @property
    def scale(self) -> Tensor:
        return (-0.5 / self.theta2).sqrt()

    @property
    def raw_scale(self) -> Tensor:  # type: ignore[override]
        return inv_softplus(self.scale)

    def loc_scale(self, idx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        t1, t2 = (self.theta1, self.theta2) if idx is None else (self.theta1[:, idx], self.theta2[:, idx])
        return t1 / (-2 * t2), (-0.5 / t2).sqrt()

    def natural_groups(self):
        raise NotImplementedError("q(F) in natural parameters: step theta1/theta2 directly")


class GaussianPrior(nn.Module):
    """PNMF's ``GaussianPrior``: ``q(F) = Normal(mean, scale)`` (L, N) and ``p(F) = Normal(0, scale_pf)``.

    Parameters
    ----------
    y : Tensor of shape (D, N)
        Data (features x samples); only its shape, dtype and device are used.
    L : int, default 10
    scale_pf : float, default 1
    use_natural_gradients : bool, default False
        Parametrise ``q(F)`` by its natural parameters: :attr:`theta1` ``= mu / s^2`` and
        :attr:`theta2` ``= -1 / (2 s^2)`` are then the leaf parameters (what
        :meth:`parameters` and :meth:`natural_parameters` return, where gradients land), and
        ``mean``/``scale`` tensors derived from them. ``theta2`` must stay negative.

    Attributes
    ----------
    mean : Parameter of shape (L, N)
        Variational means (standard mode; a derived tensor in natural mode).
    scale : PositiveParameter of shape (L, N)
        Variational standard deviations, softplus of a raw parameter (standard mode; a
        derived tensor in natural mode). ``scale.data`` is the value.
    theta1, theta2 : Tensor of shape (L, N)
        Natural parameters (leaf parameters in natural mode, derived tensors otherwise).
    factors : torchnmf.IndependentNormal
        The posterior shared with :class:`PoissonFactorization` and torchnmf's layers.
    """

    def __init__(self, y, L=10, scale_pf=1.0, use_natural_gradients=False, *, factors: Optional[IndependentNormal] = None):
        super().__init__()
        natural = _bool(use_natural_gradients, "use_natural_gradients")
        if factors is None:
            Y = as_tensor(y, "y", ndim=2, sparse="dense", float_only=False)
            dtype = Y.dtype if Y.is_floating_point() else torch.get_default_dtype()
            factors = IndependentNormal(check_rank(L, "L"), int(Y.shape[1]), prior_scale=scale_pf, dtype=dtype,
                                        device=Y.device)
            if natural:
                factors = _NaturalNormal(factors)
        self.factors = factors
        self.use_natural_gradients = isinstance(factors, _NaturalNormal)

    @property
    def scale_pf(self) -> float:
        return float(self.factors.prior_scale)

    @property
    def mean(self) -> Tensor:
        """Variational means, (L, N)."""
        return self.factors.loc

    @property
    def scale(self):
        """Variational standard deviations, (L, N): a :class:`PositiveParameter` (standard mode)."""
        if self.use_natural_gradients:
            return self.factors.scale
        return _SoftplusView(self.factors.raw_scale)

    def _loc_scale(self) -> Tuple[Tensor, Tensor]:
        return self.factors.loc_scale()

    @property
    def theta1(self) -> Tensor:
        if self.use_natural_gradients:
            return self.factors.theta1
        loc, scale = self._loc_scale()
        return loc / scale ** 2

    @property
    def theta2(self) -> Tensor:
        if self.use_natural_gradients:
            return self.factors.theta2
        return -0.5 / self._loc_scale()[1] ** 2

    def forward(self) -> Tuple[Normal, Normal]:
        """``(qF, pF)``: ``Normal(mean, scale)`` and ``Normal(0, scale_pf)``, each (L, N)."""
        loc, scale = self.factors.loc_scale()
        return Normal(loc, scale), Normal(torch.zeros_like(loc), torch.full_like(loc, self.scale_pf))

    def forward_batched(self, idx) -> Tuple[Normal, Normal]:
        """``(qF, pF)`` for the samples ``idx``, each (L, B)."""
        loc, scale = self.factors.loc_scale(torch.as_tensor(idx, device=self.theta1.device))
        return Normal(loc, scale), Normal(torch.zeros_like(loc), torch.full_like(loc, self.scale_pf))

    def natural_parameters(self) -> Tuple[Tensor, Tensor]:
        """``(theta1, theta2)``, each (L, N): the leaf parameters in natural mode."""
        return self.theta1, self.theta2

def get_prior(model) -> GaussianPrior:
    """The posterior ``q(F)`` of a fitted model as a :class:`GaussianPrior`.

    Non-spatial models: the model's own posterior (parameters shared). Spatial models: a copy
    of the GP posterior's marginals at the training coordinates, ``Normal(mean, sd)`` per
    sample and component (``qF`` of ``prior()`` is what :func:`log_factors` and
    :func:`factor_uncertainty` give), with ``pF`` standard normal; the GP itself (correlated
    over samples) is ``model.estimator_.layer_.factors``.
    """
    core = _fitted(model)
    factors = core.layer_.factors
    if isinstance(factors, IndependentNormal):
        return GaussianPrior(None, factors=factors)
    with torch.no_grad():
        mu, var = factors.marginals()
        snap = IndependentNormal(mu.shape[0], mu.shape[1], init_loc=mu, dtype=mu.dtype, device=mu.device)
        snap.raw_scale.copy_(inv_softplus(var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()))
    return GaussianPrior(None, factors=snap)


def transform_F(X, W, n_components=None, mode='expanded', E=3, max_iter=200, tol=0.0001, learning_rate=0.01,
                verbose=False, device='auto', return_prior=False):
    """Fit ``q(F)`` of new samples ``X`` (n_samples, n_features) with loadings ``W`` (n_features, K) fixed.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Non-negative; never modified.
    W : array-like of shape (n_features, K)
        Non-negative loadings (e.g. :func:`get_loadings`).
    n_components : int, optional
        ``K``; inferred from ``W``.
    mode : {'simple', 'expanded', 'lower-bound'}, default 'expanded'
    E : int, default 3
    max_iter : int, default 200
        Steps at most.
    tol : float, default 1e-4
        Tolerance for convergence: the refit stops once the ELBO's relative change per step
        is at most ``tol`` (the rule of :mod:`torchnmf.engine`; 0 runs ``max_iter`` steps).
    learning_rate : float, default 0.01
    verbose : bool, default False
    device : {'cpu', 'cuda', 'mps', 'auto'}, default 'auto'
    return_prior : bool, default False

    Returns
    -------
    ndarray of shape (n_samples, K)
        ``E[exp F]``, or the fitted :class:`GaussianPrior` if ``return_prior``.
    """
    Wt = as_tensor(W, "W", ndim=2, sparse="dense", float_only=False)
    check_nonnegative(Wt, "W")
    K = int(Wt.shape[1]) if n_components is None else check_rank(n_components, "n_components")
    if K != Wt.shape[1]:
        raise ValueError(f"W has {Wt.shape[1]} components, n_components={K}")
    check_positive(tol, "tol", allow_zero=True)
    core = _CorePNMF(n_components=K, mode=mode, E=E, learning_rate=learning_rate, verbose=verbose, device=device,
                     transform_max_iter=max_iter)
    T = _document_rule(core._check_X, X, reset=True, counts=True, **core._count_rule())
    if T.shape[1] != Wt.shape[0]:
        raise ValueError(f"X has {T.shape[1]} features, W has {Wt.shape[0]} rows")
    dtype = T.dtype if T.is_floating_point() else torch.get_default_dtype()
    Wd = Wt.to(device=T.device, dtype=dtype)
    core.layer_ = LogNormalPoisson(T.shape[1], 1, K, mode=mode, E=E, loadings_mode="projected", W=Wd,
                                   dtype=dtype, device=T.device)
    core.n_components_ = K
    factors = core._fit_factors(T.to(dtype), core._transform_steps(), tol=float(tol))
    prior = GaussianPrior(None, factors=factors)
    return prior if return_prior else factors_from_prior(prior)


def transform_W(X, F, W_init=None, n_components=None, max_iter=100, tol=0.0001, verbose=False, device='auto'):
    """Loadings ``W`` (n_features, K) for ``X`` (n_samples, n_features) with factors ``F = exp(F)`` fixed.

    Multiplicative updates of the Poisson (KL) objective: :class:`torchnmf.NMF` with ``H = F``
    fixed, fitted by :meth:`~torchnmf.nmf.BaseComponent.fit` with ``beta=1``.
    """
    Ft = as_tensor(F, "F", ndim=2, sparse="dense", float_only=False).to(torch.float64)
    check_nonnegative(Ft, "F")
    Xt = as_tensor(X, "X", ndim=2, sparse="dense", float_only=False).to(torch.float64)
    check_nonnegative(Xt, "X")
    if Xt.shape[0] != Ft.shape[0]:
        raise ValueError(f"X has {Xt.shape[0]} samples, F has {Ft.shape[0]}")
    K = int(Ft.shape[1]) if n_components is None else check_rank(n_components, "n_components")
    if K != Ft.shape[1]:
        raise ValueError(f"F has {Ft.shape[1]} components, n_components={K}")
    if W_init is None:
        g = torch.Generator().manual_seed(0)
        W0 = torch.rand(Xt.shape[1], K, dtype=torch.float64, generator=g) + 0.1
    else:
        W0 = as_tensor(W_init, "W_init", ndim=2, sparse="dense", float_only=False).to(torch.float64)
        if tuple(W0.shape) != (Xt.shape[1], K):
            raise ValueError(f"W_init must have shape {(Xt.shape[1], K)}, got {tuple(W0.shape)}")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    m = NMF(W=W0, H=Ft, trainable_H=False).to(dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ConvergenceWarning of a short refit
        m.fit(Xt.to(dev), beta=1, tol=tol, max_iter=check_rank(max_iter, "max_iter"), verbose=verbose)
    return m.W.detach().cpu().numpy()


def log_factors_from_prior(prior: GaussianPrior, return_tensor=False):
    """Means of ``q(F)``, shape (n_samples, n_components)."""
    return _out(prior.mean.t(), return_tensor)


def factors_from_prior(prior: GaussianPrior, use_mgf=True, return_tensor=False):
    """``exp(mu + sigma^2 / 2)`` (``use_mgf``) or ``exp(mu)``, shape (n_samples, n_components)."""
    mu, scale = prior._loc_scale()
    out = torch.exp(mu + scale ** 2 / 2) if use_mgf else torch.exp(mu)
    return _out(out.t(), return_tensor)


def uncertainty_from_prior(prior: GaussianPrior, return_variance=False, return_tensor=False):
    """Standard deviations (or variances) of ``q(F)``, shape (n_samples, n_components)."""
    s = prior._loc_scale()[1]
    return _out((s ** 2 if return_variance else s).t(), return_tensor)


# -- PNMF.custom_modules ------------------------------------------------------------------
def _shape(shape) -> Tuple[int, ...]:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (int(shape),)
    if not isinstance(shape, (tuple, list, torch.Size)) or not shape:
        raise TypeError(f"shape must be an int or a non-empty tuple of ints, got {shape!r}")
    return tuple(check_rank(s, "shape") for s in shape)


class ConstrainedParameter(nn.Module):
    """PNMF's ``ConstrainedParameter``: a constrained value over an unconstrained raw parameter.

    Subclasses implement ``_to_constrained`` and ``_to_unconstrained``; the raw
    ``nn.Parameter`` is :attr:`raw` (``._raw``) and :attr:`data` is the constrained value.
    Tensor-like helpers (``shape``, a tuple; ``size``, ``numpy``...) act on the constrained
    value; ``to``, ``cpu``, ``cuda``, ``float``, ``double``, ``half`` are the module's and
    move or cast the raw parameter.

    Parameters
    ----------
    shape : int or tuple of int
        Shape of the constrained parameter.
    mode : str
        Constraint mode (subclass-specific).
    """

    def __init__(self, shape, mode: str):
        super().__init__()
        self._shape = _shape(shape)
        self.mode = mode

    # the bijection (subclasses)
    def _to_constrained(self, raw: Tensor) -> Tensor:
        raise NotImplementedError

    def _to_unconstrained(self, value: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def shape(self) -> Tuple[int, ...]:
        # shape of the constrained parameter (no docstring: a documented `shape` would make
        # Sphinx's cross-references to io.Matrix.shape ambiguous)
        return tuple(self._raw.shape)

    @property
    def data(self) -> Tensor:
        """The constrained value (differentiable w.r.t. :attr:`raw`)."""
        return self._to_constrained(self._raw)

    @property
    def raw(self) -> nn.Parameter:
        """The underlying unconstrained parameter."""
        return self._raw

    @property
    def requires_grad(self) -> bool:
        return self._raw.requires_grad

    @property
    def device(self) -> torch.device:
        return self._raw.device

    @property
    def dtype(self) -> torch.dtype:
        return self._raw.dtype

    @property
    def grad(self):
        """Gradient of the raw parameter."""
        return self._raw.grad

    @property
    def is_cuda(self) -> bool:
        return self._raw.is_cuda

    @property
    def is_leaf(self) -> bool:
        return self._raw.is_leaf

    def freeze(self):
        """Stop gradients to the raw parameter."""
        self._raw.requires_grad_(False)
        return self

    def unfreeze(self):
        """Resume gradients to the raw parameter."""
        self._raw.requires_grad_(True)
        return self

    def project(self):
        """Project onto the constraint set (no-op unless a subclass's mode needs it)."""

    def __getitem__(self, idx) -> Tensor:
        return self.data[idx]

    def dim(self) -> int:
        return self._raw.dim()

    def size(self, dim=None):
        return self._raw.size() if dim is None else self._raw.size(dim)

    def numel(self) -> int:
        return self._raw.numel()

    def detach(self) -> Tensor:
        return self.data.detach()

    def clone(self) -> Tensor:
        return self.data.clone()

    def contiguous(self) -> Tensor:
        return self.data.contiguous()

    def numpy(self) -> np.ndarray:
        return self.data.detach().cpu().numpy()


class PositiveParameter(ConstrainedParameter):
    """PNMF's ``PositiveParameter``: a positive tensor parameter in one of torchnmf's positivity modes.

    A thin adapter over :mod:`torchnmf.constraints`: :attr:`raw` is a
    :class:`torchnmf.constraints.PositiveParameter` and the modes are the same.

    Parameters
    ----------
    shape : int or tuple of int
        Any shape.
    mode : {'softplus', 'exp', 'projected', 'multiplicative'}, default 'softplus'
        ``softplus(raw)``, ``exp(raw)``, or the raw value itself kept >= 0 by :meth:`project`
        (``'projected'``) or by :meth:`multiplicative_update` (``'multiplicative'``, no
        gradient optimizer).
    elbo_mode : {'lower-bound', 'expanded', 'simple'}, default 'expanded'
        ELBO mode of the terms :meth:`multiplicative_update` reads.
    value : Tensor, optional (keyword only)
        Initial non-negative value; default uniform in ``[0.5, 1.5)``.
    raw : torchnmf.constraints.PositiveParameter, optional (keyword only)
        Wrap this existing raw parameter (shared, e.g. a layer's ``W``) instead of a new one.

    Examples
    --------
    >>> W = PositiveParameter((4, 2), mode="softplus")
    >>> bool((W.data > 0).all()), W.shape
    (True, (4, 2))
    """

    def __init__(self, shape, mode: str = "softplus", elbo_mode: str = "expanded", *, value=None, raw=None):
        from .. import constraints
        from ..poisson.lognormal import ELBO_MODES

        check_option(mode, constraints.MODES, "mode")
        check_option(elbo_mode, ELBO_MODES, "elbo_mode")
        super().__init__(shape, mode)
        self.elbo_mode = elbo_mode
        if raw is not None:
            if constraints.mode_of(raw) is None:
                raise TypeError("raw must be a torchnmf.constraints.PositiveParameter")
            if tuple(raw.shape) != self._shape:
                raise ValueError(f"raw has shape {tuple(raw.shape)}, expected {self._shape}")
            if constraints.mode_of(raw) != mode:
                raise ValueError(f"raw is in mode {constraints.mode_of(raw)!r}, expected {mode!r}")
            self._raw = raw
            return
        if value is None:
            value = torch.rand(self._shape) + 0.5
        else:
            value = as_tensor(value, "value", sparse="dense").detach().clone()
            if tuple(value.shape) != self._shape:
                raise ValueError(f"value has shape {tuple(value.shape)}, expected {self._shape}")
            check_nonnegative(value, "value")
        self._raw = constraints.PositiveParameter(self._to_unconstrained(value), mode)

    def _to_constrained(self, raw: Tensor) -> Tensor:
        from .. import constraints

        return constraints.value_of(raw)

    def _to_unconstrained(self, value: Tensor) -> Tensor:
        from .. import constraints

        tr = {"softplus": constraints.Softplus, "exp": constraints.Exp}.get(self.mode)
        return tr().right_inverse(value) if tr is not None else value

    def project(self):
        """Clamp to >= 0 in place (``'projected'`` mode; other modes are positive already)."""
        from .. import constraints

        constraints.project_([self._raw])
        return self

    @torch.no_grad()
    def multiplicative_update(self, X, terms: dict, idy=None, eps: float = 1e-08) -> Tensor:
        r"""``W <- W * numerator / denominator`` from the terms of :meth:`PoissonFactorization.forward`.

        With ``W`` of shape (D, L), ``X`` (D_b, N_b) and factors (L, N_b):
        numerator ``= sum_n X_dn e^{F_ln} / (W e^F)_dn`` averaged over the draws
        (``'expanded'``/``'simple'``: ``terms['exp_F_samples']``, (E, L, N_b)) or with
        ``e^F = exp(mu)`` (``'lower-bound'``: ``terms['exp_mu']``, ``terms['rate_mean']``);
        denominator ``= sum_n E[e^{F_ln}]`` (``terms['exp_mu_sigma']``; the draws' mean for
        ``'simple'``). The minorize-maximize update of each mode's bound.

        Parameters
        ----------
        X : Tensor of shape (D_b, N_b)
        terms : dict
        idy : LongTensor of shape (D_b,), optional
            Rows of ``W`` to update (default all).
        eps : float, default 1e-8

        Returns
        -------
        Tensor of shape (D_b, L)
            The updated rows.
        """
        from .. import constraints

        W_all = self.data.detach()
        W = W_all if idy is None else W_all[torch.as_tensor(idy, device=W_all.device)]
        Xt = _document_rule(check_counts, as_tensor(X, "X", ndim=2, sparse="dense", device=W.device), "X").to(W.dtype)
        if self.elbo_mode == "lower-bound":
            expF = terms["exp_mu"][None]
        else:
            expF = terms["exp_F_samples"]
        num = torch.zeros_like(W)
        for e in expF:  # (L, N_b) per draw: no (E, D, N) tensor
            num += (Xt / (W @ e).clamp_min(eps)) @ e.t()
        num /= expF.shape[0]
        den = (expF.mean(0) if self.elbo_mode == "simple" else terms["exp_mu_sigma"]).sum(1)
        new = W * num / den.clamp_min(eps)[None, :]
        if idy is None:
            full = new
        else:
            full = W_all.clone()
            full[torch.as_tensor(idy, device=W_all.device)] = new
        constraints.assign_(self._raw, full)
        return new


class _SoftplusView(PositiveParameter):
    """A :class:`PositiveParameter` over an existing raw tensor with a softplus constraint (shared)."""

    def __init__(self, raw: nn.Parameter):
        ConstrainedParameter.__init__(self, tuple(raw.shape), "softplus")
        self.elbo_mode = "expanded"
        self._raw = raw

    def _to_constrained(self, raw: Tensor) -> Tensor:
        return torch.nn.functional.softplus(raw)

    def _to_unconstrained(self, value: Tensor) -> Tensor:
        return inv_softplus(value)

    def project(self):
        return self



# -- PNMF.models --------------------------------------------------------------------------
class PoissonFactorization(nn.Module):
    """PNMF's ``PoissonFactorization``: ``y ~ Poisson(W exp(F))`` over a :class:`GaussianPrior`.

    A thin adapter over :class:`torchnmf.poisson.LogNormalPoisson`, which shares the
    prior's ``q(F)`` and whose loadings are :attr:`W`.

    Parameters
    ----------
    prior : GaussianPrior, or torchnmf.poisson.spatial.SVGP / LCGP
        ``q(F)`` and ``p(F)``, (L, N); a GP prior (over the samples' coordinates) makes this a
        spatial model, whose :meth:`forward` takes ``spatial=True``.
    y : Tensor of shape (D, N)
        Data (features x samples). Non-negative counts for the likelihood terms of
        :meth:`forward`; other data only fixes the shapes (as in PNMF's example).
    L : int, default 10
        Must equal the prior's ``L``.
    loadings_mode : {'softplus', 'exp', 'projected', 'multiplicative'}, default 'softplus'
    mode : {'simple', 'expanded', 'lower-bound'}, default 'expanded'

    Attributes
    ----------
    prior : GaussianPrior
    W : PositiveParameter
        Loadings, shape (D, L).
    layer : torchnmf.poisson.LogNormalPoisson
    loadings_mode : str
    D, N, L : int

    Examples
    --------
    >>> import torch
    >>> y = torch.randn(100, 50)
    >>> prior = GaussianPrior(y, L=10)
    >>> model = PoissonFactorization(prior, y, L=10)
    >>> rate, qF, pF = model(E=10)
    >>> tuple(rate["rate"].shape), tuple(qF.mean.shape)
    ((100, 50), (10, 50))
    """

    def __init__(self, prior, y, L=10, loadings_mode='softplus', mode='expanded'):
        super().__init__()
        from .. import constraints
        from ..poisson.lognormal import ELBO_MODES

        from ..poisson.spatial import SVGP, LCGP

        if isinstance(prior, GaussianPrior):
            factors = prior.factors
        elif isinstance(prior, (SVGP, LCGP)):
            factors = prior  # a GP prior: forward(spatial=True)
        else:
            raise TypeError(f"prior must be a GaussianPrior (or a torchnmf.poisson.spatial SVGP/LCGP for "
                            f"spatial=True), got {type(prior).__name__}")
        Y = as_tensor(y, "y", ndim=2, sparse="dense", float_only=False)
        L = check_rank(L, "L")
        if L != factors.n_components:
            raise ValueError(f"L={L} but the prior has L={factors.n_components}")
        if int(Y.shape[1]) != factors.n_samples:
            raise ValueError(f"y has {Y.shape[1]} samples (columns), the prior has N={factors.n_samples}")
        check_option(loadings_mode, constraints.MODES, "loadings_mode")
        check_option(mode, ELBO_MODES, "mode")
        ref = next(factors.parameters())
        dtype, device = ref.dtype, ref.device
        self.prior = prior
        self._factors = factors
        self.D, self.N, self.L = int(Y.shape[0]), factors.n_samples, L
        self.mode = mode
        Yf = Y.detach().to(dtype=dtype, device=device)
        self.register_buffer("y", Yf.clone())
        self._counts = bool(torch.isfinite(Yf).all()) and bool((Yf >= 0).all())
        W0 = (torch.rand(self.D, L, dtype=dtype, device=device) + 0.5) / L
        self.layer = LogNormalPoisson(self.D, self.N, L, mode=mode, loadings_mode=loadings_mode, factors=factors,
                                      W=W0, dtype=dtype, device=device)
        self.W = PositiveParameter((self.D, L), loadings_mode, mode, raw=self.layer._raw_W())

    @property
    def loadings_mode(self) -> str:
        return self.W.mode

    def get_rate(self, prior_samples, idy=None) -> Tensor:
        """``Z = W[idy] exp(F)`` per draw: ``prior_samples`` (E, L, N) -> (E, D or D_batch, N)."""
        F = as_tensor(prior_samples, "prior_samples", ndim=3, sparse="dense", dtype=self.W.dtype,
                      device=self.W.device)
        if F.shape[1] != self.L:
            raise ValueError(f"prior_samples must have shape (E, {self.L}, N), got {tuple(F.shape)}")
        W = self.W.data if idy is None else self.W.data[torch.as_tensor(idy, device=self.W.device)]
        return torch.einsum("dl,eln->edn", W, torch.exp(F))

    def forward(self, idx=None, idy=None, E=10, X=None, coordinates=None, groups=None, spatial=False):
        """Variational distributions and log-likelihood terms of a batch.

        Parameters
        ----------
        idx : LongTensor of shape (B,), optional
            Samples (columns) of the batch; default all.
        idy : LongTensor of shape (D_b,), optional
            Features (rows); default all.
        E : int, default 10
            Monte Carlo draws (unused by ``'lower-bound'``).
        X : Tensor of shape (D_b, B), optional
            The batch's counts; default ``y[idy][:, idx]``.
        coordinates : array-like of shape (B, 2), optional
            ``spatial=True``: new locations (the GP predictive; not with ``idx``).
        groups : array-like of shape (B,), optional
            Their groups (multi-group GPs).
        spatial : bool, default False
            The GP forward pass; True exactly when the prior is a GP (``SVGP``/``LCGP``).

        Returns
        -------
        terms : dict
            ``'rate'`` (D_b, B) ``= W E[e^F]``; ``'rate_mean'`` (D_b, B) ``= W e^mu``;
            ``'exp_mu'``, ``'exp_mu_sigma'`` (L, B) ``= e^mu``, ``e^{mu + sigma^2/2}``;
            ``'exp_F_samples'`` (E, L, B) in the Monte Carlo modes; ``'kl'`` (the KL scaled to
            the full data); and for count data the ELBO pieces ``'log_term'``,
            ``'rate_term'``, ``'lgamma'``, ``'log_likelihood'`` (scaled to the full data) and
            ``'elbo'`` (all shape ()).
        qF, pF : torch.distributions.Normal
            ``q(F)`` and ``p(F)`` of the batch, (L, B) (non-spatial).
        qF, qU, pU
            Spatial: ``q(F)``'s marginals from the GP (L, B); ``q`` of the inducing values
            (an SVGP's whitened ``v``, a ``MultivariateNormal`` (L, M); an LCGP's values at
            every sample, low-rank plus diagonal); ``pU`` is None (whitened, as documented).
            At new ``coordinates`` the terms hold the rates and draws only (no counts, no ELBO).
        """
        from ..poisson.lognormal import _check_idx

        gp = not isinstance(self.prior, GaussianPrior)
        if _bool(spatial, "spatial") != gp:
            raise ValueError("spatial=True needs a GP prior (PoissonFactorization(SVGP(...) or LCGP(...), y)), "
                             "spatial=False a GaussianPrior; this model's prior is a "
                             f"{type(self.prior).__name__}")
        if not gp and (coordinates is not None or groups is not None):
            raise ValueError("coordinates and groups are for spatial=True (a GP prior)")
        E = check_rank(E, "E")
        idx_t = _check_idx(idx, self.N, "idx")
        if not gp:
            qF, pF = self.prior() if idx_t is None else self.prior.forward_batched(idx_t)
            return self.compute_log_likelihood_terms(qF, X=X, idx=idx_t, idy=idy, E=E, return_samples=True), qF, pF
        if coordinates is not None and idx_t is not None:
            raise ValueError("give idx (training samples) or coordinates (new locations), not both")
        covariates = {} if coordinates is None else dict(coordinates=coordinates, groups=groups)
        mean, var = self.prior.marginals(idx_t, **covariates)
        qF = Normal(mean, var.clamp_min(torch.finfo(var.dtype).tiny).sqrt())
        if hasattr(self.prior, "q_scale_tril"):  # SVGP: whitened inducing values v, u = chol(K_uu) v
            qU = torch.distributions.MultivariateNormal(self.prior.q_loc, scale_tril=self.prior.q_scale_tril)
        elif self.prior.diagonal_only:  # LCGP: every sample is inducing, low-rank + diagonal covariance
            qU = Normal(self.prior.q_loc, self.prior.q_scale)
        else:
            qU = torch.distributions.LowRankMultivariateNormal(self.prior.q_loc, self.prior.q_factor,
                                                               self.prior.q_scale.square())
        if coordinates is not None:  # new locations: no counts of them are held
            return self.compute_log_likelihood_terms(qF, X=X, idx=None, idy=idy, E=E, return_samples=True,
                                                     _covariates=covariates), qF, qU, None
        terms = self.compute_log_likelihood_terms(qF, X=X, idx=idx_t, idy=idy, E=E, return_samples=True)
        return terms, qF, qU, None

    def compute_log_likelihood_terms(self, qF, X=None, idx=None, idy=None, E=10, return_samples=False,
                                     *, _covariates=None) -> dict:
        """The likelihood terms of a batch under ``q(F)`` (what :meth:`forward` returns first).

        Parameters
        ----------
        qF : torch.distributions.Normal
            ``q(F)`` of the batch's samples, (L, B) (e.g. from :meth:`GaussianPrior.forward_batched`).
        X : Tensor of shape (D_b, B), optional
            The batch's counts; default ``y[idy][:, idx]`` when ``y`` holds counts.
        idx, idy : LongTensor, optional
            Samples and features of the batch (default all).
        E : int, default 10
            Monte Carlo draws (unused by ``'lower-bound'``).
        return_samples : bool, default False
            Include ``'exp_F_samples'`` (E, L, B), the draws :meth:`PositiveParameter.multiplicative_update`
            reads in the Monte Carlo modes.

        Returns
        -------
        dict
            The keys listed under :meth:`forward` (the ELBO pieces ``'log_term'`` ... ``'elbo'``
            are those of the prior's ``q(F)``, which ``qF`` is expected to be).
        """
        from ..poisson.lognormal import _check_idx

        E = check_rank(E, "E")
        idx_t = _check_idx(idx, self.N, "idx")
        idy_t = _check_idx(idy, self.D, "idy")
        mu, var = qF.mean, qF.variance
        if _covariates:  # new locations of a GP prior: rates and draws only
            W = self.W.data if idy_t is None else self.W.data[idy_t]
            terms = dict(exp_mu=torch.exp(mu), exp_mu_sigma=torch.exp(mu + var / 2))
            terms["rate"], terms["rate_mean"] = W @ terms["exp_mu_sigma"], W @ terms["exp_mu"]
            if self.mode != "lower-bound" and return_samples:
                terms["exp_F_samples"] = torch.exp(qF.rsample((E,)))
            terms["kl"] = self._factors.kl()
            return terms
        if tuple(mu.shape) != (self.L, self.N if idx_t is None else idx_t.numel()):
            raise ValueError(f"qF has shape {tuple(mu.shape)}, expected (L, batch) = "
                             f"{(self.L, self.N if idx_t is None else idx_t.numel())}")
        W = self.W.data if idy_t is None else self.W.data[idy_t]
        terms = dict(exp_mu=torch.exp(mu), exp_mu_sigma=torch.exp(mu + var / 2))
        terms["rate"] = W @ terms["exp_mu_sigma"]
        terms["rate_mean"] = W @ terms["exp_mu"]
        if self.mode != "lower-bound" and _bool(return_samples, "return_samples"):
            terms["exp_F_samples"] = torch.exp(qF.rsample((E,)))
        terms["kl"] = self._factors.kl(idx_t)
        if X is None and self._counts:
            X = self.y if idy_t is None else self.y[idy_t]
            X = X if idx_t is None else X[:, idx_t]
        if X is not None:
            Xt = as_tensor(X, "X", ndim=2, dtype=W.dtype, device=W.device)
            log_term, rate_term, lg = self.layer.data_terms(Xt, idx_t, idy_t, E=E)
            terms.update(log_term=log_term, rate_term=rate_term, lgamma=lg)
            terms["log_likelihood"] = (log_term - rate_term - lg) * self.layer._scale(idx_t, idy_t)
            terms["elbo"] = terms["log_likelihood"] - terms["kl"]
        return terms

    def project_parameters(self):
        """Clamp ``W`` to >= 0 (``loadings_mode='projected'``)."""
        self.W.project()
