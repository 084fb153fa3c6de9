r"""Deep Poisson factorization: Gamma-posterior layers that chain like :class:`~torchnmf.nmf.NMF`.

A chain ``nn.Sequential(GammaNMF((N, K1), rank=K0), GammaNMF(W=(K2, K1)), GammaNMF(W=(C, K2)))``
called with ``None`` models counts :math:`X` (N x C) as

.. math::

    X_{nc} \sim \mathrm{Poisson}\big((F_0 F_1^\top F_2^\top \cdots F_L^\top)_{nc}\big),

with :math:`F_0 = H` of the first layer and :math:`F_l` the ``W`` of layer ``l``. Every
factor of a :class:`GammaNMF` gets independent Gamma priors
:math:`F_{l,ik} \sim \mathrm{Gamma}(a_l, b_{l,i})` (one rate per row, fitted by maximum
likelihood unless fixed) and a mean-field posterior
:math:`q(F_{l,ik}) = \mathrm{Gamma}(s_{l,ik}, r_{l,ik})`. Each count splits over the paths
through the chain (Poisson augmentation); as every factor enters the rate linearly, every
complete conditional is Gamma and coordinate ascent (CAVI) is closed form:

* shape of :math:`F_l` = :math:`a_l + G_l \circ \partial_{G_l} \sum_{nc} X_{nc}\log(\text{chain at } G)_{nc}`,
  with :math:`G = \exp\mathbb E\log F` (the expected latent counts; only nonzeros of X enter);
* rate of :math:`F_l` = :math:`b_l + \partial_{M_l} \sum_{nc} (\text{chain at } M)_{nc}`,
  with :math:`M = \mathbb E F` — a rank-one quantity, no N x C matrix.

These are the KL multiplicative-update statistics at the geometric and the arithmetic means.
A plain :class:`~torchnmf.nmf.NMF` layer in the same chain is the point-mass case
(:math:`G = M =` its value); its update, value = statistic / rate, is the KL multiplicative
update (variational EM), so mixed chains share one sweep.

How the trainers see a chain: :class:`torchnmf.trainer.CAVI` and
:class:`torchnmf.trainer.NaturalGradient` call the closure inside a
:class:`torch.overrides.TorchFunctionMode` under which ``GammaNMF.forward`` and the
``F.linear`` of an ``NMF`` layer return a :class:`FactorChain` (the list of factors) instead
of a dense matrix. The chain is contracted at the nonzeros by splitting it at the rank that
makes ``nnz * K + (dense products)`` cheapest, the dense products in the order
:mod:`opt_einsum` plans; the sampled product is the one of
:func:`torchnmf.poisson.gamma.expected_counts`, so a one-layer chain computes exactly the
statistics of :class:`~torchnmf.poisson.GammaPoisson` (one implementation, not two), and the
gradients into deeper factors flow back through the small dense products by autograd.
"""
from __future__ import annotations

import numbers
import threading
from collections.abc import Iterable
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import opt_einsum
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Gamma, kl_divergence
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from .. import constraints
from ..data import as_tensor, check_option, check_positive, check_rank
from .elbo import ELBO
from .gamma import CountMatrix, expected_counts

__all__ = ["GammaNMF", "FactorChain", "chain_elbo"]

FactorArg = Union[None, Tensor, Sequence[int]]
_IDENTITY_MODES = ("multiplicative", "projected")


