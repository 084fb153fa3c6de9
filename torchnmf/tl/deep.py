"""``deep_poisson``: a chain of Gamma-Poisson layers (genes -> programs -> meta-programs) on an AnnData."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ._common import Result, run
from .factorize import _doc

__all__ = ["deep_poisson"]


def _nmf_start(X, ranks: Sequence[int], max_iter: int, generator):
    """Posterior means to start from: KL-NMF of ``X`` at ``ranks[0]``, then of each level's usages.

    Returns ``H`` (N, ranks[-1]) and ``[W_1 (C, ranks[0]), W_2 (ranks[0], ranks[1]), ...]``, each
    level's two factors given the same total per component (neither prior sees a rescaled factor).
    """
    import warnings

    from ..engine import ConvergenceWarning
    from ..estimators import BetaNMF

    Ws, U = [], X
    for r in ranks:
        est = BetaNMF(r, beta_loss="kullback-leibler", init="nndsvda", max_iter=max_iter, tol=1e-4,
                      random_state=generator, device=X.device, dtype=X.dtype)
        with warnings.catch_warnings():  # a start, not a result: stopping at max_iter is intended
            warnings.filterwarnings("ignore", category=ConvergenceWarning)
            H = est.fit_transform(U)
        W = est.module_.W.detach()
        scale = (W.sum(0) / H.sum(0).clamp_min(1e-30)).sqrt().clamp_min(1e-30)
        Ws.append(W / scale)
        U = H * scale
    return U, Ws


def _chain(N: int, C: int, ranks: Sequence[int], a: float, generator, dtype, device, start=None):
    """``nn.Sequential`` of :class:`~torchnmf.poisson.GammaNMF`: ``X ≈ H W_Lᵀ ... W_1ᵀ``, ``W_1`` (C, ranks[0]).

    ``start``: ``(H, [W_1, ..., W_L])`` posterior means (else random posteriors).
    """
    from torch import nn

    from ..poisson.chain import GammaNMF

    dims = [C, *ranks]
    L = len(ranks)
    kw = dict(a=a, generator=generator, dtype=dtype, device=device)
    if start is None:
        H, Ws = (N, dims[L]), [(dims[l - 1], dims[l]) for l in range(1, L + 1)]
    else:
        H, Ws = start
    first = GammaNMF(H=H, W=Ws[L - 1], **kw)
    return nn.Sequential(first, *[GammaNMF(W=Ws[l - 1], **kw) for l in range(L - 1, 0, -1)])


@_doc("deep_poisson")
def deep_poisson(adata, ranks: Sequence[int] = (20, 5), *, layer: Optional[str] = None,
                 use_highly_variable: Optional[bool] = None, key_added: str = "deep_poisson", copy: bool = False,
                 overwrite: bool = False, n_top_features: int = 20, obs_columns: bool = True, random_state=0,
                 allow_noninteger: bool = False, a: float = 0.3, init: str = "nmf", init_max_iter: int = 100,
                 max_iter: int = 500, tol: float = 1e-6, device="auto", dtype="float64",
                 chunk_size: Optional[int] = None, verbose: bool = False):
    """Deep Poisson factorization: gene programs and programs of programs (:mod:`torchnmf.poisson.chain`).

    A chain of :class:`~torchnmf.poisson.GammaNMF` layers models the counts as
    ``X ~ Poisson(H W_Lᵀ ... W_1ᵀ)``: ``W_1`` (genes x ``ranks[0]``) holds the programs' gene
    rates, each further ``W_l`` (``ranks[l-2]`` x ``ranks[l-1]``) how the programs of level
    ``l`` mix those of level ``l - 1``, and ``H`` (cells x ``ranks[-1]``) the cells' weights on
    the top level. :class:`torchnmf.trainer.CAVI` sweeps it on the nonzeros until the ELBO's
    relative change per sweep is at most ``tol``.

    Parameters
    ----------
    adata : anndata.AnnData or path of an .h5ad file
        Cells x genes of raw counts.
    ranks : sequence of int, default (20, 5)
        Components per level, finest first (each at most ``min(n_obs, n_genes_used)``).
    {common}
    allow_noninteger : bool, default False
        Fit non-integer values as a quasi-likelihood; otherwise they raise ``ValueError``.
    a : float, default 0.3
        Prior shape of every factor (below 1: sparse factors).
    init : {'nmf', 'random'}, default 'nmf'
        ``'nmf'``: posterior means start at a KL-NMF of the counts at ``ranks[0]`` (at most
        ``init_max_iter`` updates, NNDSVDa start), then a KL-NMF of each level's usages at the
        next rank, as :class:`~torchnmf.estimators.GammaPoissonFactorization` starts one level;
        ``'random'``: random posteriors drawn from ``random_state``.
    init_max_iter : int, default 100
    max_iter : int, default 500
        CAVI sweeps at most (reaching it first warns with
        :class:`~torchnmf.engine.ConvergenceWarning`).
    tol : float, default 1e-6
    device : 'auto', str or torch.device, default 'auto'
    dtype : {'float64', 'float32'}, default 'float64'
    chunk_size : int, optional
        Bound on the nonzeros processed at once (peak memory).
    verbose : bool, default False
        Progress bar.

    Returns
    -------
    anndata.AnnData or None
        As :func:`nmf` for the finest level (``ranks[0]`` components): ``obsm['X_<key>']``
        = ``E[H] E[W_L]ᵀ ... E[W_2]ᵀ`` and ``varm['<key>']`` = ``E[W_1]``, whose product is the
        expected counts. Each coarser level ``l = 2, ...`` goes to ``obsm['X_<key>_level<l>']``
        (n_obs, ``ranks[l-1]``) and ``varm['<key>_level<l>']`` (n_vars, ``ranks[l-1]``), the
        same product split at that level; ``uns['<key>']`` adds ``ranks``, ``elbo``,
        ``mixing_level<l>`` (the posterior mean of ``W_l``, ``ranks[l-2]`` x ``ranks[l-1]``) and
        ``top_features_level<l>``. Levels have no ``obs`` columns.
    """
    import torch

    from .. import engine
    from ..anndata_io import top_features
    from ..data import check_option, check_positive, check_rank
    from ..estimators._base import resolve_device, resolve_dtype
    from ..history import History
    from ..init import check_random_state
    from ..poisson.gamma import CountMatrix
    from ..trainer import CAVI

    if isinstance(ranks, (str, bytes)) or not hasattr(ranks, "__len__") or len(ranks) == 0:
        raise TypeError(f"ranks must be a non-empty sequence of ints (finest level first), got {ranks!r}")
    ranks = [check_rank(r, "ranks") for r in ranks]
    check_positive(a, "a")
    check_option(init, ("nmf", "random"), "init")
    init_max_iter = check_rank(init_max_iter, "init_max_iter")
    max_iter = check_rank(max_iter, "max_iter")
    check_positive(tol, "tol", allow_zero=True)
    dev = resolve_device(device) or torch.device("cpu")
    dt = resolve_dtype(dtype, torch.float64)

    def fit(sel):
        N, C = sel.shape
        if max(ranks) > min(N, C):
            raise ValueError(f"ranks={tuple(ranks)}: each rank must be at most min(n_obs, n_features) = {min(N, C)}")
        data = CountMatrix.from_input(sel.tensor(), "X", allow_noninteger=allow_noninteger, dtype=dt, device=dev)
        g = check_random_state(random_state)
        start = _nmf_start(sel.tensor().to(device=dev, dtype=dt), ranks, init_max_iter, g) if init == "nmf" else None
        model = _chain(N, C, ranks, a, g, dt, dev, start)
        trainer = CAVI(model.parameters(), chunk_size=chunk_size)
        history = History(verbose=verbose, total=max_iter, desc="deep_poisson", name="elbo", maximize=True)
        try:
            result = engine.run(lambda i, measure: trainer.step(lambda: (data, model(None))), max_iter=max_iter,
                                tol=tol, history=history, model="deep_poisson", dtype=dt)
        finally:
            history.close()
        with torch.no_grad():
            H = model[0].H
            Ws = [m.W for m in reversed(model)]  # Ws[0]: genes x ranks[0]; Ws[l]: ranks[l-1] x ranks[l]
            levels = []
            for j in range(len(ranks)):
                feats = Ws[0]
                for W in Ws[1:j + 1]:
                    feats = feats @ W
                cells = H
                for W in reversed(Ws[j + 1:]):
                    cells = cells @ W.t()
                levels.append((cells.cpu().numpy(), feats.cpu().numpy()))
        obsm, varm, uns = {}, {}, {"ranks": np.asarray(ranks), "elbo": float(history[-1])}
        for j, (cells, feats) in enumerate(levels[1:], start=2):
            obsm[f"level{j}"], varm[f"level{j}"] = cells, feats
            uns[f"mixing_level{j}"] = Ws[j - 1].cpu().numpy()
            uns[f"top_features_level{j}"] = top_features(feats, sel.feature_names, n_top_features,
                                                         [f"{key_added}_level{j}_{k + 1}" for k in range(ranks[j - 1])])
        params = {"ranks": ranks, "a": a, "init": init, "init_max_iter": init_max_iter, "max_iter": max_iter,
                  "tol": tol, "random_state": random_state,
                  "allow_noninteger": allow_noninteger, "dtype": str(dt).replace("torch.", "")}
        return Result(levels[0][0], levels[0][1], history, "elbo", bool(result.converged), result.n_iter, params,
                      obsm=obsm, varm=varm, uns=uns)

    return run(adata, fit, model="deep_poisson", layer=layer, use_highly_variable=use_highly_variable,
               key_added=key_added, copy=copy, overwrite=overwrite, counts=not allow_noninteger,
               n_top_features=n_top_features, obs_columns=obs_columns)
