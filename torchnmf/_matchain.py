"""Products of chains of matrices, contracted in the order :mod:`opt_einsum` plans.

A chain of NMF layers, ``nn.Sequential(NMF(...), NMF(W=...), NMF(W=...))(None)``, is the
product ``H W1ᵀ W2ᵀ W3ᵀ``. Multiplied left to right it costs ``N (K1 K2 + K2 K3 + ...)``;
contracting the small factors first is often several times cheaper. Each plain 2-D NMF
output is remembered here (in a weak table, keyed by the output tensor) together with the
factors it is the product of, so that

* a layer fed the output of another layer computes its own output from the whole chain,
  in the planned order (:func:`linear`), and
* :class:`torchnmf.trainer.BetaMu` finds the factors of a prediction and computes the
  gradient parts of any factor in closed form, also by planned contractions.

A record is used only while neither the output nor any of its factors has been modified
in place since (tensor version counters), so a stale record is never trusted.
"""
from __future__ import annotations

import contextlib
import functools
from typing import List, Optional, Sequence, Tuple

import opt_einsum
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["Chain", "record_of", "linear", "chain_product", "plan", "disabled"]

# output tensor -> (Chain, output version); entries vanish with their output
_records = WeakTensorKeyDictionary()
# switched off by :func:`disabled` (benchmarks of the plain left-to-right path)
_enabled = True


@contextlib.contextmanager
def disabled():
    """Within the block, layers multiply left to right and record nothing (for comparisons)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


class Chain:
    """The factors ``A_1, ..., A_n`` of a product ``A_1 A_2 ... A_n`` (each a 2-D tensor).

    ``factors`` holds ``(tensor, transposed)`` pairs, ``A_i = tensor.t()`` when ``transposed``
    (the ``W`` of a layer enters as ``Wᵀ``); ``versions`` their version counters when recorded.
    """

    __slots__ = ("factors", "versions")

    def __init__(self, factors: Sequence[Tuple[Tensor, bool]]):
        self.factors = tuple(factors)
        self.versions = tuple(t._version for t, _ in self.factors)

    def valid(self) -> bool:
        """No factor was modified in place since the record was made."""
        return all(t._version == v for (t, _), v in zip(self.factors, self.versions))

    def matrices(self) -> List[Tensor]:
        """``[A_1, ..., A_n]`` (views, no copies)."""
        return [t.t() if tr else t for t, tr in self.factors]

    def dims(self) -> Tuple[int, ...]:
        """``(d_0, ..., d_n)`` with ``A_i`` of shape ``(d_{i-1}, d_i)``."""
        mats = self.matrices()
        return (mats[0].shape[0],) + tuple(m.shape[1] for m in mats)


def record_of(out: Tensor) -> Optional[Chain]:
    """The chain ``out`` is the product of, if known and neither it nor a factor changed since."""
    try:
        rec = _records.get(out)
        if rec is None:
            return None
        chain, version = rec
        return chain if out._version == version and chain.valid() else None
    except (RuntimeError, TypeError):  # e.g. inference tensors have no version counter
        return None


def _remember(out: Tensor, factors: Sequence[Tuple[Tensor, bool]]) -> None:
    try:
        _records[out] = (Chain(factors), out._version)
    except (RuntimeError, TypeError):  # inference tensors, tracing: no record, plain results
        pass


@functools.lru_cache(maxsize=512)
def plan(dims: Tuple[int, ...]) -> Tuple[Tuple[Tuple[int, int], ...], float]:
    """Pairwise contraction order of a chain with these dims, and its cost (opt_einsum's flops).

    The path is in opt_einsum's convention (positions in the current operand list, result
    appended at the end). Only products of neighbours in the chain are allowed: a path with
    an outer product (which opt_einsum does not choose for a chain) falls back to left to right.
    """
    n = len(dims) - 1
    if n == 1:
        return (), 0.0
    sym = [opt_einsum.get_symbol(i) for i in range(n + 1)]
    eq = ",".join(sym[i] + sym[i + 1] for i in range(n)) + "->" + sym[0] + sym[n]
    shapes = [(dims[i], dims[i + 1]) for i in range(n)]
    path, info = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize="optimal" if n <= 6 else "dp")
    spans = [(i, i + 1) for i in range(n)]
    for pair in path:
        a, b = sorted(pair)
        x, y = spans[a], spans[b]
        if x[0] > y[0]:
            x, y = y, x
        if len(pair) != 2 or x[1] != y[0]:  # not neighbours
            path = [(0, 1)] * (n - 1)
            break
        del spans[b], spans[a]
        spans.append((x[0], y[1]))
    return tuple(tuple(p) for p in path), float(info.opt_cost)


def _mm(X: Tensor, Y: Tensor) -> Tensor:
    """``X @ Y``; for a big ``X`` and a thin result, as ``(Yᵀ Xᵀ)ᵀ`` (MKL is faster so, see
    :func:`torchnmf.updates._big_mm`)."""
    a, b = X.shape
    c = Y.shape[1]
    if b >= 8 * c and a >= 8 * c and a * b >= 65536:
        return (Y.t() @ X.t()).t()
    return X @ Y


def chain_product(mats: Sequence[Tensor], out: Optional[Tensor] = None) -> Tensor:
    """``mats[0] @ mats[1] @ ...`` contracted in the planned order (differentiable).

    ``out`` (no autograd) receives the result of the last product, saving an allocation.
    """
    mats = list(mats)
    if len(mats) == 1:
        return mats[0] if out is None else out.copy_(mats[0])
    dims = (mats[0].shape[0],) + tuple(m.shape[1] for m in mats)
    path, _ = plan(dims)
    ops = [(m, i) for i, m in enumerate(mats)]  # (tensor, chain position of its left end)
    for pair in path:
        a, b = sorted(pair)
        x, y = ops[a], ops[b]
        del ops[b], ops[a]
        if x[1] > y[1]:
            x, y = y, x
        last = out is not None and not ops
        ops.append((torch.matmul(x[0], y[0], out=out) if last else _mm(x[0], y[0]), x[1]))
    return ops[0][0]


def linear(H: Tensor, W: Tensor) -> Tensor:
    """``H Wᵀ`` (as :func:`torch.nn.functional.linear`), planned over a known chain behind ``H``.

    For 2-D operands the result is recorded as the product of its factors. When ``H`` is
    itself a recorded product ``A_1 ... A_m``, the result ``A_1 ... A_m Wᵀ`` is contracted
    from the factors whenever the plan costs less than multiplying the existing ``H``.
    """
    if not _enabled or not isinstance(H, Tensor) or not isinstance(W, Tensor) or H.dim() != 2 or W.dim() != 2:
        return F.linear(H, W)  # non-tensors: e.g. the FactorChain a CAVI closure builds (poisson/chain.py)
    rec = record_of(H)
    factors = ((H, False),) if rec is None else rec.factors
    factors = factors + ((W, True),)
    if rec is not None:
        dims = rec.dims() + (W.shape[0],)
        _, cost = plan(dims)
        _, direct = plan((H.shape[0], H.shape[1], W.shape[0]))
        out = chain_product([t.t() if tr else t for t, tr in factors]) if cost < direct else F.linear(H, W)
    else:
        out = F.linear(H, W)
    if isinstance(out, Tensor):  # under a CAVI closure F.linear returns a FactorChain: nothing to record
        _remember(out, factors)
    return out
