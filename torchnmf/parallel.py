"""Data-parallel and streaming fits: statistics of a batch of rows, summed over processes, then an update.

One mechanism serves full-batch, mini-batch and multi-process fitting: each process
computes the sufficient statistics of the shared factors on its own rows,
:func:`torchnmf.distributed.all_reduce_stats` sums them, and every process applies the
same update. Launch the same script on every process with ``torchrun`` after
:func:`torchnmf.distributed.init`; without a process group every function here is an
ordinary one-process fit.

==========================  ===================================  ==============================
function                    shared factor / statistics           local (per-process) state
==========================  ===================================  ==============================
:func:`fit_nmf`             W: numerator, denominator, loss      H rows of the shard
:func:`fit_nmf_online`      W: accumulated (A, B) of OnlineMU    H of the current batch only
:func:`fit_gamma_cavi`      q(α): layer.global_statistics        q(U) rows of the shard
:func:`fit_gamma_svi`       q(α): layer.global_statistics        q(U) rows of the batch
==========================  ===================================  ==============================

Every fit takes ``checkpoint=`` (a directory or a :class:`~torchnmf.distributed.Checkpointer`):
it saves every ``checkpoint_every`` epochs and, when the directory already holds a
checkpoint, resumes from it, ending with exactly the result of an uninterrupted run.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Union

import torch
from torch import Tensor

from . import data
from ._memory import release_freed
from .constraints import assign_, value_of
from .distributed import (Checkpointer, all_reduce_stats, broadcast_, check_shards, get_rank, get_world_size,
                          is_distributed, stats_reducer)
from .engine import STOP_RULES, resume, run, run_stateful
from .history import History
from .streaming import SparseRows, row_loader
from .trainer.online import OnlineMU

__all__ = ["fit_nmf", "fit_nmf_online", "fit_gamma_cavi", "fit_gamma_svi"]

CheckpointArg = Union[None, str, os.PathLike, Checkpointer]


def _checkpointer(checkpoint: CheckpointArg, every: int, group, timeout) -> Optional[Checkpointer]:
    if checkpoint is None or isinstance(checkpoint, Checkpointer):
        return checkpoint
    return Checkpointer(checkpoint, every=every, group=group, timeout=timeout)


def _history(history: Optional[History], verbose: bool, total: int, desc: str, name: str, maximize: bool, group):
    if history is not None:
        return history, False
    # one progress bar per job, not one per process
    return History(verbose=verbose and get_rank(group) == 0, total=total, desc=desc, name=name,
                   maximize=maximize), True


def _agree(like: Tensor, group, timeout):
    """``flag -> any(flag over processes)``: one decision (stop, converged) on every process."""
    def agree(flag: bool) -> bool:
        t = like.new_tensor(1.0 if flag else 0.0)
        return bool(all_reduce_stats({"flag": t}, group=group, timeout=timeout, op="max")["flag"] > 0)
    return agree


# -- NMF -------------------------------------------------------------------------
def fit_nmf(model, V, *, beta: float = 1, tol: float = 1e-4, max_iter: int = 200, alpha: float = 0,
            l1_ratio: float = 0, mask=None, history: Optional[History] = None, verbose: bool = False,
            check_every: Optional[int] = None, checkpoint: CheckpointArg = None, checkpoint_every: int = 10,
            n_shards: Optional[int] = None, shard_index: Optional[int] = None, group=None,
            timeout: Optional[float] = None, stop_rule: str = "relative") -> int:
    r"""Fit an :class:`~torchnmf.nmf.NMF` layer by multiplicative updates, data-parallel over rows.

    Each process holds a shard of the rows of ``V`` and the matching rows of ``H``
    (``model.H`` of shape ``(n_local, R)``) and the whole ``W``. Per iteration, ``H``
    takes a local update; the statistics of ``W``'s update (numerator, denominator,
    divergence), sums over rows, are summed over processes, so every process applies the
    same update to ``W``. The iterates equal :meth:`NMF.fit <torchnmf.nmf.BaseComponent.fit>`
    on the whole data up to floating-point summation order; with one process it *is* that fit.

    Parameters
    ----------
    model : torchnmf.NMF
        With ``W`` (C, R) and ``H`` (n_local, R); fitted in place. ``W`` is taken from rank 0.
    V : Tensor (dense or sparse), array or scipy.sparse, shape (n_local, C)
        This process's rows; never modified.
    beta, tol, max_iter, alpha, l1_ratio, mask
        As :meth:`NMF.fit <torchnmf.nmf.BaseComponent.fit>` (``tol`` on the global divergence).
    history : History, optional
        Receives the global divergence before the first, after every ``check_every``-th and
        after the last iteration.
    verbose : bool, default False
        Progress bar on rank 0.
    check_every : int, optional
        Measure the divergence (for ``tol``, ``history``, stop requests) every this many
        iterations; default as :meth:`NMF.fit <torchnmf.nmf.BaseComponent.fit>` (10, or 1 for beta = 2).
    checkpoint : str, os.PathLike or Checkpointer, optional
        Save every ``checkpoint_every`` iterations; resume from it if it holds one.
    checkpoint_every : int, default 10
    n_shards : int, optional
        Number of shards the data were split into: must equal the world size.
    shard_index : int, optional
        Which shard this process holds (default its rank); shards are ordered by it.
    group : ProcessGroup, optional
    timeout : float, optional
        Seconds a collective waits for the peers before
        :class:`~torchnmf.distributed.DistributedTimeoutError`.
    stop_rule : {'relative', 'sklearn'}, default 'relative'
        As :meth:`NMF.fit <torchnmf.nmf.BaseComponent.fit>`.

    Returns
    -------
    int
        Number of iterations done (including those before a resume).

    Raises
    ------
    ValueError
        Shards that do not match the world (on every process, before any work), or a
        checkpoint from a job with another number of processes.
    DistributedTimeoutError
        A peer process died or hung.
    """
    from .nmf import NMF

    if not isinstance(model, NMF) or model.W is None or model.H is None:
        raise TypeError("model must be a torchnmf.NMF with both W and H (H holding this process's rows)")
    model._check_fit_args(beta, tol, max_iter, alpha, l1_ratio)
    data.check_option(stop_rule, STOP_RULES, "stop_rule")
    V = model._check_V(V, sparse_ok=True)
    M = data.check_mask(mask, V.shape, device=V.device, dtype=V.dtype)
    beta = float(beta)
    model._check_beta_support(V, beta)
    checkpoint_every = data.check_rank(checkpoint_every, "checkpoint_every")
    check_every = (1 if beta == 2 else 10) if check_every is None else data.check_rank(check_every, "check_every")
    check_shards(V.shape[0], V.shape[1], shard_index=shard_index, n_shards=n_shards, group=group, timeout=timeout)
    l1, l2 = float(alpha * l1_ratio), float(alpha * (1 - l1_ratio))
    W0 = value_of(model._raw("W")).detach().clone()
    broadcast_([W0], group=group, timeout=timeout)
    assign_(model._raw("W"), W0)
    ckpt = _checkpointer(checkpoint, checkpoint_every, group, timeout)
    history, own = _history(history, verbose, max_iter, "fit_nmf", "beta-divergence", False, group)
    distributed = is_distributed(group)
    # NMF.fit's own loop, with W's statistics and the divergence summed over processes
    reduce = (lambda stats: all_reduce_stats(stats, group=group, timeout=timeout)) if distributed else None
    agree = _agree(W0, group, timeout) if distributed else None
    try:
        return model._fit_mu(V, M, beta, tol, max_iter, l1, l2, history, check_every, stop_rule, reduce=reduce,
                             agree=agree, checkpoint=ckpt, model="fit_nmf").n_iter
    finally:
        if own:
            history.close()


def _steps_per_epoch(n_local_batches: int, group, timeout) -> int:
    """The most batches any process has: processes with fewer wrap around (collectives stay in step)."""
    t = torch.tensor(float(n_local_batches), dtype=torch.float64)
    return int(all_reduce_stats({"n": t}, group=group, timeout=timeout, op="max")["n"])


# a block whose values take this much is followed by a trim (smaller ones free too little to pay for it)
_TRIM_BYTES = 1 << 20


def _batches(loader, epoch: int, n_steps: int):
    """``n_steps`` batches of ``epoch``'s order, starting over when the loader runs out."""
    loader.batch_sampler.set_epoch(epoch)
    done, big = 0, False
    while done < n_steps:
        batches = iter(loader)
        while True:
            if big:  # the last block's working set, before the next is read (see torchnmf._memory)
                release_freed()
            batch = next(batches, None)
            if batch is None:
                break
            X = batch.X
            big = (X.values() if X.layout != torch.strided else X).nbytes >= _TRIM_BYTES
            del X
            yield batch
            batch = None  # not held while the loader reads the next one: one block in memory at a time
            done += 1
            if done == n_steps:
                return