# -- the layer ---------------------------------------------------------------------------
class GammaNMF(nn.Module):
    r"""Gamma-Poisson factorization layer, the Bayesian twin of :class:`~torchnmf.nmf.NMF`.

    ``forward(H, W)`` returns the expected reconstruction :math:`\mathbb E[H]\,\mathbb E[W]^\top`
    (``(N, R) x (C, R) -> (N, C)``), so layers chain in :class:`torch.nn.Sequential` exactly like
    ``NMF`` (``GammaNMF(W=...)`` uses the previous output as its ``H``), and
    :class:`torchnmf.trainer.CAVI` / :class:`torchnmf.trainer.NaturalGradient` fit any such chain
    (see the module notes for the model and the updates).

    Each factor ``F`` in (``H``, ``W``) is held as a variational posterior
    ``q(F) = Gamma(F_shape, F_rate)`` (positive parameters of the factor's shape, see
    :mod:`torchnmf.constraints`) with prior ``Gamma(F_prior_shape, F_prior_rate[i])``
    (buffers: a scalar and one rate per row), so :meth:`state_dict` holds everything.

    Parameters
    ----------
    Vshape : (int, int), optional
        ``(N, C)``: random posteriors for W ``(C, R)`` and H ``(N, R)``.
    rank : int, optional
        R; needed with ``Vshape`` unless W or H is a tensor.
    W, H : Tensor or sequence of int, optional
        A shape gives a random posterior (shape ``a + Uniform(0, 1)``, rate the prior rate);
        a non-negative tensor is the initial posterior mean (shape ``a + 1``, entries floored at
        the dtype's tiny); ``None`` leaves the factor to be passed to :meth:`forward`.
    trainable_W, trainable_H : bool, default True
        ``False`` keeps the factor's posterior fixed (``requires_grad=False``).
    a : float, default 0.3
        Prior shape of both factors (below 1 favours sparse factors).
    prior_rate : float, default 1.0
        Initial (or, with ``learn_prior_rate=False``, fixed) prior rate of every row.
    learn_prior_rate : bool, default True
        Fit the prior rates by maximum likelihood, ``b_i = a R / Σ_k E[F_ik]``, after each sweep.
    mode : {'multiplicative', 'softplus', 'exp', 'projected'}, default 'multiplicative'
        Positivity mode of the variational parameters.
    allow_noninteger : bool, default False
        Accept non-integer counts (a quasi-likelihood).
    generator : torch.Generator, optional
        For the random initialisation (drawn in float64: H's shapes first, then W's, as
        :class:`~torchnmf.poisson.GammaPoisson` draws U then α, so both start alike).
    dtype, device : optional

    Attributes
    ----------
    H, W : Tensor or None
        Posterior means, shapes ``(N, R)`` and ``(C, R)``: detached tensors (``.numpy()``
        converts them); :meth:`mean` gives them differentiable.
    rank : int

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from torchnmf.trainer import CAVI
    >>> X = torch.poisson(torch.rand(40, 3) @ torch.rand(3, 8) @ torch.rand(8, 30) * 2)
    >>> model = nn.Sequential(GammaNMF((40, 8), rank=3, dtype=torch.float64),
    ...                       GammaNMF(W=(30, 8), dtype=torch.float64))
    >>> trainer = CAVI(model.parameters())
    >>> elbos = [trainer.step(lambda: (X, model(None))) for _ in range(20)]
    >>> bool(elbos[-1].total >= elbos[0].total), model(None).shape
    (True, torch.Size([40, 30]))
    """

    _factors = ("H", "W")

    def __init__(self, Vshape: Optional[Sequence[int]] = None, rank: Optional[int] = None, W: FactorArg = None,
                 H: FactorArg = None, trainable_W: bool = True, trainable_H: bool = True, *, a: float = 0.3,
                 prior_rate: float = 1.0, learn_prior_rate: bool = True, mode: str = "multiplicative",
                 allow_noninteger: bool = False, generator: Optional[torch.Generator] = None,
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        check_option(mode, constraints.MODES, "mode")
        a = check_positive(a, "a")
        prior_rate = check_positive(prior_rate, "prior_rate")
        if rank is not None:
            rank = check_rank(rank)
        if dtype is None:
            tensors = [v for v in (W, H) if isinstance(v, Tensor)]
            dtype = tensors[0].dtype if tensors and tensors[0].is_floating_point() else torch.get_default_dtype()
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        if Vshape is not None:
            try:
                N, C = (int(s) for s in Vshape)
            except (TypeError, ValueError):
                raise ValueError(f"Vshape must be two positive ints (N, C), got {Vshape!r}") from None
            if N < 1 or C < 1:
                raise ValueError(f"Vshape must be two positive ints (N, C), got {tuple(Vshape)}")
            if rank is None:
                rank = next((v.shape[1] for v in (W, H) if isinstance(v, Tensor) and v.dim() == 2), None)
            if rank is None:
                raise ValueError("rank is needed with Vshape (or give W or H as a tensor)")
            W = (C, rank) if W is None else W
            H = (N, rank) if H is None else H
        self.learn_prior_rate = bool(learn_prior_rate)
        self.allow_noninteger = bool(allow_noninteger)
        self._mode = mode
        inits = {}
        for name, value, trainable in (("H", H, trainable_H), ("W", W, trainable_W)):
            if value is None:
                continue
            if isinstance(value, Tensor):
                T = as_tensor(value, name, dtype=dtype, device=device, ndim=2, sparse="dense", float_only=False)
                if not bool(torch.isfinite(T).all()) or bool((T < 0).any()):
                    raise ValueError(f"GammaNMF: {name} must be finite and non-negative")
                shape, mean = tuple(T.shape), T.detach().clone()
            elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
                shape = tuple(value)
                if len(shape) != 2 or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0
                                              for s in shape):
                    raise ValueError(f"GammaNMF: {name} shape must be two positive ints, got {shape!r}")
                shape, mean = tuple(int(s) for s in shape), None
            else:
                raise TypeError(f"GammaNMF: {name} must be a tensor, a shape or None, got {type(value).__name__}")
            if rank is not None and shape[1] != rank:
                raise ValueError(f"GammaNMF: {name} has rank {shape[1]} in dim 1, expected rank={rank}")
            rank = shape[1]
            kw = dict(dtype=dtype, device=device)
            self.register_buffer(f"{name}_prior_shape", torch.tensor(a, **kw))
            self.register_buffer(f"{name}_prior_rate", torch.full((shape[0],), prior_rate, **kw))
            for part in ("shape", "rate"):
                setattr(self, f"{name}_{part}", nn.Parameter(torch.ones(shape, **kw)))
                constraints.positive(self, f"{name}_{part}", mode, requires_grad=bool(trainable))
            inits[name] = mean
        if rank is None:
            raise ValueError("GammaNMF needs W or H (a shape or a tensor), or Vshape and rank")
        self.rank = rank
        self.reset_parameters(generator, inits)

    # -- parameters ----------------------------------------------------------------
    def has(self, name: str) -> bool:
        """Whether the layer holds factor ``name`` (``'H'`` or ``'W'``)."""
        check_option(name, self._factors, "name")
        return f"{name}_prior_rate" in self._buffers

    def _raw(self, name: str) -> Tensor:
        if parametrize.is_parametrized(self, name):
            return getattr(self.parametrizations, name).original
        return self._parameters[name]

    def _need(self, name: str) -> None:
        if not self.has(name):
            raise ValueError(f"GammaNMF has no {name}: it was created without one")

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None,
                         means: Optional[Dict[str, Optional[Tensor]]] = None) -> None:
        """Initialise the posteriors: shape ``a + Uniform(0, 1)`` and rate the prior rate.

        Parameters
        ----------
        generator : torch.Generator, optional
        means : dict of str to Tensor, optional
            Initial posterior means of some factors instead (shape ``a + 1``).
        """
        means = means or {}
        for name in self._factors:
            if not self.has(name):
                continue
            a, b = getattr(self, f"{name}_prior_shape"), getattr(self, f"{name}_prior_rate")
            size = self._raw(f"{name}_shape").shape
            mean = means.get(name)
            if mean is None:
                gen_device = generator.device if generator is not None else self.device
                noise = torch.rand(size, generator=generator, dtype=torch.float64, device=gen_device)
                _write(self, f"{name}_shape", a + noise.to(device=self.device, dtype=self.dtype))
                _write(self, f"{name}_rate", b[:, None].expand(size).clone())
            else:
                shape = (a + 1).expand(size).clone()
                _write(self, f"{name}_shape", shape)
                _write(self, f"{name}_rate", shape / mean.to(shape).clamp_min(torch.finfo(self.dtype).tiny))

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._buffers.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self._buffers.values())).device

    # -- posterior summaries --------------------------------------------------------
    def mean(self, name: str) -> Tensor:
        """Posterior mean :math:`\\mathbb E F = s / r` of factor ``name``, shape of the factor."""
        self._need(name)
        return getattr(self, f"{name}_shape") / getattr(self, f"{name}_rate")

    def log_mean(self, name: str) -> Tensor:
        """:math:`\\mathbb E\\log F = \\psi(s) - \\log r`, shape of the factor."""
        self._need(name)
        return torch.digamma(getattr(self, f"{name}_shape")) - torch.log(getattr(self, f"{name}_rate"))

    def geometric_mean(self, name: str) -> Tensor:
        """:math:`\\exp\\mathbb E\\log F`, shape of the factor."""
        return torch.exp(self.log_mean(name))

    def q(self, name: str) -> Gamma:
        """The variational posterior of factor ``name``: a Gamma of batch shape the factor's."""
        self._need(name)
        return Gamma(getattr(self, f"{name}_shape"), getattr(self, f"{name}_rate"), validate_args=False)

    def prior(self, name: str) -> Gamma:
        """The prior of factor ``name``: a Gamma of batch shape ``(rows, 1)``."""
        self._need(name)
        b = getattr(self, f"{name}_prior_rate")
        return Gamma(getattr(self, f"{name}_prior_shape").expand(b.shape[0], 1), b[:, None], validate_args=False)

    def kl(self, name: str) -> Tensor:
        """KL divergence of ``q(name)`` from its prior, summed: a tensor of shape ()."""
        return kl_divergence(self.q(name), self.prior(name)).sum()

    @property
    def H(self) -> Optional[Tensor]:  # noqa: N802 - NMF's name
        """Posterior mean of H, shape ``(N, R)``, or None; detached (``.numpy()`` works; :meth:`mean` is differentiable)."""
        return self.mean("H").detach() if self.has("H") else None

    @property
    def W(self) -> Optional[Tensor]:  # noqa: N802 - NMF's name
        """Posterior mean of W, shape ``(C, R)``, or None; detached (``.numpy()`` works; :meth:`mean` is differentiable)."""
        return self.mean("W").detach() if self.has("W") else None

    # -- reconstruction -------------------------------------------------------------
    def forward(self, H: Optional[Tensor] = None, W: Optional[Tensor] = None) -> Tensor:
        """Expected reconstruction ``E[H] E[W]ᵀ``, shape ``(N, C)``.

        Parameters
        ----------
        H : Tensor, shape (N, R), optional
            Activations (e.g. the previous layer's output); default the layer's posterior mean.
        W : Tensor, shape (C, R), optional
            Default the layer's posterior mean.

        Returns
        -------
        Tensor, shape (N, C)
            Dense; inside a closure called by CAVI/NaturalGradient a :class:`FactorChain`.
        """
        mode = _active_mode()
        if mode is not None:
            return mode.link(H if H is not None else self._slot("H"), W if W is not None else self._slot("W"), self)
        if H is None and self.has("H"):
            H = self.mean("H")
        if W is None and self.has("W"):
            W = self.mean("W")
        if H is None or W is None:
            raise ValueError(f"GammaNMF: {'H' if H is None else 'W'} was not given and the layer has none")
        if H.shape[-1] != W.shape[-1]:
            raise ValueError(f"GammaNMF: input H has {H.shape[-1]} columns but W {tuple(W.shape)} has rank {W.shape[-1]}")
        return F.linear(H, W)

    def _slot(self, name: str):
        return _GammaFactor(self, name) if self.has(name) else None

    def elbo(self, X, H: Optional[Tensor] = None) -> ELBO:
        """ELBO of this layer alone on counts ``X`` (see :func:`chain_elbo`).

        Parameters
        ----------
        X : counts, shape (N, C)
        H : Tensor, optional
            Input activations when the layer has no H of its own.

        Returns
        -------
        ELBO
        """
        return chain_elbo(X, self, H)

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}={tuple(self._raw(f'{n}_shape').shape)}" for n in self._factors if self.has(n))
        return f"{shapes}, rank={self.rank}, learn_prior_rate={self.learn_prior_rate}, mode={self._mode!r}"


