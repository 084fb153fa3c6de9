"""Beta-divergence multiplicative updates for any chain of non-negative modules."""
from __future__ import annotations

import weakref
from typing import Callable, Iterable, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import _matchain, data, row_pass
from ..constraints import assign_, mode_of, value_of
from ..updates import EPSILON, mu_gamma

__all__ = ["BetaMu"]

Closure = Callable[[], Union[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor, Tensor]]]


def _transform_grad(p: Tensor) -> Optional[Tensor]:
    """d value / d raw for a transformed parameter (None for identity modes)."""
    mode = mode_of(p)
    if mode == "softplus":
        return torch.sigmoid(p)
    if mode == "exp":
        return torch.exp(p)
    return None


class BetaMu(Optimizer):
    r"""Multiplicative updates minimising a beta-divergence, one parameter at a time.

    For each trainable parameter ``p`` the prediction depends on, :meth:`step` calls the
    closure, splits the gradient of :math:`d_\beta(V \| \hat V)` into its positive and
    negative parts by two backward passes through the prediction (output gradients
    :math:`\hat V^{\beta-1}` and :math:`V \hat V^{\beta-2}`), and sets

    .. math:: p \leftarrow p \circ (\nabla^- / \nabla^+)^{\gamma(\beta)},

    with :math:`\gamma = 1/(2-\beta)` for :math:`\beta<1`, 1 for :math:`1\le\beta\le2`,
    :math:`1/(\beta-1)` for :math:`\beta>2` (Févotte & Idier 2011). When the prediction is
    linear in ``p`` with non-negative coefficients — every NMF layer, and every chain of
    them such as ``nn.Sequential(NMF(...), NMF(W=...), NMF(W=...))`` called with ``None`` —
    each update never increases the divergence.

    Any positivity mode works: for ``softplus``/``exp`` the transform's derivative cancels
    in the ratio of gradient parts, so the constrained value is updated and written back.
    After a step ``p.grad`` holds the true gradient (of the raw parameter) of the regularised
    divergence at the point just before ``p``'s update. Parameters the prediction does not
    depend on, and those with ``requires_grad=False``, are left alone.

    Parameters
    ----------
    params : iterable of Tensor or dict
        Parameters or parameter groups (e.g. ``model.parameters()``).
    beta : float, default 1
        Divergence: 2 Euclidean, 1 KL, 0 Itakura-Saito.
    l1_reg : float, default 0
        Adds ``l1_reg * Σ p``.
    l2_reg : float, default 0
        Adds ``l2_reg / 2 * ||p||²``.
    orthogonal : float, default 0
        Adds ``orthogonal / 2 * Σ_i Σ_{r≠r'} p[i, r] p[i, r']`` (components, dim 1, pushed apart).
    lr : float, default 1
        Ignored: present so :mod:`torch.optim.lr_scheduler` schedulers can be attached.
    eps : float, default float32 eps
        Floor of the prediction where beta < 2 needs its negative powers.
    closed_form : bool, default True
        When the prediction is the output of a plain :class:`~torchnmf.NMF` layer or of a chain
        of them (``H W1ᵀ W2ᵀ …``, recorded by the layers) and a parameter is one of its
        factors, compute the gradient parts directly, as matrix products contracted in the
        order opt_einsum plans, instead of by backward passes. Same quantities (equal to
        rounding); ``False`` always takes the generic autograd path.

    Notes
    -----
    The closure returns ``(target, prediction)`` or ``(target, prediction, mask)`` where
    ``mask`` (same shape, 1/True observed, 0 missing) removes entries from the divergence.
    It is called with grad enabled at the start of each step, and again before the update
    of each parameter whose gradient parts need a graph of the current point (parameters
    that are factors of a recorded NMF chain, with every factor a leaf tensor, are served
    without calling it again: the current prediction is recomputed from the factors when
    the divergence needs it)::

        trainer = BetaMu(model.parameters(), beta=1)
        def closure():
            return V, model(None)
        for _ in range(100):
            trainer.step(closure)
    """

    def __init__(self, params: Iterable, beta: float = 1, l1_reg: float = 0, l2_reg: float = 0,
                 orthogonal: float = 0, lr: float = 1.0, eps: float = EPSILON, closed_form: bool = True):
        beta = data.check_beta(beta)
        data.check_positive(l1_reg, "l1_reg", allow_zero=True)
        data.check_positive(l2_reg, "l2_reg", allow_zero=True)
        data.check_positive(orthogonal, "orthogonal", allow_zero=True)
        data.check_positive(eps, "eps")
        defaults = dict(beta=float(beta), l1_reg=l1_reg, l2_reg=l2_reg, orthogonal=orthogonal, lr=lr, eps=eps)
        super().__init__(params, defaults)
        if not isinstance(closed_form, bool):
            raise TypeError(f"closed_form must be a bool, got {closed_form!r}")
        self.closed_form = closed_form
        # data key (see _data_key) of the last target checked: a fixed V (or a fresh view of
        # it, such as the ``V.t()`` of a closure) is checked once, a new or modified one again
        self._checked = None

    def _check_target(self, target: Tensor, dtype: torch.dtype) -> None:
        """The layers' checks of ``V`` on the closure's target, once per distinct target data.

        ``dtype`` is the prediction's, in which the updates run: a target too large for it
        (float32 data near 1e20 under beta = 2, one entry of 3e38 under any beta) is refused
        here rather than turning the factors into NaN.
        """
        if _same_data(getattr(self, "_checked", None), target):  # absent after unpickling
            return
        data.as_tensor(target, "target", float_only=False)  # bool and complex: TypeError
        data.check_nonnegative(target, "target")  # NaN, inf, negative: ValueError
        beta = max(g["beta"] for g in self.param_groups)
        data.check_magnitude(target, "target", dtype if dtype.is_floating_point else None, beta=beta)
        self._checked = _data_key(target)

    def _unpack(self, out) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
            raise TypeError("the closure must return (target, prediction) or (target, prediction, mask)")
        target, pred = out[0], out[1]
        mask = out[2] if len(out) == 3 else None
        if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
            raise TypeError("the closure's target and prediction must be tensors")
        self._check_target(target, pred.dtype)
        if target.layout != torch.strided:
            target = target.to_dense()
        if target.shape != pred.shape:
            raise ValueError(f"target has shape {tuple(target.shape)} but the prediction {tuple(pred.shape)}")
        if mask is not None:
            mask = data.check_mask(mask, pred.shape, device=pred.device, dtype=pred.dtype)
        return target.to(pred.dtype), pred, mask

    @torch.no_grad()
    def step(self, closure: Closure) -> None:  # type: ignore[override]
        """Update every trainable parameter in turn; see the class notes for the closure."""
        if closure is None:
            raise ValueError("BetaMu.step needs a closure returning (target, prediction[, mask])")
        params = [p for g in self.param_groups for p in g["params"]]
        flags = {id(p): p.requires_grad for p in params}
        closed = getattr(self, "closed_form", True)  # absent after unpickling an old trainer
        grads = {}
        cur = None  # (target, pred, mask, chain) of the current point while no update has happened since
        kept = None  # (target, mask, chain) for the whole step when the chain's factors are all leaves
        called = False
        try:
            for group in self.param_groups:
                beta, eps = group["beta"], group["eps"]
                gamma = mu_gamma(beta)
                for p in group["params"]:
                    if not flags[id(p)]:
                        continue
                    parts = None
                    if cur is None and kept is not None and _position(kept[2], p) is not None:
                        # the factors are the parameters themselves, updated in place: the
                        # recorded chain still describes the prediction, no closure call needed
                        target, mask, chain = kept
                        parts = _closed_parts(chain, _position(kept[2], p), target, None, mask, beta, eps,
                                              self._scratch())
                    if parts is None:
                        if cur is None:
                            # the first call builds a graph for every trainable parameter (which
                            # shows whether the chain's factors are leaves); later ones only for p
                            for q in params:
                                q.requires_grad_(flags[id(q)] if not called else q is p)
                            with torch.enable_grad():
                                target, pred, mask = self._unpack(closure())
                            chain = _matchain.record_of(pred) if closed else None
                            if not called and chain is not None and all(t.grad_fn is None for t, _ in chain.factors):
                                kept = (target, mask, chain)
                            called = True
                            cur = (target, pred, mask, chain)
                            if kept is not None and self._one_pass(chain, target, pred, mask, group, params, flags,
                                                                   grads):
                                break  # H and W both updated in one pass over the target's rows
                        target, pred, mask, chain = cur
                        k = _position(chain, p)
                        if k is not None:
                            parts = _closed_parts(chain, k, target, pred.detach(), mask, beta, eps,
                                                  self._scratch())
                        else:
                            parts = self._autograd_parts(p, target, pred, mask, beta, eps)
                    if parts is None:  # the prediction does not depend on p
                        continue
                    pos, neg = parts
                    self._update(p, pos, neg, group, gamma)
                    cur = None  # the prediction is stale now
                    grads[id(p)] = (p, pos - neg)
        finally:
            for p in params:
                p.requires_grad_(flags[id(p)])
        for p, g in grads.values():
            p.grad = g

    def _one_pass(self, chain, target: Tensor, pred: Tensor, mask: Optional[Tensor], group: dict,
                  params: list, flags: dict, grads: dict) -> bool:
        """Both updates of a plain layer ``H Wᵀ`` in one pass over row blocks of the target
        (:mod:`torchnmf.row_pass`): the arithmetic of the two closed-form updates in turn,
        with the target read once. Only when the trainable parameters are exactly ``H`` and
        ``W`` of one group (either order), both identity-mode leaves, with a dense CPU target
        and no mask. ``W`` first runs on the transposed target, copied once by rows and kept
        (as the closed form keeps a copy of a target that is not row-major).
        """
        trainable = [q for q in params if flags[id(q)]]
        f = chain.factors
        if (len(f) != 2 or len(trainable) != 2 or f[0][1] or not f[1][1]
                or {id(q) for q in trainable} != {id(f[0][0]), id(f[1][0])}
                or not all(any(q is r for r in group["params"]) for q in trainable)
                or target.dtype != f[0][0].dtype or any(_transform_grad(q) is not None for q in trainable)):
            return False
        beta, gamma = group["beta"], mu_gamma(group["beta"])
        A, B = trainable  # A's rows are updated first, by blocks; then B
        X = target if A is f[0][0] else target.t()
        if not row_pass.supports(X, mask, beta) and row_pass.supports(X.t(), mask, beta):
            X = _contiguous(X, self._scratch())  # the transposed target, by rows, kept across steps
        if not row_pass.supports(X, mask, beta):
            return False
        gA = torch.empty_like(A)

        def rule(Y, num, den, out, start):
            # pos materialised: comparisons on a broadcast (beta=1) operand take a slow path
            pos = den + self._penalty(Y, group) if self._has_penalty(group) else den.contiguous()
            g = torch.sub(pos, num, out=gA[start:start + Y.shape[0]] if start is not None else None)
            ratio = torch.div(num, pos).masked_fill_(pos <= 0, 1.0)  # = where(pos > 0, num/pos, 1)
            if gamma != 1:
                ratio.pow_(gamma)
            if start is None:
                grads[id(B)] = (B, g)
            return Y.mul_(ratio)

        P = pred.detach() if A is f[0][0] else pred.detach().t()
        row_pass.iterate(X, B, A, beta, rule, eps=group["eps"], cache=self._scratch(), H_out=A,
                         pred=P if P.is_contiguous() else None)
        grads[id(A)] = (A, gA)
        return True

    @staticmethod
    def _has_penalty(group: dict) -> bool:
        return bool(group["l1_reg"] or group["l2_reg"] or group["orthogonal"])

    @staticmethod
    def _penalty(value: Tensor, group: dict) -> Tensor:
        """Gradient of the penalties at ``value`` (added to the positive part)."""
        reg = torch.zeros_like(value)
        if group["l1_reg"]:
            reg += group["l1_reg"]
        if group["l2_reg"]:
            reg += group["l2_reg"] * value
        if group["orthogonal"] and value.dim() >= 2:
            reg += group["orthogonal"] * (value.sum(1, keepdim=True) - value)
        return reg

    def _scratch(self) -> dict:
        """Buffers of the closed form kept across steps (large temporaries are costly to allocate)."""
        if not hasattr(self, "_buffers"):  # absent after unpickling
            self._buffers = {}
        return self._buffers

    @staticmethod
    def _autograd_parts(p: Tensor, target: Tensor, pred: Tensor, mask: Optional[Tensor], beta: float,
                        eps: float) -> Optional[Tuple[Tensor, Tensor]]:
        """Both gradient parts of p by two backward passes (None when pred does not depend on p)."""
        if not pred.requires_grad:
            return None
        g_pos, g_neg = _output_grads(pred.detach(), target, mask, beta, eps)
        pos, = torch.autograd.grad(pred, p, g_pos, retain_graph=True, allow_unused=True)
        if pos is None:  # the prediction does not depend on p
            return None
        neg, = torch.autograd.grad(pred, p, g_neg, allow_unused=True)
        if neg is None:
            neg = torch.zeros_like(pos)
        return pos, neg

    @staticmethod
    def _update(p: Tensor, pos: Tensor, neg: Tensor, group: dict, gamma: float) -> None:
        value = value_of(p).detach()
        dv = _transform_grad(p)  # raw grads = value grads * dv; regularisers are in value space
        reg = BetaMu._penalty(value, group) if BetaMu._has_penalty(group) else None
        if reg is not None:
            pos.add_(reg if dv is None else reg * dv)
        ratio = torch.where(pos > 0, neg / pos, torch.ones_like(pos))
        if gamma != 1:
            ratio.pow_(gamma)
        if dv is None:
            p.mul_(ratio)
        else:
            assign_(p, value * ratio)


