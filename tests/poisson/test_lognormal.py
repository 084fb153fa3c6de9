"""Tests of torchnmf.poisson.lognormal: factor posteriors and the log-normal Poisson layer."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.special import gammaln, logsumexp

from torchnmf import constraints
from torchnmf.poisson import ELBO, Counts, FactorPosterior, IndependentNormal, LogNormalPoisson
from torchnmf.trainer import GaussianNatural
from gamma_helpers import huge_float32 as _huge_float32

# small problems: one intra-op thread avoids contention (conftest fixture)

DT = torch.float64
MODES = ("simple", "expanded", "lower-bound")


def make_layer(mode="lower-bound", D=7, N=9, K=3, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    W = torch.rand(D, K, generator=g, dtype=DT) + 0.2
    loc = 0.5 * torch.randn(K, N, generator=g, dtype=DT)
    layer = LogNormalPoisson(D, N, K, mode=mode, W=W, init_loc=loc, init_scale=0.4, dtype=DT, **kw)
    return layer


def make_counts(D=7, N=9, seed=1, p_zero=0.4):
    g = torch.Generator().manual_seed(seed)
    X = torch.poisson(torch.full((D, N), 2.0, dtype=DT), generator=g)
    X[torch.rand(D, N, generator=g) < p_zero] = 0
    return X


def np_params(layer):
    W = layer.W.detach().numpy()
    mu, var = (t.detach().numpy() for t in layer.factors.marginals())
    return W, mu, var


def np_kl(mu, var, s=1.0):
    return np.sum(0.5 * (var / s**2 + mu**2 / s**2 - 1 - np.log(var / s**2)))


# -- factor posterior interface -------------------------------------------------------------
def test_independent_normal_shapes_and_kl_scaling():
    q = IndependentNormal(3, 10, prior_scale=2.0, dtype=DT)
    assert isinstance(q, FactorPosterior)
    with torch.no_grad():
        q.loc.copy_(torch.randn(3, 10, dtype=DT))
    idx = torch.tensor([1, 4, 7, 8])
    m, v = q.marginals(idx)
    assert m.shape == v.shape == (3, 4)
    assert q.rsample(idx, n_samples=5).shape == (5, 3, 4)
    assert q.rsample().shape == (1, 3, 10)
    mu, var = (t.detach().numpy() for t in q.marginals())
    full = np_kl(mu, var, 2.0)
    assert float(q.kl()) == pytest.approx(full, rel=1e-12)
    batch = np_kl(mu[:, idx.numpy()], var[:, idx.numpy()], 2.0) * 10 / 4
    assert float(q.kl(idx)) == pytest.approx(batch, rel=1e-12)
    # covariates are accepted and ignored
    assert torch.equal(q.marginals(idx, coordinates=torch.zeros(4, 2))[0], m)


def test_rsample_moments():
    torch.manual_seed(0)
    q = IndependentNormal(2, 3, init_scale=0.7, dtype=DT)
    s = q.rsample(n_samples=40000).detach()
    assert torch.allclose(s.mean(0), q.loc.detach(), atol=0.03)
    assert torch.allclose(s.var(0), q.marginals()[1].detach(), atol=0.03)


# -- ELBO values against independent numpy references -----------------------------------
def test_lower_bound_matches_numpy_reference_and_brute_force_expectation():
    layer = make_layer("lower-bound")
    X = make_counts()
    W, mu, var = np_params(layer)
    x = X.numpy()
    lograte = logsumexp(np.log(W)[:, :, None] + mu[None], axis=1)  # (D, N) log sum_k W e^mu
    ref = (x * lograte).sum() - (W @ np.exp(mu + var / 2)).sum() - gammaln(x + 1).sum() - np_kl(mu, var)
    e = layer.elbo(X)
    assert isinstance(e, ELBO)
    assert float(e.total) == pytest.approx(ref, rel=1e-10)
    # brute force: the bound is E_q[sum x (log-rate at the mean) - W e^F] - log x! - KL, by sampling
    rng = np.random.default_rng(0)
    S = 100000
    F = mu[None] + np.sqrt(var)[None] * rng.standard_normal((S, *mu.shape))
    rate_draws = np.einsum("dk,skn->s", W, np.exp(F))
    values = (x * lograte).sum() - rate_draws - gammaln(x + 1).sum() - np_kl(mu, var)
    se = values.std() / math.sqrt(S)
    assert abs(values.mean() - float(e.total)) < 4 * se


def test_lower_bound_below_simple_and_simple_unbiased():
    X = make_counts()
    layer = make_layer("simple")
    W, mu, var = np_params(layer)
    x = X.numpy()
    rng = np.random.default_rng(1)
    S = 40000
    F = mu[None] + np.sqrt(var)[None] * rng.standard_normal((S, *mu.shape))
    rates = np.einsum("dk,skn->sdn", W, np.exp(F))
    true = (x * np.log(rates) - rates).sum((1, 2)) - gammaln(x + 1).sum() - np_kl(mu, var)
    true_mean, true_se = true.mean(), true.std() / math.sqrt(S)
    lower = float(make_layer("lower-bound").elbo(X).total)
    assert lower <= true_mean + 4 * true_se
    torch.manual_seed(2)
    for mode in ("simple", "expanded"):
        layer = make_layer(mode, E=50)
        vals = torch.stack([layer.elbo(X).total.detach() for _ in range(200)]).numpy()
        se = math.hypot(vals.std() / math.sqrt(len(vals)), true_se)
        assert abs(vals.mean() - true_mean) < 4 * se, mode
        assert lower <= vals.mean() + 4 * se


@pytest.mark.parametrize("mode", MODES)
def test_sparse_and_dense_input_give_the_same_elbo(mode):
    X = make_counts()
    layer = make_layer(mode)
    values = []
    for inp in (X, X.to_sparse(), X.to_sparse_csr(), csr_matrix(X.numpy()), Counts(X)):
        torch.manual_seed(5)
        values.append(float(layer.elbo(inp).total))
    assert np.allclose(values, values[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_input_not_modified_and_forward_is_expected_rate(mode):
    X = make_counts()
    X0 = X.clone()
    layer = make_layer(mode)
    layer.elbo(X)
    layer.update_W_(X)
    assert torch.equal(X, X0)
    mu, var = layer.factors.marginals()
    assert torch.allclose(layer(), layer.W @ torch.exp(mu + var / 2))
    assert layer(torch.tensor([0, 2])).shape == (7, 2)


def test_minibatch_scaling_is_unbiased_over_a_partition():
    X = make_counts(D=8, N=12)
    layer = make_layer("lower-bound", D=8, N=12)
    full = layer.elbo(X)
    cols = torch.arange(12).reshape(3, 4)
    rows = torch.arange(8).reshape(2, 4)
    datas, kls = [], []
    for c in cols:
        for r in rows:
            e = layer.elbo(X[r][:, c], idx=c, feature_idx=r)
            datas.append(float(e.data))
            kls.append(float(e.F_kl))
    assert np.mean(datas) == pytest.approx(float(full.data), rel=1e-12)
    assert np.mean(kls) == pytest.approx(float(full.F_kl), rel=1e-12)
    # Counts.select gives the same batches as slicing
    C = Counts(X)
    e1 = layer.elbo(C.select(cols[1], rows[0]), idx=cols[1], feature_idx=rows[0])
    e2 = layer.elbo(X[rows[0]][:, cols[1]], idx=cols[1], feature_idx=rows[0])
    assert float(e1.total) == pytest.approx(float(e2.total), rel=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loadings_mode", ["softplus", "exp", "projected"])
def test_gradients_match_finite_differences(mode, loadings_mode):
    X = make_counts(D=4, N=5)
    # without control variates the gradient is the exact derivative of the sample value
    layer = make_layer(mode, D=4, N=5, K=2, loadings_mode=loadings_mode, control_variates=False)
    params = list(constraints.gradient_parameters(layer))
    assert len(params) == 3

    base = [p.detach().clone() for p in params]
    torch.manual_seed(3)
    layer.zero_grad()
    layer.elbo(X).total.backward()
    grads = [p.grad.clone() for p in params]
    h = 1e-6
    for p, gr in zip(params, grads):
        for i in range(0, p.numel(), 3):
            with torch.no_grad():
                p.view(-1)[i] += h
            torch.manual_seed(3)
            up = float(layer.elbo(X).total)
            with torch.no_grad():
                p.view(-1)[i] -= 2 * h
            torch.manual_seed(3)
            down = float(layer.elbo(X).total)
            with torch.no_grad():
                p.view(-1)[i] += h
            assert (up - down) / (2 * h) == pytest.approx(float(gr.view(-1)[i]), rel=1e-5, abs=1e-6)
    for p, b in zip(params, base):
        assert torch.allclose(p.detach(), b)


@pytest.mark.parametrize("mode", ["simple", "expanded"])
def test_control_variates_keep_value_and_gradient_unbiased_and_cut_scale_noise(mode):
    X = make_counts(D=5, N=6)
    stats = {}
    for cv in (False, True):
        layer = make_layer(mode, D=5, N=6, K=2, E=40, control_variates=cv)
        torch.manual_seed(0)
        vals, grads = [], []
        for _ in range(150):
            layer.zero_grad()
            e = layer.elbo(X).total
            e.backward()
            vals.append(float(e))
            grads.append(layer.factors.raw_scale.grad.clone())
        stats[cv] = (np.array(vals), torch.stack(grads))
    (v0, g0), (v1, g1) = stats[False], stats[True]
    se = math.hypot(v0.std(), v1.std()) / math.sqrt(len(v0))
    assert abs(v0.mean() - v1.mean()) < 4 * se
    gse = torch.sqrt((g0.var(0) + g1.var(0)) / len(g0))
    assert bool(((g0.mean(0) - g1.mean(0)).abs() < 4 * gse + 1e-9).all())
    assert float(g1.var(0).sum()) < 0.5 * float(g0.var(0).sum())


@pytest.mark.parametrize("mode", ["simple", "expanded"])
def test_variance_gradients_have_the_exact_sign_termwise(mode):
    # d E[x log(W e^F)] / d var = E[x share (1 - share)] / 2 >= 0 and d E[sum W e^F] / d var > 0:
    # with control variates every draw's estimate has these signs (Price's theorem), so
    # natural steps never read a noisy "the rate falls as the variance grows"; the
    # reparameterised estimate of the same draws has entries of the wrong sign
    X = make_counts(D=6, N=40)
    wrong = {}
    for cv in (True, False):
        layer = make_layer(mode, D=6, N=40, K=3, E=2, control_variates=cv)
        with torch.no_grad():
            layer.factors.raw_scale.fill_(1.0)  # std 1.3: noisy draws
        torch.manual_seed(5)
        log_term, rate_term, _ = layer.data_terms(X)
        g_log, = torch.autograd.grad(log_term, layer.factors.raw_scale, retain_graph=True)
        g_rate, = torch.autograd.grad(rate_term, layer.factors.raw_scale)
        wrong[cv] = int((g_log < 0).sum()) + int((g_rate < 0).sum())
    assert wrong[True] == 0
    assert wrong[False] > 0


@pytest.mark.parametrize("mode", MODES)
def test_multiplicative_update_never_decreases_the_bound(mode):
    X = make_counts(D=10, N=12)
    layer = make_layer(mode, D=10, N=12, loadings_mode="multiplicative", E=4)
    prev = None
    for _ in range(15):
        torch.manual_seed(11)  # fixed draws: the update is MM on the fixed-draw objective
        before = float(layer.elbo(X).total)
        torch.manual_seed(11)
        layer.update_W_(X)
        torch.manual_seed(11)
        after = float(layer.elbo(X).total)
        assert after >= before - 1e-9 * abs(before)
        prev = after
    assert prev is not None
    assert bool((layer.W >= 0).all())


def test_multiplicative_update_feature_batch_only_changes_its_rows():
    X = make_counts(D=10, N=12)
    layer = make_layer("lower-bound", D=10, N=12, loadings_mode="multiplicative")
    W0 = layer.W.detach().clone()
    rows = torch.tensor([1, 5, 6])
    cols = torch.tensor([0, 3, 4, 9])
    layer.update_W_(X[rows][:, cols], idx=cols, feature_idx=rows)
    changed = (layer.W.detach() != W0).any(1)
    assert set(torch.nonzero(changed).flatten().tolist()) <= set(rows.tolist())
    assert bool(changed[rows].any())


def simulate(D=40, N=120, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(K, N, generator=g, dtype=DT)
    W = torch.distributions.Gamma(torch.full((D, K), 0.6, dtype=DT), torch.full((D, K), 0.4, dtype=DT)).sample()
    X = torch.poisson(W @ F.exp(), generator=g)
    return X, W, F


def matched_corr(A, B):
    A = (A - A.mean(1, keepdims=True)) / A.std(1, keepdims=True)
    B = (B - B.mean(1, keepdims=True)) / B.std(1, keepdims=True)
    C = A @ B.T / A.shape[1]
    r, c = linear_sum_assignment(-C)
    return C[r, c]


def test_natural_gradient_fit_recovers_factors_and_elbo_rises():
    torch.manual_seed(0)
    X, W, F = simulate()
    D, N = X.shape
    layer = LogNormalPoisson(D, N, 3, mode="lower-bound", loadings_mode="multiplicative", dtype=DT,
                             W=torch.full((D, 3), float(X.mean()) / 3, dtype=DT) * (0.5 + torch.rand(D, 3, dtype=DT)))
    opt = GaussianNatural(layer.factors.natural_groups(), lr=0.5, max_step=1.0)
    C = Counts(X)
    values = []
    for _ in range(200):
        def closure():
            opt.zero_grad()
            loss = -layer.elbo(C, check=False).total
            loss.backward()
            return loss
        values.append(-float(opt.step(closure)))
        layer.update_W_(C, check=False)
    assert values[-1] > values[0]
    assert np.all(np.diff(values[100:]) > -1e-6 * abs(values[-1]))
    corr = matched_corr(layer.factors.loc.detach().numpy(), F.numpy())
    assert corr.min() > 0.9, corr


def test_adam_fit_elbo_rises_in_every_mode():
    X, _, _ = simulate(D=15, N=30, K=2)
    for mode in MODES:
        torch.manual_seed(0)
        layer = LogNormalPoisson(15, 30, 2, mode=mode, dtype=DT)
        opt = torch.optim.Adam(constraints.gradient_parameters(layer), lr=0.05)
        first = float(layer.elbo(X, E=30).total)
        for _ in range(80):
            opt.zero_grad()
            (-layer.elbo(X).total).backward()
            opt.step()
        assert float(layer.elbo(X, E=30).total) > first


# -- bad input ----------------------------------------------------------------------------
def test_bad_input():
    layer = make_layer()
    X = make_counts()
    with pytest.raises(ValueError, match="non-negative"):
        layer.elbo(-X)
    bad = X.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer.elbo(bad)
    with pytest.raises(ValueError, match=r"shape \(7, 8\), expected \(7, 9\)"):
        layer.elbo(X[:, :8])
    with pytest.raises(ValueError, match="shape"):
        layer.elbo(X, idx=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"idx must lie in \[0, 9\)"):
        layer.elbo(X[:, :2], idx=torch.tensor([0, 9]))
    with pytest.raises(TypeError, match="integer"):
        layer.elbo(X[:, :2], idx=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="'simple', 'expanded', 'lower-bound'"):
        LogNormalPoisson(3, 4, 2, mode="exact")
    with pytest.raises(ValueError, match="loadings_mode must be one of"):
        LogNormalPoisson(3, 4, 2, loadings_mode="relu")
    with pytest.raises(TypeError, match="FactorPosterior"):
        LogNormalPoisson(3, 4, 2, factors=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="n_components, n_samples"):
        LogNormalPoisson(3, 4, 2, factors=IndependentNormal(2, 5))
    with pytest.raises(ValueError, match="W has shape"):
        LogNormalPoisson(3, 4, 2, W=torch.ones(3, 3))
    with pytest.raises(ValueError, match="W must be non-negative"):
        LogNormalPoisson(3, 4, 2, W=-torch.ones(3, 2))
    with pytest.raises(ValueError, match="n_components"):
        LogNormalPoisson(3, 4, 0)
    with pytest.raises(ValueError, match="prior_scale"):
        IndependentNormal(2, 3, prior_scale=0.0)


def test_module_moves_dtype_and_state_dict_round_trip():
    layer = make_layer(loadings_mode="softplus")
    other = make_layer(loadings_mode="softplus", seed=3)
    other.load_state_dict(layer.state_dict())
    X = make_counts()
    assert float(other.elbo(X).total) == pytest.approx(float(layer.elbo(X).total), rel=1e-12)
    f32 = layer.float()
    assert float(f32.elbo(X.float()).total) == pytest.approx(float(other.elbo(X).total), rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs cuda")
def test_cuda_matches_cpu():
    layer = make_layer()
    X = make_counts()
    cpu = float(layer.elbo(X).total)
    assert float(layer.cuda().elbo(X.cuda()).total) == pytest.approx(cpu, rel=1e-10)
    assert float(layer.elbo(X.to_sparse()).total) == pytest.approx(cpu, rel=1e-10)


# -- dense path for dense-ish batches (issue 16) ----------------------------------------------
def _elbo_and_grads(mode, X, dense_density, control_variates=True, loadings_mode="softplus", zero_rows=0, **kw):
    layer = make_layer(mode, D=12, N=10, K=4, seed=5, loadings_mode=loadings_mode,
                       control_variates=control_variates, dense_density=dense_density)
    if zero_rows:
        with torch.no_grad():
            layer.W[:zero_rows] = 0  # zero rates under positive counts: the floor applies
    params = [p for p in layer.parameters() if p.requires_grad]
    torch.manual_seed(11)  # the same draws for both paths
    total = layer.elbo(Counts(X), **kw).total
    return total.detach(), torch.autograd.grad(total, params)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("control_variates", [True, False])
@pytest.mark.parametrize("loadings_mode,zero_rows", [("softplus", 0), ("projected", 3)])
def test_dense_path_equals_nonzero_path(mode, control_variates, loadings_mode, zero_rows):
    X = make_counts(D=12, N=10, p_zero=0.3)
    sparse = _elbo_and_grads(mode, X, None, control_variates, loadings_mode, zero_rows)
    dense = _elbo_and_grads(mode, X, 0.0, control_variates, loadings_mode, zero_rows)
    torch.testing.assert_close(dense[0], sparse[0], rtol=1e-10, atol=0)
    for gd, gs in zip(dense[1], sparse[1]):
        torch.testing.assert_close(gd, gs, rtol=1e-10, atol=1e-12)
    # a feature/sample batch too
    idx, fidx = torch.tensor([0, 3, 4, 9]), torch.tensor([1, 2, 7, 8, 11])
    batch = X[fidx][:, idx]
    sb = _elbo_and_grads(mode, batch, None, control_variates, loadings_mode, zero_rows, idx=idx, feature_idx=fidx)
    db = _elbo_and_grads(mode, batch, 0.0, control_variates, loadings_mode, zero_rows, idx=idx, feature_idx=fidx)
    torch.testing.assert_close(db[0], sb[0], rtol=1e-10, atol=0)
    for gd, gs in zip(db[1], sb[1]):
        torch.testing.assert_close(gd, gs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_dense_path_multiplicative_update_equals_nonzero_path(mode):
    X = make_counts(D=12, N=10, p_zero=0.2)
    out = []
    for dd in (None, 0.0):
        layer = make_layer(mode, D=12, N=10, K=4, seed=2, loadings_mode="multiplicative", dense_density=dd)
        torch.manual_seed(3)
        out.append(layer.update_W_(X).clone())
    torch.testing.assert_close(out[1], out[0], rtol=1e-10, atol=0)


def test_dense_path_floor_matches_extreme_rates():
    # the floored-rate cases of test_silent_results: zero and denormal loadings, huge counts
    W = torch.tensor([[0., 0., 0.], [1., .5, 0.], [2., 1e-30, 3.], [0., 1e-45, 0.]], dtype=DT)
    X = torch.tensor([[4., 0., 30.], [1., 0., 0.], [0., 7., 2.], [0., 1e6, 0.]], dtype=DT)
    for mode in MODES:
        res = []
        for dd in (None, 0.0):
            layer = LogNormalPoisson(4, 3, 3, mode=mode, W=W, loadings_mode="projected", dense_density=dd, dtype=DT)
            params = [p for p in layer.parameters() if p.requires_grad]
            torch.manual_seed(4)
            total = layer.elbo(X).total
            res.append((total.detach(), torch.autograd.grad(total, params)))
        assert torch.isfinite(res[1][0])
        torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-10, atol=0)
        for gd, gs in zip(res[1][1], res[0][1]):
            assert torch.isfinite(gd).all()
            torch.testing.assert_close(gd, gs, rtol=1e-10, atol=1e-12)


def test_path_chosen_by_density(monkeypatch):
    import torchnmf.poisson.lognormal as ln

    calls = []
    real = ln._x_log_rate_dense
    monkeypatch.setattr(ln, "_x_log_rate_dense", lambda *a: calls.append(1) or real(*a))
    X = make_counts(D=10, N=10, p_zero=0.5)  # about half nonzero
    C = Counts(X)
    assert C.density == pytest.approx(float((X > 0).double().mean()))
    assert torch.equal(C.dense(), X) and C.dense() is C.dense() and C.select() is C
    assert ln.DENSE_DENSITY == 0.25 and make_layer().dense_density == ln.DENSE_DENSITY
    for dd, expect in ((None, 0), (0.0, 1), (C.density, 1), (min(1.0, C.density + 0.01), 0), (ln.DENSE_DENSITY, 1)):
        calls.clear()
        make_layer(D=10, N=10, dense_density=dd).elbo(C)
        assert len(calls) == expect, dd
    sparse = Counts(make_counts(D=10, N=10, p_zero=0.9))
    assert sparse.density < ln.DENSE_DENSITY
    calls.clear()
    make_layer(D=10, N=10).elbo(sparse)
    assert calls == []
    with pytest.raises(ValueError, match="dense_density"):
        make_layer(dense_density=-0.1)


def test_independent_normal_draws_and_kl_equal_torch_distributions():
    from torch.distributions import Normal, kl_divergence

    f = IndependentNormal(3, 8, prior_scale=1.7, prior_loc=0.3, init_loc=torch.randn(3, 8, dtype=DT),
                          init_scale=0.4, dtype=DT)
    with torch.no_grad():
        f.raw_scale.add_(0.3 * torch.randn(3, 8, dtype=DT))
    for idx in (None, torch.tensor([5, 1, 2])):
        loc, scale = f.loc_scale(idx)
        torch.manual_seed(9)
        mine = f.rsample(idx, 4)
        torch.manual_seed(9)
        assert torch.equal(mine, Normal(loc, scale).rsample((4,)))
        prior = Normal(f.prior_loc.expand_as(loc), f.prior_scale.expand_as(loc))
        ref = kl_divergence(Normal(loc, scale), prior).sum() * (8 / loc.shape[1])
        assert torch.equal(f.kl(idx), ref)


def test_float32_counts_too_large_are_refused_by_the_elbo():
    # issue 22 item 5: elbo returned NaN without an error
    X = _huge_float32().T  # features x samples
    with pytest.raises(ValueError, match="X is too large for float32"):
        LogNormalPoisson(5, 6, 2, dtype=torch.float32).elbo(X)
    assert torch.isfinite(LogNormalPoisson(5, 6, 2, dtype=DT).elbo(X.double()).total)