@torch.no_grad()
def _write(module: nn.Module, name: str, value: Tensor, rows: Optional[Tensor] = None) -> None:
    """Write the constrained ``value`` of parameter ``name`` (of ``rows`` only), in any mode."""
    raw = module._raw(name)
    if rows is None:
        constraints.assign_(raw, value)
    elif constraints.mode_of(raw) in _IDENTITY_MODES:
        raw[rows] = value
    else:
        full = getattr(module, name).detach().clone()
        full[rows] = value
        constraints.assign_(raw, full)


# -- factors of a chain ------------------------------------------------------------------
class _Factor:
    """One factor matrix of a chain, as the trainers see it."""

    gamma = False
    label = "?"

    def trainable(self, params: Optional[set]) -> bool:
        return False

    def kl(self, rows=None, dtype: Optional[torch.dtype] = None) -> Optional[Tensor]:
        return None

    def update_prior(self, rows=None) -> None:
        pass

    def versions(self) -> tuple:
        return ()


class _GammaFactor(_Factor):
    gamma = True

    def __init__(self, layer: GammaNMF, name: str):
        self.layer, self.name = layer, name
        self.key = (id(layer), name)
        self.shape = tuple(layer._raw(f"{name}_shape").shape)

    def describe(self) -> str:
        return f"GammaNMF.{self.name} {self.shape}"

    def _params(self):
        return self.layer._raw(f"{self.name}_shape"), self.layer._raw(f"{self.name}_rate")

    def trainable(self, params) -> bool:
        return all(p.requires_grad and (params is None or id(p) in params) for p in self._params())

    def versions(self) -> tuple:
        b = getattr(self.layer, f"{self.name}_prior_rate")
        return tuple(t._version for t in (*self._params(), b))

    def _get(self, part: str, rows, dtype: Optional[torch.dtype] = None):
        v = getattr(self.layer, f"{self.name}_{part}")
        v = v if rows is None else v[rows]
        return v if dtype is None else v.to(dtype)

    @property
    def dtype(self):
        return self.layer.dtype

    @property
    def device(self):
        return self.layer.device

    def log_value(self, rows=None, dtype: Optional[torch.dtype] = None) -> Tensor:
        return torch.digamma(self._get("shape", rows, dtype)) - torch.log(self._get("rate", rows, dtype))

    def mean(self, rows=None, dtype: Optional[torch.dtype] = None) -> Tensor:
        return self._get("shape", rows, dtype) / self._get("rate", rows, dtype)

    def prior_rate(self, rows=None) -> Tensor:
        b = getattr(self.layer, f"{self.name}_prior_rate")
        return b if rows is None else b[rows]

    @torch.no_grad()
    def update(self, stat: Tensor, rate: Tensor, rows=None, rho: float = 1.0) -> None:
        a = getattr(self.layer, f"{self.name}_prior_shape")
        shape_hat = a + stat
        rate_hat = self.prior_rate(rows)[:, None] + rate
        if rho != 1.0:
            shape_hat = torch.lerp(self._get("shape", rows).detach(), shape_hat, rho)
            rate_hat = torch.lerp(self._get("rate", rows).detach(), rate_hat, rho)
        _write(self.layer, f"{self.name}_shape", shape_hat, rows)
        _write(self.layer, f"{self.name}_rate", rate_hat, rows)

    @torch.no_grad()
    def update_prior(self, rows=None) -> None:
        if not self.layer.learn_prior_rate:
            return
        a = getattr(self.layer, f"{self.name}_prior_shape")
        new = a * self.shape[1] / self.mean(rows).sum(1)
        b = getattr(self.layer, f"{self.name}_prior_rate")
        if rows is None:
            b.copy_(new)
        else:
            b[rows] = new

    def kl(self, rows=None, dtype: Optional[torch.dtype] = None) -> Tensor:
        q = Gamma(self._get("shape", rows, dtype), self._get("rate", rows, dtype), validate_args=False)
        b = self.prior_rate(rows)
        a = getattr(self.layer, f"{self.name}_prior_shape")
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        return kl_divergence(q, Gamma(a.expand(b.shape[0], 1), b[:, None], validate_args=False)).sum()


