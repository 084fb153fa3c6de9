"""Deterministic NMF layers: :class:`NMF` and its convolutional forms.

Every layer is an :class:`torch.nn.Module` whose ``forward(H=None, W=None)`` returns the
reconstruction, with the rank in dim 1 of both factors (the convolution layout):

=========  ====================  ==================  =============================
layer      V                     W                   H
=========  ====================  ==================  =============================
NMF        (N, C)                (C, R)              (N, R)
NMFD       (N, C, L)             (C, R, T)           (N, R, L - T + 1)
NMF2D      (N, C, L1, L2)        (C, R, K1, K2)      (N, R, L1 - K1 + 1, L2 - K2 + 1)
NMF3D      (N, C, L1, L2, L3)    (C, R, K1, K2, K3)  (N, R, L1 - K1 + 1, ...)
=========  ====================  ==================  =============================

The convolutional forms use full padding with flipped kernels,
``V[n, c, l] = Σ_r Σ_t W[c, r, t] H[n, r, l - t]``, so H is shorter than V
(``NMFD(..., same_length=True)`` keeps H as long as V instead).

W and H are positive parameters (:mod:`torchnmf.constraints`) in any mode; layers chain in
:class:`torch.nn.Sequential` (``NMF(W=...)`` called on the previous output uses it as H).
"""
from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _matchain, data, row_pass
from ._csr import to_csr
from .constraints import MODES, assign_, positive, value_of
from .history import History
from .metrics import beta_div
from . import engine
from .engine import STOP_RULES, FitResult
from .updates import EPSILON, mu_apply, mu_statistics, mu_update

__all__ = ["BaseComponent", "NMF", "NMFD", "NMF2D", "NMF3D"]

Shape = Union[int, Sequence[int]]
FactorArg = Union[None, Tensor, np.ndarray, Sequence[int], Sequence[Sequence[float]]]


def _tuple(value: Shape, n: int, name: str) -> Tuple[int, ...]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (int(value),) * n
    value = tuple(value)
    if len(value) != n or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in value):
        raise ValueError(f"{name} must be a positive int or a tuple of {n} positive ints, got {value!r}")
    return tuple(int(v) for v in value)


def _check_vshape(Vshape, ndim: int) -> Tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in Vshape)
    except TypeError:
        raise TypeError(f"Vshape must be a sequence of {ndim} ints, got {Vshape!r}") from None
    if len(shape) != ndim or any(s <= 0 for s in shape):
        raise ValueError(f"Vshape must hold {ndim} positive sizes, got {tuple(Vshape)}")
    return shape


def _is_shape(value) -> bool:
    """A flat tuple, list or ``torch.Size`` (of ints, else refused as a shape) is a shape, as in
    pytorch-NMF 0.3.5; arrays and nested sequences are values."""
    return isinstance(value, (tuple, list, torch.Size)) and all(isinstance(s, numbers.Number) for s in value)


def _factor_values(value, name: str, fdim: int) -> Optional[Tensor]:
    """The checked values of a factor given as a tensor, array, DataFrame, scipy matrix or nested
    sequence; ``None`` when ``value`` is a shape (or not array-like)."""
    if value is None or _is_shape(value) or not (
            isinstance(value, (Tensor, np.ndarray, tuple, list)) or hasattr(value, "__array__")
            or hasattr(value, "tocoo")):
        return None
    T = data.as_tensor(value, name, sparse="dense")  # numeric, real, floating (tensors), native dtype
    if T.dim() != fdim:
        raise ValueError(f"{name} must have {fdim} dimensions, got shape {tuple(T.shape)}")
    if 0 in T.shape:
        raise ValueError(f"{name} has shape {tuple(T.shape)}: every dimension of a factor must be at least 1 "
                         "(a rank-0 or empty factor has nothing to fit)")
    data.check_nonnegative(T, name)
    return T


