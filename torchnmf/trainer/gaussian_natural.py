r"""Natural-gradient optimizer for mean-field Gaussian variational posteriors.

For ``q(f) = Normal(m, v)`` with natural parameters ``theta1 = m / v``,
``theta2 = -1 / (2 v)`` and mean parameters ``mu1 = m``, ``mu2 = m^2 + v``, the natural
gradient of an objective ``L`` in ``theta`` equals its ordinary gradient in ``mu``
(Khan & Lin, 2017). With ``g_m = dL/dm`` and ``g_v = dL/dv``,
``dL/dmu2 = g_v`` and ``dL/dmu1 = g_m - 2 m g_v``, so a step of size ``rho`` is

    precision' = 1 / v - 2 rho g_v
    m'         = m + rho g_m / precision'

For an exponential-family prior ``p`` and ``L = E_q[log lik] - KL(q || p)`` a step of
size 1 sets ``theta`` to ``theta_prior + d E_q[log lik] / d mu``: the exact optimum when the
likelihood is conjugate (Gaussian in ``f``).

The closure returns a *loss* (the negative objective), as for every torch optimizer.
Entries whose gradient is zero (mini-batch columns not in the batch) are left unchanged.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as Fn
from torch import Tensor

from ..constraints import Softplus
from ..data import check_option, check_positive

__all__ = ["GaussianNatural", "SCALES"]

SCALES = ("softplus", "exp", "log_var")
_SOFTPLUS = Softplus()


def _std_and_dvar(raw: Tensor, scale: str):
    """Variance ``v`` of a raw scale parameter and ``dv / draw``."""
    if scale == "softplus":
        s = Fn.softplus(raw)
        return s * s, 2 * s * torch.sigmoid(raw)
    if scale == "exp":
        v = torch.exp(2 * raw)
        return v, 2 * v
    v = torch.exp(raw)  # log_var
    return v, v


def _raw_of_var(v: Tensor, scale: str) -> Tensor:
    if scale == "softplus":
        return _SOFTPLUS.right_inverse(v.sqrt())
    if scale == "exp":
        return 0.5 * torch.log(v)
    return torch.log(v)


class GaussianNatural(torch.optim.Optimizer):
    r"""Natural-gradient steps on ``(loc, raw scale)`` pairs of mean-field Gaussians.

    Parameters
    ----------
    params : iterable of dict
        Parameter groups, each with ``'params': [loc, raw_scale]`` (two tensors of the same
        shape) and optionally ``'scale'`` (how ``raw_scale`` maps to the standard deviation:
        ``'softplus'`` (default), ``'exp'``, or ``'log_var'`` for a log-variance) and ``'lr'``.
        :meth:`torchnmf.poisson.FactorPosterior.natural_groups` returns such groups.
    lr : float, default 1.0
        Step size ``rho`` in ``(0, 1]`` is the usual range; 1 is exact for conjugate models.
        With mini-batches of ``B`` of ``N`` samples and a per-sample (local) posterior,
        ``lr = B / N`` is the full local update, since the objective is scaled by ``N / B``.
    max_var_growth : float, default 10
        A noisy (Monte Carlo) gradient can push the precision non-positive or collapse the
        variance (whose reparameterised gradient has noise growing like ``1 / std``); each
        step changes a variance at most by this factor, up or down.
    min_var : float, default 1e-10
        Floor of the variance written back.
    max_step : float, optional
        Trust region: clip each change of ``loc`` to ``[-max_step, max_step]``. Natural steps
        are Newton-like and overshoot where the likelihood's curvature is far from the
        current one (e.g. a Poisson rate ``e^f`` started far too low); ``None`` (default)
        keeps the exact step.

    Examples
    --------
    >>> import torch
    >>> from torchnmf.poisson import IndependentNormal
    >>> q = IndependentNormal(1, 1, prior_scale=1.0, init_scale=1.0)
    >>> opt = GaussianNatural(q.natural_groups(), lr=1.0)
    >>> def closure():  # one observation y = 2 with noise variance 1
    ...     opt.zero_grad()
    ...     m, v = q.marginals()
    ...     loss = 0.5 * ((2.0 - m) ** 2 + v).sum() + q.kl()
    ...     loss.backward()
    ...     return loss
    >>> _ = opt.step(closure)
    >>> round(float(q.loc.detach()), 4), round(float(q.marginals()[1].detach()), 4)
    (1.0, 0.5)
    """

    def __init__(self, params: Iterable[dict], lr: float = 1.0, max_var_growth: float = 10.0, min_var: float = 1e-10,
                 max_step: Optional[float] = None):
        lr = check_positive(lr, "lr")
        max_var_growth = check_positive(max_var_growth, "max_var_growth")
        if max_var_growth <= 1:
            raise ValueError(f"max_var_growth must be > 1, got {max_var_growth}")
        min_var = check_positive(min_var, "min_var")
        if max_step is not None:
            max_step = check_positive(max_step, "max_step")
        params = list(params)
        if not params or not all(isinstance(g, dict) for g in params):
            raise TypeError("params must be a non-empty list of dicts {'params': [loc, raw_scale], 'scale': ...}")
        for g in params:
            ps = list(g["params"])
            if len(ps) != 2:
                raise ValueError(f"each parameter group needs exactly [loc, raw_scale], got {len(ps)} tensors")
            if ps[0].shape != ps[1].shape:
                raise ValueError(f"loc and raw_scale shapes differ: {tuple(ps[0].shape)} vs {tuple(ps[1].shape)}")
            check_option(g.get("scale", "softplus"), SCALES, "scale")
        defaults = dict(lr=lr, scale="softplus", max_var_growth=max_var_growth, min_var=min_var, max_step=max_step)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        """One natural-gradient step; ``closure`` zeroes grads, returns the loss after ``backward()``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            loc, raw = group["params"]
            if loc.grad is None and raw.grad is None:
                continue
            rho = group["lr"]
            gm = torch.zeros_like(loc) if loc.grad is None else -loc.grad  # objective = -loss
            graw = torch.zeros_like(raw) if raw.grad is None else -raw.grad
            v, dv = _std_and_dvar(raw, group["scale"])
            tiny = torch.finfo(v.dtype).tiny
            gv = graw / dv.clamp_min(tiny)
            prec = 1.0 / v.clamp_min(tiny)
            new_prec = prec - 2 * rho * gv
            # keep the precision positive and the variance's growth bounded
            growth = group["max_var_growth"]
            new_prec = torch.minimum(torch.maximum(new_prec, prec / growth), prec * growth)
            new_prec = new_prec.clamp(max=1.0 / group["min_var"])
            step = rho * gm / new_prec
            if group["max_step"] is not None:
                step = step.clamp(-group["max_step"], group["max_step"])
            new_loc = loc + step
            # entries outside the batch (zero gradient) and non-finite updates stay as they are
            changed = ((gm != 0) | (graw != 0)) & torch.isfinite(new_loc) & torch.isfinite(new_prec)
            loc.copy_(torch.where(changed, new_loc, loc))
            raw.copy_(torch.where(changed, _raw_of_var(1.0 / new_prec, group["scale"]), raw))
        return loss