def _loader(source, batch_size, shuffle, seed, distributed, dtype, num_workers, group, timeout):
    ds = source if isinstance(source, SparseRows) else SparseRows(source, dtype=dtype)
    n_rows, n_cols = ds.shape
    if distributed:
        ds = ds.shard(get_rank(group), get_world_size(group))
        check_shards(len(ds), n_cols, group=group, timeout=timeout)
    loader = row_loader(ds, batch_size, shuffle=shuffle, seed=seed, num_workers=num_workers)
    return loader, n_rows, n_cols


def fit_nmf_online(model, source, *, batch_size: int = 1024, epochs: int = 10, beta: float = 1,
                   forget_factor: float = 0.7, inner_iter: int = 10, alpha: float = 0, l1_ratio: float = 0,
                   shuffle: bool = True, seed: int = 0, history: Optional[History] = None, verbose: bool = False,
                   checkpoint: CheckpointArg = None, checkpoint_every: int = 1, distributed: Optional[bool] = None,
                   num_workers: int = 0, group=None, timeout: Optional[float] = None) -> int:
    """Fit the shared ``W`` of an NMF layer by online multiplicative updates over streamed row batches.

    Rows come from a :class:`~torchnmf.streaming.SparseRows` source (host memory or a memory
    map) through a DataLoader, batch by batch to ``W``'s device; each batch's activations
    start random and take ``inner_iter`` updates, then :class:`~torchnmf.trainer.OnlineMU`
    updates ``W`` from the accumulated statistics. Data-parallel: each process streams its
    contiguous share of the rows and the statistics are summed over processes, so all keep
    the same ``W``. Activations of any rows afterwards: :meth:`NMF.transform <torchnmf.nmf.NMF.transform>`.

    Parameters
    ----------
    model : torchnmf.NMF
        Its ``W`` (C, R) is fitted in place (rank 0's ``W`` is the start); ``H`` is not used.
    source : SparseRows or anything it accepts (scipy.sparse, tensor, array, path)
        The data, shape (n_rows, C).
    batch_size : int, default 1024
        Rows per batch and process.
    epochs : int, default 10
        Passes over the data.
    beta, forget_factor, inner_iter
        See :class:`~torchnmf.trainer.OnlineMU` (``n_samples`` is the number of rows).
    alpha, l1_ratio : float, default 0
        Penalty strength and L1 share, as :meth:`NMF.fit <torchnmf.nmf.BaseComponent.fit>`.
    shuffle : bool, default True
        Row order reshuffled every epoch from ``seed`` (and the epoch).
    seed : int, default 0
        Also seeds each batch's random activations, so a resumed fit repeats exactly.
    history : History, optional
        Receives, per epoch, the sum of the batch divergences (over all processes).
    verbose : bool, default False
    checkpoint : str, os.PathLike or Checkpointer, optional
        Save every ``checkpoint_every`` epochs; resume from it if it holds one.
    checkpoint_every : int, default 1
    distributed : bool, optional
        Default: whether a process group with several processes is initialised.
    num_workers : int, default 0
        DataLoader worker processes reading batches ahead.
    group : ProcessGroup, optional
    timeout : float, optional

    Returns
    -------
    int
        Epochs done (including those before a resume).
    """
    from .nmf import NMF

    if not isinstance(model, NMF) or model.W is None:
        raise TypeError("model must be a torchnmf.NMF with W")
    epochs = data.check_rank(epochs, "epochs")
    checkpoint_every = data.check_rank(checkpoint_every, "checkpoint_every")
    model._check_fit_args(beta, 0, 1, alpha, l1_ratio)
    distributed = is_distributed(group) if distributed is None else bool(distributed)
    rawW = model._raw("W")
    W = value_of(rawW).detach()
    loader, n_rows, n_cols = _loader(source, batch_size, shuffle, seed, distributed, W.dtype, num_workers,
                                     group, timeout)
    if n_cols != W.shape[0]:
        raise ValueError(f"source has {n_cols} columns but W has {W.shape[0]} rows")
    R = W.shape[1]
    if distributed:
        W0 = W.clone()
        broadcast_([W0], group=group, timeout=timeout)
        assign_(rawW, W0)
    n_steps = _steps_per_epoch(len(loader), group, timeout) if distributed else len(loader)
    l1, l2 = float(alpha * l1_ratio), float(alpha * (1 - l1_ratio))
    opt = OnlineMU([rawW], beta=beta, forget_factor=forget_factor, n_samples=n_rows, inner_iter=inner_iter,
                   l1=l1, l2=l2, distributed=distributed, group=group, timeout=timeout)
    ckpt = _checkpointer(checkpoint, checkpoint_every, group, timeout)
    history, own = _history(history, verbose, epochs, "fit_nmf_online", "beta-divergence", False, group)

    def restore(state):
        assign_(rawW, state["W"].to(device=W.device, dtype=W.dtype))
        opt.load_state_dict(state["optimizer"])

    start = resume(ckpt, history, restore, map_location=W.device)
    rank = get_rank(group) if distributed else 0

    def epoch_step(epoch, measure):
        total = 0.0
        step = -1
        for batch in _batches(loader, epoch, n_steps):  # not enumerate: it keeps the last batch alive
            step += 1
            Vb = batch.X.to(device=W.device, dtype=W.dtype)
            # scikit-learn's random start, sqrt(mean(V) / R) * U(0, 1), from a seed per batch
            mean = float(Vb.values().sum() if data.is_sparse(Vb) else Vb.sum()) / max(1, Vb.numel())
            g = torch.Generator().manual_seed(hash((seed, epoch, step, rank)) & ((1 << 62) - 1))
            Hb = (math.sqrt(max(mean, 1e-12) / R) * torch.rand(Vb.shape[0], R, generator=g, dtype=W.dtype))
            Hb = Hb.to(W.device)
            total += float(opt.step(lambda: (Vb, Hb)))
            batch = Vb = Hb = None  # before the next block is read
        return total

    try:
        # one record per epoch: the sum of the batch divergences, each measured before its W update;
        # no tolerance (the records of different epochs see different random activations)
        return run(epoch_step, max_iter=epochs, start=start, tol=0.0, history=history, model="fit_nmf_online",
                   dtype=W.dtype, checkpoint=ckpt, agree=_agree(W, group, timeout) if distributed else None,
                   state=lambda: {"W": value_of(rawW).detach(), "optimizer": opt.state_dict()}).n_iter
    finally:
        if own:
            history.close()


