"""Divergences between a prediction and a target, summed over all entries.

Every function takes the prediction (``input``) first and the target second, like
:mod:`torch.nn.functional`, and returns a 0-dim tensor that is differentiable in both.

A divergence that comes out NaN or infinite for finite arguments raises ``ValueError``
naming them (entries too large for the dtype's arithmetic, e.g. float32 data near 1e20
under ``euclidean``, or a zero where the divergence is infinite) instead of returning it;
NaN or infinite arguments still give NaN or inf.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .data import check_beta

__all__ = ["beta_div", "kl_div", "is_div", "euclidean", "sparseness", "poisson_nll"]


def _finite(result: Tensor, what: str, **args: Tensor) -> Tensor:
    """``result``, or ``ValueError`` when it is not finite although every argument is."""
    if bool(torch.isfinite(result)):
        return result
    values = {k: v.detach() for k, v in args.items()}
    if not all(bool(torch.isfinite(v).all()) for v in values.values()):
        return result  # NaN or inf in, NaN or inf out (documented)
    names = " and ".join(values)
    big = max(values, key=lambda k: float(values[k].abs().max()) if values[k].numel() else 0.0)
    amax = float(values[big].abs().max()) if values[big].numel() else 0.0
    dtype = str(result.dtype).replace("torch.", "")
    raise ValueError(f"{what} is {float(result)} for finite {names}: either their entries (largest {amax:.3g}, in "
                     f"{big}) overflow {dtype} arithmetic (divide {names} by a constant or use float64), or a "
                     f"zero in {names} makes the divergence infinite")


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
    return _finite(0.5 * (input - target).pow(2).sum(), "euclidean", input=input, target=target)


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
    return _finite((torch.xlogy(target, target) - torch.xlogy(target, input) - target + input).sum(), "kl_div",
                   input=input, target=target)


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
    return _finite((ratio - torch.log(ratio) - 1).sum(), "is_div", input=input, target=target)


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
    rounding); NaN or infinite input still gives NaN or inf. For beta < 0 the value comes
    from the ratio form (exact at ``input == target``) and the autograd gradient from the
    plain form, ``input^(β-1) - target·input^(β-2)`` in ``input`` (the ratio form's own
    gradient loses float32 precision under small targets).
    """
    beta = check_beta(beta)  # NaN/inf would give NaN silently
    _tensors(input=input, target=target)
    return _finite(_beta_div(input, target, beta), f"beta_div (beta={beta:g})", input=input, target=target)


def _beta_div(input: Tensor, target: Tensor, beta: float) -> Tensor:
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
        value = (input.pow(beta) * (ratio.pow(beta) + bminus - beta * ratio) / (beta * bminus)).clamp_min(0)
        if not (input.requires_grad or target.requires_grad):
            return value.sum()
        # gradients from the plain form: the ratio form's autograd cancels terms of size
        # target^β / input, which in float32 swamps the true gradient where the target is small
        plain = input.pow(beta) / beta - target * input.pow(bminus) / bminus
        if target.requires_grad:
            plain = plain + target.pow(beta) / (beta * bminus)
        return (value.detach() + (plain - plain.detach())).sum()
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
    return _finite((rate - torch.xlogy(counts, rate) + torch.lgamma(counts + 1)).sum(), "poisson_nll",
                   rate=rate, counts=counts)
