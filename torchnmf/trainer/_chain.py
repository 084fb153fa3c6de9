"""CAVI and SVI steps on chains of GammaNMF / NMF layers (used by CAVI and NaturalGradient).

The trainers see parameters and a closure returning ``(X, model(None)[, rows[, scale]])``;
the closure runs under the chain mode of :mod:`torchnmf.poisson.chain`, so ``model(None)``
is the list of the chain's factors. Schedule of one sweep (each step is the exact coordinate
maximiser of the bound at the path split it uses: of the ELBO itself for the first factor, of
the bound at the split from before ``W_1``'s update for ``W_2 .. W_L``; that bound is at most the
ELBO, so the ELBO never decreases over a sweep):

1. the path split ``φ`` at the current posterior, then the first factor (rows, ``H``);
2. ``φ`` again, then every other factor in chain order with that ``φ`` — given ``φ`` each
   factor's shape is fixed and its rate uses the latest means of the others;
3. the prior rates of the Gamma factors (maximum likelihood).

So a sweep costs two passes over the nonzeros whatever the depth (plus the ELBO's pass,
which the next sweep reuses for step 1), and for one layer it is exactly the
``GammaPoisson`` CAVI sweep. As there, the ELBO's pass runs in float64 for a float32 chain
(the record's float32 rounding exceeds its change near convergence); its counts are cast
back to the chain's dtype.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional

import torch
from torch import nn

from .. import constraints
from ..data import check_positive
from ..engine import max_relative_change
from ..poisson.chain import ChainStatistics, chain_data, chain_rows, collect, elbo_from, rate_statistics

__all__ = ["chain_parameters", "ChainRunner"]


def chain_parameters(source) -> List[torch.Tensor]:
    """The parameters a chain trainer holds, from a module or an iterable of parameters.

    Raises ``TypeError`` when none is a positive parameter (``GammaNMF`` / ``NMF`` layers).
    """
    if isinstance(source, nn.Module):
        params = list(source.parameters())
        what = f"layer {type(source).__name__}"
    elif isinstance(source, Iterable) and not isinstance(source, (str, bytes, torch.Tensor)):
        params = []
        for p in source:
            if isinstance(p, dict):
                raise TypeError("parameter groups (dicts) are not supported: pass model.parameters()")
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameters must be tensors, got {type(p).__name__}")
            params.append(p)
        what = "the parameters given"
    else:
        raise TypeError(f"expected a conjugate layer (e.g. GammaPoisson) or the parameters of a chain of "
                        f"GammaNMF/NMF layers, got {type(source).__name__}")
    if not any(constraints.mode_of(p) is not None for p in params):
        raise TypeError(f"{what}: no conjugate-update method(s) and no positive parameters of a GammaNMF/NMF chain; "
                        "closed-form trainers need a conjugate layer (e.g. GammaPoisson) or a chain's parameters")
    return params


class ChainRunner:
    """The chain half of a closed-form trainer: data cache, statistics cache, the two step kinds."""

    def __init__(self, params: List[torch.Tensor]):
        self.ids = {id(p) for p in params}
        self.source = None  # (X object, rows object, data, rows tensor)
        self.cache = None  # (data, chain keys and versions, statistics of the first factor)

    def reset(self) -> None:
        self.source = None
        self.cache = None

    def _unpack(self, closure, who: str):
        out, chain = collect(closure, f"{who} closure")
        if len(out) > 4:
            raise ValueError(f"the {who} closure must return (X, model(None)[, rows[, scale]]); got a tuple of {len(out)}")
        X = out[0]
        rows = out[2] if len(out) > 2 else None
        scale = out[3] if len(out) > 3 else None
        return X, chain, rows, scale

    def _data(self, X, rows, chain):
        src = self.source
        f0 = chain.factors[0]
        if (src is not None and src[0] is X and src[1] is rows and src[2].shape[1] == chain.shape[1]
                and src[2].dtype == f0.dtype and src[2].device == f0.device):
            return src[2], src[3]
        r = chain_rows(chain, rows)
        data = chain_data(X, chain, r)
        self.source = (X, rows, data, r)
        return data, r

    @staticmethod
    def _key(chain):
        return tuple((f.key, f.versions()) for f in chain.factors)

    def cavi(self, closure, chunk_size: Optional[int], update_hyper: bool):
        X, chain, rows, _ = self._unpack(closure, "CAVI")
        if rows is not None:
            raise ValueError("rows: CAVI sweeps the full data; use NaturalGradient for minibatches of rows")
        data, _ = self._data(X, None, chain)
        factors = chain.factors
        train = [i for i, f in enumerate(factors) if f.trainable(self.ids)]
        if 0 in train:
            cache = self.cache
            if cache is not None and cache[0] is data and cache[1] == self._key(chain) and cache[2] is not None:
                counts = cache[2]
            else:
                counts = ChainStatistics(data, chain, None, {0}, chunk_size).counts[0]
            factors[0].update(counts, rate_statistics(chain, 0))
        rest = [i for i in train if i > 0]
        if rest:
            stats = ChainStatistics(data, chain, None, set(rest), chunk_size)
            for i in rest:
                factors[i].update(stats.counts[i], rate_statistics(chain, i))
        if update_hyper:
            for i in train:
                factors[i].update_prior()
        # the ELBO's pass in float64 whatever the chain's dtype (as GammaPoisson's): its counts,
        # cast back, are those of the next sweep's first step
        stats = ChainStatistics(data, chain, None, {0} if 0 in train else set(), chunk_size, dtype=torch.float64)
        self.cache = (data, self._key(chain), stats.counts.get(0))
        return elbo_from(data, chain, stats.log_norm)

    def svi(self, closure, rho_fn, group: dict, elbo: bool = True):
        X, chain, rows, scale = self._unpack(closure, "NaturalGradient")
        rho = rho_fn()
        if not (0.0 < rho <= 1.0) or not math.isfinite(rho):
            raise ValueError(f"the step size rho = lr * (t + tau0) ** -forgetting_rate must be in (0, 1], "
                             f"got {rho} (lr={group['lr']})")
        data, r = self._data(X, rows, chain)
        if data.shape[0] == 0:
            raise ValueError("rows: the minibatch holds no rows")
        n_rows = chain.factors[0].shape[0]
        scale = check_positive(1.0 if r is None else n_rows / data.shape[0] if scale is None else scale, "scale")
        factors, chunk = chain.factors, group["chunk_size"]
        train = [i for i, f in enumerate(factors) if f.trainable(self.ids)]
        if 0 in train:
            first = factors[0]
            before = first.mean(r) if group["local_tol"] > 0 else None
            for _ in range(group["local_iters"]):
                counts = ChainStatistics(data, chain, r, {0}, chunk).counts[0]
                first.update(counts, rate_statistics(chain, 0, r), r)
                if group["update_hyper"]:
                    first.update_prior(r)
                if before is not None and before.numel():
                    after = first.mean(r)
                    if max_relative_change(before, after) < group["local_tol"]:
                        break
                    before = after
        rest = [i for i in train if i > 0]
        stats = ChainStatistics(data, chain, r, set(rest), chunk, dtype=torch.float64 if elbo else None)
        estimate = elbo_from(data, chain, stats.log_norm, r, scale) if elbo else None
        for i in rest:
            factors[i].update(stats.counts[i] * scale, rate_statistics(chain, i, r, scale), rho=rho)
        if group["update_hyper"]:
            for i in rest:
                factors[i].update_prior()
        self.cache = None
        return estimate
