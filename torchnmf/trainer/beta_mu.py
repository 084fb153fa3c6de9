"""Beta-divergence multiplicative updates for any chain of non-negative modules."""
from __future__ import annotations

import weakref
from typing import Callable, Iterable, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import data
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

    Notes
    -----
    The closure returns ``(target, prediction)`` or ``(target, prediction, mask)`` where
    ``mask`` (same shape, 1/True observed, 0 missing) removes entries from the divergence.
    It is called once per updated parameter, with grad enabled::

        trainer = BetaMu(model.parameters(), beta=1)
        def closure():
            return V, model(None)
        for _ in range(100):
            trainer.step(closure)
    """

    def __init__(self, params: Iterable, beta: float = 1, l1_reg: float = 0, l2_reg: float = 0,
                 orthogonal: float = 0, lr: float = 1.0, eps: float = EPSILON):
        beta = data.check_beta(beta)
        data.check_positive(l1_reg, "l1_reg", allow_zero=True)
        data.check_positive(l2_reg, "l2_reg", allow_zero=True)
        data.check_positive(orthogonal, "orthogonal", allow_zero=True)
        data.check_positive(eps, "eps")
        defaults = dict(beta=float(beta), l1_reg=l1_reg, l2_reg=l2_reg, orthogonal=orthogonal, lr=lr, eps=eps)
        super().__init__(params, defaults)
        # (weak reference, version) of the last target checked: a fixed V is checked once,
        # a new or modified one again
        self._checked = (None, -1)

    def _check_target(self, target: Tensor) -> None:
        """The layers' checks of ``V`` on the closure's target, once per distinct target tensor."""
        ref, version = getattr(self, "_checked", (None, -1))  # absent after unpickling
        if ref is not None and ref() is target and version == target._version:
            return
        data.as_tensor(target, "target", float_only=False)  # bool and complex: TypeError
        data.check_nonnegative(target, "target")  # NaN, inf, negative: ValueError
        self._checked = (weakref.ref(target), target._version)

    def _unpack(self, out) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
            raise TypeError("the closure must return (target, prediction) or (target, prediction, mask)")
        target, pred = out[0], out[1]
        mask = out[2] if len(out) == 3 else None
        if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
            raise TypeError("the closure's target and prediction must be tensors")
        self._check_target(target)
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
        grads = {}
        try:
            for group in self.param_groups:
                beta, eps = group["beta"], group["eps"]
                gamma = mu_gamma(beta)
                for p in group["params"]:
                    if not flags[id(p)]:
                        continue
                    # only p builds a graph: other parameters are constants for this update
                    for q in params:
                        q.requires_grad_(q is p)
                    with torch.enable_grad():
                        target, pred, mask = self._unpack(closure())
                    if not pred.requires_grad:
                        continue
                    with torch.no_grad():
                        P = pred.detach()
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
                    pos, = torch.autograd.grad(pred, p, g_pos, retain_graph=True, allow_unused=True)
                    if pos is None:  # the prediction does not depend on p
                        continue
                    neg, = torch.autograd.grad(pred, p, g_neg, allow_unused=True)
                    if neg is None:
                        neg = torch.zeros_like(pos)
                    self._update(p, pos, neg, group, gamma)
                    grads[id(p)] = (p, pos - neg)
        finally:
            for p in params:
                p.requires_grad_(flags[id(p)])
        for p, g in grads.values():
            p.grad = g

    @staticmethod
    def _update(p: Tensor, pos: Tensor, neg: Tensor, group: dict, gamma: float) -> None:
        value = value_of(p).detach()
        dv = _transform_grad(p)  # raw grads = value grads * dv; regularisers are in value space
        reg = None
        if group["l1_reg"]:
            reg = torch.full_like(value, group["l1_reg"])
        if group["l2_reg"]:
            r = group["l2_reg"] * value
            reg = r if reg is None else reg + r
        if group["orthogonal"] and value.dim() >= 2:
            r = group["orthogonal"] * (value.sum(1, keepdim=True) - value)
            reg = r if reg is None else reg + r
        if reg is not None:
            pos.add_(reg if dv is None else reg * dv)
        ratio = torch.where(pos > 0, neg / pos, torch.ones_like(pos))
        if gamma != 1:
            ratio.pow_(gamma)
        if dv is None:
            p.mul_(ratio)
        else:
            assign_(p, value * ratio)