class _PointFactor(_Factor):
    """A point-mass factor: a non-negative parameter in an identity mode (an ``NMF`` factor)."""

    def __init__(self, param: Tensor, owner: str = "NMF"):
        self.param = param
        self.key = id(param)
        self.shape = tuple(param.shape)
        self.owner = owner

    def describe(self) -> str:
        return f"{self.owner} factor {self.shape}"

    @property
    def dtype(self):
        return self.param.dtype

    @property
    def device(self):
        return self.param.device

    def trainable(self, params) -> bool:
        return self.param.requires_grad and (params is None or id(self.param) in params)

    def versions(self) -> tuple:
        return (self.param._version,)

    def mean(self, rows=None, dtype: Optional[torch.dtype] = None) -> Tensor:
        v = self.param.detach()
        v = v if rows is None else v[rows]
        return v if dtype is None else v.to(dtype)

    def log_value(self, rows=None, dtype: Optional[torch.dtype] = None) -> Tensor:
        return torch.log(self.mean(rows, dtype).clamp_min(torch.finfo(self.param.dtype).tiny))

    @torch.no_grad()
    def update(self, stat: Tensor, rate: Tensor, rows=None, rho: float = 1.0) -> None:
        # variational EM: value = expected latent counts / rate, the KL multiplicative update
        new = torch.where(rate > 0, stat / rate.clamp_min(torch.finfo(rate.dtype).tiny), self.mean(rows))
        if rho != 1.0:
            new = torch.lerp(self.mean(rows), new, rho)
        if rows is None:
            self.param.copy_(new)
        else:
            self.param[rows] = new


