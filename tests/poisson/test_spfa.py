"""Tests of torchnmf.poisson.spfa: sparse Poisson factor analysis with spike-and-slab priors."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.special import expit, gammaln

from torchnmf.poisson import ELBO, SparsePoissonFA
from torchnmf.poisson.spfa import spike_slab_kl
from gamma_helpers import huge_float32 as _huge_float32

# small problems: one intra-op thread avoids contention (conftest fixture)

DT = torch.float64


def make(n=12, p=7, K=2, link="log", seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    m = SparsePoissonFA(n, p, K, link=link, dtype=DT, generator=g, **kw)
    with torch.no_grad():
        for part in (m.L, m.F):
            part.logit_alpha.copy_(torch.randn(part.logit_alpha.shape, generator=g, dtype=DT))
            part.mu.copy_(0.5 * torch.randn(part.mu.shape, generator=g, dtype=DT))
            part.raw_sd.copy_(torch.randn(part.raw_sd.shape, generator=g, dtype=DT) - 1)
            part.prior_logit.copy_(torch.randn(K, generator=g, dtype=DT))
            part.log_precision.copy_(torch.randn(K, generator=g, dtype=DT))
    return m


def counts(n=12, p=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.poisson(torch.full((n, p), 1.5, dtype=DT), generator=g)
    return X


def np_part(part):
    a = expit(part.logit_alpha.detach().numpy())
    mu = part.mu.detach().numpy()
    sd = np.log1p(np.exp(part.raw_sd.detach().numpy()))
    pi = expit(part.prior_logit.detach().numpy())
    tau = np.exp(part.log_precision.detach().numpy())
    return a, mu, sd, pi, tau


def np_spike_slab_kl(a, mu, sd, pi, tau):
    kl_b = a * np.log(a / pi) + (1 - a) * np.log((1 - a) / (1 - pi))
    kl_n = 0.5 * (tau * (sd**2 + mu**2) - 1 - np.log(tau * sd**2))
    return kl_b + a * kl_n


def test_kl_matches_numpy_reference_and_monte_carlo():
    m = make()
    a, mu, sd, pi, tau = np_part(m.L)
    ref = np_spike_slab_kl(a, mu, sd, pi, tau)
    got = spike_slab_kl(m.L.logit_alpha, m.L.mu, torch.nn.functional.softplus(m.L.raw_sd), m.L.prior_logit,
                        torch.exp(m.L.log_precision)).detach().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    # Monte Carlo over (z, l) for one entry: E_q[log q(z, l) - log p(z, l)]
    rng = np.random.default_rng(0)
    i, k = 3, 1
    S = 200000
    z = rng.random(S) < a[i, k]
    l = mu[i, k] + sd[i, k] * rng.standard_normal(S)
    logq = np.where(z, np.log(a[i, k]) - 0.5 * ((l - mu[i, k]) / sd[i, k]) ** 2 - np.log(sd[i, k]),
                    np.log(1 - a[i, k]))
    logp = np.where(z, np.log(pi[k]) - 0.5 * tau[k] * l**2 + 0.5 * np.log(tau[k]), np.log(1 - pi[k]))
    diff = logq - logp
    assert abs(diff.mean() - ref[i, k]) < 4 * diff.std() / math.sqrt(S)


def test_eta_moments_match_sampling():
    m = make()
    rng = np.random.default_rng(1)
    S = 100000
    draws = []
    for part in (m.L, m.F):
        a, mu, sd, _, _ = np_part(part)
        z = rng.random((S, *a.shape)) < a
        draws.append(z * (mu + sd * rng.standard_normal((S, *a.shape))))
    eta = np.einsum("sik,sjk->sij", draws[0], draws[1])
    mean, var = (t.detach().numpy() for t in m.eta_moments())
    np.testing.assert_allclose(eta.mean(0), mean, atol=5 * np.sqrt(var.max() / S) + 1e-3)
    np.testing.assert_allclose(eta.var(0), var, rtol=0.12, atol=1e-3)  # products of point-normals are heavy-tailed


@pytest.mark.parametrize("link", ["log", "softplus"])
def test_elbo_estimate_is_unbiased_against_numpy_reference(link):
    s = torch.linspace(0.5, 2.0, 12, dtype=DT)
    m = make(link=link, size_factors=s)
    X = counts()
    x = X.numpy()
    mean, var = (t.detach().numpy() for t in m.eta_moments())
    rng = np.random.default_rng(2)
    S = 20000
    eta = mean + np.sqrt(var) * rng.standard_normal((S, *mean.shape))
    h = np.exp(eta) if link == "log" else np.log1p(np.exp(eta))
    rate = s.numpy()[:, None] * h
    ll = (x * np.log(rate) - rate - gammaln(x + 1)).sum((1, 2))
    kl = sum(np_spike_slab_kl(*np_part(part)).sum() for part in (m.L, m.F))
    ref, ref_se = ll.mean() - kl, ll.std() / math.sqrt(S)
    torch.manual_seed(0)
    vals = np.array([float(m.elbo(X, E=20).total) for _ in range(100)])
    e = m.elbo(X)
    assert isinstance(e, ELBO) and set(e.kls) == {"L_kl", "F_kl"}
    assert abs(vals.mean() - ref) < 4 * math.hypot(vals.std() / 10, ref_se)


@pytest.mark.parametrize("link", ["log", "softplus"])
def test_sparse_and_dense_input_give_the_same_elbo(link):
    m = make(link=link)
    X = counts()
    vals = []
    for inp in (X, X.to_sparse(), csr_matrix(X.numpy())):
        torch.manual_seed(4)
        vals.append(float(m.elbo(inp).total))
    np.testing.assert_allclose(vals, vals[0], rtol=1e-12)


def test_minibatch_scaling():
    m = make()
    X = counts()
    torch.manual_seed(0)
    full_L = float(m.L.kl())
    idx = torch.tensor([0, 5, 7])
    e = m.elbo(X[idx], idx=idx)
    a, mu, sd, pi, tau = np_part(m.L)
    assert float(e.L_kl) == pytest.approx(np_spike_slab_kl(a, mu, sd, pi, tau)[idx.numpy()].sum() * 12 / 3, rel=1e-10)
    assert float(e.F_kl) == pytest.approx(float(m.F.kl()), rel=1e-12)
    assert full_L > 0


@pytest.mark.parametrize("link", ["log", "softplus"])
def test_gradients_match_finite_differences(link):
    m = make(n=5, p=4, link=link)
    X = counts(5, 4)

    def value():
        torch.manual_seed(7)  # the same draws every evaluation
        return m.elbo(X, E=3).total

    m.zero_grad()
    value().backward()
    h = 1e-6
    for name, p in m.named_parameters():
        for i in range(0, p.numel(), 3):
            with torch.no_grad():
                p.view(-1)[i] += h
            up = float(value())
            with torch.no_grad():
                p.view(-1)[i] -= 2 * h
            down = float(value())
            with torch.no_grad():
                p.view(-1)[i] += h
            assert (up - down) / (2 * h) == pytest.approx(float(p.grad.view(-1)[i]), rel=1e-5, abs=1e-6), name


def test_fit_recovers_sparse_factors_and_elbo_rises():
    g = torch.Generator().manual_seed(0)
    n, p, K = 150, 40, 2
    L = torch.randn(n, K, generator=g, dtype=DT) * (torch.rand(n, K, generator=g) < 0.3)
    F = 0.8 * torch.randn(p, K, generator=g, dtype=DT) * (torch.rand(p, K, generator=g) < 0.3)
    s = torch.full((n,), 3.0, dtype=DT)
    X = torch.poisson(s[:, None] * torch.exp(L @ F.T), generator=g)
    torch.manual_seed(1)
    m = SparsePoissonFA(n, p, K, size_factors=s, dtype=DT)
    with torch.no_grad():  # spectral start, as one would in practice
        U, S, V = torch.linalg.svd(torch.log1p(X / s[:, None]), full_matrices=False)
        m.L.mu.copy_(U[:, :K] * S[:K].sqrt())
        m.F.mu.copy_(V[:K].T * S[:K].sqrt())
        m.L.logit_alpha.fill_(2.0)
        m.F.logit_alpha.fill_(2.0)
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    values = []
    for _ in range(500):
        opt.zero_grad()
        e = m.elbo(X)
        (-e.total).backward()
        opt.step()
        values.append(float(e.total.detach()))
    assert np.mean(values[-20:]) > np.mean(values[:20])
    EL, EF = (t.detach().numpy() for t in m.posterior_means())
    C = np.abs(np.corrcoef(EL.T, L.T.numpy())[:K, K:])
    r, c = linear_sum_assignment(-C)
    assert C[r, c].min() > 0.9, C
    CF = np.abs(np.corrcoef(EF.T, F.T.numpy())[:K, K:])
    assert CF[r, c].min() > 0.9, CF
    aL, aF = m.inclusion_probs()
    assert aL.shape == (n, K) and aF.shape == (p, K)
    # entries truly zero get lower inclusion probability on average
    truth = (L != 0).numpy()[:, c]
    probs = aL.detach().numpy()
    assert probs[truth].mean() > probs[~truth].mean()


def test_bad_input_and_input_not_modified():
    m = make()
    X = counts()
    X0 = X.clone()
    m.elbo(X)
    assert torch.equal(X, X0)
    with pytest.raises(ValueError, match="non-negative"):
        m.elbo(-X)
    with pytest.raises(ValueError, match="NaN"):
        m.elbo(X * float("nan"))
    with pytest.raises(ValueError, match=r"shape \(12, 6\), expected \(12, 7\)"):
        m.elbo(X[:, :6])
    with pytest.raises(ValueError, match="link must be one of 'log', 'softplus'"):
        SparsePoissonFA(3, 3, 1, link="identity")
    with pytest.raises(ValueError, match="size_factors"):
        SparsePoissonFA(3, 3, 1, size_factors=torch.ones(4))
    with pytest.raises(ValueError, match="size_factors must be > 0"):
        SparsePoissonFA(3, 3, 1, size_factors=torch.zeros(3))
    with pytest.raises(ValueError, match=r"idx must lie in \[0, 12\)"):
        m.elbo(X[:2], idx=torch.tensor([0, 12]))
    assert m().shape == (12, 7)


def test_float32_counts_too_large_are_refused_by_the_elbo():
    # issue 22 item 5: elbo returned NaN without an error
    X = _huge_float32()
    with pytest.raises(ValueError, match="X is too large for float32"):
        SparsePoissonFA(6, 5, 2, dtype=torch.float32, generator=torch.Generator().manual_seed(0)).elbo(X)
