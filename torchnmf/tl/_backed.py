"""Fits of a backed AnnData's ``X`` from row blocks on disk (the streaming fits of :mod:`torchnmf.parallel`)."""
from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np
import torch

from ._common import Result

__all__ = ["blocks", "nmf_online", "gamma_svi"]


def blocks(source, size: int) -> Iterator[range]:
    """Consecutive row ranges of ``size`` rows covering ``source``."""
    n = source.shape[0]
    for lo in range(0, n, size):
        yield range(lo, min(n, lo + size))


def nmf_online(source, sel, est, *, batch_size: int, epochs: int, seed: int) -> Result:
    """Online NMF of ``source`` (:func:`torchnmf.parallel.fit_nmf_online`), ``W`` started by NMF of the first block.

    The usages of every block are then fitted with ``W`` fixed, from scikit-learn's constant
    start, until the estimator's stop rule (``est.tol``, at most ``est.max_iter`` updates) holds
    for the block: a cell's usages depend on its block only within that tolerance. (Exactly
    ``max_iter`` updates per block, as :meth:`BetaNMF.transform
    <torchnmf.estimators.BetaNMF.transform>` runs, took 630 s for 300,000 cells at the default
    2000, against 6 s for the two epochs of the fit.)
    """
    from ..engine import ConvergenceWarning, _user_stacklevel
    from ..estimators._base import resolve_device, resolve_dtype
    from ..estimators.nmf import beta_from_loss
    from ..history import History
    from ..nmf import NMF
    from ..parallel import fit_nmf_online

    beta = beta_from_loss(est.beta_loss)
    K = int(est.n_components)
    device = resolve_device(est.device) or torch.device("cpu")
    dtype = resolve_dtype(est.dtype, source.dtype)
    first = source.batch(next(blocks(source, batch_size))).X.to_dense().to(device=device, dtype=dtype)
    from sklearn.base import clone

    start = clone(est).set_params(max_iter=min(est.max_iter, 100), tol=1e-4, device=device, dtype=dtype)
    with warnings.catch_warnings():  # a start, not a result
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        start.fit(first)
    model = NMF(W=start.module_.W.detach().clone(), rank=K)
    history = History(name="beta-divergence")
    fit_nmf_online(model, source, batch_size=batch_size, epochs=epochs, beta=beta, alpha=est.alpha,
                   l1_ratio=est.l1_ratio, shuffle=False, seed=seed, history=history)
    W = model.W.detach()
    parts, unfinished = [], 0
    for rows in blocks(source, batch_size):
        V = source.batch(rows).X.to(device=device, dtype=dtype)
        mean = float(V.values().sum()) / (V.shape[0] * V.shape[1])
        H0 = torch.full((V.shape[0], K), max(mean / K, 1e-12) ** 0.5, dtype=dtype, device=device)
        block = NMF(W=W, H=H0, trainable_W=False)  # as NMF.transform, with its iteration count
        with warnings.catch_warnings():  # the blocks at max_iter are counted in one warning below
            warnings.filterwarnings("ignore", category=ConvergenceWarning)
            n_iter = block.fit(V, beta=beta, tol=est.tol, max_iter=est.max_iter, alpha=est.alpha,
                               l1_ratio=est.l1_ratio)
        unfinished += bool(est.tol > 0 and n_iter >= est.max_iter)
        parts.append(block.H.detach().cpu().numpy())
        del V, block
    if unfinished:
        warnings.warn(f"nmf: the usages of {unfinished} of {len(parts)} blocks reached max_iter={est.max_iter} "
                      f"before tol={est.tol:g}; raise max_iter for converged usages", ConvergenceWarning,
                      stacklevel=_user_stacklevel())
    params = {k: v for k, v in est.get_params().items() if k not in ("layer", "T", "init", "tol")}
    params.update(batch_size=batch_size, epochs=epochs, fit="fit_nmf_online")
    return Result(np.concatenate(parts), W.cpu().numpy(), history, "beta-divergence", False, epochs, params)


def _first_block_nmf(source, K: int, batch_size: int, max_iter: int, device, dtype, seed: int):
    """KL-NMF (NNDSVDa start) of the first block: ``H`` (B, K), ``W`` (C, K), balanced per component."""
    from ..engine import ConvergenceWarning
    from ..estimators import BetaNMF

    first = source.batch(next(blocks(source, batch_size))).X.to_dense().to(device=device, dtype=dtype)
    est = BetaNMF(K, beta_loss="kullback-leibler", init="nndsvda", max_iter=max_iter, tol=1e-4, random_state=seed,
                  device=device, dtype=dtype)
    with warnings.catch_warnings():  # a start, not a result
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        H = est.fit_transform(first)
    W = est.module_.W.detach()
    scale = (W.sum(0) / H.sum(0).clamp_min(1e-30)).sqrt()
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    return H * scale, W / scale


def gamma_svi(source, sel, est, *, batch_size: int, epochs: int, seed: int) -> Result:
    """Gamma-Poisson by stochastic variational inference on row blocks (:func:`torchnmf.parallel.fit_gamma_svi`).

    ``init='nmf'`` or ``'nndsvda'`` (the estimator's): ``q(α)`` starts at a KL-NMF of the first
    block, every row's ``q(U)`` at that block's mean usage; ``'random'``: random posteriors.
    """
    from ..estimators._base import resolve_device, resolve_dtype
    from ..history import History
    from ..init import check_random_state
    from ..parallel import fit_gamma_svi
    from ..poisson.gamma import GammaPoisson

    device = resolve_device(est.device) or torch.device("cpu")
    dtype = resolve_dtype(est.dtype, torch.float64)
    N, C = source.shape
    layer = GammaPoisson(N, C, int(est.n_components), a=est.a, b=est.b, learn_kappa=est.learn_kappa,
                         learn_lambda=est.learn_lambda, allow_noninteger=bool(est.allow_noninteger),
                         generator=check_random_state(seed), dtype=dtype, device=device)
    if est.init != "random":  # q(α) from a KL-NMF of the first block; q(U) of every row from its mean there
        H, W = _first_block_nmf(source, int(est.n_components), batch_size, est.init_max_iter, device, dtype, seed)
        layer.set_means(H.mean(0, keepdim=True).expand(N, -1), W)
    history = History(name="elbo", maximize=True)
    fit_gamma_svi(layer, source, batch_size=batch_size, epochs=epochs, shuffle=False, seed=seed, history=history,
                  chunk_size=est.chunk_size)
    with torch.no_grad():
        U, A = layer.mean_U().cpu().numpy(), layer.mean_alpha().cpu().numpy()
        sd_U, sd_A = layer.q_U().stddev.cpu().numpy(), layer.q_alpha().stddev.cpu().numpy()
    params = {k: v for k, v in est.get_params().items() if k not in ("tol", "max_iter")}
    params.update(batch_size=batch_size, epochs=epochs, fit="fit_gamma_svi")
    return Result(U, A, history, "elbo", False, epochs, params, obsm={"sd": sd_U}, varm={"sd": sd_A},
                  uns={"elbo": float(history[-1])})