class _ConstFactor(_PointFactor):
    """A constant input (a tensor that no trainer changes)."""

    def __init__(self, value: Tensor):
        super().__init__(value.detach(), "constant")

    def trainable(self, params) -> bool:
        return False


class FactorChain:
    """The factors of a chain ``F_0 F_1ᵀ ... F_Lᵀ``, as a trainer's closure returns it.

    Built by ``model(None)`` inside a trainer's closure (never by hand): each
    :class:`GammaNMF` or ``NMF`` layer appends its W. Only ``F.linear`` (what the layers call)
    is defined on it.

    Attributes
    ----------
    factors : list
        ``[F_0, F_1, ..., F_L]``; ``F_0`` has shape ``(N, K_0)``, ``F_l`` ``(K_l, K_{l-1})``.
    shape : (int, int)
        ``(N, C)``, the shape of the product.
    """

    def __init__(self, factors: List[_Factor]):
        self.factors = factors
        self.shape = (factors[0].shape[0], factors[-1].shape[0])

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"{getattr(func, '__name__', func)} is not defined on a chain of factors: inside a CAVI or "
                        "NaturalGradient closure only GammaNMF and NMF layers (F.linear) may act on the chain")

    def __repr__(self) -> str:
        return f"FactorChain({' x '.join(f.describe() for f in self.factors)})"


# -- the mode that turns a forward pass into a FactorChain ---------------------------------
_LOCAL = threading.local()


def _active_mode() -> Optional["_ChainMode"]:
    return getattr(_LOCAL, "mode", None)