# -- Gamma-Poisson -----------------------------------------------------------------
def _conjugate(layer):
    from .trainer.cavi import check_conjugate

    check_conjugate(layer)
    if not hasattr(layer, "global_statistics"):
        raise TypeError(f"layer {type(layer).__name__} must name its summable statistics in global_statistics")
    return layer


def fit_gamma_cavi(layer, X, rows=None, *, max_iter: int = 200, tol: float = 1e-6, history: Optional[History] = None,
                   verbose: bool = False, chunk_size: Optional[int] = None, checkpoint: CheckpointArg = None,
                   checkpoint_every: int = 10, n_shards: Optional[int] = None, shard_index: Optional[int] = None,
                   group=None, timeout: Optional[float] = None) -> History:
    """Fit a conjugate layer (e.g. :class:`~torchnmf.poisson.GammaPoisson`) by CAVI, data-parallel over rows.

    Every process holds the same layer (same initialisation) and a shard of the rows of the
    counts. :class:`~torchnmf.trainer.CAVI` updates the shard's ``q(U)`` locally; the
    statistics the layer names in ``global_statistics`` are summed over processes before
    ``q(α)`` and the hyperparameters are updated, so ``q(α)`` and the ELBO equal those of
    :meth:`GammaPoisson.fit <torchnmf.poisson.GammaPoisson.fit>` on the whole data up to
    floating-point summation order (and each process's shard rows of ``q(U)`` too).

    Parameters
    ----------
    layer : nn.Module
        A conjugate layer of the *whole* data's shape, initialised identically on every process.
    X : counts, shape (n_local, n_cols)
        This process's rows (or the whole matrix with one process); never modified.
    rows : 1-D integer array, optional
        Global indices of ``X``'s rows; default the contiguous block given by the shard order.
    max_iter : int, default 200
    tol : float, default 1e-6
        Stop when the relative change of the (global) ELBO over a sweep is below ``tol``.
    history : History, optional
        Receives one :class:`~torchnmf.ELBO` per sweep.
    verbose : bool, default False
        Progress bar on rank 0.
    chunk_size : int, optional
        Bound on the nonzeros processed at once.
    checkpoint : str, os.PathLike or Checkpointer, optional
        Save every ``checkpoint_every`` sweeps; resume from it if it holds one.
    checkpoint_every : int, default 10
    n_shards, shard_index : int, optional
        See :func:`fit_nmf`.
    group : ProcessGroup, optional
    timeout : float, optional

    Returns
    -------
    History
        Of the global ELBO, one record per sweep (including those before a resume).
    """
    from .trainer.cavi import CAVI

    _conjugate(layer)
    max_iter = data.check_rank(max_iter, "max_iter")
    tol = data.check_positive(tol, "tol", allow_zero=True)
    checkpoint_every = data.check_rank(checkpoint_every, "checkpoint_every")
    distributed = is_distributed(group)
    shape = getattr(X, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"X must be a 2-D count matrix, got {type(X).__name__}")
    offset, n_total = check_shards(shape[0], shape[1], shard_index=shard_index, n_shards=n_shards,
                                   group=group, timeout=timeout)
    if distributed and rows is None:
        if n_total != layer.n_rows:
            raise ValueError(f"the shards hold {n_total} rows in all but the layer has n_rows={layer.n_rows}")
        rows = torch.arange(offset, offset + shape[0])
    if rows is not None and not distributed:
        raise ValueError("rows: with one process CAVI fits the whole matrix; pass X without rows")
    prepared = layer.prepare(X, rows)
    r = None if rows is None else torch.as_tensor(rows)
    reduce = stats_reducer(layer.global_statistics, group=group, timeout=timeout) if distributed else None
    trainer = CAVI(layer, chunk_size=chunk_size, reduce=reduce)
    closure = (lambda: (prepared, r)) if reduce is not None else (lambda: prepared)
    ckpt = _checkpointer(checkpoint, checkpoint_every, group, timeout)
    history, own = _history(history, verbose, max_iter, "fit_gamma_cavi", "elbo", True, group)
    try:
        run_stateful(layer, trainer, lambda i, measure: trainer.step(closure), max_iter=max_iter, tol=tol,
                      history=history, model="fit_gamma_cavi", checkpoint=ckpt,
                      agree=_agree(layer.kappa, group, timeout) if distributed else None)
    finally:
        if own:
            history.close()
    return history