def _output_grads(P: Tensor, target: Tensor, mask: Optional[Tensor], beta: float, eps: float) -> Tuple[Tensor, Tensor]:
    """Output gradients of the two parts: ``M ∘ P^(β-1)`` and ``M ∘ V ∘ P^(β-2)`` (P floored for β < 2)."""
    if beta < 2:
        P = P.clamp_min(eps)
    if beta == 2:
        g_pos, g_neg = P, target
    elif beta == 1:
        g_pos, g_neg = torch.ones_like(P), target / P
    else:
        Pw = P.pow(beta - 2)
        g_pos, g_neg = P * Pw, target * Pw
    if mask is not None:
        g_pos, g_neg = g_pos * mask, g_neg * mask
    return g_pos, g_neg


def _position(chain: Optional[_matchain.Chain], p: Tensor) -> Optional[int]:
    """Index of ``p`` among the chain's factors when it occurs exactly once, else None."""
    if chain is None:
        return None
    hits = [i for i, (t, _) in enumerate(chain.factors) if t is p]
    return hits[0] if len(hits) == 1 else None


def _buffer(scratch: dict, name: str, like: Tensor) -> Tensor:
    """A row-major scratch tensor shaped like ``like``, reused across calls."""
    buf = scratch.get(name)
    if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = scratch[name] = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    return buf