class _ChainMode(TorchFunctionMode):
    """While active, chain layers return :class:`FactorChain` objects instead of products."""

    def __init__(self):
        super().__init__()
        self._saved = None

    def __enter__(self):
        self._saved = _active_mode()
        _LOCAL.mode = self
        return super().__enter__()

    def __exit__(self, *exc):
        _LOCAL.mode = self._saved
        return super().__exit__(*exc)

    @staticmethod
    def _factor(x, where: str) -> Optional[List[_Factor]]:
        if x is None:
            return None
        if isinstance(x, FactorChain):
            return list(x.factors)
        if isinstance(x, _Factor):
            return [x]
        if isinstance(x, Tensor):
            if x.dim() != 2:
                raise ValueError(f"{where} must be 2-D in a chain, got shape {tuple(x.shape)}")
            if constraints.mode_of(x) in _IDENTITY_MODES:
                return [_PointFactor(x)]
            if x.requires_grad:
                raise TypeError(f"{where} is a trainable tensor CAVI cannot update in closed form "
                                "(NMF layers in a chain need mode='multiplicative' or 'projected')")
            return [_ConstFactor(x)]
        raise TypeError(f"{where} must be a tensor or a chain, got {type(x).__name__}")

    def link(self, H, W, layer: Optional[nn.Module] = None) -> FactorChain:
        """``H Wᵀ`` as a chain."""
        who = type(layer).__name__ if layer is not None else "F.linear"
        left = self._factor(H, f"{who}: H")
        right = self._factor(W, f"{who}: W")
        if left is None or right is None:
            raise ValueError(f"{who}: {'H' if left is None else 'W'} was not given and the layer has none")
        if len(right) != 1:
            raise TypeError(f"{who}: W must be a factor, not a chain")
        w = right[0]
        k_in = left[0].shape[1] if len(left) == 1 else left[-1].shape[0]
        if w.shape[1] != k_in:
            raise ValueError(f"{who} with W of shape {w.shape}: its input H has {k_in} columns but W has rank "
                             f"{w.shape[1]} (the chain's shapes do not line up)")
        return FactorChain(left + [w])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is torch._C._nn.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if bias is None and (isinstance(x, FactorChain) or constraints.mode_of(x) in _IDENTITY_MODES
                                 or constraints.mode_of(w) in _IDENTITY_MODES):
                return self.link(x, w)
        if any(isinstance(a, FactorChain) for a in (*args, *kwargs.values())):
            FactorChain.__torch_function__(func, types, args, kwargs)
        return func(*args, **kwargs)


def collect(closure, where: str = "closure") -> Tuple[tuple, FactorChain]:
    """Call ``closure`` under the chain mode; returns its output and the chain it holds at index 1."""
    with _ChainMode(), torch.enable_grad():
        out = closure()
    if not isinstance(out, tuple) or len(out) < 2:
        raise ValueError(f"the {where} must return (X, model(None)) or (X, model(None), rows[, scale]) for a chain")
    chain = out[1]
    if not isinstance(chain, FactorChain):
        raise TypeError(f"the {where}'s second value must be model(None) computed inside the closure (a chain of "
                        f"GammaNMF/NMF layers), got {type(chain).__name__}")
    keys = [f.key for f in chain.factors]
    if len(set(keys)) != len(keys):
        raise ValueError("a factor appears twice in the chain: the model must be linear in each factor")
    dtypes = {(f.dtype, f.device) for f in chain.factors}
    if len(dtypes) != 1:
        raise TypeError(f"the chain's factors must share one dtype and device, got {sorted(map(str, dtypes))}")
    for i, f in enumerate(chain.factors):
        f.label = "H" if i == 0 else f"W{i}"
    return out, chain


# -- contraction plans ---------------------------------------------------------------------
def _sym(i: int) -> str:
    return opt_einsum.get_symbol(i)


@lru_cache(maxsize=256)
def _plan(shapes: Tuple[Tuple[int, int], ...], nnz: int):
    """Split point and opt_einsum expressions for a chain with these factor shapes.

    Returns ``(s, left, right)``: the data term is contracted as the sampled product of
    ``L = F_0 F_1ᵀ...F_sᵀ`` (N x K_s) and ``R = F_L...F_{s+1}`` (C x K_s), each side an
    opt_einsum expression (None for a single factor); ``s`` minimises
    ``nnz * K_s`` plus opt_einsum's cost of both sides.
    """
    L = len(shapes) - 1
    n, c = _sym(0), _sym(1)
    k = [_sym(2 + i) for i in range(L)]
    # F_0: (n, k0); F_l: (k_l, k_{l-1}) for 0 < l < L; F_L: (c, k_{L-1})
    subs = [n + k[0]] + [k[l] + k[l - 1] for l in range(1, L)] + [c + k[L - 1]]
    best = None
    for s in range(L):
        cost = nnz * shapes[s][1] if s == 0 else nnz * shapes[s][0]
        sides = []
        for idx, out in ((range(0, s + 1), n + k[s]), (range(s + 1, L + 1), c + k[s])):
            idx = list(idx)
            if len(idx) == 1:
                sides.append(None)
                continue
            eq = ",".join(subs[i] for i in idx) + "->" + out
            ops = [shapes[i] for i in idx]
            _, info = opt_einsum.contract_path(eq, *ops, shapes=True)
            cost += int(info.opt_cost)
            sides.append(opt_einsum.contract_expression(eq, *ops))
        if best is None or cost < best[0]:
            best = (cost, s, sides[0], sides[1])
    return best[1], best[2], best[3]


