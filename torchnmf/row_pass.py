"""One whole multiplicative-update iteration in a single pass over the rows of a dense ``V``.

:meth:`torchnmf.nmf.NMF.fit` updates ``H`` and then ``W`` for ``V (N, C) ≈ H Wᵀ``. Done as
two calls of :func:`torchnmf.updates.mu_update`, each half reads all of ``V`` and, for beta
other than 2, builds and walks an ``(N, C)`` reconstruction: four to six passes over ``N·C``
entries in memory. But the update of ``H`` is separable by rows, and the statistics of the
``W`` update are sums over rows; so :func:`mu_iteration` takes ``V`` by blocks of rows that fit
in a core's cache and, for each block, updates its rows of ``H`` and adds the block's share of
``W``'s numerator and denominator while the block is still in cache. ``W`` is updated once
every block is done. The arithmetic is that of the two half-updates (tested equal to them,
float64, 1e-10); only the order of the sums over rows differs.

Measured on a 2-core AMD EPYC (2000x1000, rank 20, 2 threads; benchmarks/README.md): an
iteration takes 0.6-0.75x the time of the two half-updates for beta 0 and 1, 0.9x for beta 2
in float32 (float64 beta 2 keeps the half-updates, see :func:`supports`).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from .data import check_beta
from .updates import EPSILON, _big_mm, _multiply, mu_gamma

__all__ = ["mu_iteration", "iterate", "supports"]

# A block of V (and each reconstruction block) of about this many bytes: two of them fit in a
# core's L2 cache (1 MiB on the machine this was tuned on), the rest of the pass in L3.
_BLOCK_BYTES = 1 << 20
_MIN_ROWS = 8


def supports(V: Tensor, mask: Optional[Tensor] = None, beta: Optional[float] = None) -> bool:
    """Whether the one pass applies, and pays: a dense CPU ``V`` stored by rows, no mask.

    Column-major ``V`` (a transposed view) would be read with a stride of ``N`` inside each
    block, losing the cache locality the pass exists for (measured slower than two halves);
    GPUs have their own fused kernels. ``beta=2`` in float64 keeps the two halves too: the
    Gram form has no elementwise work to fuse, and MKL's float64 products of row blocks
    were slower than its whole-matrix products (benchmarks/README.md).

    Parameters
    ----------
    V : Tensor, shape (N, C)
    mask : Tensor, shape (N, C), optional
    beta : float, optional
        The divergence, when known.
    """
    if beta == 2 and V.dtype == torch.float64:
        return False
    return (mask is None and V.layout == torch.strided and V.device.type == "cpu" and V.dim() == 2
            and V.dtype in (torch.float32, torch.float64) and V.shape[1] > 0
            and (V.stride(1) == 1 or V.shape[1] == 1))


def block_rows(V: Tensor) -> int:
    """Rows of ``V`` per block (about ``_BLOCK_BYTES`` of ``V``, at least ``_MIN_ROWS``)."""
    return max(_MIN_ROWS, _BLOCK_BYTES // max(1, V.shape[1] * V.element_size()))


def _scratch(cache: Dict, name: str, rows: int, V: Tensor) -> Tensor:
    """A kept (rows, C) buffer: fresh temporaries of this size cost page faults every call."""
    buf = cache.get(name)
    if buf is None or buf.shape != (rows, V.shape[1]) or buf.dtype != V.dtype:
        buf = cache[name] = torch.empty(rows, V.shape[1], dtype=V.dtype, device=V.device)
    return buf


def mu_iteration(
    V: Tensor,
    W: Tensor,
    H: Tensor,
    beta: float = 1,
    l1: float = 0.0,
    l2: float = 0.0,
    *,
    eps: float = EPSILON,
    with_loss: bool = False,
    cache: Optional[Dict] = None,
    zero_below: Optional[float] = None,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    r"""``H`` then ``W`` updated once by beta-divergence multiplicative updates, one pass over ``V``.

    Equal to ``H' = mu_update(V, W, H, beta, l1=l1, l2=l2)`` followed by
    ``W' = mu_update(V.T, H', W, beta, l1=l1, l2=l2)`` (the update of :meth:`NMF.fit
    <torchnmf.nmf.NMF.fit>`), with ``V`` read once by blocks of rows (see the module's
    docstring). Nothing passed in is modified.

    Parameters
    ----------
    V : Tensor, shape (N, C)
        Dense, non-negative target on the CPU, stored by rows (:func:`supports`). Not checked
        here, for speed: callers validate their input.
    W : Tensor, shape (C, R)
    H : Tensor, shape (N, R)
        Current factors, ``V ≈ H Wᵀ``.
    beta : float, default 1
        Beta-divergence (2 Euclidean, 1 generalised KL, 0 Itakura-Saito, any real).
    l1, l2 : float, default 0
        Penalties ``l1 Σ X + l2/2 ||X||²`` on each factor, as :func:`~torchnmf.updates.mu_update`.
    eps : float, default float32 eps
        Floor of the reconstruction (beta < 2) and of zero denominators.
    with_loss : bool, default False
        Also return the divergence at the input point ``(W, H)``.
    cache : dict, optional
        Kept by the caller across calls with the same ``V`` (scratch buffers, norms of ``V``).
    zero_below : float, optional
        Entries of the new factors below this are set to 0 (scikit-learn's safeguard for
        beta < 1), ``H``'s before ``W`` is updated, as :meth:`NMF.fit <torchnmf.nmf.NMF.fit>`.

    Returns
    -------
    H_new : Tensor, shape (N, R)
    W_new : Tensor, shape (C, R)
    loss : Tensor of shape () or None
        The divergence at ``(W, H)`` with ``with_loss``, else None.
    """
    beta = check_beta(beta)
    g = mu_gamma(beta)

    def rule(X: Tensor, num: Tensor, den: Tensor, out: Optional[Tensor], start: Optional[int]) -> Tensor:
        X = _multiply(X, num, den, g, l1, l2, eps, out=out, num_is_scratch=True)
        if zero_below is not None:
            X.masked_fill_(X < zero_below, 0.0)
        return X

    with torch.no_grad():
        H_new = torch.empty_like(H, memory_format=torch.contiguous_format)
        W_new, loss = iterate(V, W, H, beta, rule, eps=eps, with_loss=with_loss, cache=cache, H_out=H_new)
    return H_new, W_new, loss


def iterate(V: Tensor, W: Tensor, H: Tensor, beta: float, rule: Callable, *, eps: float = EPSILON,
            with_loss: bool = False, cache: Optional[Dict] = None, H_out: Optional[Tensor] = None,
            pred: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """The pass behind :func:`mu_iteration`, with the multiplicative step left to ``rule``.

    ``rule(X, num, den, out, start)`` returns the updated factor rows ``X`` (rows ``start:``
    of ``H``, or all of ``W`` with ``start=None``) from the numerator and denominator of the
    beta-divergence gradient's parts, written to ``out`` (``None`` for ``W``: a new tensor or
    ``W`` itself); :class:`torchnmf.trainer.BetaMu` passes its own (penalties, gradients).
    ``num`` may be overwritten. ``H_out`` receives the new rows of ``H`` (``H`` itself for an
    in-place update); ``pred``, if given, is ``H Wᵀ`` already computed (its blocks replace a
    product). Returns ``(W_new, loss)``; no gradient is recorded.
    """
    cache = {} if cache is None else cache
    N, C = V.shape
    rows = block_rows(V)
    H_out = torch.empty_like(H) if H_out is None else H_out
    G = W.t() @ W if beta == 2 else None
    wsum = W.sum(0) if beta == 1 else None
    loss = V.new_zeros((), dtype=torch.float64) if with_loss else None
    if with_loss and beta == 2:  # needs H before an in-place update of its rows
        loss = loss + _loss_rest(V, W, H, beta, G, wsum, cache)
    # contiguous ranges of whole blocks, one per worker, summed in a fixed order afterwards
    n_blocks = -(-N // rows)
    workers = max(1, min(torch.get_num_threads(), n_blocks // 2)) if parallel_blocks else 1
    cuts = [rows * (n_blocks * i // workers) for i in range(workers)] + [N]
    args = (V, W, H, H_out, beta, rule, eps, with_loss, pred, G, wsum, rows)
    if workers == 1:
        parts = [_row_range(*args, cuts[0], cuts[1], cache.setdefault("worker0", {}))]
    else:
        parts = _in_workers([(_row_range, args + (cuts[i], cuts[i + 1], cache.setdefault(f"worker{i}", {})))
                             for i in range(workers)])
    numWt, denWt = parts[0][0], parts[0][1]
    for part in parts[1:]:
        numWt.add_(part[0])
        if denWt is not None:
            denWt.add_(part[1])
    if with_loss:
        loss = loss + sum(part[2] for part in parts)
        if beta != 2:
            loss = loss + _loss_rest(V, W, H, beta, G, wsum, cache)
    if beta == 2:
        den = W @ (H_out.t() @ H_out)
    elif beta == 1:
        den = H_out.sum(0).expand_as(W)
    else:
        den = denWt.t()
    W_new = rule(W, numWt.t(), den, None, None)
    return W_new, (loss.to(V.dtype) if with_loss else None)


#: Run the row blocks of a pass in ``torch.get_num_threads()`` Python threads, each with
#: single-threaded torch ops, instead of one thread whose every small product is split over
#: the threads. Independent blocks need no barrier per product: about 1.1x faster at 2
#: threads on a quiet machine, up to 2x on a busy one. Set False to split each product.
parallel_blocks = True
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0


def _in_workers(jobs):
    """Run ``fn(*args)`` for each job in a thread pool with torch's intra-op threads at 1.

    Like scikit-learn's KMeans (which limits BLAS to one thread around its own parallel
    loop), this sets the process-wide thread count while the jobs run and restores it.
    """
    global _pool, _pool_size
    if _pool_size < len(jobs):  # a larger pool replaces the old one, whose idle threads then exit
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_size = ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="torchnmf-rows"), len(jobs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        futures = [_pool.submit(fn, *args) for fn, args in jobs]
        return [f.result() for f in futures]
    finally:
        torch.set_num_threads(threads)


def _row_range(V: Tensor, W: Tensor, H: Tensor, H_out: Tensor, beta: float, rule: Callable, eps: float,
               with_loss: bool, pred: Optional[Tensor], G: Optional[Tensor], wsum: Optional[Tensor],
               rows: int, lo: int, hi: int, cache: Dict):
    """Rows ``lo:hi`` of the pass, by blocks: their ``H`` update and their share of ``W``'s
    statistics, ``(numWt, denWt, loss part)``. Runs in a worker thread (grad mode is per thread)."""
    with torch.no_grad():
        Wt = W.t()
        numWt = torch.zeros(W.shape[1], V.shape[1], dtype=W.dtype, device=W.device)  # (num of W)ᵀ
        denWt = None if beta in (1, 2) else torch.zeros_like(numWt)
        loss = V.new_zeros((), dtype=torch.float64)
        for s in range(lo, hi, rows):
            e = min(s + rows, hi)
            Vb, Hb, Hn = V[s:e], H[s:e], H_out[s:e]
            b = e - s
            # ---- rows s:e of H (W fixed) ----
            if beta == 2:
                num = _big_mm(Vb, W)
                den = Hb @ G
                if with_loss:  # the cross term of 0.5 ||V - H Wᵀ||², by blocks
                    loss = loss - (Hb * num).sum().double()
            else:
                buf = _scratch(cache, "WH", rows, V)[:b]
                if pred is None:
                    WH = torch.mm(Hb, Wt, out=buf)
                    if beta < 2:
                        WH.clamp_min_(eps)
                else:  # the known product, floored on the way into the buffer (one pass, not two)
                    WH = torch.clamp_min(pred[s:e], eps, out=buf) if beta < 2 else buf.copy_(pred[s:e])
                num, den, part = _stats(Vb, WH, W, beta, wsum, cache, rows, with_loss)
                if with_loss:
                    loss = loss + part
            if with_loss and beta == 1:  # Σ H (colsum W) at the old rows
                loss = loss + torch.dot(Hb.sum(0), wsum).double()
            rule(Hb, num, den, Hn, s)
            # ---- this block's share of W's statistics (H's new rows) ----
            if beta == 2:
                numWt.addmm_(Hn.t(), Vb)
                continue
            WH = torch.mm(Hn, Wt, out=_scratch(cache, "WH", rows, V)[:b])
            if beta < 2:
                WH.clamp_min_(eps)
            if beta == 1:
                numWt.addmm_(Hn.t(), torch.div(Vb, WH, out=WH))
                continue
            P = torch.pow(WH, beta - 2, out=_scratch(cache, "P", rows, V)[:b])
            D = torch.mul(WH, P, out=WH)  # WH^(beta-1)
            denWt.addmm_(Hn.t(), D)
            numWt.addmm_(Hn.t(), P.mul_(Vb))
        return numWt, denWt, loss


def _stats(Vb: Tensor, WH: Tensor, W: Tensor, beta: float, wsum: Optional[Tensor], cache: Dict,
           rows: int, with_loss: bool):
    """(num, den, loss part) of a block's ``H`` update from its (floored) reconstruction ``WH``.

    ``WH`` is overwritten. The loss part is the block's ``V``-dependent term; the terms that
    need no ``V`` (or are constants of ``V``) are added once by :func:`_loss_rest`.
    """
    part = None
    if beta == 1:
        if with_loss:  # Σ V log WH: WH >= eps > 0, a plain log (xlogy is ~10x slower)
            part = -torch.dot(Vb.reshape(-1), torch.log(WH).reshape(-1)).double()
        num = _big_mm(torch.div(Vb, WH, out=WH), W)
        return num, wsum.expand(Vb.shape[0], -1), part
    P = torch.pow(WH, beta - 2, out=_scratch(cache, "P", rows, Vb)[:Vb.shape[0]])
    if with_loss:
        if beta == 0:
            r = Vb / WH
            part = (r - torch.log(r) - 1).sum().double()
        else:  # ((beta-1) Σ WH^beta - beta Σ V WH^(beta-1)) / (beta (beta-1)), the rest is constant
            D = WH * P
            part = (((beta - 1) * (D * WH).sum() - beta * (D * Vb).sum()) / (beta * (beta - 1))).double()
    D = torch.mul(WH, P, out=WH)  # WH^(beta-1)
    num = _big_mm(P.mul_(Vb), W)
    return num, _big_mm(D, W), part


def _loss_rest(V: Tensor, W: Tensor, H: Tensor, beta: float, G: Optional[Tensor],
               wsum: Optional[Tensor], cache: Dict) -> Tensor:
    """The terms of the divergence at ``(W, H)`` that the row blocks do not add."""
    if beta == 2:  # 0.5 (||V||² - 2 Σ H∘VW + Σ (HᵀH)∘(WᵀW)); the middle term came by blocks
        if "sq" not in cache:
            cache["sq"] = torch.dot(V.reshape(-1), V.reshape(-1)).double()
        return 0.5 * (cache["sq"] + ((H.t() @ H) * G).sum().double())
    if beta == 1:  # Σ H (colsum W) comes by blocks (H's rows may be updated in place)
        if "c1" not in cache:
            cache["c1"] = (torch.xlogy(V, V) - V).sum().double()
        return cache["c1"]
    if beta == 0:
        return V.new_zeros((), dtype=torch.float64)
    if "cb" not in cache:
        cache["cb"] = (V.pow(beta).sum() / (beta * (beta - 1))).double()
    return cache["cb"]
