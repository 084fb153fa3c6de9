r"""Log-normal Poisson factorization (PNMF) and the factor-posterior interface.

Model
-----
``X`` (``D`` features x ``N`` samples) ``~ Poisson(W exp(F))`` with loadings ``W`` (``D x K``,
a positive parameter in any :mod:`torchnmf.constraints` mode) and log-factors ``F``
(``K x N``) under a Gaussian variational posterior ``q(F)``.

Factor-posterior interface (stable; spatial GP priors plug in here)
-------------------------------------------------------------------
:class:`FactorPosterior` is an ``nn.Module`` holding ``q(F)`` *and* its prior, with
``F`` of shape ``(n_components, n_samples) = (K, N)``:

``marginals(idx=None, **covariates) -> (mean, var)``
    Mean and variance of ``q(F[:, idx])``, each ``(K, B)`` (``B = len(idx)``, or ``N``).
``rsample(idx=None, n_samples=1, **covariates) -> Tensor``
    Reparameterised draws of ``F[:, idx]``, shape ``(E, K, B)`` with ``E = n_samples``.
``kl(idx=None, **covariates) -> Tensor``
    The KL term, shape ``()``, to subtract from an ELBO whose data term is scaled to the
    full data set: per-sample priors return ``(N / B) * sum over the batch``; global priors
    (e.g. GP inducing points) return their full KL.
``natural_groups() -> list of dict``  (optional)
    Parameter groups for :class:`torchnmf.trainer.GaussianNatural`, for posteriors that are
    mean-field Gaussian in ``(loc, raw scale)`` pairs. The base class raises
    ``NotImplementedError``.

``idx`` is a ``LongTensor`` of sample (column) indices, ``None`` meaning all samples.
``covariates`` are keyword tensors a spatial prior needs for the batch (``coordinates=``,
``groups=``...); :class:`IndependentNormal` ignores them.

ELBO modes of :class:`LogNormalPoisson`
---------------------------------------
``simple``
    Monte Carlo estimate of ``E_q[log p(X | W, F)]`` with ``E`` reparameterised draws.
``expanded``
    Monte Carlo only for ``E_q[log (W e^F)]``; the rate term uses
    ``E[e^F] = exp(mu + sigma^2 / 2)``.
``lower-bound``
    Jensen's inequality on the convex log-sum-exp,
    ``E_q[log sum_k W_dk e^{F_kn}] >= log sum_k W_dk e^{mu_kn}``: fully analytic, no draws.

Zeros of ``X`` enter only through sums (``sum_{d,n} (W E[e^F])_{dn} = sum_k (sum_d W_dk)
(sum_n E[e^{F_kn}])``), so a sparse ``X`` costs ``O(nnz K E)`` time and
``O(nnz E + (D + N) K E)`` memory (the per-nonzero rates are computed in chunks by a custom
autograd function), never ``O(D N E)``. :class:`Counts` keeps the nonzeros once so
mini-batches slice them without re-reading ``X``.

Dense-ish data take a dense path instead: when a batch's share of nonzeros is at least the
layer's ``dense_density`` (default :data:`DENSE_DENSITY`, 0.25), the nonzero-only sums are
computed over the whole ``(D_b, B)`` batch with matrix products (zeros contribute exactly 0),
which on such data is several times faster than gathering rows per nonzero. Same value and
gradient (to rounding: fp64 agree to ~1e-15); ``dense_density=None`` never takes it, ``0``
always.

With ``control_variates=True`` (the default) the Monte Carlo modes keep their sampled value
but estimate its gradient in the posterior means and variances by Price's theorem
(``dE[g(F)]/dmu = E[g'(F)]``, ``dE[g(F)]/dvar = E[g''(F)] / 2``, from the same draws):
unbiased, far less noisy than the reparameterised gradient, and termwise of the exact
sign (the log term's curvature is >= 0, the rate's is > 0), which natural-gradient steps
on the variances need to stay stable.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from .. import constraints
from ..data import (as_tensor, check_counts, check_finite, check_magnitude, check_nonnegative, check_option,
                    check_positive, check_rank, nonzeros)
from .elbo import ELBO

__all__ = ["FactorPosterior", "IndependentNormal", "LogNormalPoisson", "Counts", "ELBO_MODES", "inv_softplus",
           "DENSE_DENSITY"]

ELBO_MODES = ("simple", "expanded", "lower-bound")

#: Default share of nonzeros (``nnz / (D_b B)``) from which :class:`LogNormalPoisson` computes a
#: batch's nonzero sums densely (matrix products over all entries) instead of per nonzero.
#: 0.25 keeps the dense ``(E, D_b, B)`` rates at most 4x the nonzeros (memory stays
#: ``O(nnz E)``); in time the dense path already breaks even near 0.1 and is 2-6x faster at
#: 0.25 (K=10, CPU; ``benchmarks/pnmf_cpu.py --crossover``).
DENSE_DENSITY = 0.25


_SOFTPLUS = constraints.Softplus()


def inv_softplus(y: Tensor) -> Tensor:
    """Inverse of softplus, ``log(expm1(y))`` written stably; ``y`` must be > 0."""
    return _SOFTPLUS.right_inverse(y)


def _check_idx(idx, n: int, name: str = "idx") -> Optional[Tensor]:
    if idx is None:
        return None
    idx = torch.as_tensor(idx)
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must hold integer indices, got dtype {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(idx.shape)}")
    if idx.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(f"{name} must lie in [0, {n}), got range [{int(idx.min())}, {int(idx.max())}]")
    return idx.long()


class FactorPosterior(nn.Module):
    """Abstract ``q(F)`` with its prior, ``F`` of shape ``(n_components, n_samples)``.

    Subclasses implement :meth:`marginals`, :meth:`rsample` and :meth:`kl`; see the
    module docstring for the contract (shapes and KL scaling).

    Attributes
    ----------
    n_components : int
        ``K``.
    n_samples : int
        ``N``.
    """

    n_components: int
    n_samples: int

    def marginals(self, idx: Optional[Tensor] = None, **covariates) -> Tuple[Tensor, Tensor]:
        """Mean and variance of ``q(F[:, idx])``, each of shape ``(K, B)``."""
        raise NotImplementedError

    def rsample(self, idx: Optional[Tensor] = None, n_samples: int = 1, **covariates) -> Tensor:
        """Reparameterised draws of ``F[:, idx]``, shape ``(n_samples, K, B)``."""
        raise NotImplementedError

    def kl(self, idx: Optional[Tensor] = None, **covariates) -> Tensor:
        """KL term scaled to the full data set (see the module docstring), shape ``()``."""
        raise NotImplementedError

    def natural_groups(self) -> List[dict]:
        """Parameter groups for :class:`torchnmf.trainer.GaussianNatural`."""
        raise NotImplementedError(f"{type(self).__name__} does not support natural-gradient training")

    def batch_size_of(self, idx: Optional[Tensor]) -> int:
        """``B``: the number of samples ``idx`` selects."""
        return self.n_samples if idx is None else int(idx.numel())


class IndependentNormal(FactorPosterior):
    r"""Mean-field ``q(F_kn) = Normal(loc_kn, scale_kn^2)`` with prior ``Normal(prior_loc, prior_scale^2)``.

    ``scale = softplus(raw_scale)``, so any gradient optimizer can train ``loc`` and
    ``raw_scale``; :class:`torchnmf.trainer.GaussianNatural` updates them by natural
    gradient (:meth:`natural_groups`).

    Parameters
    ----------
    n_components : int
        ``K``.
    n_samples : int
        ``N``.
    prior_scale : float, default 1
        Standard deviation ``s`` of the prior.
    prior_loc : float, default 0
    init_loc : Tensor of shape (K, N), optional
        Initial posterior means (default 0).
    init_scale : float, default 0.1
        Initial posterior standard deviation.

    Attributes
    ----------
    loc : Parameter, shape (K, N)
    raw_scale : Parameter, shape (K, N)
    """

    def __init__(self, n_components: int, n_samples: int, prior_scale: float = 1.0, prior_loc: float = 0.0,
                 init_loc: Optional[Tensor] = None, init_scale: float = 0.1, dtype: Optional[torch.dtype] = None,
                 device=None):
        super().__init__()
        self.n_components = check_rank(n_components, "n_components")
        self.n_samples = check_rank(n_samples, "n_samples")
        prior_scale = check_positive(prior_scale, "prior_scale")
        init_scale = check_positive(init_scale, "init_scale")
        if isinstance(prior_loc, bool) or not isinstance(prior_loc, (int, float)) or not math.isfinite(prior_loc):
            raise TypeError(f"prior_loc must be a finite real number, got {prior_loc!r}")
        dtype = dtype or torch.get_default_dtype()
        shape = (self.n_components, self.n_samples)
        if init_loc is None:
            loc = torch.zeros(shape, dtype=dtype, device=device)
        else:
            loc = as_tensor(init_loc, "init_loc", dtype=dtype, device=device, ndim=2, sparse="dense").detach().clone()
            if tuple(loc.shape) != shape:
                raise ValueError(f"init_loc has shape {tuple(loc.shape)}, expected {shape}")
            check_finite(loc, "init_loc")
        self.loc = nn.Parameter(loc)
        self.raw_scale = nn.Parameter(inv_softplus(torch.full(shape, init_scale, dtype=dtype, device=device)))
        self.register_buffer("prior_loc", torch.tensor(float(prior_loc), dtype=dtype, device=device))
        self.register_buffer("prior_scale", torch.tensor(prior_scale, dtype=dtype, device=device))

    @property
    def scale(self) -> Tensor:
        """Posterior standard deviations, shape ``(K, N)``."""
        return Fn.softplus(self.raw_scale)

    def loc_scale(self, idx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Posterior means and standard deviations of the samples ``idx`` (default all).

        Returns
        -------
        loc, scale : Tensor, shape (K, len(idx)) or (K, N)
        """
        if idx is None:
            return self.loc, self.scale
        return self.loc[:, idx], Fn.softplus(self.raw_scale[:, idx])

    def marginals(self, idx: Optional[Tensor] = None, **covariates) -> Tuple[Tensor, Tensor]:
        loc, scale = self.loc_scale(idx)
        return loc, scale.square()

    def rsample(self, idx: Optional[Tensor] = None, n_samples: int = 1, **covariates) -> Tensor:
        loc, scale = self.loc_scale(idx)
        # Normal(loc, scale).rsample((E,)) written out (the same draws from the same generator
        # state, the same arithmetic): the distribution object's argument checks cost more than
        # the draw at PNMF's sizes (issue 16)
        eps = torch.empty((int(n_samples),) + tuple(loc.shape), dtype=loc.dtype, device=loc.device).normal_()
        return loc + eps * scale

    def kl(self, idx: Optional[Tensor] = None, **covariates) -> Tensor:
        loc, scale = self.loc_scale(idx)
        # kl_divergence(Normal(loc, scale), Normal(prior_loc, prior_scale)) written out (torch's
        # formula, term for term)
        var_ratio = (scale / self.prior_scale).pow(2)
        t1 = ((loc - self.prior_loc) / self.prior_scale).pow(2)
        total = (0.5 * (var_ratio + t1 - 1 - var_ratio.log())).sum()
        return total * (self.n_samples / loc.shape[1])

    def natural_groups(self) -> List[dict]:
        return [{"params": [self.loc, self.raw_scale], "scale": "softplus"}]

    def extra_repr(self) -> str:
        return (f"n_components={self.n_components}, n_samples={self.n_samples}, "
                f"prior_scale={float(self.prior_scale):g}")