def _data_key(t: Tensor) -> Tuple[weakref.ref, tuple]:
    """(weak reference to the base tensor, view geometry and version): equal for two views
    showing the same unchanged data, e.g. two calls of ``V.t()``."""
    if t.layout != torch.strided:
        return weakref.ref(t), (t._version,)
    base = t._base if t._base is not None else t
    return weakref.ref(base), (t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)


def _same_data(key: Optional[tuple], t: Tensor) -> bool:
    if key is None or key[0]() is None:
        return False
    now = _data_key(t)
    return key[0]() is now[0]() and key[1] == now[1]


def _contiguous(target: Tensor, scratch: dict) -> Tensor:
    """``target`` in row-major order (the products' rounding must not depend on its strides),
    copied once per distinct target data."""
    if target.is_contiguous():
        return target
    kept = scratch.get("target")
    if kept is not None and _same_data(kept[0], target):
        return kept[1]
    copy = target.contiguous()
    scratch["target"] = (_data_key(target), copy)
    return copy


def _closed_parts(chain: _matchain.Chain, k: int, target: Tensor, P: Optional[Tensor], mask: Optional[Tensor],
                  beta: float, eps: float, scratch: dict) -> Tuple[Tensor, Tensor]:
    """Gradient parts of the chain's ``k``-th factor without autograd.

    For ``pred = A_1 … A_n`` the gradient of ``<G, pred>`` in ``A_k`` is ``Lᵀ G Rᵀ`` with
    ``L = A_1 … A_{k-1}`` and ``R = A_{k+1} … A_n``: a chain product, contracted in the
    planned order. beta = 2 (no mask) takes the Gram form ``LᵀL A_k RRᵀ`` and never forms
    the prediction; beta = 1 (no mask) has ``G = 1``, so its positive part is the outer
    product ``(Lᵀ1)(R1)ᵀ``. ``P`` is the current prediction if known (else recomputed);
    it is never modified: the elementwise work runs in the ``scratch`` buffers.
    """
    mats = chain.matrices()
    left = [m.t() for m in reversed(mats[:k])]  # Lᵀ = A_{k-1}ᵀ … A_1ᵀ
    right = [m.t() for m in reversed(mats[k + 1:])]  # Rᵀ = A_nᵀ … A_{k+1}ᵀ
    target = target.to(mats[k].dtype)

    def part(G: Tensor) -> Tensor:
        return _matchain.chain_product(left + [G] + right)

    if beta == 2 and mask is None:
        pos = _matchain.chain_product(left + mats + right)
        neg = part(_contiguous(target, scratch))
    else:
        a = _buffer(scratch, "a", target)
        if P is None:
            P = _matchain.chain_product(mats, out=a)
        # a = the prediction floored (beta < 2)
        if beta < 2:
            torch.clamp_min(P, eps, out=a)
        elif P is not a:
            a.copy_(P)
        if beta == 1 and mask is None:
            N, C = a.shape
            u = _matchain.chain_product(left + [a.new_ones(N, 1)])  # Lᵀ1
            v = _matchain.chain_product([a.new_ones(1, C)] + right)  # (R1)ᵀ
            pos = u @ v
            neg = part(torch.div(target, a, out=a))
        elif beta == 1:
            pos = part(mask)
            neg = part(torch.div(target, a, out=a).mul_(mask))
        elif beta == 2:  # with a mask
            pos = part(a.mul_(mask))
            neg = part(torch.mul(target, mask, out=_buffer(scratch, "b", target)))
        else:
            b = torch.pow(a, beta - 2, out=_buffer(scratch, "b", target))  # P^(β-2)
            a.mul_(b)  # P^(β-1)
            b.mul_(target)  # V P^(β-2)
            if mask is not None:
                a.mul_(mask)
                b.mul_(mask)
            pos, neg = part(a), part(b)
    if chain.factors[k][1]:  # the factor enters transposed (a layer's W)
        pos, neg = pos.t(), neg.t()
    return pos.contiguous(), neg.contiguous()
