"""Divergences between a prediction and a target, summed over all entries.

Every function takes the prediction (``input``) first and the target second, like
:mod:`torch.nn.functional`, and returns a 0-dim tensor that is differentiable in both.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .data import check_beta

__all__ = ["beta_div", "kl_div", "is_div", "euclidean", "sparseness", "poisson_nll"]


def _tensors(**named: Tensor) -> None:
    """Refuse arguments that are not tensors, by name, before any arithmetic: a scipy matrix
    would reach scipy's operators (``target == 0`` sorts its indices in place) or fail obscurely."""
    for name, value in named.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}: convert it with "
                            f"torch.as_tensor({name}) (a scipy.sparse matrix: torch.as_tensor({name}.toarray()))")


def euclidean(input: Tensor, target: Tensor) -> Tensor:
    r"""Half the squared Frobenius distance, :math:`\frac12\sum (x - y)^2` (beta = 2).

    Parameters
    ----------
    input : Tensor, any shape
        Prediction.
    target : Tensor, same shape as ``input``
        Target.

    Returns
    -------
    Tensor, shape ()
    """
    _tensors(input=input, target=target)
    return 0.5 * (input - target).pow(2).sum()


def kl_div(input: Tensor, target: Tensor) -> Tensor:
    r"""Generalised Kullback-Leibler divergence :math:`\sum y \log(y/x) - y + x` (beta = 1).

    Zero targets contribute :math:`x` (``0 log 0 = 0``).

    Parameters
    ----------
    input : Tensor, any shape
        Prediction, positive where ``target`` is positive.
    target : Tensor, same shape as ``input``
        Non-negative target.

    Returns
    -------
    Tensor, shape ()
    """
    _tensors(input=input, target=target)
    return (torch.xlogy(target, target) - torch.xlogy(target, input) - target + input).sum()


def is_div(input: Tensor, target: Tensor) -> Tensor:
    r"""Itakura-Saito divergence :math:`\sum y/x - \log(y/x) - 1` (beta = 0).

    Parameters
    ----------
    input : Tensor, any shape
        Positive prediction.
    target : Tensor, same shape as ``input``
        Positive target.

    Returns
    -------
    Tensor, shape ()
    """
    _tensors(input=input, target=target)
    ratio = target / input
    return (ratio - torch.log(ratio) - 1).sum()


def beta_div(input: Tensor, target: Tensor, beta: float = 2) -> Tensor:
    r"""Beta-divergence :math:`d_\beta(y \| x)` summed over entries.

    .. math::
        d_\beta(y\|x) = \frac{y^\beta + (\beta - 1) x^\beta - \beta y x^{\beta-1}}{\beta(\beta-1)}

    with the limits :func:`is_div` at beta = 0 and :func:`kl_div` at beta = 1.

    Parameters
    ----------
    input : Tensor, any shape
        Non-negative prediction.
    target : Tensor, same shape as ``input``
        Non-negative target.
    beta : float, default 2
        The divergence parameter.

    Returns
    -------
    Tensor, shape ()

    Notes
    -----
    As in pytorch-NMF 0.3.5, zeros are floored where the divergence would be infinite:
    the prediction under a positive target for ``0 < beta < 1``, prediction and target for
    ``beta <= 0``, at the machine
    epsilon of their dtype (0.3.5 adds float32's eps). The result is then finite and
    non-negative for finite input (each entry's divergence is clamped at 0 against
    rounding); NaN or infinite input still gives NaN or inf.
    """
    beta = check_beta(beta)  # NaN/inf would give NaN silently
    _tensors(input=input, target=target)
    if beta == 2:
        return euclidean(input, target)
    if beta == 1:
        return kl_div(input, target)
    if beta < 1:
        eps = torch.finfo(input.dtype).eps if input.is_floating_point() else torch.finfo().eps
        if beta <= 0:
            input, target = input.clamp_min(eps), target.clamp_min(eps)
        else:  # 0 < beta < 1: only input^(beta-1) under a positive target is infinite
            input = torch.where(target > 0, input.clamp_min(eps), input)
    if beta == 0:
        ratio = target / input
        return (ratio - torch.log(ratio) - 1).clamp_min(0).sum()
    bminus = beta - 1
    if beta < 0:  # both positive here: the ratio form is exact at target == input
        ratio = target / input
        return (input.pow(beta) * (ratio.pow(beta) + bminus - beta * ratio) / (beta * bminus)).clamp_min(0).sum()
    # a zero target contributes nothing to the cross term, even where input^(beta-1) is infinite
    cross = torch.where(target == 0, torch.zeros_like(input), target * input.pow(bminus))
    term = target.pow(beta) + bminus * input.pow(beta) - beta * cross
    return (term / (beta * bminus)).clamp_min(0).sum()


def sparseness(x: Tensor) -> Tensor:
    r"""Hoyer's sparseness of a vector, 0 for a flat vector and 1 for a single non-zero.

    .. math:: \frac{\sqrt{n} - \|x\|_1 / \|x\|_2}{\sqrt{n} - 1}

    Parameters
    ----------
    x : Tensor, any shape
        Flattened before measuring; needs at least 2 entries.

    Returns
    -------
    Tensor, shape ()
    """
    n = x.numel()
    if n < 2:
        raise ValueError(f"sparseness needs at least 2 entries in x, got {n}")
    norm = x.norm()
    if not bool(norm > 0):
        raise ValueError("sparseness is undefined for an all-zero x")
    sqrt_n = math.sqrt(n)
    return (sqrt_n - x.abs().sum() / norm) / (sqrt_n - 1)


def poisson_nll(rate: Tensor, counts: Tensor) -> Tensor:
    r"""Poisson negative log-likelihood :math:`\sum \lambda - y\log\lambda + \log\Gamma(y+1)`.

    Parameters
    ----------
    rate : Tensor, any shape
        Positive Poisson rates.
    counts : Tensor, same shape as ``rate``
        Non-negative counts.

    Returns
    -------
    Tensor, shape ()
    """
    _tensors(rate=rate, counts=counts)
    return (rate - torch.xlogy(counts, rate) + torch.lgamma(counts + 1)).sum()
