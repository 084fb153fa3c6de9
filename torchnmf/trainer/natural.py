"""Stochastic variational inference (natural-gradient steps) for conjugate layers."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
from torch import nn

from ..data import check_int, check_positive, check_rank, check_real
from ..engine import max_relative_change
from .cavi import Reduce, _ConjugateTrainer, unpack_batch

__all__ = ["NaturalGradient"]


class NaturalGradient(_ConjugateTrainer):
    r"""Stochastic variational inference (Hoffman et al., 2013) over minibatches of rows.

    Each :meth:`step` takes a minibatch of rows from the closure, fits the batch's local
    posterior ``q(U)`` (and its prior rates ``κ``) by ``local_iters`` coordinate steps, then
    moves the global ``q(α)`` in natural parameters towards the estimate the batch implies for
    the full data,

    .. math::

        s^\alpha \leftarrow (1-\rho_t)s^\alpha + \rho_t\,(b + \tfrac{N}{|B|}\textstyle\sum_{c\in B}X_{ct}\phi_{ctk}),
        \quad
        r^\alpha \leftarrow (1-\rho_t)r^\alpha + \rho_t\,(\lambda_t + \tfrac{N}{|B|}\textstyle\sum_{c\in B}\mathbb EU_{ck}),

    which is a natural-gradient step of size :math:`\rho_t` on the ELBO. ``λ`` is then refitted
    by maximum likelihood (if the layer learns it).

    Step size: :math:`\rho_t = \mathrm{lr}\,(t + \tau_0)^{-\kappa}` with ``t`` the number of
    steps already taken and ``lr`` read from the parameter group at each step, so a torch
    learning-rate scheduler multiplies the built-in Robbins-Monro decay; with
    ``forgetting_rate=0`` the scheduler alone sets :math:`\rho_t = \mathrm{lr}`.
    :math:`\rho_t` must lie in (0, 1].

    Parameters
    ----------
    layer : nn.Module or iterable of Tensor
        A conjugate layer such as :class:`torchnmf.poisson.GammaPoisson`, or the parameters
        (or module) of a chain of :class:`~torchnmf.poisson.GammaNMF` / ``NMF`` layers.
    lr : float, default 1.0
        Scale of the step size (see above).
    tau0 : float, default 1.0
        Delay :math:`\tau_0 > 0`; larger values damp the first steps.
    forgetting_rate : float, default 0.7
        :math:`\kappa \in [0, 1]`; (0.5, 1] guarantees convergence.
    local_iters : int, default 10
        Coordinate steps on the batch's ``q(U)`` per step.
    local_tol : float, default 1e-4
        Stop the local steps early when the largest relative change of the batch's
        ``E[U]`` is below it (0 always runs ``local_iters``).
    chunk_size : int, optional
        Bound on the nonzeros processed at once.
    update_hyper : bool, default True
        Refit ``κ`` of the batch rows and ``λ`` (for those the layer learns).
    elbo_every : int, default 1
        Compute the ELBO estimate :meth:`step` returns at every this-many-th step (steps
        ``t`` with ``t % elbo_every == 0``, counted from 0) and return ``None`` at the
        others; 0 never computes it. The estimate costs about as much as the rest of a step
        on wide data (digamma and lgamma of all of ``q(α)`` in float64), so loops that do not
        read it every step should set this (:func:`~torchnmf.parallel.fit_gamma_svi` measures
        once per epoch). ``step(closure, elbo=True/False)`` overrides it for one step.
    reduce : callable, optional
        ``reduce(stats) -> stats`` applied to the batch statistics before the global step
        (sum the layer's ``global_statistics`` over processes for data-parallel SVI).

    Notes
    -----
    The closure returns ``(X_batch, rows)`` (rows of the full data held by ``X_batch``), or
    ``(X_batch, rows, scale)`` to override the default scale ``n_rows / len(rows)``; a bare
    ``X`` is the full matrix (scale 1). With ``rho = 1`` on the full data and
    ``local_iters=1`` a step equals one :class:`CAVI` sweep.

    :meth:`step` returns a noisy estimate of the full-data ELBO from the batch, at the batch's
    local optimum and before the global step (or ``None`` on steps that do not compute it,
    see ``elbo_every``). Whether a step computes it does not change the step of a float64
    layer; a float32 layer computes the batch's ``q(α)`` statistics in float64 on the steps
    that compute the estimate (the ELBO needs that pass in float64) and in float32 on the
    others, so their trajectories differ by float32 rounding.

    For a chain the closure returns ``(X_batch, model(None), rows)`` (or with a 4th ``scale``;
    ``(X, model(None))`` is the full data): the rows of the first factor (``H``) are the local
    factors, fitted by ``local_iters`` coordinate steps; every other trainable factor is
    global and moves by the natural-gradient step above, in chain order (point-mass ``NMF``
    factors move by ``(1 - rho) * value + rho * estimate``). With ``rho = 1`` on the full data
    and ``local_iters=1`` a step equals one :class:`CAVI` sweep of the chain.

    Examples
    --------
    >>> import torch
    >>> from torchnmf.poisson import GammaPoisson
    >>> X = torch.poisson(torch.rand(100, 3) @ torch.rand(3, 15) * 4)
    >>> layer = GammaPoisson(100, 15, rank=3, dtype=torch.float64)
    >>> trainer = NaturalGradient(layer, tau0=2.0)
    >>> for t in range(20):
    ...     rows = torch.randperm(100)[:25]
    ...     estimate = trainer.step(lambda: (X[rows], rows))
    """

    def __init__(self, layer: nn.Module, lr: float = 1.0, tau0: float = 1.0, forgetting_rate: float = 0.7,
                 local_iters: int = 10, local_tol: float = 1e-4, chunk_size: Optional[int] = None,
                 update_hyper: bool = True, elbo_every: int = 1, reduce: Optional[Reduce] = None):
        lr = check_positive(lr, "lr")
        tau0 = check_positive(tau0, "tau0")
        forgetting_rate = check_real(forgetting_rate, "forgetting_rate", 0, 1)
        local_iters = check_rank(local_iters, "local_iters")
        local_tol = check_positive(local_tol, "local_tol", allow_zero=True)
        if chunk_size is not None:
            chunk_size = check_rank(chunk_size, "chunk_size")
        elbo_every = check_int(elbo_every, "elbo_every", low=0)
        defaults = dict(lr=lr, tau0=tau0, forgetting_rate=forgetting_rate, local_iters=local_iters,
                        local_tol=local_tol, chunk_size=chunk_size, update_hyper=bool(update_hyper),
                        elbo_every=elbo_every)
        super().__init__(layer, defaults, reduce)

    def rho(self) -> float:
        """The step size the next :meth:`step` takes, :math:`\\mathrm{lr}\\,(t + \\tau_0)^{-\\kappa}`."""
        g = self.param_groups[0]
        return float(g["lr"]) * (self.steps + float(g["tau0"])) ** (-float(g["forgetting_rate"]))

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None, *, elbo: Optional[bool] = None):
        """Local fit of the batch rows, then a natural-gradient step of ``q(α)``.

        Parameters
        ----------
        closure : callable
            Returns ``(X_batch, rows)``, ``(X_batch, rows, scale)`` or the full ``X``.
        elbo : bool, optional
            Compute the ELBO estimate at this step; default: as ``elbo_every`` says. With
            ``reduce`` every process must make the same choice.

        Returns
        -------
        torchnmf.ELBO or None
            Estimate of the full-data ELBO from this batch (before the global step); ``None``
            when not computed.
        """
        if closure is None:
            raise ValueError("NaturalGradient.step needs a closure returning (X_batch, rows)")
        group = self.param_groups[0]
        if elbo is None:
            every = int(group.get("elbo_every", 1))
            elbo = every > 0 and self.steps % every == 0
        if self._chain is not None:
            estimate = self._chain.svi(closure, self.rho, group, elbo)
            self._count_step()
            return estimate
        X, rows, scale = unpack_batch(closure())
        rho = self.rho()
        if not (0.0 < rho <= 1.0) or not math.isfinite(rho):
            raise ValueError(f"the step size rho = lr * (t + tau0) ** -forgetting_rate must be in (0, 1], "
                             f"got {rho} (lr={self.param_groups[0]['lr']})")
        data, r = self._prepare(X, rows)
        if data.shape[0] == 0:
            raise ValueError("rows: the minibatch holds no rows")
        if scale is None:
            scale = 1.0 if r is None else self.layer.n_rows / data.shape[0]
        scale = check_positive(scale, "scale")
        layer, group = self.layer, self.param_groups[0]
        # q(α) is fixed until update_alpha: its digamma/log are computed once for the batch
        fixed = layer.alpha_fixed() if hasattr(layer, "alpha_fixed") else contextlib.nullcontext()
        with fixed:
            before = layer.mean_U(r) if group["local_tol"] > 0 else None
            for _ in range(group["local_iters"]):
                layer.update_U(layer.statistics(data, rows=r, chunk_size=group["chunk_size"], which=("U",)))
                if group["update_hyper"]:
                    layer.update_kappa(r)
                if before is not None and before.numel():
                    after = layer.mean_U(r)
                    if max_relative_change(before, after) < group["local_tol"]:
                        break
                    before = after
            stats = self._statistics(data, r, ("alpha", "elbo") if elbo else ("alpha",), scale=scale)
        estimate = layer.elbo_from_statistics(stats) if elbo else None
        layer.update_alpha(stats, rho=rho)
        if group["update_hyper"]:
            layer.update_lambda()
        self._count_step()
        return estimate
