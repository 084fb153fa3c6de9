"""Special functions faster than torch's where the variational updates spend their time.

``torch.digamma`` on a float32 CPU tensor evaluates a scalar routine per entry (about
30-50 ns each, slower than its float64 version); an SVI step computes it for all of
``q(α)`` (``n_cols x K`` entries), once per step. :func:`digamma_positive` evaluates the
same function with a handful of vectorised passes.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["digamma_positive", "digamma_series"]

#: shift of the recurrence: the asymptotic series is evaluated at x + SHIFT >= SHIFT
SHIFT = 6

# Bernoulli terms B_2k / (2k) of the series psi(y) ~ log y - 1/(2y) - sum_k B_2k / (2k y^2k),
# k = 1..6, highest first (Horner in 1/y^2)
_COEFFS = (691.0 / 32760.0, -1.0 / 132.0, 1.0 / 240.0, -1.0 / 252.0, 1.0 / 120.0, -1.0 / 12.0)


def digamma_series(x: Tensor) -> Tensor:
    r"""Digamma of positive entries by recurrence and asymptotic series, in ``x``'s dtype.

    :math:`\psi(x) = \psi(x + 6) - \sum_{i=0}^{5} 1/(x + i)` and, at :math:`y = x + 6 \ge 6`,
    :math:`\psi(y) = \log y - \tfrac{1}{2y} - \sum_{k=1}^{6} \tfrac{B_{2k}}{2k\,y^{2k}}`;
    the truncation error is below :math:`1/(12 y^{14}) < 10^{-12}`, so in float64 it agrees
    with ``torch.digamma`` to about 1e-13 (absolute near the root 1.4616..., relative
    elsewhere) and in float32 to float32 rounding.

    Parameters
    ----------
    x : Tensor, any shape
        Positive entries (a Gamma shape); not modified.

    Returns
    -------
    Tensor, same shape and dtype as ``x``
    """
    s = torch.reciprocal(x)
    tmp = torch.empty_like(x)
    for i in range(1, SHIFT):  # in place: each new temporary costs a page-faulting allocation
        torch.add(x, i, out=tmp)
        s.add_(tmp.reciprocal_())
    y = torch.add(x, SHIFT)
    inv = torch.reciprocal(y)
    torch.mul(inv, inv, out=tmp)  # 1 / y^2
    out = torch.mul(tmp, _COEFFS[0])
    for c in _COEFFS[1:]:
        out.add_(c).mul_(tmp)
    out.sub_(s).sub_(inv.mul_(0.5))
    return out.add_(y.log_())


def digamma_positive(x: Tensor) -> Tensor:
    """``torch.digamma`` of a tensor of positive entries, by :func:`digamma_series` where faster.

    That is float32 on the CPU (2-3x faster than ``torch.digamma``, as accurate); float64
    and GPU tensors go to ``torch.digamma`` (as fast or faster there), so float64 results
    are unchanged; so do tensors that autograd records and small ones.

    Parameters
    ----------
    x : Tensor, any shape
        Positive entries; not modified.

    Returns
    -------
    Tensor, same shape and dtype as ``x``
    """
    # the series works in place: not where autograd records it (torch's has the derivative)
    recorded = torch.is_grad_enabled() and x.requires_grad
    if x.dtype == torch.float32 and x.device.type == "cpu" and not recorded and x.numel() >= 4096:
        return digamma_series(x)
    return torch.digamma(x)
