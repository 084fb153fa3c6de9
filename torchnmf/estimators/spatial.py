"""scikit-learn estimator for log-normal Poisson factorization with spatial GP factor priors."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Normal, kl_divergence

from ..data import check_option, check_positive, check_rank
from ..poisson.lognormal import Counts, IndependentNormal, LogNormalPoisson
from ..poisson.spatial import CHOLESKY_MODES, INDUCING_ALLOCATIONS, LCGP, SVGP, check_coordinates
from .pnmf import PNMF

__all__ = ["SpatialPNMF"]


def _obsm_spatial(X, coordinates, spatial: bool):
    """``coordinates``, or by default an AnnData's ``obsm['spatial']`` when the prior is spatial."""
    if coordinates is None and spatial and type(X).__module__.split(".")[0] == "anndata" and "spatial" in X.obsm:
        return np.asarray(X.obsm["spatial"])
    return coordinates


class _NormalUnderPredictive(IndependentNormal):
    """Mean-field ``q(F)`` for new samples whose prior is the GP predictive ``N(mean, var)`` (K, N)."""

    def __init__(self, prior_mean: Tensor, prior_var: Tensor, init_scale: float):
        K, N = prior_mean.shape
        super().__init__(K, N, init_loc=prior_mean.detach(), init_scale=init_scale, dtype=prior_mean.dtype,
                         device=prior_mean.device)
        self.register_buffer("predictive_mean", prior_mean.detach().clone())
        self.register_buffer("predictive_std", prior_var.detach().clamp_min(1e-12).sqrt())

    def kl(self, idx: Optional[Tensor] = None, **covariates) -> Tensor:
        loc, scale = self.loc_scale(idx)
        pm = self.predictive_mean if idx is None else self.predictive_mean[:, idx]
        ps = self.predictive_std if idx is None else self.predictive_std[:, idx]
        return kl_divergence(Normal(loc, scale), Normal(pm, ps)).sum() * (self.n_samples / loc.shape[1])


