"""Positive parameters, in four modes.

``softplus`` and ``exp``
    The module attribute is ``f(raw)`` for an unconstrained raw parameter, through
    :func:`torch.nn.utils.parametrize.register_parametrization`; any gradient optimizer
    works on the raw value.
``projected``
    The attribute is the raw parameter itself; gradient steps may leave it negative, so
    :func:`project_` (or the hook from :func:`attach_projection`) clamps it to >= 0 after
    each step.
``multiplicative``
    The attribute is the raw parameter itself, updated in place by multiplicative trainers
    (:class:`torchnmf.trainer.BetaMu`, CAVI). Gradient optimizers should not take it:
    pass them :func:`gradient_parameters` instead of ``module.parameters()``.

The raw parameter is a :class:`PositiveParameter`, which knows its mode and survives
``.to()``, ``copy.deepcopy``, pickling and ``state_dict`` round trips, so a trainer given
only parameters can still read and write the constrained value (:func:`value_of`,
:func:`assign_`).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "MODES",
    "PositiveParameter",
    "Softplus",
    "Exp",
    "positive",
    "mode_of",
    "value_of",
    "assign_",
    "project_",
    "attach_projection",
    "positive_parameters",
    "gradient_parameters",
    "multiplicative_parameters",
]

MODES = ("softplus", "exp", "projected", "multiplicative")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
    return mode


class Softplus(nn.Module):
    """Parametrization ``log(1 + exp(raw))`` with its exact inverse."""

    def forward(self, raw: Tensor) -> Tensor:
        return F.softplus(raw)

    def right_inverse(self, value: Tensor) -> Tensor:
        # log(expm1(y)) written stably; tiny values map to a very negative raw value.
        y = value.clamp_min(torch.finfo(value.dtype).tiny)
        return y + torch.log(-torch.expm1(-y))


class Exp(nn.Module):
    """Parametrization ``exp(raw)`` with inverse ``log``."""

    def forward(self, raw: Tensor) -> Tensor:
        return torch.exp(raw)

    def right_inverse(self, value: Tensor) -> Tensor:
        return torch.log(value.clamp_min(torch.finfo(value.dtype).tiny))


_TRANSFORMS = {"softplus": Softplus, "exp": Exp}


class PositiveParameter(nn.Parameter):
    """An :class:`torch.nn.Parameter` that remembers its positivity mode.

    Parameters
    ----------
    data : Tensor
        The raw value (for ``softplus``/``exp``, the unconstrained value).
    mode : {'softplus', 'exp', 'projected', 'multiplicative'}
    requires_grad : bool, default True
        ``False`` keeps the parameter fixed for every trainer.
    """

    def __new__(cls, data: Tensor, mode: str = "multiplicative", requires_grad: bool = True):
        self = super().__new__(cls, data, requires_grad)
        self.mode = _check_mode(mode)
        return self

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        result = type(self)(self.data.clone(memory_format=torch.preserve_format), self.mode, self.requires_grad)
        memo[id(self)] = result
        return result

    def __reduce_ex__(self, proto):
        return (_rebuild_positive, (self.data, self.mode, self.requires_grad))

    def __repr__(self) -> str:
        return f"PositiveParameter(mode={self.mode!r}) containing:\n{self.data!r}"


def _rebuild_positive(data, mode, requires_grad):
    return PositiveParameter(data, mode, requires_grad)


def mode_of(p: Tensor) -> Optional[str]:
    """The mode of a raw parameter, or ``None`` for a tensor that is not a :class:`PositiveParameter`."""
    return getattr(p, "mode", None) if isinstance(p, PositiveParameter) else None


def value_of(p: Tensor) -> Tensor:
    """The constrained (non-negative) value of a raw parameter; ``p`` itself for identity modes."""
    mode = mode_of(p)
    if mode in _TRANSFORMS:
        return _TRANSFORMS[mode]()(p)
    return p


@torch.no_grad()
def assign_(p: Tensor, value: Tensor) -> Tensor:
    """Write the constrained ``value`` into raw parameter ``p`` in place (inverting its transform)."""
    mode = mode_of(p)
    p.copy_(_TRANSFORMS[mode]().right_inverse(value) if mode in _TRANSFORMS else value)
    return p


def positive(module: nn.Module, name: str, mode: str = "multiplicative", requires_grad: Optional[bool] = None,
             *, copy: bool = True) -> nn.Module:
    """Make ``module.<name>`` a positive parameter in ``mode``.

    The current attribute (a tensor or parameter of non-negative values) becomes the
    initial constrained value. Calling it again with another mode converts the
    parameter, keeping its value.

    Parameters
    ----------
    module : nn.Module
    name : str
        Attribute holding the tensor.
    mode : {'softplus', 'exp', 'projected', 'multiplicative'}, default 'multiplicative'
    requires_grad : bool, optional
        Default keeps the current parameter's flag (True for a plain tensor).
    copy : bool, default True
        The raw parameter holds a copy of the value; ``False`` (a layer's own fresh tensor, in
        any mode) takes its storage, so a layer of many rows allocates its parameters once.

    Returns
    -------
    nn.Module
        ``module``, for chaining.
    """
    _check_mode(mode)
    if parametrize.is_parametrized(module, name):
        raw = getattr(module.parametrizations, name).original
        value = getattr(module, name).detach()
        flag = raw.requires_grad if requires_grad is None else requires_grad
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        delattr(module, name)
    else:
        value = getattr(module, name)
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a tensor to be made positive, got {type(value).__name__}")
        flag = (value.requires_grad if isinstance(value, nn.Parameter) else True) if requires_grad is None else requires_grad
        value = value.detach()
        delattr(module, name)
    if value.numel() and not bool(value.min() >= 0):  # NaN fails too; no full-size flag array
        raise ValueError(f"{name} must be non-negative to be a positive parameter")
    if mode in _TRANSFORMS:
        # parametrize applies right_inverse to the registered value in place, so the raw
        # parameter stays this PositiveParameter object.
        module.register_parameter(name, PositiveParameter(value.clone() if copy else value, mode, flag))
        parametrize.register_parametrization(module, name, _TRANSFORMS[mode]())
        if mode_of(getattr(module.parametrizations, name).original) != mode:  # pragma: no cover
            raise RuntimeError("torch.nn.utils.parametrize replaced the raw parameter")
    else:
        module.register_parameter(name, PositiveParameter(value.clone() if copy else value, mode, flag))
    return module


def positive_parameters(module: nn.Module) -> Iterator[PositiveParameter]:
    """Every :class:`PositiveParameter` of ``module`` and its children, once each."""
    for p in module.parameters():
        if isinstance(p, PositiveParameter):
            yield p


def gradient_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters a gradient optimizer should take: trainable and not ``multiplicative``."""
    for p in module.parameters():
        if p.requires_grad and mode_of(p) != "multiplicative":
            yield p


def multiplicative_parameters(module: nn.Module) -> Iterator[PositiveParameter]:
    """Trainable parameters in ``multiplicative`` mode, for multiplicative trainers."""
    for p in module.parameters():
        if p.requires_grad and mode_of(p) == "multiplicative":
            yield p


@torch.no_grad()
def project_(params: Iterable[Tensor] | nn.Module, min: float = 0.0) -> None:
    """Clamp every ``projected`` parameter in ``params`` (or a module's) to ``>= min`` in place."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    for p in params:
        if mode_of(p) == "projected":
            p.clamp_(min=min)


def attach_projection(optimizer: torch.optim.Optimizer, min: float = 0.0):
    """Clamp the optimizer's ``projected`` parameters after each of its steps.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
    min : float, default 0

    Returns
    -------
    torch.utils.hooks.RemovableHandle
        Call ``.remove()`` to detach.
    """

    def hook(opt, args, kwargs):
        for group in opt.param_groups:
            project_(group["params"], min)

    return optimizer.register_step_post_hook(hook)


