r"""Many restarts of NMF as one tensor program: replicates are a dimension, not a loop.

:func:`fit_replicates` fits ``R`` restarts of :class:`torchnmf.nmf.NMF` (``X ≈ H Wᵀ``) at one
rank or at several, from different random starts, as one program. The replicates' factors are
stacked along the rank axis: ``W_all`` is ``(n_features, Σ k_r)`` and ``H_all``
``(n_samples, Σ k_r)``, replicate ``r`` owning a block of ``k_r`` columns, so that

* with the Frobenius loss (beta = 2) every product with ``X`` is **one** GEMM (dense ``X``) or
  **one** CSR product (sparse ``X``, never densified) for all replicates and ranks at once,
  ``X @ W_all`` and ``Xᵀ @ H_all``; the per-replicate Gram terms ``W_rᵀ W_r`` and
  ``H_r (W_rᵀ W_r)`` are batched matrix products over ``(R, ·, k)`` views;
* with any other beta the ratio ``X / (H_r W_rᵀ)`` (its powers, for a general beta) belongs to
  each replicate: a dense ``X`` is taken in tiles of replicates and rows, each tile one batched
  product, sized so that no tile holds more than ``block_elems`` entries (never an
  ``R x n_samples x n_features`` tensor); a sparse ``X`` gives the sampled products
  ``H_r W_rᵀ`` at its non-zeros only: for beta = 1 one sampled product and one CSR product
  per chunk of replicates (X's pattern repeated block-diagonally, :class:`_Expanded`), for
  other betas one replicate at a time through :func:`torchnmf.updates.mu_statistics`.

Each iteration updates H then W with the rules of :meth:`NMF.fit <torchnmf.nmf.BaseComponent.fit>`
(same exponents, floors, penalties and scikit-learn's zeroing for beta < 1), and every replicate
follows the fit engine's stop rule on its own (:func:`torchnmf.engine.relative_change`,
:func:`torchnmf.engine.has_converged`, the noise floor of the dtype): replicate ``r`` of the batch
ends with the factors, the objective and the number of iterations of ``NMF.fit`` started from
the same factors. A replicate that has converged stops changing and stops costing: it leaves the
stacked tensors at the check where it stopped (the remaining columns are copied once, which costs
less than one product with ``X``). The only host synchronisation is one small copy of the
replicates' divergences per check.

``solver='cd'`` (beta = 2 only) replaces the multiplicative updates by scikit-learn's
coordinate descent (``NMF(solver='cd', shuffle=False)``, HALS; cNMF's solver for the Frobenius
loss): per iteration H then W (scikit-learn's W then H) by one sweep over the components
(:func:`torchnmf.hals.hals_sweep`), each side one product with ``X`` for all replicates, the
Gram matrices batched ``(R, k, k)``, the sweep a loop over the ``k`` components of batched
vector operations. Each replicate stops on scikit-learn's rule: the projected-gradient
``violation`` of an iteration at most ``tol`` times that of its first iteration; replicate
``r`` ends with the factors and the number of iterations of scikit-learn's fit from the same
factors. At the same cost per iteration (the two products with ``X`` dominate), coordinate
descent ends its replicates much closer to their optima than the multiplicative updates (what a
consensus's stability measures).

Memory: the stacked factors and their updates take about ``6 (n_samples + n_features)`` entries
per stacked column (``max_columns`` fits the replicates in consecutive batches of fewer columns);
the per-replicate work of beta != 2 at most a few times ``block_elems`` entries.

With :mod:`torch.distributed` initialised (or a ``process_group``) the replicates are divided
among the processes, each fits its share, and the results are summed back so that every process
holds all of them: the same result as one process.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from . import data
from ._csr import csr_tensor, to_csr
from .distributed import all_reduce_stats, get_rank, get_world_size
from .engine import ConvergenceWarning, STOP_RULES, _user_stacklevel, has_converged, relative_change
from .hals import hals_sweep
from .init import _mean, check_random_state
from .updates import EPSILON, _big_mm, _multiply, _sparse_parts, mu_gamma, mu_statistics

__all__ = ["ReplicateFit", "fit_replicates", "replicate_generator", "init_replicates"]

#: ``init`` values :func:`fit_replicates` accepts.
INITS = ("random",)
#: ``solver`` values: multiplicative updates, coordinate descent (HALS, beta = 2 only).
SOLVERS = ("mu", "cd")

# entries of one reconstruction tile (replicates x rows x features) for beta != 2 and a dense X:
# 1 MiB of float64 per temporary on a CPU (cache-sized: 1.5-2x faster than 32 MiB tiles,
# measured 2000x500, rank 8), 512 MiB of float32 on a GPU
_BLOCK_ELEMS_CPU = 1 << 17
_BLOCK_ELEMS_CUDA = 1 << 27
# entries (non-zeros x replicates) of one chunk of the sparse KL path (_Expanded: ~36 bytes each);
# on a CPU smaller chunks stay in cache (measured 1.3x faster than 2**21 at 85k non-zeros)
_SPARSE_ELEMS_CPU = 1 << 19
_SPARSE_ELEMS_CUDA = 1 << 25


@dataclass
class ReplicateFit:
    """The replicates of one rank fitted by :func:`fit_replicates`.

    Convention as :class:`torchnmf.nmf.NMF`: ``X (n_samples, n_features) ≈ H @ W.T``; the
    components in scikit-learn's layout are ``W[r].T``.

    Attributes
    ----------
    rank : int
        The rank ``k`` of every replicate.
    W : Tensor, shape (R, n_features, k)
        Each replicate's components (one slice per replicate).
    H : Tensor, shape (R, n_samples, k)
        Each replicate's usages.
    n_iter : Tensor, shape (R,), int64
        Iterations each replicate ran under its own stop rule.
    converged : Tensor, shape (R,), bool
        Whether each replicate met ``tol`` (``False`` when ``max_iter`` ended it).
    loss : Tensor, shape (R,), float64
        Each replicate's beta-divergence at its returned factors (penalties not included).
    """

    rank: int
    W: Tensor
    H: Tensor
    n_iter: Tensor
    converged: Tensor
    loss: Tensor


# -- seeds and starts ------------------------------------------------------------------------
def _base_seed(random_state) -> int:
    """One integer seed from ``random_state`` (``None`` draws it from torch's global generator)."""
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        if random_state < 0:
            raise ValueError(f"random_state must be a non-negative integer, got {random_state}")
        return int(random_state)
    g = check_random_state(random_state)
    return int(torch.randint(0, 2 ** 62, (1,), generator=g).item())


def replicate_generator(seed: int, rank: int, replicate: int) -> torch.Generator:
    """The CPU generator of replicate ``replicate`` at rank ``rank`` for the base seed ``seed``.

    Derived from ``(seed, rank, replicate)`` alone (:class:`numpy.random.SeedSequence`), so a
    replicate starts from the same factors whatever the number of replicates, the other ranks
    fitted with it, or the processes that share the work.

    Parameters
    ----------
    seed : int
        Non-negative base seed (``random_state`` of :func:`fit_replicates`).
    rank, replicate : int
        The rank and the replicate's index (from 0).

    Returns
    -------
    torch.Generator
    """
    state = np.random.SeedSequence([int(seed), int(rank), int(replicate)]).generate_state(2, np.uint32)
    g = torch.Generator()
    g.manual_seed((int(state[0]) << 31) ^ int(state[1]))
    return g


def init_replicates(X, rank: int, replicates: Sequence[int], seed: int, *, dtype: Optional[torch.dtype] = None,
                    device=None) -> Tuple[Tensor, Tensor]:
    """Random starting factors of the given replicates, scikit-learn's ``init='random'`` scaling.

    Replicate ``r`` draws ``H = |N(0, 1)| sqrt(mean(X) / k)`` (n_samples, k) then ``W`` alike
    (n_features, k) from :func:`replicate_generator` ``(seed, rank, r)`` on the CPU in float64,
    as :func:`torchnmf.init.initialize` with ``method='random'`` does for a float64 ``X`` with
    that generator, then rounds them to ``dtype``: the same start on every device and in
    every dtype.

    Parameters
    ----------
    X : Tensor, shape (n_samples, n_features)
        Non-negative data, dense or sparse (only its mean is read).
    rank : int
    replicates : sequence of int
        Indices of the replicates to draw.
    seed : int
        Base seed.
    dtype : torch.dtype, optional
        Default ``X``'s.
    device : optional
        Default ``X``'s.

    Returns
    -------
    W : Tensor, shape (len(replicates), n_features, rank)
    H : Tensor, shape (len(replicates), n_samples, rank)
    """
    dtype = dtype or X.dtype
    device = device if device is not None else X.device
    N, F = X.shape
    # drawn in float64 and rounded: a replicate starts from the same factors in every dtype
    scale = (_mean(X).to(device="cpu", dtype=torch.float64) / rank).sqrt()
    Ws, Hs = [], []
    for r in replicates:
        g = replicate_generator(seed, rank, r)
        Hs.append(scale * torch.randn((N, rank), generator=g, dtype=torch.float64).abs())
        Ws.append(scale * torch.randn((F, rank), generator=g, dtype=torch.float64).abs())
    W = torch.stack(Ws) if Ws else torch.empty((0, F, rank), dtype=torch.float64)
    H = torch.stack(Hs) if Hs else torch.empty((0, N, rank), dtype=torch.float64)
    return W.to(device=device, dtype=dtype), H.to(device=device, dtype=dtype)


# -- the batch ----------------------------------------------------------------------------------
class _Group:
    """Replicates of one rank in the stacked factors: columns ``[offset, offset + len(ids) * k)``."""

    def __init__(self, k: int, ids: List[Tuple[int, int]], offset: int):
        self.k, self.ids, self.offset = k, ids, offset

    @property
    def cols(self) -> slice:
        return slice(self.offset, self.offset + len(self.ids) * self.k)

    def view(self, A: Tensor) -> Tensor:
        """The group's block of a stacked factor ``A`` (n, C) as ``(n, R_g, k)``."""
        return A[:, self.cols].view(A.shape[0], len(self.ids), self.k)


def _survivors(g: _Group, ids: List[int], offset: int, keep_cols: List[int], new_groups: List[_Group]) -> int:
    """Keep replicates ``ids`` (positions in ``g``) running: their columns into ``keep_cols``, their group at
    ``offset`` into ``new_groups``; return the offset after them (shared by the MU and coordinate-descent loops)."""
    keep_cols.extend(c for j in ids for c in range(g.offset + j * g.k, g.offset + (j + 1) * g.k))
    new_groups.append(_Group(g.k, [g.ids[j] for j in ids], offset))
    return offset + len(ids) * g.k


class _Expanded:
    """The non-zero pattern of a sparse ``X`` (n, m) repeated for ``c`` replicates, as one CSR matrix.

    Row ``i c + r`` of the ``(n c, m c)`` matrix holds row ``i`` of ``X`` at columns
    ``j c + r``: with the replicates' factors as ``(n c, k)`` and ``(m c, k)`` matrices (the
    stacked layout, reshaped), the reconstruction at the non-zeros of all ``c`` replicates is
    one sampled product and their numerators one CSR product, with no work outside the
    non-zeros.
    """

    def __init__(self, nz, c: int):
        n, m = nz.shape
        crow, col = nz.crow.long(), nz.col.long()
        counts = (crow[1:] - crow[:-1]).repeat_interleave(c)  # entries of each row (i, r)
        crowE = torch.zeros(n * c + 1, dtype=torch.int64, device=crow.device)
        torch.cumsum(counts, 0, out=crowE[1:])
        rows = torch.repeat_interleave(torch.arange(n * c, device=crow.device), counts)
        src = crow[rows // c] + torch.arange(rows.numel(), device=crow.device) - crowE[rows]  # entry of X
        colE = col[src] * c + rows % c
        del rows
        if max(colE.numel(), n * c, m * c) < 2 ** 31 - 1:  # int32: faster CSR products, half the memory
            crowE, colE = crowE.to(torch.int32), colE.to(torch.int32)
        self.shape = (n * c, m * c)
        self.crow, self.col = crowE, colE
        self.vals = nz.vals[src]
        self.pattern = self.csr(torch.zeros_like(self.vals))  # sampled_addmm's beta=0 still reads it
        self._ones: Optional[Tensor] = None

    def csr(self, values: Tensor) -> Tensor:
        return csr_tensor(self.crow, self.col, values, self.shape)

    def row_sums(self, values: Tensor) -> Tensor:
        """``Σ_j`` of the matrix holding ``values``, per row, shape (n c,)."""
        if self._ones is None or self._ones.dtype != values.dtype:
            self._ones = values.new_ones((self.shape[1], 1))
        return (self.csr(values) @ self._ones).view(-1)


class _Batch:
    """The stacked factors of the active replicates and one multiplicative update of either."""

    def __init__(self, X: Tensor, beta: float, l1: float, l2: float, block_elems: Optional[int]):
        self.beta, self.l1, self.l2, self.gamma = beta, l1, l2, mu_gamma(beta)
        cuda = X.is_cuda
        self.block = block_elems or (_BLOCK_ELEMS_CUDA if cuda else _BLOCK_ELEMS_CPU)
        self.sparse_block = block_elems or (_SPARSE_ELEMS_CUDA if cuda else _SPARSE_ELEMS_CPU)
        self.sparse = data.is_sparse(X)
        self.X = X
        self.Xt = to_csr(X.t()) if self.sparse else X.t()
        self.cache: Dict[str, dict] = {"H": {}, "W": {}}
        self._consts: Dict[str, Tensor] = {}

    # -- constants of X (the divergence's terms that do not depend on the factors) --
    def _const(self, name: str) -> Tensor:
        if name not in self._consts:
            X, b = self.X, self.beta
            if name == "sq":
                self._consts[name] = data._values(X).pow(2).sum() if self.sparse else (X * X).sum()
            elif name == "c1":
                self._consts[name] = (torch.xlogy(X, X) - X).sum()
            else:  # "cb"
                self._consts[name] = X.pow(b).sum()
        return self._consts[name]

    def update(self, side: str, W: Tensor, H: Tensor, groups: List[_Group], measure: bool):
        """New ``H`` (side ``'H'``) or ``W`` (side ``'W'``) for every active replicate.

        Returns the new stacked factor and, when ``measure``, the divergence of each replicate
        at the input point, shape (R_active,), in the order of ``groups``.
        """
        B = H if side == "H" else W  # the factor updated
        if self.beta == 2:
            num, den, loss = self._frobenius(side, W, H, groups, measure)
        elif self.sparse:
            num, den, loss = self._sparse(side, W, H, groups, measure)
        else:
            num, den, loss = self._dense(side, W, H, groups, measure)
        # num is a fresh tensor on every path: divided in place. Row-major result, so that every
        # rank's block of columns views as (n, R_g, k)
        new = _multiply(B, num, den, self.gamma, self.l1, self.l2, EPSILON, num_is_scratch=True)
        return new.contiguous(), loss

    def product(self, side: str, A: Tensor) -> Tensor:
        """``X @ A`` (side ``'H'``, A = W) or ``Xᵀ @ A`` (side ``'W'``, A = H): one GEMM or CSR product."""
        if self.sparse:
            nz = _sparse_parts(self.X if side == "H" else self.Xt, self.cache[side])
            return nz.mm(nz.vals, A.contiguous())
        return _big_mm(self.X if side == "H" else self.Xt, A)

    def _frobenius(self, side, W, H, groups, measure):
        """beta = 2: one product with X for all replicates, Gram terms batched per rank."""
        A, B = (W, H) if side == "H" else (H, W)
        num = self.product(side, A)
        den = torch.empty_like(B)
        losses = []
        for g in groups:
            Ag, Bg = g.view(A), g.view(B)
            G = torch.einsum("nrk,nrl->rkl", Ag, Ag)  # (R_g, k, k) Gram of the fixed factor
            g.view(den).copy_(torch.einsum("nrk,rkl->nrl", Bg, G))
            if measure:
                cross = (Bg * g.view(num)).sum((0, 2))
                GB = torch.einsum("nrk,nrl->rkl", Bg, Bg)
                losses.append(0.5 * (self._const("sq") - 2 * cross + (GB * G).sum((1, 2))))
        return num, den, (torch.cat(losses) if measure else None)

    def _sparse(self, side, W, H, groups, measure):
        """Sparse X, beta != 2: the update's statistics at X's non-zeros.

        beta = 1 takes ``c`` replicates at once through :class:`_Expanded` (one sampled product
        and one CSR product per chunk); other betas need dense blocks of each replicate's
        reconstruction for the denominator and go one replicate at a time through
        :func:`torchnmf.updates.mu_statistics`.
        """
        if self.beta == 1:
            return self._sparse_kl(side, W, H, groups, measure)
        X = self.X if side == "H" else self.Xt
        A, B = (W, H) if side == "H" else (H, W)
        num, den = torch.empty_like(B), torch.empty_like(B)
        losses = []
        for g in groups:
            Ag, Bg, ng, dg = g.view(A), g.view(B), g.view(num), g.view(den)
            for j in range(len(g.ids)):
                n_, d_, l_ = mu_statistics(X, Ag[:, j].contiguous(), Bg[:, j].contiguous(), self.beta,
                                           with_loss=measure, cache=self.cache[side])
                ng[:, j].copy_(n_)
                dg[:, j].copy_(d_)
                if measure:
                    losses.append(l_.reshape(1))
        return num, den, (torch.cat(losses) if measure else None)

    def _sparse_kl(self, side, W, H, groups, measure):
        """Sparse X, beta = 1: ``X / (H_r W_rᵀ)`` at the non-zeros for chunks of replicates."""
        nz = _sparse_parts(self.X if side == "H" else self.Xt, self.cache[side])
        A, B = (W, H) if side == "H" else (H, W)
        n, m = nz.shape
        num = torch.empty_like(B)
        den = B.new_empty((1, B.shape[1]))
        losses = []
        nnz = max(1, nz.vals.numel())
        chunks = [max(1, min(len(g.ids), self.sparse_block // nnz)) for g in groups]
        # keep the expansions of the chunk sizes these groups use (until replicates stop), no others
        sizes = {min(c, len(g.ids) - r0) for g, c in zip(groups, chunks) for r0 in range(0, len(g.ids), c)}
        store = self.cache[side].setdefault("expanded", {})
        for c in set(store) - sizes:
            del store[c]
        for g, c in zip(groups, chunks):
            Ag, Bg, R = g.view(A), g.view(B), len(g.ids)
            lg = []
            for r0 in range(0, R, c):
                r1 = min(R, r0 + c)
                if r1 - r0 not in store:
                    store[r1 - r0] = _Expanded(nz, r1 - r0)
                ex = store[r1 - r0]
                Bc = Bg[:, r0:r1].reshape(n * (r1 - r0), g.k)  # row (i, r) = B[i, r]
                Ac = Ag[:, r0:r1].reshape(m * (r1 - r0), g.k)
                wh = torch.sparse.sampled_addmm(ex.pattern, Bc, Ac.t(), beta=0.0).values()
                whc = wh.clamp_min(EPSILON)
                ratio = ex.vals / whc
                g.view(num)[:, r0:r1] = (ex.csr(ratio) @ Ac).view(n, r1 - r0, g.k)
                if measure:
                    terms = torch.xlogy(ex.vals, ratio) - ex.vals  # v log(v / wh) - v
                    lg.append(ex.row_sums(terms).view(n, r1 - r0).sum(0))
            g.view(den)[0] = Ag.sum(0)  # the fixed factor's column sums, as NMF.fit's
            if measure:
                losses.append(torch.cat(lg) + (Bg.sum(0) * Ag.sum(0)).sum(1))
        return num, den, (torch.cat(losses) if measure else None)

    def _tiles(self, N: int, F: int, R: int):
        """``(replicates, rows)`` per tile: at most ``block`` entries of an (r, n, F) reconstruction."""
        if R * N * F <= self.block:
            return R, N
        if N * F <= self.block:
            return max(1, self.block // (N * F)), N
        return 1, max(1, self.block // F)

    def _dense(self, side, W, H, groups, measure):
        """Dense X, beta != 2: each replicate's ratio by tiles of (replicates, rows of X)."""
        beta, X = self.beta, self.X
        N, F = X.shape
        B = H if side == "H" else W
        num = torch.empty_like(B)
        den = torch.empty_like(B) if beta != 1 else None
        den1 = B.new_empty((1, B.shape[1])) if beta == 1 else None
        losses = []
        for g in groups:
            Wg, Hg = g.view(W), g.view(H)
            R = len(g.ids)
            nr, nb = self._tiles(N, F, R)
            ng = g.view(num)
            dg = None if den is None else g.view(den)
            lg = Hg.new_zeros(R) if measure else None
            for r0 in range(0, R, nr):
                r1 = min(R, r0 + nr)
                # products with the thin operand on the left (MKL: ~2x faster, cf. updates._big_mm)
                Wt = Wg[:, r0:r1].permute(1, 2, 0).contiguous()  # (c, k, F)
                if side == "W":
                    accN = Wt.new_zeros(Wt.shape)
                    accD = None if beta == 1 else Wt.new_zeros(Wt.shape)
                for n0 in range(0, N, nb):
                    n1 = min(N, n0 + nb)
                    Hc = Hg[n0:n1, r0:r1].permute(1, 0, 2)  # (c, n, k)
                    Xb = X[n0:n1]
                    WH = torch.bmm(Hc, Wt)  # (c, n, F)
                    if beta < 2:
                        WH.clamp_min_(EPSILON)
                    if beta == 1:
                        if measure:
                            lg[r0:r1] -= (torch.log(WH) * Xb).sum((1, 2))
                        Nm, D = torch.div(Xb, WH, out=WH), None  # X / WH
                    else:
                        P = WH.pow(beta - 2)
                        D = P * WH  # WH^(beta-1)
                        if measure:
                            if beta == 0:
                                q = Xb / WH
                                lg[r0:r1] += (q - torch.log(q) - 1).sum((1, 2))
                            else:
                                lg[r0:r1] += ((beta - 1) * (D * WH).sum((1, 2))
                                              - beta * (D * Xb).sum((1, 2))) / (beta * (beta - 1))
                        Nm = P.mul_(Xb)  # X WH^(beta-2)
                    if side == "H":
                        ng[n0:n1, r0:r1] = torch.bmm(Wt, Nm.transpose(1, 2)).permute(2, 0, 1)
                        if D is not None:
                            dg[n0:n1, r0:r1] = torch.bmm(Wt, D.transpose(1, 2)).permute(2, 0, 1)
                    else:
                        HcT = Hc.transpose(1, 2)  # (c, k, n)
                        accN.baddbmm_(HcT, Nm)
                        if D is not None:
                            accD.baddbmm_(HcT, D)
                if side == "W":
                    ng[:, r0:r1] = accN.permute(2, 0, 1)
                    if accD is not None:
                        dg[:, r0:r1] = accD.permute(2, 0, 1)
            if beta == 1:  # the denominator is the fixed factor's column sums, as NMF.fit's
                g.view(den1)[0] = (Wg if side == "H" else Hg).sum(0)
            if measure:
                if beta == 1:
                    lg += self._const("c1") + (Hg.sum(0) * Wg.sum(0)).sum(1)
                elif beta != 0:
                    lg += self._const("cb") / (beta * (beta - 1))
                losses.append(lg)
        if beta == 1:
            den = den1  # (1, C), broadcast over the rows
        return num, den, (torch.cat(losses) if measure else None)


# -- checks ------------------------------------------------------------------------------------
def _check_ranks(rank, shape) -> Tuple[List[int], bool]:
    limit = min(shape)
    if isinstance(rank, numbers.Integral) and not isinstance(rank, bool):
        return [data.check_rank(rank, "rank", max_rank=limit)], True
    if isinstance(rank, (str, bytes)) or not isinstance(rank, Sequence) and not hasattr(rank, "__iter__"):
        raise TypeError(f"rank must be a positive integer or a sequence of them, got {rank!r}")
    ranks = [data.check_rank(k, "rank", max_rank=limit) for k in rank]
    if not ranks:
        raise ValueError("rank must hold at least one rank, got an empty sequence")
    twice = sorted({k for k in ranks if ranks.count(k) > 1})
    if twice:
        raise ValueError(f"rank holds {', '.join(map(str, twice))} more than once: list each rank once "
                         "(more restarts of a rank come from n_replicates)")
    return ranks, False


def _check_start(value, name: str, shape, dtype, device) -> Optional[Tensor]:
    if value is None:
        return None
    T = data.as_tensor(value, name, dtype=dtype, device=device, ndim=3, sparse="dense")
    data.check_nonnegative(T, name)
    if tuple(T.shape) != tuple(shape):
        hint = (f"; pass n_replicates={T.shape[0]} to start from its {T.shape[0]} slices"
                if tuple(T.shape[1:]) == tuple(shape[1:]) else "")
        raise ValueError(f"{name} has shape {tuple(T.shape)}, expected (n_replicates, "
                         f"{'n_features' if name == 'W0' else 'n_samples'}, rank) = {tuple(shape)}{hint}")
    return T


def _prepare_X(X, dtype, device, beta: Optional[float] = None) -> Tensor:
    X = data.as_tensor(X, "X", ndim=2, sparse="keep", dtype=dtype, device=device)
    if X.layout not in (torch.strided, torch.sparse_coo, torch.sparse_csr):
        X = X.to_sparse_coo()
    if X.layout == torch.sparse_coo:
        X = X.coalesce()
    data.check_nonnegative(X, "X")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X is empty (shape {tuple(X.shape)}): there is nothing to factorize")
    data.check_magnitude(X, "X", X.dtype, beta=beta)  # Σ x² overflows float32 long before Σ x log x
    return X


# -- the fit -----------------------------------------------------------------------------------
def fit_replicates(X, rank: Union[int, Sequence[int]], n_replicates: int = 10, *, beta: float = 2,
                   tol: float = 1e-4, max_iter: int = 200, check_every: Optional[int] = None,
                   init: str = "random", W0=None, H0=None, random_state=None, device=None,
                   dtype: Optional[torch.dtype] = None, alpha: float = 0, l1_ratio: float = 0,
                   verbose: bool = False, process_group=None, stop_rule: str = "relative",
                   block_elems: Optional[int] = None, max_columns: Optional[int] = None,
                   solver: str = "mu") -> Union[ReplicateFit, List[ReplicateFit]]:
    r"""Fit ``n_replicates`` restarts of NMF at each rank as one tensor program.

    With ``solver='mu'``, replicate ``r`` at rank ``k`` is the fit of :meth:`NMF.fit
    <torchnmf.nmf.BaseComponent.fit>` ``(X, beta, tol, max_iter, alpha=alpha, l1_ratio=l1_ratio,
    check_every=check_every)`` started from its own factors, iterations and stop included; with
    ``solver='cd'`` (beta = 2) it is scikit-learn's ``NMF(solver='cd', shuffle=False,
    init='custom')`` fit, with ``W_sklearn = H`` and ``H_sklearn = Wᵀ``. See the module
    documentation for how the replicates share the work.

    Parameters
    ----------
    X : array, Tensor or sparse matrix, shape (n_samples, n_features)
        Non-negative, finite data: numpy, torch (dense, COO or CSR) or scipy.sparse (never
        densified). Never modified.
    rank : int or sequence of int
        The rank, or several (each in ``[1, min(n_samples, n_features)]``), fitted in one call.
    n_replicates : int, default 10
        Restarts per rank, ``R``.
    beta : float, default 2
        Beta-divergence: 2 Frobenius, 1 Kullback-Leibler, any real (beta <= 0 needs a dense,
        strictly positive ``X``).
    tol : float, default 1e-4
        Tolerance of the stop rule, for each replicate on its own: with ``solver='mu'`` the
        engine's (:mod:`torchnmf.engine`); with ``'cd'`` scikit-learn's (the iteration's
        projected-gradient violation at most ``tol`` times the first iteration's). 0 runs
        ``max_iter`` iterations (``'cd'``: unless a replicate reaches a fixed point).
    max_iter : int, default 200
    check_every : int, optional
        ``solver='mu'`` only: measure each replicate's divergence every this many iterations;
        default as ``NMF.fit``: 1 for beta = 2, 10 otherwise. ``'cd'`` measures every iteration.
    init : {'random'}, default 'random'
        Starting factors not given by ``W0``/``H0``: see :func:`init_replicates`.
    W0 : array or Tensor, shape (R, n_features, rank), optional
        Starting components (single rank only); never modified.
    H0 : array or Tensor, shape (R, n_samples, rank), optional
        Starting usages (single rank only); never modified.
    random_state : None, int, numpy or torch generator
        Base seed: replicate ``r`` at rank ``k`` starts from :func:`replicate_generator`
        ``(seed, k, r)``, the same whatever ``n_replicates``, the other ranks or the processes.
    device : str or torch.device, optional
        Default ``X``'s.
    dtype : torch.dtype, optional
        Floating dtype of the fit; default ``X``'s (float32 for integer input).
    alpha, l1_ratio : float, default 0
        Penalty ``l1 (ΣW + ΣH) + l2/2 (‖W‖² + ‖H‖²)`` with ``l1 = alpha l1_ratio`` and
        ``l2 = alpha (1 - l1_ratio)``, as ``NMF.fit``; for ``'cd'`` scikit-learn's penalty
        with ``alpha_W = alpha / n_features`` (on ``H``) and ``alpha_H = alpha / n_samples`` (on ``W``).
    verbose : bool, default False
        A progress bar over iterations with the number of replicates still running.
    process_group : ProcessGroup, optional
        Divide the replicates among this group's processes (default: the initialised default
        group, if any); every process returns the full result.
    stop_rule : {'relative', 'sklearn'}, default 'relative'
        As ``NMF.fit`` (``solver='mu'``; ``'cd'`` has its own rule, see ``tol``).
    block_elems : int, optional
        Memory budget of the per-replicate work for beta != 2: the entries of one
        reconstruction tile (replicates x rows x features) for a dense ``X`` (default 2**17 on
        a CPU, 2**27 on a GPU), or of one chunk (replicates x non-zeros) for a sparse ``X``
        with beta = 1 (default 2**19 on a CPU, 2**25 on a GPU; X's pattern repeated for a chunk
        is kept for each chunk size in use, at most two per rank). Temporaries
        take a few times this many entries; no ``R x n_samples x n_features`` tensor is ever made.
    max_columns : int, optional
        Stack at most this many columns (the sum of the replicates' ranks) at once: the
        (rank, replicate) pairs of a process are then fitted in consecutive batches. The
        stacked factors and their updates take about ``6 (n_samples + n_features)`` entries
        per column; default: every replicate in one batch.
    solver : {'mu', 'cd'}, default 'mu'
        Multiplicative updates (any beta), or coordinate descent (HALS, beta = 2 only), as
        scikit-learn's ``NMF(solver='cd')``: replicates end much closer to their optima. See the
        module documentation.

    Returns
    -------
    ReplicateFit or list of ReplicateFit
        One per rank, in the order of ``rank``.

    Raises
    ------
    ValueError, TypeError
        Bad input, naming the argument.
    FloatingPointError
        A replicate's divergence became NaN or infinite (the replicate is named).

    Warns
    -----
    ConvergenceWarning
        Once, when ``max_iter`` ended some replicates before ``tol`` was met (saying how many).

    Examples
    --------
    >>> import torch
    >>> from torchnmf.replicates import fit_replicates
    >>> X = torch.rand(40, 12, dtype=torch.float64)
    >>> fit = fit_replicates(X, 3, n_replicates=5, random_state=0, max_iter=50, tol=0)
    >>> fit.W.shape, fit.H.shape, fit.n_iter.tolist()
    (torch.Size([5, 12, 3]), torch.Size([5, 40, 3]), [50, 50, 50, 50, 50])
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    X = _prepare_X(X, dtype, device, beta=data.check_beta(beta))
    ranks, single = _check_ranks(rank, X.shape)
    R = data.check_int(n_replicates, "n_replicates", low=1)
    beta = data.check_beta(beta)
    if beta <= 0 and (data.is_sparse(X) or bool((X == 0).any())):
        raise ValueError("X must be dense and strictly positive for beta <= 0 (the divergence is infinite at zeros)")
    tol = data.check_positive(tol, "tol", allow_zero=True)
    max_iter = data.check_int(max_iter, "max_iter", low=1)
    data.check_option(solver, SOLVERS, "solver")
    if solver == "cd" and beta != 2:
        raise ValueError(f"solver='cd' (coordinate descent) needs beta=2 (Frobenius), got beta={beta:g}; "
                         "use solver='mu' for other betas")
    if solver == "cd" and check_every is not None:
        raise ValueError("check_every is for solver='mu': solver='cd' measures every iteration (at no extra cost); "
                         "leave check_every=None")
    check_every = (1 if beta == 2 else 10) if check_every is None else data.check_int(check_every, "check_every", low=1)
    data.check_option(init, INITS, "init")
    data.check_option(stop_rule, STOP_RULES, "stop_rule")
    alpha = data.check_positive(alpha, "alpha", allow_zero=True)
    l1_ratio = data.check_real(l1_ratio, "l1_ratio", 0, 1)
    if not isinstance(verbose, (bool, np.bool_)):
        raise TypeError(f"verbose must be True or False, got {verbose!r}")
    if block_elems is not None:
        block_elems = data.check_int(block_elems, "block_elems", low=1)
    if max_columns is not None:
        max_columns = data.check_int(max_columns, "max_columns", low=1)
    N, F = X.shape
    if (W0 is not None or H0 is not None) and not single:
        raise ValueError("W0 and H0 need a single rank: fit several ranks without them, or one rank per call")
    W0 = _check_start(W0, "W0", (R, F, ranks[0]), X.dtype, X.device)
    H0 = _check_start(H0, "H0", (R, N, ranks[0]), X.dtype, X.device)

    world, me = get_world_size(process_group), get_rank(process_group)
    seed = _base_seed(random_state) if (W0 is None or H0 is None) else 0
    if world > 1 and random_state is None and (W0 is None or H0 is None):  # one seed for the whole job
        seed = int(all_reduce_stats({"s": torch.tensor([seed if me == 0 else 0], dtype=torch.int64)},
                                    group=process_group, op="sum")["s"])
    # (rank, replicate) pairs dealt round-robin: every process gets a share of every rank
    pairs = [(k, r) for k in ranks for r in range(R)]
    mine = pairs[me::world]
    l1, l2 = float(alpha * l1_ratio), float(alpha * (1 - l1_ratio))

    out = {k: ReplicateFit(rank=k, W=torch.zeros((R, F, k), dtype=X.dtype, device=X.device),
                           H=torch.zeros((R, N, k), dtype=X.dtype, device=X.device),
                           n_iter=torch.zeros(R, dtype=torch.int64), converged=torch.zeros(R, dtype=torch.bool),
                           loss=torch.zeros(R, dtype=torch.float64))
           for k in ranks}
    error: Optional[BaseException] = None
    try:
        batch = _Batch(X, beta, l1, l2, block_elems)
        parts = _columns_split(mine, max_columns)
        for n, part in enumerate(parts):
            desc = f"fit_replicates ({len(part)} replicates"
            desc += f", part {n + 1}/{len(parts)})" if len(parts) > 1 else ")"
            bar = _bar(verbose and me == 0, max_iter, len(part), desc)
            if solver == "cd":
                _fit_local_cd(batch, part, out, W0, H0, seed, tol, max_iter, bar)
            else:
                _fit_local(batch, part, out, W0, H0, seed, tol, max_iter, check_every, stop_rule, bar)
    except (FloatingPointError, RuntimeError) as err:
        if world == 1:
            raise
        error = err
    if world > 1:
        _gather(out, ranks, error, process_group)
    unconverged = sum(int((~f.converged).sum()) for f in out.values())
    if tol > 0 and unconverged:
        rule = "coordinate descent's violation" if solver == "cd" else stop_rule
        warnings.warn(f"fit_replicates: {unconverged} of {len(pairs)} replicates reached max_iter={max_iter} "
                      f"before converging (tol={tol:g}, {rule} rule). Increase max_iter, or raise tol.",
                      ConvergenceWarning, stacklevel=_user_stacklevel())
    return out[ranks[0]] if single else [out[k] for k in ranks]


def _gather(out: Dict[int, ReplicateFit], ranks: List[int], error: Optional[BaseException], group) -> None:
    """Sum the processes' shares (zeros where a process did not fit a replicate); raise a peer's error."""
    flag = all_reduce_stats({"e": torch.tensor([0.0 if error is None else 1.0])}, group=group, op="max")["e"]
    if float(flag) > 0:
        if error is not None:
            raise error
        raise FloatingPointError("fit_replicates: a replicate failed on another process (see its error)")
    for k in ranks:
        f = out[k]
        s = all_reduce_stats({"W": f.W, "H": f.H, "n_iter": f.n_iter, "converged": f.converged.to(torch.int64),
                              "loss": f.loss}, group=group)
        f.W, f.H, f.n_iter, f.loss = s["W"], s["H"], s["n_iter"], s["loss"]
        f.converged = s["converged"] > 0


def _columns_split(pairs: List[Tuple[int, int]], max_columns: Optional[int]) -> List[List[Tuple[int, int]]]:
    """``pairs`` (rank, replicate) in consecutive parts of at most ``max_columns`` stacked columns."""
    if max_columns is None:
        return [pairs] if pairs else []
    parts: List[List[Tuple[int, int]]] = []
    width = 0
    for pair in pairs:
        if not parts or width + pair[0] > max_columns:
            parts.append([])
            width = 0
        parts[-1].append(pair)
        width += pair[0]
    return parts


def _stack(X: Tensor, mine, W0, H0, seed) -> Tuple[Tensor, Tensor, List[_Group]]:
    """The starting factors of ``mine`` (pairs (rank, replicate)) stacked: W (F, C), H (N, C), groups."""
    # ranks in order of first appearance, replicates in order
    Ws, Hs, groups, offset = [], [], [], 0
    by_rank: Dict[int, List[int]] = {}
    for k, r in mine:
        by_rank.setdefault(k, []).append(r)
    for k, reps in by_rank.items():
        Wk, Hk = (None, None) if (W0 is not None and H0 is not None) else init_replicates(X, k, reps, seed)
        Wk = W0[reps] if W0 is not None else Wk
        Hk = H0[reps] if H0 is not None else Hk
        Ws.append(Wk.permute(1, 0, 2).reshape(X.shape[1], -1))  # (F, R_k k), replicate-major columns
        Hs.append(Hk.permute(1, 0, 2).reshape(X.shape[0], -1))
        groups.append(_Group(k, [(k, r) for r in reps], offset))
        offset += len(reps) * k
    W = torch.cat(Ws, 1).to(device=X.device, dtype=X.dtype).contiguous()
    H = torch.cat(Hs, 1).to(device=X.device, dtype=X.dtype).contiguous()
    return W, H, groups


@torch.no_grad()
def _finish(out, W: Tensor, H: Tensor, g: "_Group", j: int, i: int, converged: bool, value: float) -> None:
    """Write replicate ``j`` of group ``g`` (its columns of the stacked ``W``, ``H``) into ``out``."""
    k, r = g.ids[j]
    c = slice(g.offset + j * k, g.offset + (j + 1) * k)
    f = out[k]
    f.W[r].copy_(W[:, c])
    f.H[r].copy_(H[:, c])
    f.n_iter[r] = i
    f.converged[r] = converged
    f.loss[r] = value


def _fit_local(batch: "_Batch", mine, out, W0, H0, seed, tol, max_iter, check_every, rule, bar) -> None:
    """Fit the replicates ``mine`` (pairs (rank, replicate)) in one batch, writing into ``out``."""
    X, beta = batch.X, batch.beta
    dtype, device = X.dtype, X.device
    W, H, groups = _stack(X, mine, W0, H0, seed)
    prev: Dict[Tuple[int, int], float] = {}
    first: Dict[Tuple[int, int], float] = {}
    prev_step = None
    tiny = torch.finfo(torch.float64).eps

    i = 0
    try:
        while groups:
            end = i >= max_iter
            measure = end or i % check_every == 0
            H_new, loss = batch.update("H", W, H, groups, measure)
            if measure:
                values = loss.double().tolist()  # the one host sync of a check
                keep_cols, new_groups, offset, j_all = [], [], 0, 0
                for g in groups:
                    ids = []
                    for j, pair in enumerate(g.ids):
                        value = values[j_all + j]
                        if not math.isfinite(value):
                            raise FloatingPointError(
                                f"fit_replicates: the objective of replicate {pair[1]} at rank {pair[0]} became "
                                f"{value} at iteration {i}; check the data's scale and the hyperparameters")
                        if pair in prev:
                            change = relative_change(prev[pair], value, i - prev_step, rule=rule, first=first[pair])
                        else:
                            change, first[pair] = float("nan"), value
                        prev[pair] = value
                        converged = has_converged(change, tol, dtype, rule)
                        if end or converged:
                            _finish(out, W, H, g, j, i, converged, value)
                        else:
                            ids.append(j)
                    j_all += len(g.ids)
                    if ids:
                        offset = _survivors(g, ids, offset, keep_cols, new_groups)
                prev_step = i
                if len(keep_cols) < H.shape[1]:  # some replicates stopped: compact the stacked factors
                    groups = new_groups
                    if not groups:
                        break
                    idx = torch.tensor(keep_cols, device=device)
                    W, H_new = W.index_select(1, idx), H_new.index_select(1, idx)
                if bar is not None:
                    bar.update(i - bar.n)
                    bar.set_postfix(active=sum(len(g.ids) for g in groups), refresh=False)
            H = H_new
            if beta < 1:  # as scikit-learn, for stability
                H.masked_fill_(H < tiny, 0.0)
            W = batch.update("W", W, H, groups, False)[0]
            if beta < 1:
                W.masked_fill_(W < tiny, 0.0)
            i += 1
    finally:
        if bar is not None:
            bar.close()


def _gram(A: Tensor, g: _Group) -> Tensor:
    """Each replicate's Gram matrix of its block of the stacked factor ``A``, shape (R_g, k, k)."""
    Ag = g.view(A)
    return torch.einsum("nrk,nrl->rkl", Ag, Ag)


@torch.no_grad()
def _fit_local_cd(batch: "_Batch", mine, out, W0, H0, seed, tol, max_iter, bar) -> None:
    """Coordinate descent (scikit-learn's ``solver='cd'``, ``shuffle=False``) for ``mine``, beta = 2.

    Per iteration H then W (scikit-learn's W then H) by one :func:`torchnmf.hals.hals_sweep`
    each; replicate ``r`` stops when its violation (both sweeps) is at most ``tol`` times its
    first iteration's. The product with ``X`` of each side is one GEMM / CSR product for every
    replicate; one host synchronisation per iteration (violations and objectives).
    """
    X, l1, l2 = batch.X, batch.l1, batch.l2
    W, H, groups = _stack(X, mine, W0, H0, seed)
    grams = [_gram(W, g) for g in groups]  # WᵀW per replicate, kept up to date after each W sweep
    first: Dict[Tuple[int, int], float] = {}

    try:
        for i in range(1, max_iter + 1):
            XW = batch.product("H", W)
            viol = [hals_sweep(g.view(H), G, g.view(XW), l1, l2) for g, G in zip(groups, grams)]
            del XW
            XtH = batch.product("W", H)
            losses = []
            for n, g in enumerate(groups):
                GH = _gram(H, g)
                viol[n] = viol[n] + hals_sweep(g.view(W), GH, g.view(XtH), l1, l2)
                grams[n] = _gram(W, g)
                # the divergence at the new (H, W): 0.5 (‖X‖² - 2 <W, XᵀH> + <WᵀW, HᵀH>)
                cross = (g.view(W) * g.view(XtH)).sum((0, 2))
                losses.append(0.5 * (batch._const("sq") - 2 * cross + (grams[n] * GH).sum((1, 2))))
            del XtH
            values = torch.stack([torch.cat(viol).double(), torch.cat(losses).double()]).tolist()  # the one sync
            keep_cols, new_groups, new_grams, offset, j_all = [], [], [], 0, 0
            for g, G in zip(groups, grams):
                ids = []
                for j, pair in enumerate(g.ids):
                    v, value = values[0][j_all + j], values[1][j_all + j]
                    if not (math.isfinite(value) and math.isfinite(v)):
                        raise FloatingPointError(
                            f"fit_replicates: the objective of replicate {pair[1]} at rank {pair[0]} became "
                            f"{value} at iteration {i}; check the data's scale and the hyperparameters")
                    if i == 1:
                        first[pair] = v
                    # scikit-learn's rule: a zero first violation is a fixed point
                    converged = first[pair] == 0 or v / first[pair] <= tol
                    if converged or i == max_iter:
                        _finish(out, W, H, g, j, i, converged, value)
                    else:
                        ids.append(j)
                j_all += len(g.ids)
                if ids:
                    offset = _survivors(g, ids, offset, keep_cols, new_groups)
                    new_grams.append(G if len(ids) == len(g.ids) else G[torch.tensor(ids, device=G.device)])
            if bar is not None:
                bar.update(i - bar.n)
                bar.set_postfix(active=sum(len(g.ids) for g in new_groups), refresh=False)
            if not new_groups:
                break
            if len(keep_cols) < H.shape[1]:  # some replicates stopped: compact the stacked factors
                idx = torch.tensor(keep_cols, device=X.device)
                W, H = W.index_select(1, idx), H.index_select(1, idx)
            groups, grams = new_groups, new_grams
    finally:
        if bar is not None:
            bar.close()


def _bar(verbose: bool, total: int, n: int, desc: str):
    if not verbose:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is an optional dependency
        raise ImportError("verbose progress bars need tqdm: pip install tqdm") from None
    return tqdm(total=total, desc=desc, leave=False, postfix={"active": n})
