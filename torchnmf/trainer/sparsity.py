"""Projected gradient steps under Hoyer's sparseness constraint (Hoyer 2004)."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import data
from ..constraints import assign_, value_of
from .beta_mu import _transform_grad

__all__ = ["SparsityProj", "project_sparseness"]


def project_sparseness(x: Tensor, sparsity: float, dim: int = 1) -> Tensor:
    r"""Closest non-negative tensor whose slices along ``dim`` have Hoyer sparseness ``sparsity``.

    Each slice ``x.select(dim, r)`` (flattened, n entries) is replaced by the closest
    (in L2) non-negative vector with the same L2 norm and L1 norm
    :math:`\|x\|_2(\sqrt n - s(\sqrt n - 1))`, by Hoyer's (2004) alternating projections.

    Parameters
    ----------
    x : Tensor
        Values to project (any sign).
    sparsity : float in [0, 1]
        Target :func:`torchnmf.metrics.sparseness` of every slice.
    dim : int, default 1
        The dimension indexing the slices (the rank dimension of the layers).

    Returns
    -------
    Tensor
        Same shape as ``x``; all-zero slices stay zero.
    """
    moved = x.movedim(dim, 0)
    X = moved.reshape(moved.shape[0], -1)
    B, n = X.shape
    if n < 2:
        raise ValueError(f"sparseness needs slices of at least 2 entries, got {n}")
    k2 = X.norm(dim=1, keepdim=True)
    sqn = math.sqrt(n)
    k1 = k2 * (sqn - sparsity * (sqn - 1))
    S = X + (k1 - X.sum(1, keepdim=True)) / n
    Z = torch.zeros_like(X, dtype=torch.bool)
    done = (k2 == 0).squeeze(1)
    for _ in range(n + 1):
        free = (~Z).sum(1, keepdim=True).clamp_min(1)
        m = torch.where(Z, torch.zeros_like(S), k1 / free)
        d = S - m
        A = (d * d).sum(1, keepdim=True)
        b = 2 * (m * d).sum(1, keepdim=True)
        c = (m * m).sum(1, keepdim=True) - k2 * k2
        disc = (b * b - 4 * A * c).clamp_min(0)
        a = torch.where(A > 0, (-b + disc.sqrt()) / (2 * A).clamp_min(torch.finfo(X.dtype).tiny), torch.zeros_like(A))
        S_new = m + a * d
        S = torch.where(done[:, None], S, S_new)
        neg = (S < 0) & ~done[:, None]
        finished = ~neg.any(1)
        done = done | finished
        if bool(done.all()):
            break
        Z = Z | neg
        S = torch.where(Z, torch.zeros_like(S), S)
        shift = (S.sum(1, keepdim=True) - k1) / (~Z).sum(1, keepdim=True).clamp_min(1)
        S = torch.where(Z | done[:, None], S, S - shift)
    S = torch.where(k2 == 0, torch.zeros_like(S), S.clamp_min(0))
    return S.reshape(moved.shape).movedim(0, dim)


class SparsityProj(Optimizer):
    r"""Projected gradient descent keeping each component at a fixed Hoyer sparseness.

    Each :meth:`step` treats the parameters one at a time: the constrained value is
    projected (:func:`project_sparseness`), then moved along minus the gradient of the
    closure's loss and projected again, halving the step size until the loss does not
    increase (at most ``max_iter`` tries; the projected point is kept if none succeeds)
    and growing it by 1.2 after a success, as in Hoyer (2004).

    Parameters
    ----------
    params : iterable of Tensor or dict
        Non-negative parameters (any positivity mode; the step is taken on the value).
    sparsity : float in [0, 1]
        Target sparseness of every slice along ``dim``.
    dim : int, default 1
        Dimension indexing the components (the rank dimension).
    max_iter : int, default 10
        Step-size halvings per step.
    lr : float, optional
        Initial step size; default ``0.1 ||p|| / ||grad||`` at the first step.

    Notes
    -----
    The closure returns a scalar loss (differentiable in the parameters), for example
    ``lambda: beta_div(model(), V, 2)``.
    """

    def __init__(self, params: Iterable, sparsity: float, dim: int = 1, max_iter: int = 10, lr=None):
        sparsity = data.check_real(sparsity, "sparsity", 0, 1)
        max_iter = data.check_int(max_iter, "max_iter", low=1)
        if lr is not None:
            data.check_positive(lr, "lr")
        super().__init__(params, dict(sparsity=float(sparsity), dim=int(dim), max_iter=max_iter, lr=lr))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """Take one projected step per parameter; return the final loss."""
        if closure is None:
            raise ValueError("SparsityProj.step needs a closure returning a scalar loss")
        loss = None
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                start = project_sparseness(value_of(p).detach(), group["sparsity"], group["dim"])
                assign_(p, start)
                with torch.enable_grad():
                    loss = closure()
                    if not bool(torch.isfinite(loss).all()):  # a NaN loss would silently become NaN factors
                        raise FloatingPointError(f"SparsityProj: the closure's loss is {float(loss)}; check the "
                                                 "data and prediction the closure uses")
                    (g,) = torch.autograd.grad(loss, p, allow_unused=True)
                if g is None:
                    continue
                dv = _transform_grad(p)
                vgrad = g if dv is None else torch.where(dv > 0, g / dv, torch.zeros_like(g))
                state = self.state[p]
                lr = state.get("lr", group["lr"])
                if lr is None:
                    gn = float(vgrad.norm())
                    lr = 0.1 * float(start.norm()) / gn if gn > 0 else 1.0
                for _ in range(group["max_iter"]):
                    cand = project_sparseness(start - lr * vgrad, group["sparsity"], group["dim"])
                    assign_(p, cand)
                    new = closure()
                    if bool(new <= loss):
                        loss = new
                        lr *= 1.2
                        break
                    lr *= 0.5
                else:
                    assign_(p, start)
                state["lr"] = lr
                p.grad = g
        return loss.detach() if isinstance(loss, Tensor) else loss
