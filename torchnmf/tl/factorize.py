"""``nmf``, ``gamma_poisson``, ``pnmf``: torchnmf's estimators on an AnnData, results written as scanpy does."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..data import check_rank
from ._common import Result, run

__all__ = ["nmf", "gamma_poisson", "pnmf"]

_COMMON = """
    layer : str, optional
        The layer to factorize (a key of ``adata.layers``); default ``adata.X``.
    use_highly_variable : bool, optional
        Use only the genes flagged in ``adata.var['highly_variable']``; default: when that
        column exists (as :func:`scanpy.tl.pca`). The other genes get zero loadings.
    key_added : str, default {key!r}
        Where the results go: ``obsm['X_<key_added>']``, ``varm['<key_added>']``,
        ``uns['<key_added>']`` and ``obs['<key_added>_1']`` ... (see :mod:`torchnmf.tl`).
    copy : bool, default False
        Return a copy of ``adata`` with the results; else write them into ``adata`` and return
        ``None`` (as scanpy). A path is read and the new AnnData returned.
    overwrite : bool, default False
        Replace earlier results under ``key_added``; otherwise a ``ValueError`` refuses to.
    n_top_features : int, default 20
        Genes listed per component in ``uns['<key_added>']['top_features']``.
    obs_columns : bool, default True
        Also write each component's usage as an ``obs`` column (``<key_added>_1`` ...), for
        ``scanpy.pl.umap(adata, color='<key_added>_1')``.
    random_state : int, generator or None, default 0
        As in scanpy, a fixed seed by default: the same call gives the same result."""

_STREAM = """
    batch_size : int, default 1024
        Backed ``X`` only: rows per block read from the file.
    epochs : int, default 10
        Backed ``X`` only: passes over the file."""


def _doc(key: str):
    def deco(f):
        doc = f.__doc__.replace("    {common}", _COMMON.format(key=key).strip("\n"))
        f.__doc__ = doc.replace("    {stream}", _STREAM.strip("\n"))
        return f
    return deco


def _seed(random_state) -> int:
    """An int seed for the streaming fits from ``random_state`` (an int is kept)."""
    if isinstance(random_state, (int, np.integer)) and not isinstance(random_state, bool):
        return int(random_state)
    from ..init import check_random_state

    return int(torch.randint(0, 2 ** 31 - 1, (1,), generator=check_random_state(random_state)))


def _converged(est) -> bool:
    return bool(getattr(est.history_, "converged_", False))


@_doc("nmf")
def nmf(adata, n_components: int = 10, *, beta_loss="kullback-leibler", layer: Optional[str] = None,
        use_highly_variable: Optional[bool] = None, key_added: str = "nmf", copy: bool = False,
        overwrite: bool = False, n_top_features: int = 20, obs_columns: bool = True, random_state=0,
        batch_size: int = 1024, epochs: int = 10, **kwargs):
    """Non-negative matrix factorization of an AnnData (:class:`~torchnmf.estimators.BetaNMF`).

    Fits ``X ≈ U Wᵀ`` with usages ``U`` (cells x components) and loadings ``W`` (genes x
    components) by multiplicative updates of a beta-divergence. A backed ``X``
    (``anndata.read_h5ad(path, backed='r')``, or a path) is streamed from the file by row blocks
    instead: online NMF (:func:`torchnmf.parallel.fit_nmf_online`, ``epochs`` passes in file
    order), then each block's usages with the loadings fixed.

    Parameters
    ----------
    adata : anndata.AnnData or path of an .h5ad file
        Cells x genes; not modified unless ``copy=False`` (then only the result keys are added).
    n_components : int, default 10
    beta_loss : float or {'frobenius', 'kullback-leibler', 'itakura-saito'}, default 'kullback-leibler'
    {common}
    {stream}
    **kwargs
        Further :class:`~torchnmf.estimators.BetaNMF` parameters (``max_iter``, ``tol``,
        ``init``, ``device``, ``dtype``, ``alpha``...).

    Returns
    -------
    anndata.AnnData or None
        With ``copy=True`` the copy, else ``None``. Written: ``obsm['X_<key>']`` (n_obs, K),
        ``varm['<key>']`` (n_vars, K), ``obs['<key>_k']``, and ``uns['<key>']`` with
        ``params``, ``objective`` ('beta-divergence'), ``history``, ``converged``, ``n_iter``,
        ``components``, ``top_features`` and ``reconstruction_err``.

    Examples
    --------
    >>> import anndata, numpy as np, torchnmf.tl
    >>> adata = anndata.AnnData(np.random.default_rng(0).poisson(1.0, (60, 20)).astype("float32"))
    >>> torchnmf.tl.nmf(adata, n_components=3, max_iter=50, tol=0, device="cpu")
    >>> adata.obsm["X_nmf"].shape, adata.varm["nmf"].shape, adata.uns["nmf"]["n_iter"]
    ((60, 3), (20, 3), 50)
    """
    from ..estimators import BetaNMF

    est = BetaNMF(n_components, beta_loss=beta_loss, random_state=random_state, **kwargs)

    def fit(sel):
        U = est.fit_transform(sel)
        params = {k: v for k, v in est.get_params().items() if k not in ("layer", "T")}  # not the AnnData layer
        return Result(U, est.components_.T, est.history_, "beta-divergence", _converged(est), est.n_iter_,
                      params, uns={"reconstruction_err": float(est.reconstruction_err_)})

    def stream(source, sel):
        from ._backed import nmf_online

        return nmf_online(source, sel, est, batch_size=batch_size, epochs=check_rank(epochs, "epochs"),
                          seed=_seed(random_state))

    return run(adata, fit, model="BetaNMF", layer=layer, use_highly_variable=use_highly_variable,
               key_added=key_added, copy=copy, overwrite=overwrite, counts=False, n_top_features=n_top_features,
               obs_columns=obs_columns, stream=stream, batch_size=batch_size)


@_doc("gamma_poisson")
def gamma_poisson(adata, n_components: int = 10, *, layer: Optional[str] = None,
                  use_highly_variable: Optional[bool] = None, key_added: str = "gamma_poisson", copy: bool = False,
                  overwrite: bool = False, n_top_features: int = 20, obs_columns: bool = True, random_state=0,
                  allow_noninteger: bool = False, batch_size: int = 1024, epochs: int = 10, **kwargs):
    """Bayesian Gamma-Poisson factorization of counts (:class:`~torchnmf.estimators.GammaPoissonFactorization`).

    ``X ~ Poisson(U αᵀ)`` with Gamma priors, fitted by coordinate ascent on the nonzeros.
    The usages and loadings written are posterior means; their posterior standard
    deviations go beside them. A backed ``X`` (``anndata.read_h5ad(path, backed='r')``, or a
    path) is streamed from the file by row blocks instead: stochastic variational inference
    (:func:`torchnmf.parallel.fit_gamma_svi`, ``epochs`` passes in file order), ``q(α)``
    started from a KL-NMF of the first block (``init='random'``: random posteriors).

    Parameters
    ----------
    adata : anndata.AnnData or path of an .h5ad file
        Cells x genes of raw counts (use ``layer='counts'`` when ``X`` is normalized).
    n_components : int, default 10
    {common}
    allow_noninteger : bool, default False
        Fit non-integer values as a quasi-likelihood; otherwise they raise ``ValueError``
        naming a layer of counts.
    {stream}
    **kwargs
        Further :class:`~torchnmf.estimators.GammaPoissonFactorization` parameters (``a``,
        ``b``, ``max_iter``, ``tol``, ``init``, ``device``...).

    Returns
    -------
    anndata.AnnData or None
        As :func:`nmf`, plus ``obsm['X_<key>_sd']`` (n_obs, K) and ``varm['<key>_sd']``
        (n_vars, K), the posterior standard deviations of ``U`` and ``α``, and
        ``uns['<key>']['elbo']``; ``objective`` is ``'elbo'``.
    """
    from ..estimators import GammaPoissonFactorization

    est = GammaPoissonFactorization(n_components, random_state=random_state, allow_noninteger=allow_noninteger,
                                    **kwargs)

    def fit(sel):
        import torch

        U = est.fit_transform(sel)
        with torch.no_grad():
            sd_U = est.module_.q_U().stddev.cpu().numpy()
            sd_a = est.module_.q_alpha().stddev.cpu().numpy()
        return Result(U, est.components_.T, est.history_, "elbo", _converged(est), est.n_iter_, est.get_params(),
                      obsm={"sd": sd_U}, varm={"sd": sd_a}, uns={"elbo": float(est.elbo_)})

    def stream(source, sel):
        from ._backed import gamma_svi

        return gamma_svi(source, sel, est, batch_size=batch_size, epochs=check_rank(epochs, "epochs"),
                         seed=_seed(random_state))

    return run(adata, fit, model="GammaPoissonFactorization", layer=layer, use_highly_variable=use_highly_variable,
               key_added=key_added, copy=copy, overwrite=overwrite, counts=not allow_noninteger,
               n_top_features=n_top_features, obs_columns=obs_columns, stream=stream, batch_size=batch_size)


@_doc("pnmf")
def pnmf(adata, n_components: int = 10, *, layer: Optional[str] = None, use_highly_variable: Optional[bool] = None,
         key_added: str = "pnmf", copy: bool = False, overwrite: bool = False, n_top_features: int = 20,
         obs_columns: bool = True, random_state=0, allow_noninteger: bool = False, **kwargs):
    """Log-normal Poisson factorization of counts (:class:`~torchnmf.estimators.PNMF`).

    ``X ~ Poisson(exp(F) Wᵀ)`` with Gaussian ``q(F)``. The usages written are ``E[exp F]`` of
    the fit's own posterior (not a refit, unlike ``PNMF.fit_transform``).

    Parameters
    ----------
    adata : anndata.AnnData or path of an .h5ad file
        Cells x genes of raw counts.
    n_components : int, default 10
    {common}
    allow_noninteger : bool, default False
        Fit non-integer values as a quasi-likelihood; otherwise they raise ``ValueError``.
    **kwargs
        Further :class:`~torchnmf.estimators.PNMF` parameters (``max_iter``, ``tol``,
        ``batch_size``, ``mode``, ``device``...).

    Returns
    -------
    anndata.AnnData or None
        As :func:`nmf`, plus ``obsm['X_<key>_log_sd']`` (n_obs, K), the posterior standard
        deviation of ``F``, and ``uns['<key>']['elbo']``; ``objective`` is ``'elbo'``.
    """
    from ..estimators import PNMF

    if "allow_noninteger" in PNMF._get_param_names():  # where PNMF checks counts itself
        kwargs["allow_noninteger"] = allow_noninteger
    est = PNMF(n_components, random_state=random_state, **kwargs)

    def fit(sel):
        est.fit(sel)
        mean, var = np.asarray(est.log_factors()), np.asarray(est.factor_uncertainty("variance"))
        return Result(np.exp(mean + var / 2), np.asarray(est.get_loadings()), est.history_, "elbo", _converged(est),
                      est.n_iter_, est.get_params(), obsm={"log_sd": np.sqrt(var)}, uns={"elbo": float(est.elbo_)})

    return run(adata, fit, model="PNMF", layer=layer, use_highly_variable=use_highly_variable, key_added=key_added,
               copy=copy, overwrite=overwrite, counts=not allow_noninteger, n_top_features=n_top_features,
               obs_columns=obs_columns)