class Counts:
    """Nonzero entries of a count matrix, kept once so mini-batches slice them cheaply.

    Parameters
    ----------
    X : Tensor, shape (D, N)
        Dense or sparse non-negative data (checked: finite, non-negative).
    check : bool, default True
        Skip the checks for data already checked.

    Attributes
    ----------
    rows, cols : LongTensor, shape (nnz,)
    values : Tensor, shape (nnz,)
    shape : tuple of int
    lgamma : Tensor, shape ()
        ``sum log(x!)`` over the entries (the Poisson normaliser).
    density : float
        ``nnz / (D N)``.
    """

    def __init__(self, X: Tensor, check: bool = True, _parts=None):
        self._dense: Optional[Tensor] = None
        if _parts is not None:
            self.rows, self.cols, self.values, self.shape = _parts
        else:
            X = as_tensor(X, "X", ndim=2)
            if check:
                X = check_counts(X, "X")
            self.rows, self.cols, self.values = nonzeros(X)
            self.shape = tuple(X.shape)
        self.lgamma = torch.lgamma(self.values + 1).sum()

    @classmethod
    def from_samples(cls, X: Tensor) -> "Counts":
        """Counts of ``X.T`` (features x samples) from a samples x features ``X``, unchecked.

        Parameters
        ----------
        X : Tensor, shape (N, D)
            Dense or sparse data already checked to be finite and non-negative.

        Returns
        -------
        Counts
            With ``shape == (D, N)``.
        """
        r, c, v = nonzeros(X)
        return cls(None, _parts=(c, r, v, (int(X.shape[1]), int(X.shape[0]))))

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    def dense(self) -> Tensor:
        """The counts as a dense tensor, shape ``(D, N)``, made once and kept (do not modify it)."""
        if self._dense is None:
            out = self.values.new_zeros(self.shape)
            out[self.rows, self.cols] = self.values
            self._dense = out
        return self._dense

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def to(self, *args, **kwargs) -> "Counts":
        """The same counts moved/cast like :meth:`torch.Tensor.to` (indices keep their dtype)."""
        vals = self.values.to(*args, **kwargs)
        if vals is self.values:
            return self
        return Counts(None, _parts=(self.rows.to(vals.device), self.cols.to(vals.device), vals, self.shape))

    def select(self, idx: Optional[Tensor] = None, feature_idx: Optional[Tensor] = None) -> "Counts":
        """The sub-matrix ``X[feature_idx][:, idx]`` (rows and columns renumbered in that order)."""
        if idx is None and feature_idx is None:
            return self  # the whole matrix (a full-batch fit selects it every epoch)
        rows, cols, vals = self.rows, self.cols, self.values
        D, N = self.shape
        keep = None
        if idx is not None:
            pos = torch.full((N,), -1, dtype=torch.long, device=rows.device)
            pos[idx.to(rows.device)] = torch.arange(idx.numel(), device=rows.device)
            new_cols = pos[cols]
            keep = new_cols >= 0
            cols = new_cols
            N = int(idx.numel())
        if feature_idx is not None:
            pos = torch.full((D,), -1, dtype=torch.long, device=rows.device)
            pos[feature_idx.to(rows.device)] = torch.arange(feature_idx.numel(), device=rows.device)
            new_rows = pos[rows]
            k2 = new_rows >= 0
            keep = k2 if keep is None else keep & k2
            rows = new_rows
            D = int(feature_idx.numel())
        if keep is not None:
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
        return Counts(None, _parts=(rows, cols, vals, (D, N)))