class BaseComponent(nn.Module):
    r"""Base of the NMF layers: owns the non-negative factors W and H.

    Parameters
    ----------
    rank : int, optional
        Number of components R; inferred from W or H when given as tensors.
    W, H : Tensor, array-like or sequence of int, optional
        The factors, rank in dim 1. A tensor (or numpy array, DataFrame, scipy matrix, nested
        list) holds the values: it is copied, kept in its own dtype (numpy float64 stays
        float64) and checked non-negative and non-empty; a tuple, list or ``torch.Size`` of
        ints is a shape and gives a uniform random initialisation in the default dtype;
        ``None`` leaves the factor to be passed to :meth:`forward`.
    trainable_W, trainable_H : bool, default True
        ``False`` fixes the factor (``requires_grad=False``): no trainer changes it.
    mode : {'multiplicative', 'softplus', 'exp', 'projected'}, default 'multiplicative'
        Positivity mode of both factors (see :mod:`torchnmf.constraints`).
    W_mode, H_mode : str, optional
        Per-factor mode, overriding ``mode``.

    Attributes
    ----------
    W, H : Tensor or None
        The constrained (non-negative) values.
    rank : int or None
    """

    #: number of trailing "convolution" dims of the factors (0 for plain NMF)
    _conv_dims = 0

    def __init__(self, rank: Optional[int] = None, W: FactorArg = None, H: FactorArg = None,
                 trainable_W: bool = True, trainable_H: bool = True, *, mode: str = "multiplicative",
                 W_mode: Optional[str] = None, H_mode: Optional[str] = None):
        super().__init__()
        data.check_option(mode, MODES, "mode")
        if rank is not None:
            rank = data.check_rank(rank)
        fdim = 2 + self._conv_dims
        inferred = rank
        for name, value, trainable, fmode in (("W", W, trainable_W, W_mode or mode), ("H", H, trainable_H, H_mode or mode)):
            data.check_option(fmode, MODES, f"{name}_mode")
            if value is None:
                self.register_parameter(name, None)
                continue
            values = _factor_values(value, name, fdim)
            if values is not None:
                init = values.detach().clone()
            elif isinstance(value, Iterable):
                shape = tuple(value)
                if len(shape) != fdim or not all(isinstance(s, numbers.Integral) and s > 0 for s in shape):
                    raise ValueError(f"{name} shape must be {fdim} positive ints, got {shape!r}")
                init = torch.rand(*shape)
            else:
                raise TypeError(f"{name} must be a tensor, an array, a shape or None, got {type(value).__name__}")
            r = init.shape[1]
            if inferred is not None and r != inferred:
                raise ValueError(f"{name} has rank {r} in dim 1, expected rank={inferred}")
            inferred = r
            setattr(self, name, init)
            positive(self, name, fmode, requires_grad=bool(trainable))
        if inferred is None:  # refused by pytorch-NMF 0.3.5 too
            raise ValueError("a rank is needed when neither W nor H is given: pass rank=, W= or H=")
        self.rank = inferred

    # -- reconstruction ----------------------------------------------------------
    @staticmethod
    def reconstruct(H: Tensor, W: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The reconstruction from H and W (rank in dim 1 of both); defined by each layer."""
        raise NotImplementedError

    def forward(self, H: Optional[Tensor] = None, W: Optional[Tensor] = None) -> Tensor:
        """The reconstruction from ``H`` and ``W``, each defaulting to the module's own.

        Parameters
        ----------
        H : Tensor, optional
            Activations, rank in dim 1 (e.g. the output of a previous layer).
        W : Tensor, optional
            Templates, rank in dim 1.

        Returns
        -------
        Tensor
            The reconstruction V.
        """
        if H is None:
            H = self.H
        if W is None:
            W = self.W
        if H is None or W is None:
            raise ValueError(f"{'H' if H is None else 'W'} was not given and the module has none")
        return self.reconstruct(H, W)

    def _raw(self, name: str) -> Optional[Tensor]:
        """The raw parameter behind ``name`` (itself for identity modes)."""
        if hasattr(self, "parametrizations") and name in self.parametrizations:
            return getattr(self.parametrizations, name).original
        return getattr(self, name)

    def expected_vshape(self) -> Tuple[int, ...]:
        """Shape of ``forward()`` from the module's own factors."""
        if self.W is None or self.H is None:
            raise ValueError("the module needs both W and H to be fitted on its own; this one lacks "
                             + ("W" if self.W is None else "H"))
        return tuple(self._vshape(tuple(self.H.shape), tuple(self.W.shape)))

    @staticmethod
    def _vshape(Hs, Ws):
        return (Hs[0], Ws[0]) + tuple(h + k - 1 for h, k in zip(Hs[2:], Ws[2:]))

    # -- fitting -----------------------------------------------------------------
    def _check_V(self, V, name="V", sparse_ok=False):
        shape = self.expected_vshape()
        ref = self.W if self.W is not None else self.H
        V = data.as_tensor(V, name, ndim=len(shape), sparse="keep" if sparse_ok else "dense")
        data.check_nonnegative(V, name)
        data.check_shape(V, shape, name)
        data.check_magnitude(V, name, ref.dtype)
        if V.dtype != ref.dtype or V.device != ref.device:
            V = V.to(device=ref.device, dtype=ref.dtype)
        return V

    @staticmethod
    def _check_fit_args(beta, tol, max_iter, alpha, l1_ratio):
        data.check_beta(beta)
        data.check_positive(tol, "tol", allow_zero=True)
        data.check_int(max_iter, "max_iter", low=1)
        data.check_positive(alpha, "alpha", allow_zero=True)
        data.check_real(l1_ratio, "l1_ratio", 0, 1)

    def fit(self, V, beta: float = 1, tol: float = 1e-5, max_iter: int = 2000, verbose: bool = False,
            alpha: float = 0, l1_ratio: float = 0, *, mask=None, history: Optional[History] = None,
            check_every: Optional[int] = None, stop_rule: str = "relative") -> int:
        r"""Fit the trainable factors to ``V`` by beta-divergence multiplicative updates.

        Minimises :math:`d_\beta(V \| \hat V) + \ell_1 (\Sigma W + \Sigma H) +
        \tfrac{\ell_2}{2}(\|W\|^2 + \|H\|^2)` with ``l1 = alpha * l1_ratio`` and
        ``l2 = alpha * (1 - l1_ratio)`` (not rescaled by the data size, unlike
        scikit-learn). Each iteration updates H then W (scikit-learn's order in its
        transposed layout), each with the exponent that makes the update monotone.
        A factor with ``requires_grad=False`` stays fixed: with a fixed W this fits H for
        new data (see also :meth:`NMF.transform`). Works for every positivity mode.

        Parameters
        ----------
        V : Tensor or array, shape of :meth:`forward`'s output
            Non-negative target (``NMF`` also takes a torch sparse COO/CSR V, never densified).
            Converted to the module's dtype and device; never modified.
        beta : float, default 1
            Beta-divergence (2 Euclidean, 1 KL, 0 Itakura-Saito).
        tol : float, default 1e-5
            Stop when the change of the divergence per iteration, relative to its current
            value, is at most ``tol`` (see :mod:`torchnmf.engine`); 0 runs ``max_iter``
            iterations. Reaching ``max_iter`` with ``tol > 0`` warns with
            :class:`~torchnmf.engine.ConvergenceWarning`. The same defaults as
            :class:`~torchnmf.estimators.BetaNMF`'s (the same updates); every fit's defaults
            are compared in :ref:`default-tolerances`.
        max_iter : int, default 2000
            Enough for typical data to meet the default ``tol`` (scikit-learn's digits at
            KL: 960 iterations), so the warning marks a fit that really did not converge.
        verbose : bool, default False
            Show a progress bar with the current divergence.
        alpha, l1_ratio : float, default 0
            Regularisation strength and its L1 share.
        mask : Tensor, same shape as V, optional
            1/True for observed entries, 0 for missing ones (which do not count).
        history : History, optional
            Receives the divergence before the first iteration, after every
            ``check_every``-th one and after the last; may be used to stop the fit from
            another thread.
        check_every : int, optional
            Measure the divergence (for ``tol``, ``history`` and the progress bar) every
            this many iterations. Default 1, except 10 for :class:`NMF` with beta != 2,
            where measuring costs a pass of logarithms/powers over V (scikit-learn
            also checks every 10 iterations); with beta = 2 it is free (Gram form).
        stop_rule : {'relative', 'sklearn'}, default 'relative'
            ``'sklearn'``: scikit-learn's rule, the decrease between two measurements
            relative to the initial divergence below ``tol``.

        Returns
        -------
        int
            Number of iterations done.
        """
        self._check_fit_args(beta, tol, max_iter, alpha, l1_ratio)
        data.check_option(stop_rule, STOP_RULES, "stop_rule")
        V = self._check_V(V, sparse_ok=self._plain())
        data.check_magnitude(V, "V", V.dtype, beta=beta)  # Σ x² overflows float32 long before Σ x log x
        M = data.check_mask(mask, V.shape, device=V.device, dtype=V.dtype)
        self._check_beta_support(V, beta)
        l1, l2 = float(alpha * l1_ratio), float(alpha * (1 - l1_ratio))
        if check_every is None:
            check_every = 10 if (self._plain() and beta != 2) else 1
        else:
            check_every = data.check_rank(check_every, "check_every")
        own = history is None
        if own:
            history = History(verbose=verbose, total=max_iter, desc=f"{type(self).__name__}.fit", name="beta-divergence")
        try:
            run = self._fit_mu if self._plain() else self._fit_trainer
            return run(V, M, float(beta), tol, max_iter, l1, l2, history, int(check_every), stop_rule).n_iter
        finally:
            if own:
                history.close()

    @staticmethod
    def _check_beta_support(V, beta) -> None:
        if beta <= 0 and (data.is_sparse(V) or bool((V == 0).any())):
            raise ValueError("V must be strictly positive for beta <= 0 (the divergence is infinite at zeros)")

    def _plain(self) -> bool:
        return self._conv_dims == 0 and isinstance(self, NMF)

    def _fit_mu(self, V, M, beta, tol, max_iter, l1, l2, history, check_every, stop_rule="relative", *,
                reduce: Optional[Callable] = None, agree: Optional[Callable] = None, checkpoint=None,
                model: Optional[str] = None) -> FitResult:
        """Multiplicative updates of a plain NMF through the fit engine.

        ``reduce`` sums a dict of statistics over processes (the data-parallel fit of
        :func:`torchnmf.parallel.fit_nmf`: rows of V and H are local, W is shared);
        ``agree`` combines stop decisions; ``checkpoint`` saves W, H and the records and,
        when it holds a checkpoint, resumes from it.
        """
        rawW, rawH = self._raw("W"), self._raw("H")
        train_W, train_H = rawW.requires_grad, rawH.requires_grad
        cur = {"W": value_of(rawW).detach().clone(), "H": value_of(rawH).detach().clone()}

        def restore(state):
            for name in ("W", "H"):
                if tuple(state[name].shape) != tuple(cur[name].shape):
                    raise ValueError(f"the checkpoint holds {name} {tuple(state[name].shape)}, "
                                     f"the model {tuple(cur[name].shape)}")
                cur[name] = state[name].to(device=cur[name].device, dtype=cur[name].dtype)

        start = engine.resume(checkpoint, history, restore, map_location=cur["W"].device)
        Vt = V.t()
        if data.is_sparse(V):  # transpose once, not at every W update (CSC -> CSR: one sort)
            Vt = to_csr(V.t())
        Mt = None if M is None else M.t()
        cacheV, cacheT = {}, {}
        tiny = torch.finfo(torch.float64).eps

        def update(X, A, B, mask, cache, measure):
            """B's update for X ≈ B Aᵀ (and the divergence before it), statistics summed by ``reduce``."""
            if reduce is None:
                out = mu_update(X, A, B, beta=beta, l1=l1, l2=l2, mask=mask, with_loss=measure, cache=cache)
                return out if measure else (out, None)
            num, den, loss = mu_statistics(X, A, B, beta, mask, with_loss=measure, cache=cache)
            stats = reduce({"num": num, "den": den, **({"loss": loss} if measure else {})})
            return mu_apply(B, stats["num"], stats["den"], beta, l1, l2), stats.get("loss")

        def h_update(measure):
            """H's update, local to a process: only the divergence is summed."""
            if reduce is None:
                return update(V, cur["W"], cur["H"], M, cacheV, measure)
            num, den, loss = mu_statistics(V, cur["W"], cur["H"], beta, M, with_loss=measure, cache=cacheV)
            loss = reduce({"loss": loss})["loss"] if measure else None
            return mu_apply(cur["H"], num, den, beta, l1, l2), loss

        pending = {}
        # both factors of a dense CPU V: one pass over V's row blocks per iteration (row_pass)
        one_pass = reduce is None and train_H and train_W and row_pass.supports(V, M, beta)
        cacheP = {}

        def step(i, measure):
            if one_pass:
                pending["H"], pending["W"], loss = row_pass.mu_iteration(
                    V, cur["W"], cur["H"], beta, l1, l2, with_loss=measure, cache=cacheP,
                    zero_below=tiny if beta < 1 else None)
                return None if loss is None else float(loss)
            # the first half-update of an iteration also measures the point it starts from
            if train_H:
                pending["H"], loss = h_update(measure)
            else:
                pending["W"], loss = update(Vt, cur["H"], cur["W"], Mt, cacheT, measure)
            return None if loss is None else float(loss)

        def commit():
            if one_pass:
                cur["H"], cur["W"] = pending.pop("H"), pending.pop("W")
                return
            if train_H:
                cur["H"] = pending.pop("H")
                if beta < 1:  # as scikit-learn, for stability
                    cur["H"].masked_fill_(cur["H"] < tiny, 0.0)
                if train_W:
                    cur["W"] = update(Vt, cur["H"], cur["W"], Mt, cacheT, False)[0]
            else:
                cur["W"] = pending.pop("W")
            if beta < 1 and train_W:
                cur["W"].masked_fill_(cur["W"] < tiny, 0.0)

        try:
            trains = train_H or train_W  # nothing to train: measure the start and return 0
            return engine.run(step, commit=commit if trains else (lambda: None), start=start,
                              max_iter=max_iter if trains else 0, tol=tol, history=history,
                              model=model or f"{type(self).__name__}.fit", check_every=check_every,
                              dtype=cur["W"].dtype, rule=stop_rule, checkpoint=checkpoint, agree=agree,
                              state=lambda: dict(cur), warn=trains)
        finally:
            if train_W:
                assign_(rawW, cur["W"])
            if train_H:
                assign_(rawH, cur["H"])

    def _fit_trainer(self, V, M, beta, tol, max_iter, l1, l2, history, check_every, stop_rule="relative") -> FitResult:
        from .trainer.beta_mu import BetaMu  # trainers import layers' modules lazily, not vice versa

        params = [p for p in (self._raw("W"), self._raw("H")) if p is not None and p.requires_grad]
        trainer = BetaMu(params, beta=beta, l1_reg=l1, l2_reg=l2) if params else None

        def closure():
            return (V, self()) if M is None else (V, self(), M)

        def step(i, measure):
            # the objective of the current point, then (unless the engine stops here) an update
            with torch.no_grad():
                return float(_divergence(self(), V, M, beta)) if measure else None

        try:
            return engine.run(step, commit=(lambda: trainer.step(closure)) if params else (lambda: None),
                              max_iter=max_iter if params else 0, tol=tol, history=history,
                              model=f"{type(self).__name__}.fit", check_every=check_every, dtype=V.dtype,
                              rule=stop_rule, warn=bool(params))
        finally:
            for p in params:
                p.grad = None

    def sparse_fit(self, V, beta: float = 2, max_iter: int = 200, verbose: bool = False,
                   sW: Optional[float] = None, sH: Optional[float] = None, *, history: Optional[History] = None) -> int:
        """Fit with Hoyer (2004) sparseness constraints on W and/or H.

        A constrained factor takes projected gradient steps (:class:`torchnmf.trainer.SparsityProj`,
        each component — a slice along dim 1 — projected to Hoyer sparseness ``sW``/``sH``);
        an unconstrained one takes multiplicative updates (:class:`torchnmf.trainer.BetaMu`).

        Parameters
        ----------
        V : Tensor or array
            Non-negative target, shape of :meth:`forward`'s output; never modified.
        beta : float, default 2
        max_iter : int, default 200
        verbose : bool, default False
        sW, sH : float in [0, 1], optional
            Target sparseness of each component of W / H; ``None`` leaves it free.
        history : History, optional
            Receives the divergence after each iteration.

        Returns
        -------
        int
            Number of iterations done.
        """
        from .trainer.beta_mu import BetaMu
        from .trainer.sparsity import SparsityProj

        self._check_fit_args(beta, 0, max_iter, 0, 0)
        for name, s in (("sW", sW), ("sH", sH)):
            if s is not None:
                data.check_real(s, name, 0, 1)
        V = self._check_V(V)
        beta = float(beta)
        own = history is None
        if own:
            history = History(verbose=verbose, total=max_iter, desc=f"{type(self).__name__}.sparse_fit", name="beta-divergence")
        steps = []
        for name, s in (("H", sH), ("W", sW)):
            p = self._raw(name)
            if p is None or not p.requires_grad:
                continue
            if s is None:
                steps.append((BetaMu([p], beta=beta), lambda: (V, self())))
            else:
                steps.append((SparsityProj([p], sparsity=s, dim=1), lambda: beta_div(self(), V, beta)))
        def step(i, measure):
            for trainer, closure in steps:
                trainer.step(closure)
            with torch.no_grad():
                return float(_divergence(self(), V, None, beta))

        try:
            # no tolerance: Hoyer's projected steps run max_iter iterations (records after each)
            return engine.run(step, max_iter=max_iter, tol=0.0, history=history, dtype=V.dtype,
                              model=f"{type(self).__name__}.sparse_fit").n_iter
        finally:
            if own:
                history.close()
            for p in self.parameters():
                p.grad = None


def _divergence(pred: Tensor, V: Tensor, M: Optional[Tensor], beta: float) -> Tensor:
    """Beta-divergence over the observed entries (``M == 1``), prediction floored as in the updates."""
    if beta < 2:
        pred = pred.clamp_min(EPSILON)
    if M is not None:
        keep = M != 0
        pred, V = pred[keep], V[keep]
    return beta_div(pred, V, beta)


class NMF(BaseComponent):
    r"""Non-negative matrix factorization, ``V (N, C) ≈ H Wᵀ``.

    Parameters
    ----------
    Vshape : (int, int), optional
        ``(N, C)``: random W of shape (C, R) and H of shape (N, R).
    rank : int, optional
        R; with ``Vshape`` and no W/H tensor it defaults to C, as in pytorch-NMF 0.3.5.
    **kwargs
        :class:`BaseComponent` arguments; ``W=``/``H=`` override the random factors.

    Examples
    --------
    >>> import torch
    >>> from torchnmf import NMF
    >>> V = torch.rand(20, 30)
    >>> m = NMF(V.shape, rank=4)
    >>> n_iter = m.fit(V)
    >>> m().shape
    torch.Size([20, 30])
    """

    def __init__(self, Vshape: Optional[Sequence[int]] = None, rank: Optional[int] = None, **kwargs):
        if Vshape is not None:
            N, C = _check_vshape(Vshape, 2)
            rank = _default_rank(rank, kwargs, C)
            kwargs.setdefault("W", (C, rank))
            kwargs.setdefault("H", (N, rank))
        super().__init__(rank, **kwargs)

    @staticmethod
    def reconstruct(H: Tensor, W: Tensor) -> Tensor:
        """``H Wᵀ``: (…, R) × (C, R) → (…, C).

        When ``H`` is the output of other NMF layers (a chain ``H₁ W₁ᵀ … Wₖᵀ``), the product
        is contracted from all the chain's factors in the order opt_einsum plans, when that
        is cheaper than multiplying ``H`` itself (see :mod:`torchnmf._matchain`).
        """
        return _matchain.linear(H, W)

    @staticmethod
    def _vshape(Hs, Ws):
        return (Hs[0], Ws[0])

    def transform(self, V, beta: float = 1, tol: float = 1e-4, max_iter: int = 200, verbose: bool = False,
                  alpha: float = 0, l1_ratio: float = 0, *, mask=None, H: Optional[Tensor] = None) -> Tensor:
        """Activations of new data ``V (N', C)`` with this module's W held fixed.

        Builds a fresh ``NMF`` sharing nothing with this one (W copied and fixed, H random
        or ``H``) and fits its H; this module is not changed.

        Parameters
        ----------
        V : Tensor or array, shape (N', C)
        beta, tol, max_iter, verbose, alpha, l1_ratio, mask
            As in :meth:`fit`.
        H : Tensor, shape (N', R), optional
            Initial activations.

        Returns
        -------
        Tensor, shape (N', R)
        """
        if self.W is None:
            raise ValueError("transform needs the module's W")
        Vt = data.as_tensor(V, "V", ndim=2)
        if Vt.shape[1] != self.W.shape[0]:
            raise ValueError(f"V has {Vt.shape[1]} columns, expected {self.W.shape[0]} (W's rows)")
        W = value_of(self._raw("W")).detach()
        H0 = (torch.rand(Vt.shape[0], W.shape[1], dtype=W.dtype, device=W.device) if H is None else H)
        sub = NMF(W=W, H=H0, trainable_W=False)
        sub.fit(Vt, beta=beta, tol=tol, max_iter=max_iter, verbose=verbose, alpha=alpha, l1_ratio=l1_ratio, mask=mask)
        return sub.H.detach()


def _rank_from(kwargs) -> Optional[int]:
    for name in ("W", "H"):
        v = kwargs.get(name)
        if v is not None and not _is_shape(v) and len(np.shape(v)) > 1:  # values (tensor, array, ...)
            return int(np.shape(v)[1])
    Z = kwargs.get("Z")  # PLCA's component weights
    if isinstance(Z, Tensor) and Z.dim() == 1:
        return Z.shape[0]
    return None


def _default_rank(rank, kwargs, default: int) -> int:
    """``rank``, else the rank of a W/H tensor in ``kwargs``, else ``default`` (pytorch-NMF 0.3.5's choice)."""
    if rank is None:
        rank = _rank_from(kwargs)
    return data.check_rank(default if rank is None else rank)


class NMFD(BaseComponent):
    r"""Non-negative matrix factor deconvolution, ``V[n,c,l] = Σ_{r,t} W[c,r,t] H[n,r,l-t]``.

    Parameters
    ----------
    Vshape : (int, int, int), optional
        ``(N, C, L)``: random W (C, R, T) and H (N, R, L - T + 1) (or (N, R, L) with
        ``same_length``).
    rank : int, optional
        Default (with ``Vshape`` and no W/H tensor): C, as in pytorch-NMF 0.3.5.
    T : int, default 1
        Template length.
    same_length : bool, default False
        H as long as V; the reconstruction keeps the first L frames of the full
        convolution (a causal convolution: H[l] starts a template at frame l).
    **kwargs
        :class:`BaseComponent` arguments.
    """

    _conv_dims = 1

    def __init__(self, Vshape: Optional[Sequence[int]] = None, rank: Optional[int] = None, T: int = 1,
                 same_length: bool = False, **kwargs):
        (T,) = _tuple(T, 1, "T")
        if Vshape is not None:
            N, C, L = _check_vshape(Vshape, 3)
            if T > L and not same_length:
                raise ValueError(f"T={T} is longer than V (L={L})")
            rank = _default_rank(rank, kwargs, C)
            kwargs.setdefault("W", (C, rank, T))
            kwargs.setdefault("H", (N, rank, L if same_length else L - T + 1))
        super().__init__(rank, **kwargs)
        self.same_length = bool(same_length)

    @staticmethod
    def reconstruct(H: Tensor, W: Tensor) -> Tensor:
        """Full convolution of H (N, R, L') with flipped W (C, R, T) → (N, C, L' + T - 1)."""
        return F.conv1d(H, W.flip(-1), padding=W.shape[-1] - 1)

    def forward(self, H: Optional[Tensor] = None, W: Optional[Tensor] = None) -> Tensor:
        """The reconstruction (N, C, L); with ``same_length`` the first L frames of the full one."""
        out = super().forward(H, W)
        if self.same_length:
            out = out[..., : (H if H is not None else self.H).shape[-1]]
        return out

    def _vshape(self, Hs, Ws):
        L = Hs[2] if self.same_length else Hs[2] + Ws[2] - 1
        return (Hs[0], Ws[0], L)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, same_length={self.same_length}"


def _conv_defaults(Vshape, rank, ks: Tuple[int, ...], kwargs: dict) -> Optional[int]:
    """Default W ``(C, R, *ks)`` and H ``(N, R, *(L - ks + 1))`` shapes from ``Vshape`` into ``kwargs``."""
    if Vshape is None:
        return rank
    N, C, *L = _check_vshape(Vshape, len(ks) + 2)
    if any(k > l for k, l in zip(ks, L)):
        raise ValueError(f"kernel_size {ks} is larger than V's {tuple(L)}")
    # pytorch-NMF 0.3.5 defaulted the rank of NMF2D/NMF3D to V's third-to-last size
    rank = _default_rank(rank, kwargs, L[-2])
    kwargs.setdefault("W", (C, rank) + ks)
    kwargs.setdefault("H", (N, rank) + tuple(l - k + 1 for l, k in zip(L, ks)))
    return rank


class NMF2D(BaseComponent):
    r"""2-D convolutional NMF: ``V (N, C, L1, L2)``, W ``(C, R, K1, K2)``, H ``(N, R, L1-K1+1, L2-K2+1)``.

    Parameters
    ----------
    Vshape : tuple of 4 ints, optional
    rank : int, optional
        Default (with ``Vshape`` and no W/H tensor): L1, as in pytorch-NMF 0.3.5.
    kernel_size : int or (int, int), default 1
    **kwargs
        :class:`BaseComponent` arguments.
    """

    _conv_dims = 2

    def __init__(self, Vshape: Optional[Sequence[int]] = None, rank: Optional[int] = None, kernel_size: Shape = 1, **kwargs):
        rank = _conv_defaults(Vshape, rank, _tuple(kernel_size, 2, "kernel_size"), kwargs)
        super().__init__(rank, **kwargs)

    @staticmethod
    def reconstruct(H: Tensor, W: Tensor) -> Tensor:
        """Full 2-D convolution of H (N, R, h1, h2) with flipped W (C, R, K1, K2) → (N, C, h1+K1-1, h2+K2-1)."""
        return F.conv2d(H, W.flip((-2, -1)), padding=(W.shape[-2] - 1, W.shape[-1] - 1))


class NMF3D(BaseComponent):
    r"""3-D convolutional NMF: ``V (N, C, L1, L2, L3)``, W ``(C, R, K1, K2, K3)``, H ``(N, R, L1-K1+1, …)``.

    Parameters
    ----------
    Vshape : tuple of 5 ints, optional
    rank : int, optional
        Default (with ``Vshape`` and no W/H tensor): L2, as in pytorch-NMF 0.3.5.
    kernel_size : int or (int, int, int), default 1
    **kwargs
        :class:`BaseComponent` arguments.
    """

    _conv_dims = 3

    def __init__(self, Vshape: Optional[Sequence[int]] = None, rank: Optional[int] = None, kernel_size: Shape = 1, **kwargs):
        rank = _conv_defaults(Vshape, rank, _tuple(kernel_size, 3, "kernel_size"), kwargs)
        super().__init__(rank, **kwargs)

    @staticmethod
    def reconstruct(H: Tensor, W: Tensor) -> Tensor:
        """Full 3-D convolution of H (N, R, h1, h2, h3) with flipped W (C, R, K1, K2, K3)."""
        return F.conv3d(H, W.flip((-3, -2, -1)), padding=tuple(k - 1 for k in W.shape[-3:]))