def _side(expr, logs: List[Tensor], outer: int) -> Tensor:
    """log of the planned product of ``exp(logs)``, computed stably.

    ``logs[outer]`` (the factor holding the product's rows) is shifted by its row maxima, the
    others by their maximum; the shifts are constants (detached), which leaves the function
    and its gradient exact.
    """
    if expr is None:
        return logs[0]
    shifted, shift, row_shift = [], 0.0, None
    for i, lg in enumerate(logs):
        if i == outer:
            m = lg.detach().amax(1, keepdim=True)
            row_shift = m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        else:
            m = lg.detach().max()
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            shift = shift + m
        shifted.append(torch.exp(lg - m))
    prod = expr(*shifted, backend="torch")
    return torch.log(prod.clamp_min(torch.finfo(prod.dtype).tiny)) + row_shift + shift


class ChainStatistics:
    """Expected latent counts of every factor of a chain at the nonzeros of a batch.

    Parameters
    ----------
    data : CountMatrix, shape (n, C)
        The batch (``rows`` of the chain's first factor) or the full data.
    chain : FactorChain
    rows : LongTensor, optional
        Rows of the first factor held by ``data``.
    need : set of int
        Indices of the factors whose statistics are wanted.
    chunk_size : int, optional
    dtype : torch.dtype, optional
        Dtype of the pass (default the factors'): ``torch.float64`` for the ELBO pass of a
        float32 chain, as :meth:`GammaPoisson.statistics` does; ``counts`` are cast back to
        the factors' dtype, ``log_norm`` stays in ``dtype``.

    Attributes
    ----------
    counts : dict of int to Tensor
        ``G_l ∘ ∂/∂G_l Σ X log(chain at G)``, each of its factor's shape (``(n, K_0)`` for the
        first factor of a batch).
    log_norm : Tensor, shape ()
        ``Σ X log(chain at G)`` over the nonzeros.
    """

    def __init__(self, data: CountMatrix, chain: FactorChain, rows: Optional[Tensor], need, chunk_size=None,
                 dtype: Optional[torch.dtype] = None):
        factors = chain.factors
        need = set(need)
        with torch.no_grad():
            logs = [f.log_value(rows if i == 0 else None, dtype).detach() for i, f in enumerate(factors)]
        s, left, right = _plan(tuple(tuple(lg.shape) for lg in logs), max(data.nnz, 1))
        leaves = [lg.requires_grad_(True) if i in need else lg for i, lg in enumerate(logs)]
        with torch.enable_grad():
            log_left = _side(left, leaves[:s + 1], 0)
            log_right = _side(right, leaves[s + 1:], len(factors) - s - 2)
        need_rows = any(i <= s for i in need)
        need_cols = any(i > s for i in need)
        row_c, col_c, log_norm = expected_counts(data, log_left.detach(), log_right.detach(), need_rows, need_cols,
                                                 chunk_size)
        self.log_norm = log_norm.detach()
        self.counts: Dict[int, Tensor] = {}
        if not need:
            return
        outs, grads = [], []
        if need_rows:
            outs.append(log_left)
            grads.append(row_c)
        if need_cols:
            outs.append(log_right)
            grads.append(col_c)
        idx = sorted(need)
        got = torch.autograd.grad(outs, [leaves[i] for i in idx], grads, allow_unused=True)
        for i, g in zip(idx, got):
            self.counts[i] = (torch.zeros_like(logs[i]) if g is None else g.detach()).to(factors[i].dtype)


def _sum_vectors(means: List[Tensor]):
    """Vectors of the rank-one sum ``1ᵀ M_0 M_1ᵀ ... M_Lᵀ 1``, every product a matrix-vector one.

    ``left[l]`` (size ``K_{l-1}``, for l >= 1) is what sits left of ``M_l``
    (``M_{l-1} ... M_1 M_0ᵀ 1``); ``right[l]`` (the rows of ``M_l``) what sits right of it
    (``1`` for the last factor, ``M_{l+1}ᵀ right[l+1]`` before).
    """
    L = len(means) - 1
    left: List[Optional[Tensor]] = [None] * (L + 1)
    left[1] = means[0].sum(0)
    for l in range(2, L + 1):
        left[l] = means[l - 1] @ left[l - 1]
    right: List[Optional[Tensor]] = [None] * (L + 1)
    for l in range(L - 1, -1, -1):
        # a column sum when the right vector is the ones of the data's columns (as GammaPoisson)
        right[l] = means[l + 1].sum(0) if l + 1 == L else right[l + 1] @ means[l + 1]
    return left, right


def rate_statistics(chain: FactorChain, index: int, rows: Optional[Tensor] = None, scale: float = 1.0) -> Tensor:
    """``∂/∂M_index Σ (chain at the posterior means)``, over the batch ``rows`` of the first factor.

    Rank one: the outer product of the vectors on both sides of ``M_index`` in
    ``1ᵀ M_0 M_1ᵀ ... M_Lᵀ 1`` (matrix-vector products only, the cheapest order); shape of
    factor ``index`` (``(len(rows), K_0)`` for the first factor of a batch).
    """
    factors = chain.factors
    with torch.no_grad():
        means = [f.mean(rows if i == 0 else None) for i, f in enumerate(factors)]
        left, right = _sum_vectors(means)
        if index == 0:
            g = right[0].expand(means[0].shape).clone()
        elif index == len(means) - 1:
            g = left[index].expand(means[index].shape).clone()
        else:
            g = torch.outer(right[index], left[index])
        return g * scale if scale != 1.0 else g