_CHUNK = 1 << 16  # nonzeros per chunk: bounds the (chunk x K) temporaries


class _SampledProduct(torch.autograd.Function):
    """``out[..., z] = sum_k W[rows[z], k] Z[..., cols[z], k]`` without keeping ``(nnz, K)`` tensors.

    Forward and backward run in chunks of nonzeros; autograd saves only ``W``, ``Z`` and the
    indices, so memory is ``O(nnz E + (D + N) K)`` instead of ``O(nnz E K)``.
    """

    @staticmethod
    def forward(ctx, W, Z, rows, cols):
        out = Z.new_empty((*Z.shape[:-2], rows.numel()))
        for a in range(0, rows.numel(), _CHUNK):
            r, c = rows[a:a + _CHUNK], cols[a:a + _CHUNK]
            out[..., a:a + _CHUNK] = (W.index_select(0, r) * Z.index_select(-2, c)).sum(-1)
        ctx.save_for_backward(W, Z, rows, cols)
        return out

    @staticmethod
    def backward(ctx, grad):
        W, Z, rows, cols = ctx.saved_tensors
        gW = torch.zeros_like(W) if ctx.needs_input_grad[0] else None
        gZ = torch.zeros_like(Z) if ctx.needs_input_grad[1] else None
        for a in range(0, rows.numel(), _CHUNK):
            r, c, g = rows[a:a + _CHUNK], cols[a:a + _CHUNK], grad[..., a:a + _CHUNK, None]
            if gW is not None:
                part = g * Z.index_select(-2, c)  # (..., chunk, K)
                gW.index_add_(0, r, part.reshape(-1, part.shape[-2], part.shape[-1]).sum(0))
            if gZ is not None:
                gZ.index_add_(-2, c, g * W.index_select(0, r))
        return gW, gZ, None, None


