"""Probabilistic latent component analysis: PLCA and its shift-invariant forms.

``V / ΣV ≈ P(n, c, ...) = Σ_z Z[z] · P(c, ... | z) ⊛ P(n, ... | z)``: the layers of
:mod:`torchnmf.nmf` with W and H normalised to sum to one per component (over every dim but
dim 1) and a prior ``Z`` over components (summing to one). Fitting is EM, the
multiplicative updates of the KL divergence followed by normalisation, with optional
Dirichlet priors (``*_alpha``; 1 is flat, > 1 smooths, < 1 sparsifies).
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import data, engine
from .constraints import positive
from .history import History
from .metrics import kl_div
from .nmf import NMF, NMF2D, NMF3D, NMFD, _check_vshape, _default_rank, _tuple

__all__ = ["BaseComponent", "PLCA", "SIPLCA", "SIPLCA2", "SIPLCA3"]


def _normalize(x: Tensor, dims: Tuple[int, ...]) -> Tensor:
    s = x.sum(dims, keepdim=True) if dims else x.sum()
    return x / s.clamp_min(torch.finfo(x.dtype).tiny)


class BaseComponent(nn.Module):
    """Base of the PLCA layers: W, H normalised per component, Z a distribution over components.

    Parameters
    ----------
    rank : int, optional
        Number of components; inferred from W, H or Z tensors.
    W, H : Tensor or sequence of int, optional
        Factors with the rank in dim 1 (tensors are copied and normalised; shapes get a
        random start).
    Z : Tensor or int, optional
        Component weights, shape (rank,). Default uniform when ``rank`` is given; with
        neither ``rank`` nor ``Z`` the module has no ``Z`` (``self.Z is None``, as in
        pytorch-NMF 0.3.5): :meth:`forward` then weighs the components equally and
        :meth:`fit` trains W and H only.
    trainable_W, trainable_H, trainable_Z : bool, default True
    """

    _nmf = NMF
    _conv_dims = 0

    def __init__(self, rank: Optional[int] = None, W=None, H=None, Z=None,
                 trainable_W: bool = True, trainable_H: bool = True, trainable_Z: bool = True):
        super().__init__()
        fdim = 2 + self._conv_dims
        inferred = data.check_rank(rank) if rank is not None else None
        for name, value, trainable in (("W", W, trainable_W), ("H", H, trainable_H)):
            if value is None:
                self.register_parameter(name, None)
                continue
            if isinstance(value, Tensor):
                data.as_tensor(value, name)
                data.check_nonnegative(value, name)
                if value.dim() != fdim:
                    raise ValueError(f"{name} must have {fdim} dimensions, got shape {tuple(value.shape)}")
                init = value.detach().clone()
            else:
                shape = tuple(value)
                if len(shape) != fdim:
                    raise ValueError(f"{name} shape must have {fdim} entries, got {shape}")
                init = torch.rand(*shape)
            if inferred is not None and init.shape[1] != inferred:
                raise ValueError(f"{name} has rank {init.shape[1]} in dim 1, expected {inferred}")
            inferred = init.shape[1]
            setattr(self, name, _normalize(init, self._other_dims(init)))
            positive(self, name, "multiplicative", requires_grad=bool(trainable))
        if isinstance(Z, Tensor):
            data.as_tensor(Z, "Z")
            data.check_nonnegative(Z, "Z")
            if Z.dim() != 1 or (inferred is not None and Z.shape[0] != inferred):
                raise ValueError(f"Z must have shape ({inferred},), got {tuple(Z.shape)}")
            z = Z.detach().clone()
            inferred = z.shape[0]
        elif Z is None or isinstance(Z, numbers.Integral):
            n = inferred if Z is None else data.check_rank(Z, "Z")
            if n is None:
                raise ValueError("the rank could not be inferred: give rank, W, H or Z")
            if inferred is not None and n != inferred:
                raise ValueError(f"Z={n} components, but W/H/rank give {inferred}")
            inferred = n
            if Z is None and rank is None:  # as 0.3.5: Z comes only from rank or a given Z
                z = None
            else:
                ref = self.W if self.W is not None else self.H
                z = torch.ones(n, dtype=ref.dtype if ref is not None else None,
                               device=ref.device if ref is not None else None)
        else:
            raise TypeError(f"Z must be a tensor or an int, got {type(Z).__name__}")
        if z is None:
            self.register_parameter("Z", None)
        else:
            self.Z = z / z.sum()
            positive(self, "Z", "multiplicative", requires_grad=bool(trainable_Z))
        self.rank = inferred

    @staticmethod
    def _other_dims(x: Tensor) -> Tuple[int, ...]:
        return tuple(d for d in range(x.dim()) if d != 1)

    def forward(self, H: Optional[Tensor] = None, W: Optional[Tensor] = None, Z: Optional[Tensor] = None,
                norm=None) -> Tensor:
        """The normalised reconstruction ``Σ_z Z[z] W[:, z] ⊛ H[:, z]`` (sums to one), times ``norm``.

        Parameters
        ----------
        H, W, Z : Tensor, optional
            Default to the module's own (Z: uniform ``1 / rank`` when the module has none).
        norm : float or Tensor, optional
            Scale of the output, e.g. the ``norm`` :meth:`fit` returns (``ΣV``), so that
            ``self(norm=norm)`` approximates V (pytorch-NMF 0.3.5's argument). Default 1.

        Returns
        -------
        Tensor
            Shape of V (``(N, C)`` for :class:`PLCA`).
        """
        H = self.H if H is None else H
        W = self.W if W is None else W
        Z = self.Z if Z is None else Z
        if H is None or W is None:
            raise ValueError(f"{'H' if H is None else 'W'} was not given and the module has none")
        if Z is None:
            Z = torch.full((H.shape[1],), 1 / H.shape[1], dtype=H.dtype, device=H.device)
        out = self.reconstruct(H, W, Z)
        if norm is None:
            return out
        if isinstance(norm, Tensor):
            if norm.numel() != 1 or not bool(torch.isfinite(norm).all()) or not bool((norm >= 0).all()):
                raise ValueError(f"norm must be a finite non-negative scalar, got {norm!r}")
            return out * norm.to(device=out.device, dtype=out.dtype).reshape(())
        return out * data.check_positive(norm, "norm", allow_zero=True)

    def reconstruct(self, H: Tensor, W: Tensor, Z: Tensor) -> Tensor:
        """The matching NMF layer's reconstruction with H scaled by Z along the rank dim."""
        return self._nmf.reconstruct(H * Z.view((1, -1) + (1,) * (H.dim() - 2)), W)

    def _vshape(self):
        if self.W is None or self.H is None:
            raise ValueError("fit needs both W and H on the module")
        Hs, Ws = tuple(self.H.shape), tuple(self.W.shape)
        return (Hs[0], Ws[0]) + tuple(h + k - 1 for h, k in zip(Hs[2:], Ws[2:]))

    def fit(self, V, tol: float = 1e-4, max_iter: int = 200, verbose: bool = False,
            W_alpha: float = 1, H_alpha: float = 1, Z_alpha: float = 1,
            *, history: Optional[History] = None) -> Tuple[int, Tensor]:
        r"""Fit by EM, maximising the (penalised) likelihood of ``V / ΣV`` under the model.

        The E- and M-steps combine into, for every trainable factor X in {W, H, Z},
        ``X ← normalise(max(X ∘ ∂/∂X Σ V log V̂ + α_X - 1, ε))``: the prior acts on the
        expected counts of ``V / ΣV`` as in pytorch-NMF 0.3.5, and entries a prior with
        α < 1 pushes below 0 are floored at ε (float32's machine epsilon, 0.3.5's floor)
        rather than zeroed, so no factor or component is lost for good. The arguments keep
        0.3.5's positional order.

        Parameters
        ----------
        V : Tensor or array, shape of :meth:`forward`'s output
            Non-negative, not all zero; never modified.
        tol : float, default 1e-4
            Stop when the KL divergence changes by at most ``tol`` per iteration relative to
            its current value (the rule of :mod:`torchnmf.engine`; 0 runs ``max_iter``).
        max_iter : int, default 200
        verbose : bool, default False
            Progress bar.
        W_alpha, H_alpha, Z_alpha : float or Tensor, default 1
            Dirichlet prior concentrations (1: none); a tensor (positive entries) is
            broadcast to its factor.
        history : History, optional
            Receives the objective minimised, before the first and after every iteration:
            ``KL(V/ΣV ‖ V̂)`` without priors, else the negative log posterior up to a
            constant, ``KL(V/ΣV ‖ V̂) - Σ_X Σ (α_X - 1) log X``.

        Returns
        -------
        n_iter : int
        norm : Tensor, shape ()
            ``ΣV``; ``norm * self()`` approximates V.
        """
        data.check_positive(tol, "tol", allow_zero=True)
        data.check_int(max_iter, "max_iter", low=1)
        alphas = {n: _check_alpha(a, getattr(self, n), f"{n}_alpha")
                  for n, a in (("W", W_alpha), ("H", H_alpha), ("Z", Z_alpha))}
        shape = self._vshape()
        V = data.as_tensor(V, "V", ndim=len(shape), sparse="dense")
        data.check_nonnegative(V, "V")
        data.check_shape(V, shape, "V")
        V = V.to(device=self.W.device, dtype=self.W.dtype)
        norm = V.sum()
        if not norm > 0:
            raise ValueError("V must have a positive sum")
        Vn = V / norm
        params = {n: getattr(self, n) for n in ("W", "H", "Z")}
        train = {n: p for n, p in params.items() if p is not None and p.requires_grad}
        names = list(train)
        priors = [n for n in names if not _flat(alphas[n])]
        own = history is None
        if own:
            history = History(verbose=verbose, total=max_iter, desc=f"{type(self).__name__}.fit",
                              name="kl" if not priors else "neg_log_posterior")
        # floor of the prediction where it underflows: small, yet 1/floor sums stay finite
        tiny = torch.finfo(V.dtype).tiny ** 0.5
        pending = {}

        def step(i, measure):
            with torch.enable_grad():
                pending["pred"] = pred = self()
            with torch.no_grad():
                value = kl_div(pred.clamp_min(tiny), Vn)
                for n in priors:  # the Dirichlet log densities the updates maximise too
                    value = value - ((alphas[n] - 1) * torch.log(train[n].clamp_min(PRIOR_FLOOR))).sum()
                return float(value)

        def commit():
            pred = pending.pop("pred")
            ratio = Vn / pred.detach().clamp_min(tiny)
            grads = torch.autograd.grad(pred, [train[n] for n in names], ratio)
            with torch.no_grad():
                for n, g in zip(names, grads):
                    p = train[n]
                    new = p * g
                    if n in priors:
                        new = (new + (alphas[n] - 1)).clamp_min_(PRIOR_FLOOR)
                    dims = self._other_dims(p) if n != "Z" else (0,)
                    p.copy_(_normalize(new, dims))

        try:
            n_iter = engine.run(step, commit=commit, max_iter=max_iter if train else 0, tol=tol, history=history,
                                model=f"{type(self).__name__}.fit", dtype=V.dtype, warn=bool(train)).n_iter
        finally:
            if own:
                history.close()
        return n_iter, norm


#: floor of factor entries under a Dirichlet prior with alpha < 1 (pytorch-NMF 0.3.5's eps)
PRIOR_FLOOR = float(torch.finfo(torch.float32).eps)


def _check_alpha(alpha, factor: Optional[Tensor], name: str):
    """A positive float, or a positive tensor broadcastable to ``factor`` (copied)."""
    if not isinstance(alpha, Tensor):
        return data.check_positive(alpha, name)
    a = data.as_tensor(alpha, name, float_only=False, sparse="dense")
    if not bool(torch.isfinite(a).all()) or not bool((a > 0).all()):
        raise ValueError(f"{name} must have finite positive entries")
    if factor is not None:
        try:
            torch.broadcast_shapes(a.shape, factor.shape)
        except RuntimeError:
            raise ValueError(f"{name} of shape {tuple(a.shape)} does not broadcast to the factor's "
                             f"{tuple(factor.shape)}") from None
        a = a.to(device=factor.device, dtype=factor.dtype)
    return a.detach().clone()


def _flat(alpha) -> bool:
    """Whether a prior concentration is 1 everywhere (no prior)."""
    return bool((alpha == 1).all()) if isinstance(alpha, Tensor) else alpha == 1


class PLCA(BaseComponent):
    """PLCA, ``V (N, C) / ΣV ≈ H diag(Z) Wᵀ`` with W (C, R), H (N, R) columns summing to one.

    Parameters
    ----------
    Vshape : (int, int), optional
    rank : int, optional
        Default (with ``Vshape`` and no W/H/Z tensor): C, as in pytorch-NMF 0.3.5.
    **kwargs
        :class:`BaseComponent` arguments.
    """

    def __init__(self, Vshape: Optional[Sequence[int]] = None, rank: Optional[int] = None, **kwargs):
        if Vshape is not None:
            N, C = _check_vshape(Vshape, 2)
            rank = _default_rank(rank, kwargs, C)
            kwargs.setdefault("W", (C, rank))
            kwargs.setdefault("H", (N, rank))
        super().__init__(rank, **kwargs)


class SIPLCA(BaseComponent):
    """Shift-invariant PLCA: V (N, C, L), W (C, R, T), H (N, R, L - T + 1) (as :class:`torchnmf.NMFD`).

    Parameters
    ----------
    Vshape : (int, int, int), optional
    rank : int, optional
        Default (with ``Vshape`` and no W/H/Z tensor): C, as in pytorch-NMF 0.3.5.
    T : int, default 1
    **kwargs
    """

    _nmf = NMFD
    _conv_dims = 1

    def __init__(self, Vshape: Optional[Sequence[int]] = None, rank: Optional[int] = None, T: int = 1, **kwargs):
        (T,) = _tuple(T, 1, "T")
        if Vshape is not None:
            N, C, L = _check_vshape(Vshape, 3)
            if T > L:
                raise ValueError(f"T={T} is longer than V (L={L})")
            rank = _default_rank(rank, kwargs, C)
            kwargs.setdefault("W", (C, rank, T))
            kwargs.setdefault("H", (N, rank, L - T + 1))
        super().__init__(rank, **kwargs)


class SIPLCA2(BaseComponent):
    """2-D shift-invariant PLCA (as :class:`torchnmf.NMF2D`).

    Parameters
    ----------
    Vshape : tuple of 4 ints, optional
    rank : int, optional
        Default (with ``Vshape`` and no W/H/Z tensor): V's size in dim 2, as in pytorch-NMF 0.3.5.
    kernel_size : int or (int, int), default 1
    **kwargs
    """

    _nmf = NMF2D
    _conv_dims = 2

    def __init__(self, Vshape: Optional[Sequence[int]] = None, rank: Optional[int] = None, kernel_size=1, **kwargs):
        ks = _tuple(kernel_size, 2, "kernel_size")
        if Vshape is not None:
            N, C, *L = _check_vshape(Vshape, 4)
            if any(k > l for k, l in zip(ks, L)):
                raise ValueError(f"kernel_size {ks} is larger than V's {tuple(L)}")
            rank = _default_rank(rank, kwargs, L[-2])
            kwargs.setdefault("W", (C, rank) + ks)
            kwargs.setdefault("H", (N, rank) + tuple(l - k + 1 for l, k in zip(L, ks)))
        super().__init__(rank, **kwargs)


class SIPLCA3(BaseComponent):
    """3-D shift-invariant PLCA (as :class:`torchnmf.NMF3D`).

    Parameters
    ----------
    Vshape : tuple of 5 ints, optional
    rank : int, optional
        Default (with ``Vshape`` and no W/H/Z tensor): V's size in dim 3, as in pytorch-NMF 0.3.5.
    kernel_size : int or (int, int, int), default 1
    **kwargs
    """

    _nmf = NMF3D
    _conv_dims = 3

    def __init__(self, Vshape: Optional[Sequence[int]] = None, rank: Optional[int] = None, kernel_size=1, **kwargs):
        ks = _tuple(kernel_size, 3, "kernel_size")
        if Vshape is not None:
            N, C, *L = _check_vshape(Vshape, 5)
            if any(k > l for k, l in zip(ks, L)):
                raise ValueError(f"kernel_size {ks} is larger than V's {tuple(L)}")
            rank = _default_rank(rank, kwargs, L[-2])
            kwargs.setdefault("W", (C, rank) + ks)
            kwargs.setdefault("H", (N, rank) + tuple(l - k + 1 for l, k in zip(L, ks)))
        super().__init__(rank, **kwargs)