def total_mean(chain: FactorChain, rows: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``Σ_nc (chain at the posterior means)`` over the batch ``rows``, in ``dtype``: shape ()."""
    factors = chain.factors
    with torch.no_grad():
        means = [f.mean(rows if i == 0 else None, dtype) for i, f in enumerate(factors)]
        left, right = _sum_vectors(means)
        return (left[1] * right[0]).sum()


def chain_data(X, chain: FactorChain, rows: Optional[Tensor] = None) -> CountMatrix:
    """Check counts ``X`` against a chain (shape, dtype, integer counts unless every Gamma layer allows more)."""
    gammas = [f.layer for f in chain.factors if isinstance(f, _GammaFactor)]
    allow = all(g.allow_noninteger for g in gammas) if gammas else True
    f0 = chain.factors[0]
    n = f0.shape[0] if rows is None else int(rows.numel())
    try:
        return CountMatrix.from_input(X, "X", allow_noninteger=allow, dtype=f0.dtype, device=f0.device,
                                      shape=(n, chain.shape[1]))
    except ValueError as err:
        if "must hold counts" in str(err) and gammas:
            raise ValueError(f"{err} (on the GammaNMF layers)") from None
        raise


def chain_rows(chain: FactorChain, rows) -> Optional[Tensor]:
    """Check and convert row indices of the chain's first factor."""
    if rows is None:
        return None
    n = chain.factors[0].shape[0]
    r = torch.as_tensor(np.asarray(rows) if not isinstance(rows, Tensor) else rows)
    if r.dim() != 1 or (r.numel() and (r.is_floating_point() or r.dtype == torch.bool)):
        raise ValueError(f"rows must be a 1-D array of integer row indices, got shape {tuple(r.shape)}")
    r = r.long().to(chain.factors[0].device)
    if r.numel() and (int(r.min()) < 0 or int(r.max()) >= n):
        raise ValueError(f"rows must be indices in [0, {n}), got range [{int(r.min())}, {int(r.max())}]")
    if torch.unique(r).numel() != r.numel():
        raise ValueError("rows must not repeat an index")
    return r


def elbo_from(data: CountMatrix, chain: FactorChain, log_norm: Tensor, rows: Optional[Tensor] = None,
              scale: float = 1.0) -> ELBO:
    """The ELBO record from a pass's ``log_norm``: ``data`` term and one KL per Gamma factor.

    For a batch, the data term and the first factor's KL are multiplied by ``scale``. The
    terms are computed and kept in ``log_norm``'s dtype: float64 from the float64 pass the
    trainers and :func:`chain_elbo` run for a float32 chain (the ELBO is a small difference
    of large terms, whose float32 rounding exceeds its change near convergence; rounding the
    parts to float32 one by one would let their total fall by an ulp between sweeps).
    """
    dt = out = log_norm.dtype
    with torch.no_grad():
        z = (log_norm - data.log_factorial_in(dt) - total_mean(chain, rows, dt)) * scale
        kls = {}
        for i, f in enumerate(chain.factors):
            kl = f.kl(rows if i == 0 else None, dt)
            if kl is not None:
                kls[f"{f.label}_kls"] = (kl * scale if i == 0 else kl).to(out)
        return ELBO(z.to(out), kls)


def chain_elbo(X, model: nn.Module, input: Optional[Tensor] = None, chunk_size: Optional[int] = None) -> ELBO:
    r"""The evidence lower bound of a chain (``model(input)``) on counts ``X``.

    ``data`` (alias ``Z``): :math:`\sum_{nc}[X_{nc}\log(\text{chain at } G)_{nc} - \log X_{nc}!]
    - \sum_{nc}(\text{chain at } M)_{nc}` with the path split :math:`\phi` optimal; one KL term
    per Gamma factor, named ``H_kls`` for the first factor and ``W1_kls``, ``W2_kls``, ... for
    the W of the first, second, ... layer; point-mass (``NMF``) factors have none.

    Parameters
    ----------
    X : counts, shape (N, C)
        Dense or sparse tensor, numpy array, scipy.sparse matrix or CountMatrix; never modified.
    model : nn.Module
        A chain of :class:`GammaNMF` / ``NMF`` layers.
    input : Tensor, optional
        Passed to ``model`` (default None).
    chunk_size : int, optional

    Returns
    -------
    ELBO
        In float64 whatever the chain's dtype (computed in float64, see :func:`elbo_from`).
    """
    _, chain = collect(lambda: (None, model(input)), "model")
    data = chain_data(X, chain)
    stats = ChainStatistics(data, chain, None, (), chunk_size, dtype=torch.float64)  # see elbo_from
    return elbo_from(data, chain, stats.log_norm)