#: Floor of a count's rate relative to its column's largest factor: ``W e^F`` is replaced by
#: ``max(W e^F, _RATE_FLOOR e^{max_k F_k})``. A rate of exactly zero under a positive count
#: (a zero row of ``W``, which ``loadings_mode='projected'`` reaches) has log-likelihood
#: -inf; every mode instead uses the floored rate, whose gradient there is zero (the clamp),
#: in its value, its gradient and its control variates alike. One constant for every dtype,
#: so float32 and float64 give the same figure (a dtype's own ``tiny`` differs by 1e270).
_RATE_FLOOR = torch.finfo(torch.float32).tiny


def _log_rate_nz(W: Tensor, F: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``log sum_k W[rows, k] exp(F[..., k, cols])`` for each nonzero, shape ``(..., nnz)``.

    Shifted by the per-column maximum of ``F`` so large log-factors do not overflow; the
    shifted rate is floored at :data:`_RATE_FLOOR` (zero rates with positive counts).
    """
    shift = F.detach().amax(dim=-2, keepdim=True)  # (..., 1, B)
    expF = torch.exp(F - shift).transpose(-1, -2).contiguous()  # (..., B, K)
    # O(nnz K) time per draw, O(nnz) memory (see _SampledProduct)
    rate = _SampledProduct.apply(W, expF, rows, cols)
    return torch.log(rate.clamp_min(_RATE_FLOOR)) + shift[..., 0, :].index_select(-1, cols)


def _weighted_responsibilities(W: Tensor, F: Tensor, rows: Tensor, cols: Tensor, x: Tensor,
                               curvature: bool = False):
    """``A[k, b] = sum_{z: cols[z] = b} x_z W[rows_z, k] e^{F[k, b]} / sum_k (...)``, shape ``(K, B)``.

    The gradient of ``sum_z x_z log sum_k W e^F`` w.r.t. ``F`` as :func:`_log_rate_nz`
    computes it: a nonzero whose (shifted) rate is below :data:`_RATE_FLOOR` contributes 0,
    the clamp's gradient. Computed in chunks of nonzeros.

    With ``curvature=True`` returns ``(A, H)``, ``H`` (``(K, B)``) the diagonal of the
    Hessian in ``F``: ``H[k, b] = sum_z x_z share_zk (1 - share_zk)`` (>= 0: the log-sum-exp
    is convex).
    """
    expF = torch.exp(F - F.amax(0, keepdim=True)).t().contiguous()  # (B, K)
    A = torch.zeros_like(expF)
    H = torch.zeros_like(expF) if curvature else None
    for a in range(0, rows.numel(), _CHUNK):
        r, c = rows[a:a + _CHUNK], cols[a:a + _CHUNK]
        num = W.index_select(0, r) * expF.index_select(0, c)
        total = num.sum(1, keepdim=True)
        # num / total <= 1 before the count multiplies it: x / total overflowed to inf for
        # x >= 4 at a zero rate and then met num = 0 (NaN)
        share = torch.where(total >= _RATE_FLOOR, num / total.clamp_min(_RATE_FLOOR), torch.zeros_like(num))
        A.index_add_(0, c, share * x[a:a + _CHUNK, None])
        if H is not None:
            H.index_add_(0, c, share * (1 - share) * x[a:a + _CHUNK, None])
    return (A.t(), H.t()) if curvature else A.t()


def _x_log_rate_dense(X: Tensor, W: Tensor, F: Tensor) -> Tensor:
    """``sum_{d,b} X[d, b] log max(sum_k W[d, k] e^{F[..., k, b]}, floor)``, shape ``(...)``.

    The dense twin of ``(x * _log_rate_nz(W, F, rows, cols)).sum(-1)``: the same per-column
    shift and floor, over every entry of the dense ``X`` (``D_b, B``); a zero count adds
    exactly 0 to the value and to the gradient.
    """
    shift = F.detach().amax(dim=-2, keepdim=True)  # (..., 1, B)
    rate = W @ torch.exp(F - shift)  # (..., D, B)
    return (X * (torch.log(rate.clamp_min(_RATE_FLOOR)) + shift)).sum((-2, -1))


def _dense_control_variate_terms(W: Tensor, F: Tensor, X: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The control-variate pieces of the log term for draws ``F`` (E, K, B) on a dense ``X`` (D_b, B).

    Returns ``(value, G_W, A, H)``: ``value = mean_e sum X log max(W e^{F_e}, floor)`` (shape
    ``()``), its gradient in ``W`` (``(D_b, K)``, zero where the floor applies, as the clamp's),
    and the draw means of :func:`_weighted_responsibilities`'s ``A`` and ``H`` (``(K, B)``,
    as matrix products: ``A = e^F (W^T Q)``, ``H = A - e^{2F} ((W^2)^T (Q / total))`` with
    ``Q = X / total``). One batched pass over the draws shares the rates among all four, and no
    autograd graph of the ``(E, D_b, B)`` rates is kept: the caller attaches ``G_W`` as the
    gradient (same value and gradient as differentiating ``_x_log_rate_dense``).
    """
    n = F.shape[0]
    shift = F.amax(dim=-2, keepdim=True)  # (E, 1, B)
    expF = torch.exp(F - shift)  # (E, K, B)
    total = W @ expF  # (E, D, B)
    low = None
    if float(total.min()) < _RATE_FLOOR:  # rare (zero rows of W): floor, and no gradient there
        low = total < _RATE_FLOOR
        total.clamp_min_(_RATE_FLOOR)
    # sum X (log total + shift): the shift through the column totals of X
    value = (torch.log(total).mul_(X).sum() + (X.sum(0) * shift[:, 0, :]).sum()) / n
    inv = total.reciprocal_()  # in place: passes over (E, D, B) buffers are the cost here
    if low is not None:
        inv.masked_fill_(low, 0.0)  # the floored rate's gradient is 0 (the clamp's)
    q = X * inv  # (E, D, B)
    G_W = (q @ expF.transpose(-1, -2)).sum(0) / n
    A_e = expF * (W.t() @ q)
    H_e = A_e - expF * expF * ((W * W).t() @ inv.mul_(q))
    return value, G_W, A_e.sum(0) / n, H_e.sum(0) / n


class LogNormalPoisson(nn.Module):
    r"""Log-normal Poisson factorization ``X ~ Poisson(W exp(F))``.

    Parameters
    ----------
    n_features : int
        ``D``, rows of ``X``.
    n_samples : int
        ``N``, columns of ``X``.
    n_components : int
        ``K``.
    mode : {'simple', 'expanded', 'lower-bound'}, default 'lower-bound'
        How :meth:`elbo` estimates the expected log-likelihood (see the module docstring).
    E : int, default 3
        Monte Carlo draws per evaluation (unused by ``lower-bound``).
    loadings_mode : {'softplus', 'exp', 'projected', 'multiplicative'}, default 'softplus'
        Positivity mode of ``W`` (:mod:`torchnmf.constraints`). ``multiplicative`` loadings
        are updated by :meth:`update_W_`, not by gradient optimizers.
    factors : FactorPosterior, optional
        ``q(F)`` with its prior; default :class:`IndependentNormal` with ``prior_scale``.
    prior_scale : float, default 1
        Prior standard deviation of the default factors.
    W : Tensor of shape (D, K), optional
        Initial loadings (non-negative); default uniform in ``[0.5, 1.5) / K``.
    init_loc : Tensor of shape (K, N), optional
        Initial posterior means of the default factors.
    init_scale : float, default 0.1
        Initial posterior standard deviation of the default factors.
    control_variates : bool, default True
        In the Monte Carlo modes, estimate the gradient in the posterior means and variances
        by Price's theorem instead of reparameterisation (see the module docstring): same
        value and expected gradient, much less noise w.r.t. the variances and never of the
        wrong sign (needed by natural-gradient steps). The gradient is then unbiased but not
        the exact derivative of the returned sample value; False gives that derivative.
    dense_density : float or None, default DENSE_DENSITY (0.25)
        Batches with at least this share of nonzeros (``nnz / (D_b B)``) are computed densely
        (matrix products over all entries; same value and gradient, see the module notes);
        ``None`` always uses the nonzero-only path, ``0`` always the dense one.
    dtype, device : optional
        Of the parameters.

    Attributes
    ----------
    W : Tensor, shape (D, K)
        Non-negative loadings (a positive parameter; the raw value is
        ``constraints`` territory).
    factors : FactorPosterior

    Examples
    --------
    >>> import torch
    >>> X = torch.poisson(torch.full((20, 30), 2.0))
    >>> layer = LogNormalPoisson(20, 30, 3)
    >>> float(layer.elbo(X)) < 0
    True
    """

    def __init__(self, n_features: int, n_samples: int, n_components: int, mode: str = "lower-bound", E: int = 3,
                 loadings_mode: str = "softplus", factors: Optional[FactorPosterior] = None,
                 prior_scale: float = 1.0, W: Optional[Tensor] = None, init_loc: Optional[Tensor] = None,
                 init_scale: float = 0.1, control_variates: bool = True,
                 dense_density: Optional[float] = DENSE_DENSITY, dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        self.control_variates = bool(control_variates)
        if dense_density is not None:
            dense_density = check_positive(dense_density, "dense_density", allow_zero=True)
        self.dense_density = dense_density
        self.n_features = check_rank(n_features, "n_features")
        self.n_samples = check_rank(n_samples, "n_samples")
        self.n_components = check_rank(n_components, "n_components")
        self.mode = check_option(mode, ELBO_MODES, "mode")
        self.E = check_rank(E, "E")
        check_option(loadings_mode, constraints.MODES, "loadings_mode")
        dtype = dtype or torch.get_default_dtype()
        if factors is None:
            factors = IndependentNormal(self.n_components, self.n_samples, prior_scale=prior_scale,
                                        init_loc=init_loc, init_scale=init_scale, dtype=dtype, device=device)
        elif not isinstance(factors, FactorPosterior):
            raise TypeError(f"factors must be a FactorPosterior, got {type(factors).__name__}")
        if (factors.n_components, factors.n_samples) != (self.n_components, self.n_samples):
            raise ValueError(f"factors has (n_components, n_samples) = ({factors.n_components}, {factors.n_samples}), "
                             f"expected ({self.n_components}, {self.n_samples})")
        self.factors = factors
        if W is None:
            W = (torch.rand(self.n_features, self.n_components, dtype=dtype, device=device) + 0.5) / self.n_components
        else:
            W = as_tensor(W, "W", dtype=dtype, device=device, ndim=2, sparse="dense").detach().clone()
            if tuple(W.shape) != (self.n_features, self.n_components):
                raise ValueError(f"W has shape {tuple(W.shape)}, expected {(self.n_features, self.n_components)}")
            check_nonnegative(W, "W")
        self.W = W
        constraints.positive(self, "W", loadings_mode)

    def _raw_W(self) -> Tensor:
        return self.parametrizations.W.original if hasattr(self, "parametrizations") and "W" in self.parametrizations else self.W

    @property
    def loadings_mode(self) -> str:
        return constraints.mode_of(self._raw_W())

    # -- pieces ------------------------------------------------------------------
    def _counts(self, X, check: bool) -> Counts:
        if isinstance(X, Counts):
            return X
        C = Counts(X, check=check)
        if check:  # too large for the layer's arithmetic: NaN ELBOs without an error otherwise
            check_magnitude(C.values, "X", self._raw_W().dtype)
        return C

    def _check_batch(self, C: Counts, idx, feature_idx) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        idx = _check_idx(idx, self.n_samples, "idx")
        feature_idx = _check_idx(feature_idx, self.n_features, "feature_idx")
        D = self.n_features if feature_idx is None else feature_idx.numel()
        N = self.n_samples if idx is None else idx.numel()
        if tuple(C.shape) != (D, N):
            raise ValueError(f"X has shape {tuple(C.shape)}, expected {(D, N)} (features x samples"
                             f"{' of the batch' if idx is not None or feature_idx is not None else ''})")
        return idx, feature_idx

    def data_terms(self, X, idx: Optional[Tensor] = None, feature_idx: Optional[Tensor] = None,
                   W: Optional[Tensor] = None, E: Optional[int] = None, check: bool = True,
                   **covariates) -> Tuple[Tensor, Tensor, Tensor]:
        r"""The unscaled pieces of the expected log-likelihood of a batch.

        Parameters
        ----------
        X : Tensor of shape (D_b, B) or Counts
            The batch ``X[feature_idx][:, idx]``, dense or sparse.
        idx, feature_idx : LongTensor, optional
            Sample (column) and feature (row) indices of the batch; default all.
        W : Tensor of shape (D_b, K), optional
            Loadings to use (default ``self.W[feature_idx]``); :meth:`update_W_` passes a leaf.
        E : int, optional
            Draws (default ``self.E``).

        Returns
        -------
        log_term : Tensor, shape ()
            Estimate (or lower bound) of ``sum_nz x E_q[log (W e^F)]``.
        rate_term : Tensor, shape ()
            Estimate (or exact value) of ``sum_{d,n} E_q[(W e^F)_{dn}]``.
        lgamma : Tensor, shape ()
            ``sum log x!``. The batch log-likelihood is ``log_term - rate_term - lgamma``.
        """
        C = self._counts(X, check)
        idx, feature_idx = self._check_batch(C, idx, feature_idx)
        if W is None:
            W = self.W if feature_idx is None else self.W[feature_idx]
        E = self.E if E is None else check_rank(E, "E")
        C = C.to(device=W.device, dtype=W.dtype) if (C.device != W.device or C.dtype != W.dtype) else C
        mu, var = self.factors.marginals(idx, **covariates)
        Wsum = W.sum(0)
        # dense-ish batch: the nonzero sums over all entries by matrix products (same value)
        Xd = C.dense() if self.dense_density is not None and C.density >= self.dense_density else None

        def x_log_rate(F_: Tensor) -> Tensor:  # sum_nz x log(W e^F), per leading (draw) index
            if Xd is not None:
                return _x_log_rate_dense(Xd, W, F_)
            return (C.values * _log_rate_nz(W, F_, C.rows, C.cols)).sum(-1)

        if self.mode == "lower-bound":
            log_term = x_log_rate(mu)
            rate_term = Wsum @ torch.exp(mu + var / 2).sum(1)
        else:
            F = self.factors.rsample(idx, E, **covariates)  # (E, K, B)
            # the change of (mu, var) from their current values: zero in value, identity in
            # gradient, so `coef * (dmu + dvar / 2)` carries a chosen gradient estimate
            dmu, dvar = mu - mu.detach(), var - var.detach()
            if self.control_variates:
                # Price's theorem (Bonnet's for the mean): dE[g(F)]/dmu = E[g'(F)],
                # dE[g(F)]/dvar = E[g''(F)] / 2, estimated from the same draws. The value is
                # the plain Monte Carlo one (gradient in W included); the gradient in
                # (mu, var) is unbiased like the reparameterised one but has the sign of the
                # exact one termwise: the log term's curvature H >= 0 and the rate's e^F > 0.
                # The reparameterised d/dvar (noise ~ 1/std from the log term, ~ e^{2 std}
                # from the rate) was often of the wrong sign; natural steps then grew
                # variances tenfold per step until e^F overflowed (the ELBO became -inf on
                # digits with training_mode='natural').
                Fd = F.detach()
                if Xd is not None:
                    # value, W-gradient and (A, H) from one batched pass over the draws
                    with torch.no_grad():
                        value, G_W, A, H = _dense_control_variate_terms(W.detach(), Fd, Xd)
                    log_term = value + (G_W * (W - W.detach())).sum()
                else:
                    log_term = x_log_rate(Fd).mean()
                    with torch.no_grad():
                        A = torch.zeros_like(mu)
                        H = torch.zeros_like(mu)
                        for Fe in Fd:  # O(nnz-chunk K) memory per draw
                            Ae, He = _weighted_responsibilities(W, Fe, C.rows, C.cols, C.values, curvature=True)
                            A += Ae
                            H += He
                        A /= Fd.shape[0]
                        H /= Fd.shape[0]
                log_term = log_term + (A * dmu + H * dvar / 2).sum()
            else:
                log_term = x_log_rate(F).mean()
            if self.mode == "expanded":
                rate_term = Wsum @ torch.exp(mu + var / 2).sum(1)
            elif self.control_variates:
                expF = torch.exp(Fd)
                mean_expF = expF.mean(0)  # (K, B): estimates E[e^F] = its mu- and 2x its var-derivative
                rate_term = (expF.sum(-1) @ Wsum).mean() + (Wsum[:, None] * mean_expF * (dmu + dvar / 2)).sum()
            else:
                rate_term = (torch.exp(F).sum(-1) @ Wsum).mean()
        return log_term, rate_term, C.lgamma.to(W.dtype)

    def _scale(self, idx, feature_idx) -> float:
        D = self.n_features if feature_idx is None else len(feature_idx)
        N = self.n_samples if idx is None else len(idx)
        return (self.n_features / D) * (self.n_samples / N)

    def elbo(self, X, idx: Optional[Tensor] = None, feature_idx: Optional[Tensor] = None, E: Optional[int] = None,
             check: bool = True, **covariates) -> ELBO:
        r"""The ELBO of the full data set, estimated from a batch.

        Parameters
        ----------
        X : Tensor of shape (D_b, B), scipy/torch sparse, or Counts
            ``X[feature_idx][:, idx]`` (all of ``X`` by default): non-negative, finite.
        idx : LongTensor of shape (B,), optional
            Sample (column) indices of the batch.
        feature_idx : LongTensor of shape (D_b,), optional
            Feature (row) indices of the batch.
        E : int, optional
            Draws, default ``self.E``.
        check : bool, default True
            Check ``X`` (set False in loops over pre-checked :class:`Counts`).
        **covariates
            Passed to the factor posterior (e.g. ``coordinates=`` for spatial priors).

        Returns
        -------
        ELBO
            ``data`` is the batch log-likelihood scaled by ``(D / D_b) (N / B)``;
            ``kls = {'F_kl': ...}`` scaled by the factor posterior.
        """
        idx_t = _check_idx(idx, self.n_samples, "idx")
        fidx_t = _check_idx(feature_idx, self.n_features, "feature_idx")
        log_term, rate_term, lg = self.data_terms(X, idx_t, fidx_t, E=E, check=check, **covariates)
        data = (log_term - rate_term - lg) * self._scale(idx_t, fidx_t)
        return ELBO(data, {"F_kl": self.factors.kl(idx_t, **covariates)})

    def forward(self, idx: Optional[Tensor] = None, **covariates) -> Tensor:
        """Expected rate ``W E_q[e^F]``, shape ``(D, B)`` (``B = N`` without ``idx``)."""
        idx = _check_idx(idx, self.n_samples, "idx")
        mu, var = self.factors.marginals(idx, **covariates)
        return self.W @ torch.exp(mu + var / 2)

    @torch.no_grad()
    def update_W_(self, X, idx: Optional[Tensor] = None, feature_idx: Optional[Tensor] = None, E: Optional[int] = None,
                  check: bool = True, **covariates) -> Tensor:
        r"""One multiplicative update of ``W`` (rows ``feature_idx``) from a batch, in place.

        ``W <- W * d(log_term)/dW / d(rate_term)/dW`` with the terms of :meth:`data_terms`
        in the current ELBO mode. For ``lower-bound`` (and for the Monte Carlo modes with
        their draws held fixed) this is the minorize-maximize update, so the bound never
        decreases; the sample scaling ``N / B`` cancels in the ratio.

        Returns
        -------
        Tensor, shape (D_b, K)
            The updated rows of ``W``.
        """
        idx = _check_idx(idx, self.n_samples, "idx")
        feature_idx = _check_idx(feature_idx, self.n_features, "feature_idx")
        W0 = (self.W if feature_idx is None else self.W[feature_idx]).detach()
        Wl = W0.clone().requires_grad_(True)
        with torch.enable_grad():
            log_term, rate_term, _ = self.data_terms(X, idx, feature_idx, W=Wl, E=E, check=check, **covariates)
            num, = torch.autograd.grad(log_term, Wl, retain_graph=True, allow_unused=True)
            den, = torch.autograd.grad(rate_term, Wl, allow_unused=True)
        num = torch.zeros_like(W0) if num is None else num
        den = torch.zeros_like(W0) if den is None else den
        eps = torch.finfo(W0.dtype).tiny
        new = W0 * num / den.clamp_min(eps)
        new = torch.where(den > 0, new, W0)  # no information about a component: keep it
        if feature_idx is None:
            full = new
        else:
            full = self.W.detach().clone()
            full[feature_idx] = new
        constraints.assign_(self._raw_W(), full)
        return new

    def extra_repr(self) -> str:
        return (f"n_features={self.n_features}, n_samples={self.n_samples}, n_components={self.n_components}, "
                f"mode={self.mode!r}, E={self.E}")
