r"""Sparse Poisson factor analysis with point-normal (spike-and-slab) priors.

Model, for ``X`` of shape ``(n, p)`` (rows ``i`` are samples with size factors ``s_i``)::

    x_ij ~ Poisson(s_i h^{-1}(eta_ij)),   eta = L F^T,   L: (n, K), F: (p, K)
    l_ik ~ pi_k^L Normal(0, 1 / tau_k^L) + (1 - pi_k^L) delta_0      (same for F)

with link ``h`` = ``log`` (``h^{-1} = exp``) or ``softplus`` (``h^{-1} = softplus``), and prior
inclusion logits ``logit pi_k`` and precisions ``tau_k`` learned per column (empirical Bayes).

Variational family, per entry: ``q(l_ik) = alpha_ik Normal(mu_ik, sigma_ik^2) + (1 - alpha_ik) delta_0``.
Its KL to the prior is analytic::

    KL = KL_Bernoulli(alpha || pi) + alpha KL(Normal(mu, sigma^2) || Normal(0, 1 / tau))

(the notes' expression is larger by ``alpha``: see :func:`spike_slab_kl`).

The expected log-likelihood is a reparameterised Monte Carlo estimate using the mean and
variance of ``eta`` under ``q`` (independent entries, so
``E[eta_ij] = sum_k E[l_ik] E[f_jk]`` and ``Var[eta_ij] = sum_k E[l_ik^2] E[f_jk^2] - E[l_ik]^2 E[f_jk]^2``),
drawing ``eta_ij ~ Normal(E[eta_ij], Var[eta_ij])`` (the local reparameterisation, a
Gaussian approximation to the sum over ``k``). The ``x log rate`` term is evaluated on the
nonzeros only; the rate term needs every entry (``O(E n p)`` memory), since ``Var[eta]`` does not
factorise over rows and columns.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from ..data import (as_tensor, check_counts, check_magnitude, check_nonnegative, check_option, check_positive,
                    check_rank, nonzeros)
from .elbo import ELBO
from .lognormal import _check_idx, inv_softplus

__all__ = ["SparsePoissonFA", "LINKS", "spike_slab_kl"]

LINKS = ("log", "softplus")


def spike_slab_kl(logit_alpha: Tensor, mu: Tensor, sd: Tensor, prior_logit: Tensor, prior_precision: Tensor) -> Tensor:
    r"""Elementwise ``KL(q || p)`` between point-normal distributions.

    Parameters
    ----------
    logit_alpha, mu, sd : Tensor
        Posterior inclusion logit, slab mean and slab standard deviation (broadcast together).
    prior_logit, prior_precision : Tensor
        Prior inclusion logit and slab precision (broadcastable).

    Returns
    -------
    Tensor
        ``KL_Bern(alpha || pi) + alpha KL(Normal(mu, sd^2) || Normal(0, 1 / prior_precision))``.

    Notes
    -----
    With ``tau = 1 / sd^2`` and ``tau0 = prior_precision`` the slab term is
    ``alpha / 2 (log tau - log tau0 + tau0 (mu^2 + 1 / tau) - 1)``: the spikes at 0 are compared
    with each other and the slabs with each other. The sparse Poisson factor analysis notes
    (``SpikeSlab.forward``) write ``1 +`` in place of ``- 1``, a KL larger by ``alpha`` per
    entry (by the sum of the inclusion probabilities overall); :mod:`torchnmf.compat.spfa`
    keeps this exact one.
    """
    alpha = torch.sigmoid(logit_alpha)
    # KL between Bernoullis written with log-sigmoids so saturated logits stay finite
    kl_b = alpha * (Fn.logsigmoid(logit_alpha) - Fn.logsigmoid(prior_logit)) + (1 - alpha) * (
        Fn.logsigmoid(-logit_alpha) - Fn.logsigmoid(-prior_logit))
    # no argument validation: a zero or infinite sd gives an infinite KL, not a torch ValueError
    slab = kl_divergence(Normal(mu, sd, validate_args=False),
                         Normal(torch.zeros_like(mu), prior_precision.rsqrt().expand_as(mu), validate_args=False))
    return kl_b + alpha * slab


class _SpikeSlab(nn.Module):
    """Point-normal posterior over an ``(m, K)`` matrix with a per-column learned prior."""

    def __init__(self, m: int, K: int, dtype, device, init_sd: float, generator=None):
        super().__init__()
        self.logit_alpha = nn.Parameter(torch.zeros(m, K, dtype=dtype, device=device))
        mu = 0.1 * torch.randn(m, K, dtype=dtype, generator=generator).to(device)
        self.mu = nn.Parameter(mu)
        self.raw_sd = nn.Parameter(inv_softplus(torch.full((m, K), init_sd, dtype=dtype, device=device)))
        self.prior_logit = nn.Parameter(torch.zeros(K, dtype=dtype, device=device))
        self.log_precision = nn.Parameter(torch.zeros(K, dtype=dtype, device=device))

    def moments(self, idx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Mean ``a mu`` and variance ``a sd^2 + a (1 - a) mu^2`` (no cancellation), each (m, K)."""
        la, mu, sd = self.logit_alpha, self.mu, Fn.softplus(self.raw_sd)
        if idx is not None:
            la, mu, sd = la[idx], mu[idx], sd[idx]
        a = torch.sigmoid(la)
        return a * mu, a * (sd.square() + torch.sigmoid(-la) * mu.square())

    def kl(self, idx: Optional[Tensor] = None) -> Tensor:
        la, mu, raw = self.logit_alpha, self.mu, self.raw_sd
        if idx is not None:
            la, mu, raw = la[idx], mu[idx], raw[idx]
        return spike_slab_kl(la, mu, Fn.softplus(raw), self.prior_logit, torch.exp(self.log_precision)).sum()