class SpatialPNMF(PNMF):
    r"""Log-normal Poisson factorization whose log-factors have Gaussian-process priors.

    ``X`` (spots x features) is modelled as ``X.T ~ Poisson(W exp(F))`` as in :class:`PNMF`;
    each row of ``F`` (one per component) gets a GP prior over the spots' coordinates:
    a sparse variational GP (:class:`~torchnmf.poisson.SVGP`), or with ``local=True`` a
    locally conditioned GP (:class:`~torchnmf.poisson.LCGP`), optionally with the
    multi-group kernel (``multigroup=True``). With ``spatial=False`` it is :class:`PNMF`.

    Parameters
    ----------
    n_components, loadings_mode, mode, E, max_iter, tol, learning_rate, optimizer, random_state, verbose, device, dtype, init, scheduler, batch_size, y_batch_size, shuffle, init_scale, transform_max_iter, allow_noninteger
        As in :class:`PNMF`, except the defaults ``loadings_mode='softplus'`` and
        ``training_mode='standard'`` (Adam on all parameters; see ``training_mode``).
    training_mode : {'standard', 'natural'}, default 'standard'
        ``'natural'`` with ``spatial=True``: natural-gradient steps
        (:class:`~torchnmf.trainer.GaussianNatural`) for the whitened inducing values of an
        SVGP with ``diagonal_only=True`` (mean-field, so the steps are exact), the
        ``optimizer`` for the kernel, the GP prior means and, for a full-covariance SVGP or
        the LCGP (not mean-field), for the variational parameters too; ``W`` as in
        :class:`PNMF`. New samples' ``q(F)`` (:meth:`transform`) takes natural steps.
    prior_scale : float, default 1
        Prior standard deviation of ``F`` with ``spatial=False`` (unused otherwise).
    spatial : bool, default True
        Use a GP prior; ``fit`` then needs ``coordinates``.
    local : bool, default False
        LCGP instead of SVGP.
    multigroup : bool, default False
        Multi-group kernel; ``fit`` then needs ``groups``.
    num_inducing : int, default 100
        SVGP inducing points.
    lengthscale : float, optional
        Initial Matern 3/2 lengthscale (learned); default a tenth of the largest coordinate range.
    sigma : float, default 1
        Initial kernel output scale (learned).
    group_diff_param : float, default 1
        Initial group-difference parameter of the multi-group kernel (learned).
    jitter : float, default 1e-5
    cholesky_mode : {'exp', 'softplus'}, default 'exp'
        Positive transform of the posterior Cholesky diagonal.
    diagonal_only : bool, default False
        Diagonal posterior covariance of the inducing values.
    inducing_allocation : {'proportional', 'equal', 'derived'}, default 'proportional'
        Split of the inducing points among groups.
    K : int, default 8
        Neighbours of each spot in the LCGP.
    precompute_knn : bool, default True
        Find the LCGP neighbours once at fit time (else per batch on the device).

    Attributes
    ----------
    layer_ : LogNormalPoisson
        Its ``factors`` is the fitted :class:`~torchnmf.poisson.SVGP` or
        :class:`~torchnmf.poisson.LCGP`.
    groups_ : ndarray
        The distinct group labels seen in ``fit`` (``multigroup`` only); label ``groups_[i]``
        is group ``i`` of the kernel.
    components_, elbo_, n_iter_, history_, n_components_, n_features_in_
        As in :class:`PNMF`, except the defaults ``loadings_mode='softplus'`` and
        ``training_mode='standard'`` (Adam on all parameters; see ``training_mode``).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> xy = rng.uniform(size=(60, 2))
    >>> X = rng.poisson(2.0, size=(60, 10))
    >>> model = SpatialPNMF(n_components=2, num_inducing=10, max_iter=20, random_state=0)
    >>> model.fit(X, coordinates=xy).transform(X[:5], coordinates=xy[:5]).shape
    (5, 2)
    """

    def __init__(self, n_components: int = 2, loadings_mode: str = "softplus", mode: str = "lower-bound",
                 training_mode: str = "standard", E: int = 3, max_iter: int = 500, tol: float = 1e-5,
                 learning_rate: Optional[float] = None, optimizer="adam", random_state=None, verbose: bool = False,
                 device=None, dtype=None, init: Optional[str] = None, scheduler: Optional[str] = None,
                 batch_size: Optional[int] = None, y_batch_size: Optional[int] = None, shuffle: bool = True,
                 prior_scale: float = 1.0, init_scale: float = 0.1, transform_max_iter: int = 200,
                 spatial: bool = True, local: bool = False, multigroup: bool = False, num_inducing: int = 100,
                 lengthscale: Optional[float] = None, sigma: float = 1.0, group_diff_param: float = 1.0,
                 jitter: float = 1e-5, cholesky_mode: str = "exp", diagonal_only: bool = False,
                 inducing_allocation: str = "proportional", K: int = 8, precompute_knn: bool = True,
                 allow_noninteger: bool = False):
        super().__init__(n_components=n_components, loadings_mode=loadings_mode, mode=mode,
                         training_mode=training_mode, E=E, max_iter=max_iter, tol=tol, learning_rate=learning_rate,
                         optimizer=optimizer, random_state=random_state, verbose=verbose, device=device, dtype=dtype,
                         init=init, scheduler=scheduler, batch_size=batch_size, y_batch_size=y_batch_size,
                         shuffle=shuffle, prior_scale=prior_scale, init_scale=init_scale,
                         transform_max_iter=transform_max_iter, allow_noninteger=allow_noninteger)
        self.spatial = spatial
        self.local = local
        self.multigroup = multigroup
        self.num_inducing = num_inducing
        self.lengthscale = lengthscale
        self.sigma = sigma
        self.group_diff_param = group_diff_param
        self.jitter = jitter
        self.cholesky_mode = cholesky_mode
        self.diagonal_only = diagonal_only
        self.inducing_allocation = inducing_allocation
        self.K = K
        self.precompute_knn = precompute_knn

    # -- checks ----------------------------------------------------------------------
    def _check_spatial_params(self):
        for name in ("spatial", "local", "multigroup", "diagonal_only", "precompute_knn"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not self.spatial:
            if self.multigroup:
                raise ValueError("multigroup=True needs spatial=True")
            return
        check_rank(self.num_inducing, "num_inducing")
        if self.lengthscale is not None:
            check_positive(self.lengthscale, "lengthscale")
        check_positive(self.sigma, "sigma")
        check_positive(self.group_diff_param, "group_diff_param")
        check_positive(self.jitter, "jitter")
        check_option(self.cholesky_mode, CHOLESKY_MODES, "cholesky_mode")
        check_option(self.inducing_allocation, INDUCING_ALLOCATIONS, "inducing_allocation")
        check_rank(self.K, "K")

    def _check_params(self, N: int, D: int):
        super()._check_params(N, D)
        self._check_spatial_params()

    def _covariates(self, X, coordinates, groups, fitting: bool) -> Tuple[Optional[Tensor], Optional[np.ndarray]]:
        """Validate coordinates and groups for ``X`` (before any work); return them as tensor / int codes."""
        self._check_spatial_params()
        if not self.spatial:
            if coordinates is not None:
                raise ValueError("coordinates were given but spatial=False; pass spatial=True to use them")
            if groups is not None:
                raise ValueError("groups were given but multigroup=False; pass multigroup=True to use them")
            return None, None
        if coordinates is None:
            raise ValueError("coordinates are required when spatial=True: pass coordinates= with shape "
                             "(n_samples, n_dims)")
        n = X.shape[0] if hasattr(X, "shape") else len(X)
        dim = None if fitting else self._n_dims_
        C = check_coordinates(coordinates, n=int(n), dim=dim, dtype=torch.float64)
        if not self.multigroup:
            if groups is not None:
                raise ValueError("groups were given but multigroup=False; pass multigroup=True to use them")
            return C, None
        if groups is None:
            raise ValueError("groups are required when multigroup=True: pass groups= with one label per sample")
        labels = np.asarray(groups.detach().cpu() if isinstance(groups, Tensor) else groups)
        if labels.ndim != 1 or labels.shape[0] != n:
            raise ValueError(f"groups must have shape ({n},), got shape {labels.shape}")
        if fitting:
            self.groups_, codes = np.unique(labels, return_inverse=True)
        else:
            known = {v: i for i, v in enumerate(self.groups_.tolist())}
            unknown = sorted({v for v in labels.tolist() if v not in known}, key=str)
            if unknown:
                raise ValueError(f"groups holds labels not seen in fit: {unknown[:5]}")
            codes = np.array([known[v] for v in labels.tolist()], dtype=np.int64)
        return C, codes.astype(np.int64)

    # -- fitting ---------------------------------------------------------------------
    def fit(self, X, y=None, coordinates=None, groups=None, *, layer: Optional[str] = None,
            use_highly_variable: Optional[bool] = None, **fit_params):
        """Fit the factorization.

        Parameters
        ----------
        X : array-like, scipy.sparse, tensor or AnnData of shape (n_samples, n_features)
            Non-negative counts. Never modified.
        y : ignored
        coordinates : array-like of shape (n_samples, n_dims)
            Spot coordinates (required with ``spatial=True``; finite). Default for an AnnData:
            its ``obsm['spatial']`` (squidpy's key), when present.
        groups : array-like of shape (n_samples,)
            Group labels of any hashable type (required with ``multigroup=True``).
        layer : str, optional
            AnnData input only: the layer to factorize (default ``adata.X``).
        use_highly_variable : bool, optional
            AnnData input only: fit the genes flagged in ``var['highly_variable']`` (default:
            when that column exists, as :func:`scanpy.tl.pca`).
        **fit_params
            ``return_history``, ``callback``, ``callback_interval`` as in :meth:`PNMF.fit`.

        Returns
        -------
        self, or the History if ``return_history``.
        """
        coordinates = _obsm_spatial(X, coordinates, self.spatial)
        X = self._adata_in(X, layer, use_highly_variable, reset=True)
        C, codes = self._covariates(X, coordinates, groups, fitting=True)
        self._fit_coordinates, self._fit_groups = C, codes
        try:
            return super().fit(X, y, **fit_params)
        finally:
            del self._fit_coordinates, self._fit_groups

    def _init_layer(self, T: Tensor, g: torch.Generator) -> LogNormalPoisson:
        layer = super()._init_layer(T, g)
        if not self.spatial:
            return layer
        N, D = T.shape
        coords = self._fit_coordinates.to(device=T.device, dtype=T.dtype)
        self._n_dims_ = int(coords.shape[1])
        groups = None if self._fit_groups is None else torch.as_tensor(self._fit_groups, device=T.device)
        lengthscale = self.lengthscale
        if lengthscale is None:
            extent = float((coords.max(0).values - coords.min(0).values).max())
            lengthscale = 0.1 * extent if extent > 0 else 1.0
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g))
        common = dict(groups=groups, multigroup=bool(self.multigroup), lengthscale=lengthscale, sigma=self.sigma,
                      group_diff_param=self.group_diff_param, jitter=self.jitter, cholesky_mode=self.cholesky_mode,
                      diagonal_only=bool(self.diagonal_only), init_scale=self.init_scale, random_state=seed,
                      dtype=T.dtype, device=T.device)
        if self.local:
            prior = LCGP(coords, self.n_components, n_neighbors=self.K, precompute_knn=bool(self.precompute_knn),
                         **common)
        else:
            prior = SVGP(coords, self.n_components, num_inducing=self.num_inducing,
                         inducing_allocation=self.inducing_allocation, **common)
        self._warm_start(prior, layer.factors.loc.detach())
        return LogNormalPoisson(D, N, self.n_components, mode=self.mode, E=self.E, loadings_mode=self.loadings_mode,
                                factors=prior, W=layer.W.detach(), dtype=T.dtype, device=T.device)

    @torch.no_grad()
    def _warm_start(self, prior, loc: Tensor):
        """Start ``q(F)`` near the initial log-factors ``loc`` (K, N), smoothed by the prior."""
        prior.mean.copy_(loc.mean(1))
        resid = loc - loc.mean(1, keepdim=True)
        if isinstance(prior, LCGP):
            prior.q_loc.copy_(resid)
            return
        # ridge regression on the whitened features: the GP posterior mean for unit noise
        L = prior.prior_cholesky()
        M = prior.num_inducing
        gram = torch.eye(M, dtype=L.dtype, device=L.device).repeat(prior.n_components, 1, 1)
        rhs = torch.zeros(prior.n_components, M, dtype=L.dtype, device=L.device)
        for cols in torch.arange(prior.n_samples, device=L.device).split(4096):  # O(K M chunk) memory
            g = None if prior.groups is None else prior.groups[cols]
            A = torch.linalg.solve_triangular(
                L, prior.covariance(prior.inducing_points, prior.inducing_groups, prior.coordinates[cols], g), upper=False)
            gram += A @ A.transpose(-1, -2)
            rhs += (A @ resid[:, cols].unsqueeze(-1)).squeeze(-1)
        prior.q_loc.copy_(torch.linalg.solve(gram, rhs))

    # -- new samples -----------------------------------------------------------------
    def predict_factors(self, coordinates, groups=None):
        """GP predictive mean and standard deviation of the log-factors at new coordinates.

        Parameters
        ----------
        coordinates : array-like of shape (n_new, n_dims)
        groups : array-like of shape (n_new,), optional
            Labels seen in ``fit`` (required with ``multigroup``).

        Returns
        -------
        mean, std : ndarray (tensors for tensor ``coordinates``) of shape (n_new, n_components)
        """
        self._check_fitted()
        if not self.spatial:
            raise ValueError("predict_factors needs spatial=True")
        C, codes = self._covariates(coordinates, coordinates, groups, fitting=False)
        mean, var = self._predictive(C, codes)
        return self._output(mean.t(), coordinates), self._output(var.sqrt().t(), coordinates)

    @torch.no_grad()
    def _predictive(self, C: Tensor, codes) -> Tuple[Tensor, Tensor]:
        factors = self.layer_.factors
        C = C.to(device=factors.coordinates.device, dtype=factors.coordinates.dtype)
        g = None if codes is None else torch.as_tensor(codes, device=C.device)
        return factors.marginals(coordinates=C, groups=g)

    def transform(self, X, coordinates=None, groups=None, *, layer: Optional[str] = None):
        """``E_q[exp F]`` for new samples, shape (n_new, n_components).

        With ``spatial=True`` the GP predictive at ``coordinates`` is the prior of the new
        samples' log-factors, and ``q(F)`` is fitted to ``X`` under it with ``W`` fixed
        (``transform_max_iter`` steps; 0 steps would return the predictive alone, see
        :meth:`predict_factors`). For an AnnData: ``layer`` as in :meth:`fit`, the fitted genes
        taken by name, ``coordinates`` by default its ``obsm['spatial']``.
        """
        self._check_fitted()
        coordinates = _obsm_spatial(X, coordinates, self.spatial)
        X = self._adata_in(X, layer, reset=False)
        C, codes = self._covariates(X, coordinates, groups, fitting=False)
        if not self.spatial:
            return super().transform(X)
        T = self._check_X(X, reset=False, counts=True, **self._count_rule())
        mean, var = self._predictive(C, codes)
        factors = self._fit_under_predictive(T, mean, var, self.transform_max_iter)
        return self._output(self._expected_factors(factors), X)

    def transform_F(self, X, max_iter: Optional[int] = None, coordinates=None, groups=None, *,
                    layer: Optional[str] = None):
        """Posterior mean and standard deviation of the log-factors of new samples (see :meth:`transform`)."""
        self._check_fitted()
        coordinates = _obsm_spatial(X, coordinates, self.spatial)
        X = self._adata_in(X, layer, reset=False)
        C, codes = self._covariates(X, coordinates, groups, fitting=False)
        if not self.spatial:
            return super().transform_F(X, max_iter)
        T = self._check_X(X, reset=False, counts=True, **self._count_rule())
        max_iter = check_rank(self.transform_max_iter if max_iter is None else max_iter, "max_iter")
        mean, var = self._predictive(C, codes)
        factors = self._fit_under_predictive(T, mean, var, max_iter)
        mu, v = factors.marginals()
        return self._output(mu.t(), X), self._output(v.sqrt().t(), X)

    def _fit_under_predictive(self, T: Tensor, mean: Tensor, var: Tensor, max_iter: int) -> IndependentNormal:
        N, D = T.shape
        W = self.layer_.W.detach()
        factors = _NormalUnderPredictive(mean.to(W.dtype), var.to(W.dtype), self.init_scale)
        layer = LogNormalPoisson(D, N, self.n_components_, mode=self.mode, E=self.E, loadings_mode="projected",
                                 factors=factors, W=W, dtype=W.dtype, device=W.device)
        layer.W.requires_grad_(False)
        # mean-field under the predictive: natural steps for 'lower-bound' or training_mode='natural'
        return self._refit_factors(layer, Counts.from_samples(T.to(W.dtype)), max_iter)