def fit_gamma_svi(layer, source, *, batch_size: int = 1024, epochs: int = 10, lr: float = 1.0, tau0: float = 1.0,
                  forgetting_rate: float = 0.7, local_iters: int = 10, local_tol: float = 1e-4,
                  shuffle: bool = True, seed: int = 0,
                  history: Optional[History] = None, verbose: bool = False, chunk_size: Optional[int] = None,
                  checkpoint: CheckpointArg = None, checkpoint_every: int = 1, distributed: Optional[bool] = None,
                  num_workers: int = 0, group=None, timeout: Optional[float] = None) -> History:
    """Fit a conjugate layer by stochastic variational inference over streamed row batches.

    Batches come from a :class:`~torchnmf.streaming.SparseRows` source through a DataLoader;
    :class:`~torchnmf.trainer.NaturalGradient` fits each batch's ``q(U)`` and takes a
    natural-gradient step of ``q(α)``. Data-parallel: each process streams its share of the
    rows, the batch statistics are summed over processes and scaled by
    ``n_rows / (rows in all processes' batches)``, so all keep the same ``q(α)``.

    Parameters
    ----------
    layer : nn.Module
        A conjugate layer (e.g. :class:`~torchnmf.poisson.GammaPoisson`) of the whole data's shape.
    source : SparseRows or anything it accepts
        Counts, shape (n_rows, n_cols).
    batch_size : int, default 1024
        Rows per batch and process.
    epochs : int, default 10
    lr, tau0, forgetting_rate, local_iters, local_tol
        Step-size schedule and local iterations of :class:`~torchnmf.trainer.NaturalGradient`
        (``local_tol`` is checked per process: set it to 0 for results independent of the
        number of processes).
    shuffle : bool, default True
    seed : int, default 0
        Row order of every epoch (a resumed fit repeats it exactly).
    history : History, optional
        Receives one ELBO estimate per epoch: the estimate of the epoch's last step (from its
        batch, at the batch's local optimum, before its global step). Only that step computes
        one (``NaturalGradient.step(..., elbo=True)``): on wide data the estimate (digamma
        and lgamma of all of ``q(α)`` in float64) costs as much as the rest of a step.
    verbose : bool, default False
    chunk_size : int, optional
    checkpoint : str, os.PathLike or Checkpointer, optional
        Save every ``checkpoint_every`` epochs; resume from it if it holds one.
    checkpoint_every : int, default 1
    distributed : bool, optional
        Default: whether a process group with several processes is initialised.
    num_workers : int, default 0
    group : ProcessGroup, optional
    timeout : float, optional

    Returns
    -------
    History
        ELBO estimates, one per epoch (including those before a resume).

    Notes
    -----
    A stop request (:meth:`History.request_stop`, a callback) takes effect at the end of
    the epoch. The steps of a float32 layer that compute no estimate compute the batch's
    ``q(α)`` statistics in float32 (see :class:`~torchnmf.trainer.NaturalGradient`).
    """
    from .trainer.natural import NaturalGradient

    _conjugate(layer)
    epochs = data.check_rank(epochs, "epochs")
    checkpoint_every = data.check_rank(checkpoint_every, "checkpoint_every")
    distributed = is_distributed(group) if distributed is None else bool(distributed)
    loader, n_rows, n_cols = _loader(source, batch_size, shuffle, seed, distributed, layer.dtype, num_workers,
                                     group, timeout)
    if (n_rows, n_cols) != (layer.n_rows, layer.n_cols):
        raise ValueError(f"source has shape {(n_rows, n_cols)} but the layer is {(layer.n_rows, layer.n_cols)}")
    n_steps = _steps_per_epoch(len(loader), group, timeout) if distributed else len(loader)
    reduce = stats_reducer(layer.global_statistics, group=group, timeout=timeout) if distributed else None
    trainer = NaturalGradient(layer, lr=lr, tau0=tau0, forgetting_rate=forgetting_rate, local_iters=local_iters,
                              local_tol=local_tol, chunk_size=chunk_size, reduce=reduce)
    ckpt = _checkpointer(checkpoint, checkpoint_every, group, timeout)
    history, own = _history(history, verbose, epochs, "fit_gamma_svi", "elbo", True, group)

    def epoch_step(epoch, measure):
        estimate = None
        step = -1
        for batch in _batches(loader, epoch, n_steps):  # not enumerate: it keeps the last batch alive
            step += 1
            Xb, rows = batch.X.to(layer.device), batch.rows.to(layer.device)
            scale = None
            if distributed:  # the union of the processes' batches stands for the full data
                total_rows = all_reduce_stats({"n": torch.tensor(float(len(rows)), dtype=torch.float64)},
                                              group=group, timeout=timeout)["n"]
                scale = n_rows / float(total_rows)
            # every process measures the same (last) step: the estimate's statistics are summed
            estimate = trainer.step(lambda: (Xb, rows) if scale is None else (Xb, rows, scale),
                                    elbo=step == n_steps - 1)
            trainer._forget()
            batch = Xb = rows = None  # before the next block is read
        return estimate

    try:
        # one record per epoch (a noisy ELBO estimate, so no tolerance); checkpoints at epoch ends
        run_stateful(layer, trainer, epoch_step, max_iter=epochs, tol=0.0, history=history,
                      model="fit_gamma_svi", checkpoint=ckpt,
                      agree=_agree(layer.kappa, group, timeout) if distributed else None)
    finally:
        if own:
            history.close()
    return history