class SparsePoissonFA(nn.Module):
    r"""Sparse Poisson factor analysis layer (spike-and-slab priors on ``L`` and ``F``).

    Parameters
    ----------
    n_samples : int
        ``n``, rows of ``X``.
    n_features : int
        ``p``, columns of ``X``.
    n_components : int
        ``K``.
    link : {'log', 'softplus'}, default 'log'
    E : int, default 5
        Monte Carlo draws of ``eta`` per evaluation.
    size_factors : Tensor of shape (n,), optional
        ``s_i > 0`` (default 1).
    init_sd : float, default 0.1
        Initial slab standard deviations.
    dtype, device, generator : optional
        Of the parameters / for the initial slab means.

    Attributes
    ----------
    L, F : module
        Posterior of the loadings ``L`` (n, K) and factors ``F`` (p, K): parameters
        ``logit_alpha``, ``mu``, ``raw_sd`` (slab sd = softplus) and the prior's
        ``prior_logit`` (K,), ``log_precision`` (K,).

    Examples
    --------
    >>> import torch
    >>> X = torch.poisson(torch.full((30, 8), 2.0))
    >>> layer = SparsePoissonFA(30, 8, 2)
    >>> opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    >>> for _ in range(3):
    ...     opt.zero_grad(); loss = -layer.elbo(X).total; loss.backward(); _ = opt.step()
    >>> [t.shape for t in layer.inclusion_probs()]
    [torch.Size([30, 2]), torch.Size([8, 2])]
    """

    def __init__(self, n_samples: int, n_features: int, n_components: int, link: str = "log", E: int = 5,
                 size_factors: Optional[Tensor] = None, init_sd: float = 0.1, dtype: Optional[torch.dtype] = None,
                 device=None, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.n_samples = check_rank(n_samples, "n_samples")
        self.n_features = check_rank(n_features, "n_features")
        self.n_components = check_rank(n_components, "n_components")
        self.link = check_option(link, LINKS, "link")
        self.E = check_rank(E, "E")
        init_sd = check_positive(init_sd, "init_sd")
        dtype = dtype or torch.get_default_dtype()
        if size_factors is None:
            s = torch.ones(self.n_samples, dtype=dtype, device=device)
        else:
            s = as_tensor(size_factors, "size_factors", dtype=dtype, device=device, ndim=1, sparse="dense")
            if s.shape[0] != self.n_samples:
                raise ValueError(f"size_factors has {s.shape[0]} entries, expected n_samples={self.n_samples}")
            check_nonnegative(s, "size_factors")
            if bool((s == 0).any()):
                raise ValueError("size_factors must be > 0")
            s = s.detach().clone()
        self.register_buffer("size_factors", s)
        self.L = _SpikeSlab(self.n_samples, self.n_components, dtype, device, init_sd, generator)
        self.F = _SpikeSlab(self.n_features, self.n_components, dtype, device, init_sd, generator)

    def inclusion_probs(self) -> Tuple[Tensor, Tensor]:
        """Posterior inclusion probabilities ``alpha`` of ``L`` (n, K) and ``F`` (p, K)."""
        return torch.sigmoid(self.L.logit_alpha), torch.sigmoid(self.F.logit_alpha)

    def prior_inclusion(self) -> Tuple[Tensor, Tensor]:
        """Prior inclusion probabilities ``pi`` of the columns of ``L`` and ``F``, each (K,)."""
        return torch.sigmoid(self.L.prior_logit), torch.sigmoid(self.F.prior_logit)

    def posterior_means(self) -> Tuple[Tensor, Tensor]:
        """``E[L]`` (n, K) and ``E[F]`` (p, K)."""
        return self.L.moments()[0], self.F.moments()[0]

    def eta_moments(self, idx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Mean and variance of ``eta = L F^T`` under ``q`` for rows ``idx``, each (B, p)."""
        mL, vL = self.L.moments(idx)
        mF, vF = self.F.moments()
        mean = mL @ mF.t()
        # Var[l f] = Var[l] E[f^2] + E[l]^2 Var[f]: non-negative terms, so no cancellation to 0
        # (which made sqrt's gradient NaN when the slab sd is small against the mean)
        var = vL @ (mF.square() + vF).t() + mL.square() @ vF.t()
        return mean, var

    def _inv_link(self, eta: Tensor) -> Tensor:
        return torch.exp(eta) if self.link == "log" else Fn.softplus(eta)

    def _log_inv_link(self, eta: Tensor) -> Tensor:
        if self.link == "log":
            return eta
        return torch.log(Fn.softplus(eta).clamp_min(torch.finfo(eta.dtype).tiny))

    def elbo(self, X, idx: Optional[Tensor] = None, E: Optional[int] = None) -> ELBO:
        r"""The ELBO of the full data, estimated from the rows ``idx``.

        Parameters
        ----------
        X : Tensor of shape (B, p), dense or sparse (or scipy.sparse)
            ``X[idx]`` (all rows by default): non-negative, finite.
        idx : LongTensor of shape (B,), optional
        E : int, optional
            Draws (default ``self.E``).

        Returns
        -------
        ELBO
            ``data`` scaled by ``n / B``; ``kls = {'L_kl': (n / B) * batch KL, 'F_kl': full KL}``.
        """
        idx = _check_idx(idx, self.n_samples, "idx")
        E = self.E if E is None else check_rank(E, "E")
        X = check_counts(as_tensor(X, "X", ndim=2), "X")
        check_magnitude(X, "X", self.L.mu.dtype)  # NaN ELBOs without an error otherwise
        B = self.n_samples if idx is None else idx.numel()
        if tuple(X.shape) != (B, self.n_features):
            raise ValueError(f"X has shape {tuple(X.shape)}, expected {(B, self.n_features)}")
        ref = self.L.mu
        rows, cols, vals = nonzeros(X)
        vals = vals.to(device=ref.device, dtype=ref.dtype)
        rows, cols = rows.to(ref.device), cols.to(ref.device)
        s = self.size_factors if idx is None else self.size_factors[idx]
        mean, var = self.eta_moments(idx)
        sd = var.sqrt()
        # nonzeros: x (log s + log h^{-1}(eta)); every entry: s h^{-1}(eta)
        eps_nz = torch.randn((E, vals.numel()), dtype=ref.dtype, device=ref.device)
        eta_nz = mean[rows, cols] + sd[rows, cols] * eps_nz
        log_term = (vals * (torch.log(s[rows]) + self._log_inv_link(eta_nz))).sum(-1).mean()
        eps = torch.randn((E, *mean.shape), dtype=ref.dtype, device=ref.device)
        rate_term = (s[:, None] * self._inv_link(mean + sd * eps)).sum((-2, -1)).mean()
        data = (log_term - rate_term - torch.lgamma(vals + 1).sum()) * (self.n_samples / B)
        return ELBO(data, {"L_kl": self.L.kl(idx) * (self.n_samples / B), "F_kl": self.F.kl()})

    def forward(self, idx: Optional[Tensor] = None) -> Tensor:
        """Expected rate ``s_i E[h^{-1}(eta_ij)]`` (log link: exact under the Gaussian ``eta``;
        softplus: plug-in ``softplus(E[eta])``), shape (B, p)."""
        idx = _check_idx(idx, self.n_samples, "idx")
        mean, var = self.eta_moments(idx)
        s = self.size_factors if idx is None else self.size_factors[idx]
        rate = torch.exp(mean + var / 2) if self.link == "log" else Fn.softplus(mean)
        return s[:, None] * rate

    def extra_repr(self) -> str:
        return (f"n_samples={self.n_samples}, n_features={self.n_features}, n_components={self.n_components}, "
                f"link={self.link!r}, E={self.E}")
