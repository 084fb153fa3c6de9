"""Tests of the Gamma-Poisson factorization layer (torchnmf.poisson.gamma)."""
import threading

import numpy as np
import pytest
import scipy.sparse
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import digamma, gammaln, logsumexp

from torchnmf import History
from torchnmf.poisson import GammaPoisson
from torchnmf.poisson.gamma import CountMatrix, expected_counts
from gamma_helpers import gamma_params, make_gamma, simulate_gamma, huge_float32 as _huge_float32

DT = torch.float64


def simulate(n=40, m=30, K=4, a=0.5, b=0.5, scale=3.0, seed=0):
    return simulate_gamma(n, m, K, a, b, scale, seed)


def make(X, K=4, seed=0, **kw):
    return make_gamma(X, K, seed, **kw)


# -- independent slow references (numpy/scipy, dense, explicit phi) -------------------
def np_kl_gamma(s1, r1, s2, r2):
    """KL(Gamma(s1, r1) || Gamma(s2, r2)), shape-rate, elementwise."""
    return ((s1 - s2) * digamma(s1) - gammaln(s1) + gammaln(s2)
            + s2 * (np.log(r1) - np.log(r2)) + s1 * (r2 - r1) / r1)


def np_elbo(X, sU, rU, sA, rA, a, b, kappa, lam):
    """ELBO with phi written out for every entry: sum X phi (Elog U + Elog a - log phi) - log X! - sum E U E a."""
    ElU = digamma(sU) - np.log(rU)
    ElA = digamma(sA) - np.log(rA)
    data = 0.0
    for c in range(X.shape[0]):
        for t in range(X.shape[1]):
            if X[c, t] == 0:
                continue
            logits = ElU[c] + ElA[t]
            phi = np.exp(logits - logsumexp(logits))
            data += X[c, t] * np.sum(phi * (logits - np.log(phi))) - gammaln(X[c, t] + 1)
    data -= np.sum((sU / rU) @ (sA / rA).T)
    kl_u = np_kl_gamma(sU, rU, a, kappa[:, None]).sum()
    kl_a = np_kl_gamma(sA, rA, b, lam[:, None]).sum()
    return data, kl_u, kl_a


params = gamma_params


# -- ELBO ------------------------------------------------------------------------------
def test_elbo_matches_numpy_reference():
    X, _, _ = simulate(25, 18, 3)
    X[3] = 0  # an empty row
    layer = make(X, 3, kappa=torch.rand(25, dtype=DT) + 0.5, lambda_=2.0)
    layer.fit(X, max_iter=5, tol=0)  # away from the initial values
    e = layer.elbo(X)
    sU, rU, sA, rA = params(layer)
    data, kl_u, kl_a = np_elbo(X.numpy(), sU, rU, sA, rA, float(layer.a), float(layer.b),
                               layer.kappa.numpy(), layer.lambda_.numpy())
    np.testing.assert_allclose(float(e.Z), data, rtol=1e-8)
    np.testing.assert_allclose(float(e.data), data, rtol=1e-8)
    np.testing.assert_allclose(float(e.U_kls), kl_u, rtol=1e-8)
    np.testing.assert_allclose(float(e.alpha_kls), kl_a, rtol=1e-8)
    np.testing.assert_allclose(float(e.total), data - kl_u - kl_a, rtol=1e-8)
    assert set(e.kls) == {"U_kls", "alpha_kls"}


def test_elbo_from_statistics_equals_elbo():
    X, _, _ = simulate()
    layer = make(X)
    stats = layer.statistics(X)
    a, b = layer.elbo_from_statistics(stats), layer.elbo(X)
    assert torch.allclose(a.total, b.total, rtol=1e-12)
    assert torch.allclose(stats["alpha_kl"], b.alpha_kls, rtol=1e-12)  # own formula == torch.distributions
    assert torch.allclose(stats["U_kl"], b.U_kls, rtol=1e-12)
    with pytest.raises(ValueError, match="elbo"):
        layer.elbo_from_statistics(layer.statistics(X, which=("U",)))
    # statistics of two disjoint row halves add up to those of the full data
    rows1, rows2 = torch.arange(0, 15), torch.arange(15, 40)
    s1, s2 = layer.statistics(X[rows1], rows1), layer.statistics(X[rows2], rows2)
    for key in GammaPoisson.global_statistics:
        assert torch.allclose(s1[key] + s2[key], stats[key], rtol=1e-12), key
    assert torch.allclose(torch.cat([s1["U_counts"], s2["U_counts"]]), stats["U_counts"], rtol=1e-12)


# -- statistics: chunks, layouts, underflow ----------------------------------------------
def np_expected_counts(X, ElU, ElA):
    rows = np.zeros_like(ElU)
    cols = np.zeros_like(ElA)
    for c, t in zip(*np.nonzero(X)):
        logits = ElU[c] + ElA[t]
        phi = np.exp(logits - logsumexp(logits))
        rows[c] += X[c, t] * phi
        cols[t] += X[c, t] * phi
    return rows, cols


def test_statistics_match_reference():
    X, _, _ = simulate(20, 15, 3)
    layer = make(X, 3)
    st = layer.statistics(X)
    rows, cols = np_expected_counts(X.numpy(), layer.log_mean_U().detach().numpy(),
                                    layer.log_mean_alpha().detach().numpy())
    np.testing.assert_allclose(st["U_counts"].numpy(), rows, rtol=1e-10)
    np.testing.assert_allclose(st["alpha_counts"].numpy(), cols, rtol=1e-10)
    # expected counts redistribute every count
    assert torch.allclose(st["U_counts"].sum(1), X.sum(1), rtol=1e-10)


@pytest.mark.parametrize("chunk", [3, 50])
def test_chunked_equals_unchunked(chunk):
    X, _, _ = simulate()
    a, b = make(X), make(X)
    for _ in range(2):
        sa, sb = a.statistics(X), b.statistics(X, chunk_size=chunk)
        for key in ("U_counts", "alpha_counts", "log_likelihood"):
            assert torch.allclose(sa[key], sb[key], rtol=1e-12, atol=0), key
        a.fit(X, max_iter=1, tol=0)
        b.fit(X, max_iter=1, tol=0, chunk_size=chunk)
    for pa, pb in zip(params(a), params(b)):
        np.testing.assert_allclose(pa, pb, rtol=1e-12)
    assert torch.allclose(a.elbo(X).total, b.elbo(X, chunk_size=chunk).total, rtol=1e-12)


def test_sparse_and_dense_inputs_agree():
    X, _, _ = simulate()
    layer = make(X)
    ref = layer.statistics(X)
    inputs = [X.to_sparse_coo(), X.to_sparse_csr(), X.to_sparse_csc(), X.numpy(), scipy.sparse.csr_matrix(X.numpy()),
              scipy.sparse.coo_matrix(X.numpy()), X.long(), CountMatrix.from_input(X)]
    for inp in inputs:
        st = layer.statistics(inp)
        for key in ("U_counts", "alpha_counts", "log_likelihood", "U_kl"):
            assert torch.allclose(st[key], ref[key], rtol=1e-12), (type(inp), key)
    # explicit zeros in a sparse input are ignored
    coo = scipy.sparse.coo_matrix(X.numpy())
    padded = scipy.sparse.coo_matrix((np.r_[coo.data, 0.0], (np.r_[coo.row, 0], np.r_[coo.col, 0])), shape=coo.shape)
    if X[0, 0] == 0:
        assert torch.allclose(layer.statistics(padded)["U_counts"], ref["U_counts"], rtol=1e-12)


def test_underflow_fallback_matches_log_softmax_fp32():
    # Factors whose preferred components disagree by ~200 nats: the factorised denominator
    # underflows in float32, and the exact log-softmax path must take over.
    n, m, K = 6, 5, 3
    X = torch.poisson(torch.full((n, m), 3.0)) + 1
    elog_u = torch.randn(n, K, dtype=DT)
    elog_a = torch.randn(m, K, dtype=DT)
    elog_u[:3, 0] += 200.0
    elog_a[:2, 1] += 200.0
    data64 = CountMatrix.from_input(X, dtype=DT)
    data32 = CountMatrix.from_input(X, dtype=torch.float32)
    r32, c32, l32 = expected_counts(data32, elog_u.float(), elog_a.float(), chunk_size=4)
    rows, cols = np_expected_counts(X.numpy(), elog_u.numpy(), elog_a.numpy())
    np.testing.assert_allclose(r32.double().numpy(), rows, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(c32.double().numpy(), cols, rtol=1e-4, atol=1e-4)
    ref_l = sum(X[c, t].item() * logsumexp(elog_u[c].numpy() + elog_a[t].numpy()) for c in range(n) for t in range(m))
    np.testing.assert_allclose(float(l32), ref_l, rtol=1e-5)
    r64, _, l64 = expected_counts(data64, elog_u, elog_a)
    np.testing.assert_allclose(r64.numpy(), rows, rtol=1e-10)
    assert torch.isfinite(r32).all() and torch.isfinite(c32).all()


# -- memory layout (issue 16): int32 indices, sub-blocks, no float64 copies ----------------
def test_count_matrix_indices_int32_and_consistent():
    X, _, _ = simulate(25, 18, 3)
    data = CountMatrix.from_input(X, dtype=torch.float32)
    assert data.index_dtype == torch.int32
    for name in ("crow", "cols", "ccol", "csc_pos", "rows_by_col"):
        assert getattr(data, name).dtype == torch.int32, name
    rows, cols = torch.nonzero(X, as_tuple=True)
    assert data.rows.dtype == torch.int64 and torch.equal(data.rows, rows) and torch.equal(data.cols.long(), cols)
    # csc_pos places every nonzero at its column-major position
    by_col = torch.empty_like(data.values)
    by_col[data.csc_pos.long()] = data.values
    assert torch.equal(by_col, X.t()[X.t() != 0].float())
    assert torch.equal(data.rows_by_col.long(), torch.nonzero(X.t(), as_tuple=True)[1])
    # totals: in the values' dtype and in float64, equal for integer counts
    assert data.row_totals.dtype == torch.float32 and data.row_totals64.dtype == torch.float64
    assert torch.equal(data.row_totals64, X.sum(1)) and torch.equal(data.col_totals64, X.sum(0))
    moved = data.to(dtype=DT)
    assert moved.index_dtype == torch.int32 and torch.equal(moved.rows, data.rows)
    assert torch.equal(moved.row_totals, X.sum(1)) and moved.log_factorial == data.log_factorial64


@pytest.mark.parametrize("chunk", [None, 13])
def test_sub_blocks_equal_one_pass(monkeypatch, chunk):
    # The elementwise work runs in sub-blocks of _BLOCK nonzeros (and q(α) in row blocks):
    # a tiny _BLOCK must give what one pass gives (fp64, 1e-10), underflowing entries included,
    # and the log normaliser's gradient too.
    import torchnmf.poisson.gamma as gamma_mod

    n, m, K = 30, 22, 4
    X = torch.poisson(torch.full((n, m), 0.8, dtype=DT))
    g = torch.Generator().manual_seed(3)
    elog_u = torch.randn(n, K, dtype=DT, generator=g)
    elog_a = torch.randn(m, K, dtype=DT, generator=g)
    elog_u[:4, 0] += 800.0  # d underflows for these rows: the log-softmax fallback runs
    elog_a[:3, 1] += 800.0
    data = CountMatrix.from_input(X, dtype=DT)

    def run():
        u, a = elog_u.clone().requires_grad_(True), elog_a.clone().requires_grad_(True)
        r, c, lnorm = expected_counts(data, u, a, chunk_size=chunk)
        gu, ga = torch.autograd.grad(lnorm, (u, a))
        return r, c, lnorm.detach(), gu, ga

    ref = run()
    monkeypatch.setattr(gamma_mod, "_BLOCK", 7)
    got = run()
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=0)
    rows, cols = np_expected_counts(X.numpy(), elog_u.numpy(), elog_a.numpy())
    np.testing.assert_allclose(got[0].numpy(), rows, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got[1].numpy(), cols, rtol=1e-10, atol=1e-12)
    # d log-normaliser / d elog_u = the expected counts per row
    torch.testing.assert_close(got[3], got[0], rtol=1e-10, atol=1e-12)
    # a whole sweep and its ELBO with the tiny blocks (float32 layer: float64 ELBO pass)
    Xs, _, _ = simulate(20, 16, 3)
    layers = []
    for block in (7, 1 << 17):
        monkeypatch.setattr(gamma_mod, "_BLOCK", block)
        layer = make(Xs, 3, dtype=torch.float32)
        layer.fit(Xs, max_iter=3, tol=0)
        layers.append((layer, layer.statistics(Xs), layer.elbo(Xs).total))
    (a, sa, ea), (b, sb, eb) = layers
    for pa, pb in zip(params(a), params(b)):
        np.testing.assert_allclose(pa, pb, rtol=1e-6)
    for key in ("log_likelihood", "U_kl", "alpha_kl"):
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-10, atol=0)
    torch.testing.assert_close(ea, eb, rtol=1e-7, atol=0)


def test_float32_elbo_pass_equals_float64_layer():
    # The float64 ELBO pass of a float32 layer (counts and q(α) cast per block) equals a
    # float64 layer holding the same (float32-representable) parameters, fp64 1e-10.
    X, _, _ = simulate(30, 25, 4)
    l32 = make(X, 4, dtype=torch.float32)
    l32.fit(X, max_iter=2, tol=0)
    l64 = make(X, 4)
    with torch.no_grad():
        for name in ("U_shape", "U_rate", "alpha_shape", "alpha_rate"):
            l64._write(name, getattr(l32, name).double())
        for name in ("a", "b", "kappa", "lambda_"):  # the float32 priors (0.3 is not exact in float32)
            getattr(l64, name).copy_(getattr(l32, name).double())
    s32, s64 = l32.statistics(X), l64.statistics(X)
    for key in ("log_likelihood", "U_kl", "alpha_kl", "U_mean_sum"):
        assert s32[key].dtype == torch.float64, key
        torch.testing.assert_close(s32[key], s64[key], rtol=1e-10, atol=0)
    torch.testing.assert_close(s32["alpha_kl"], l64._kl_alpha(), rtol=1e-10, atol=0)
    torch.testing.assert_close(l32.elbo(X).total.double(), l64.elbo(X).total, rtol=1e-7, atol=0)


# -- coordinate ascent -------------------------------------------------------------------
def half_step_elbos(layer, X, sweeps):
    """ELBO after each half-step: U, alpha, kappa, lambda."""
    values = [float(layer.elbo(X).total)]
    for _ in range(sweeps):
        layer.update_U(layer.statistics(X, which=("U",)))
        values.append(float(layer.elbo(X).total))
        layer.update_alpha(layer.statistics(X, which=("alpha",)))
        values.append(float(layer.elbo(X).total))
        layer.update_kappa()
        values.append(float(layer.elbo(X).total))
        layer.update_lambda()
        values.append(float(layer.elbo(X).total))
    return np.array(values)


def assert_monotone(values):
    diffs = np.diff(values)
    assert (diffs >= -1e-9 * np.abs(values[1:])).all(), diffs.min()
    assert values[-1] > values[0]


def test_half_steps_never_decrease_synthetic():
    X, _, _ = simulate(50, 35, 4)
    X[5] = 0
    X[:, 7] = 0
    assert_monotone(half_step_elbos(make(X, 4), X, 25))


def test_half_steps_never_decrease_digits(digits):
    X = digits[:600]
    assert_monotone(half_step_elbos(make(X, 8), X, 15))


def test_recovers_true_factors():
    # Data simulated from the model with K = 5; recover E[U] and E[alpha] up to permutation.
    # Mean-field Poisson factorization has local optima: keep the best ELBO of 2 restarts.
    n, m, K = 120, 100, 5
    g = torch.Generator().manual_seed(4)
    U = torch._standard_gamma(torch.full((n, K), 1.0, dtype=DT), generator=g)
    A = torch._standard_gamma(torch.full((m, K), 1.0, dtype=DT), generator=g) * 4.0
    X = torch.poisson(U @ A.T, generator=g)
    best, best_elbo = None, -np.inf
    for seed in range(2):
        layer = make(X, K, seed=seed, a=1.0, b=1.0)
        hist = layer.fit(X, max_iter=80, tol=1e-8)
        if hist.values[-1] > best_elbo:
            best, best_elbo = layer, hist.values[-1]
    for est, true in ((best.mean_U().detach(), U), (best.mean_alpha().detach(), A)):
        corr = np.corrcoef(est.numpy().T, true.numpy().T)[:K, K:]
        r, c = linear_sum_assignment(-corr)
        assert corr[r, c].min() > 0.9, corr[r, c]


def test_empty_rows_and_columns_stay_finite():
    X, _, _ = simulate(20, 15, 3)
    X[2] = 0
    X[:, 4] = 0
    layer = make(X, 3)
    hist = layer.fit(X, max_iter=60, tol=0)
    assert all(np.isfinite(hist.values))
    for p in params(layer):
        assert np.isfinite(p).all() and (p > 0).all()
    assert torch.isfinite(layer.kappa).all() and torch.isfinite(layer.lambda_).all()
    assert float(layer.mean_U()[2].max()) < 1e-2 * float(layer.mean_U().max())
    zero = make(torch.zeros(4, 3), 2)
    assert np.isfinite(zero.fit(torch.zeros(4, 3), max_iter=5, tol=0).values).all()


def test_fixed_hyperparameters_stay_fixed():
    X, _, _ = simulate()
    layer = make(X, learn_kappa=False, learn_lambda=False, kappa=2.0, lambda_=0.5)
    assert_monotone(half_step_elbos(layer, X, 5))
    assert torch.all(layer.kappa == 2.0) and torch.all(layer.lambda_ == 0.5)


def test_fp32_close_to_fp64():
    X, _, _ = simulate()
    a, b = make(X, dtype=torch.float32), make(X)
    ha, hb = a.fit(X, max_iter=20, tol=0), b.fit(X, max_iter=20, tol=0)
    assert a.U_shape.dtype == torch.float32 and a.elbo(X).total.dtype == torch.float32
    np.testing.assert_allclose(ha.values, hb.values, rtol=1e-4)


# -- modes and gradients -------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["softplus", "exp", "projected"])
def test_modes_give_same_fit(mode):
    X, _, _ = simulate()
    ref, other = make(X), make(X, mode=mode)
    for p, q in zip(params(ref), params(other)):
        np.testing.assert_allclose(p, q, rtol=1e-12)
    ref.fit(X, max_iter=5, tol=0)
    other.fit(X, max_iter=5, tol=0)
    for p, q in zip(params(ref), params(other)):
        np.testing.assert_allclose(p, q, rtol=1e-8)


def test_elbo_gradient_in_softplus_mode_matches_finite_differences():
    X, _, _ = simulate(8, 6, 2)
    layer = make(X, 2, mode="softplus")
    raw = layer.parametrizations.alpha_shape.original
    total = layer.elbo(X).total
    (grad,) = torch.autograd.grad(total, raw)
    eps = 1e-6
    for idx in [(0, 0), (3, 1), (5, 0)]:
        with torch.no_grad():
            raw[idx] += eps
            up = float(layer.elbo(X).total)
            raw[idx] -= 2 * eps
            down = float(layer.elbo(X).total)
            raw[idx] += eps
        np.testing.assert_allclose(float(grad[idx]), (up - down) / (2 * eps), rtol=1e-5, atol=1e-6)
    # gradient ascent on the ELBO with a torch optimizer improves it
    from torchnmf.constraints import gradient_parameters
    opt = torch.optim.Adam(gradient_parameters(layer), lr=0.05)
    start = float(layer.elbo(X).total)
    for _ in range(30):
        opt.zero_grad()
        (-layer.elbo(X).total).backward()
        opt.step()
    assert float(layer.elbo(X).total) > start


# -- summaries, forward, transform ----------------------------------------------------------
def test_posterior_summaries_and_forward():
    X, _, _ = simulate()
    layer = make(X)
    layer.fit(X, max_iter=10, tol=0)
    sU, rU, sA, rA = params(layer)
    np.testing.assert_allclose(layer.mean_U().detach().numpy(), sU / rU)
    np.testing.assert_allclose(layer.geometric_mean_alpha().detach().numpy(), np.exp(digamma(sA) - np.log(rA)))
    np.testing.assert_allclose(layer.geometric_mean_U().detach().numpy(), np.exp(digamma(sU) - np.log(rU)))
    np.testing.assert_allclose(layer().detach().numpy(), (sU / rU) @ (sA / rA).T, rtol=1e-12)
    np.testing.assert_allclose(layer(rows=[1, 3]).detach().numpy(), ((sU / rU) @ (sA / rA).T)[[1, 3]], rtol=1e-12)
    assert torch.allclose(layer.q_U().mean, layer.mean_U())
    assert torch.allclose(layer.q_alpha().mean, layer.mean_alpha())
    chained = torch.nn.Sequential(layer, torch.nn.Identity())
    assert chained(None).shape == X.shape


def test_transform_reaches_fixed_point_and_fitted_rows():
    X, _, _ = simulate(40, 20, 3)
    layer = make(X, 3)
    layer.fit(X, max_iter=200, tol=1e-12)
    new = layer.transform(X[:10], max_iter=400, tol=1e-12)
    assert new.shape == (10, 3)
    # a fixed point of the row update with q(alpha) fixed, checked against the numpy reference:
    # kappa = a K / sum E[U], r = kappa + sum_t E[alpha], s = E[U] r, s = a + expected counts(s, r)
    a, K = float(layer.a), 3
    mean = new.numpy()
    rate = (a * K / mean.sum(1))[:, None] + layer.mean_alpha().detach().numpy().sum(0)
    shape = mean * rate
    counts, _ = np_expected_counts(X[:10].numpy(), digamma(shape) - np.log(rate), layer.log_mean_alpha().detach().numpy())
    np.testing.assert_allclose(shape, a + counts, rtol=1e-6)
    # most rows land on the fitted posterior (a row may have other local optima)
    close = np.isclose(mean, layer.mean_U()[:10].detach().numpy(), rtol=1e-3, atol=1e-6).all(1)
    assert close.mean() >= 0.8
    before = params(layer)
    layer.transform(scipy.sparse.csr_matrix(X[:5].numpy()))
    for p, q in zip(before, params(layer)):
        np.testing.assert_array_equal(p, q)


# -- fit helper, history, stop --------------------------------------------------------------
def test_fit_history_records_and_stop():
    X, _, _ = simulate()
    layer = make(X)
    calls = []

    def callback(lay, record):
        calls.append(record)
        if len(calls) == 4:
            history.request_stop()

    history = History(name="elbo", maximize=True)
    out = layer.fit(X, max_iter=100, tol=0, history=history, callback=callback)
    assert out is history and len(history) == 4 == len(calls)
    rec = history.elbos[-1]
    for name in ("Z", "U_kls", "alpha_kls", "total"):
        assert torch.is_tensor(getattr(rec, name))
    np.testing.assert_allclose(float(rec.total), float(rec.Z - rec.U_kls - rec.alpha_kls))
    np.testing.assert_allclose(float(rec.total), float(layer.elbo(X).total), rtol=1e-12)


def test_fit_stops_from_another_thread():
    X, _, _ = simulate()
    layer = make(X)
    history = History(name="elbo", maximize=True)
    thread = threading.Thread(target=layer.fit, args=(X,), kwargs=dict(max_iter=10 ** 6, tol=0, history=history))
    thread.start()
    while len(history) < 3:
        thread.join(0.01)
        assert thread.is_alive() or len(history) >= 3
    snapshot = history.elbos  # read while fitting
    history.request_stop()
    thread.join(30)
    assert not thread.is_alive()
    assert 3 <= len(snapshot) <= len(history) < 10 ** 6


def test_fit_verbose_and_convergence():
    X, _, _ = simulate()
    hist = make(X).fit(X, max_iter=500, tol=1e-5, verbose=True)
    assert 1 < len(hist) < 500


# -- save / load ------------------------------------------------------------------------------
def test_state_dict_round_trip():
    X, _, _ = simulate()
    layer = make(X, mode="softplus")
    layer.fit(X, max_iter=5, tol=0)
    other = make(X, seed=9, mode="softplus")
    other.load_state_dict(layer.state_dict())
    assert {"a", "b", "kappa", "lambda_"} <= set(layer.state_dict())
    assert torch.allclose(other.elbo(X).total, layer.elbo(X).total, rtol=1e-14)


# -- bad input ----------------------------------------------------------------------------
def test_bad_counts_raise_and_input_untouched():
    X, _, _ = simulate()
    layer = make(X)
    neg = X.clone()
    neg[0, 0] = -1
    with pytest.raises(ValueError, match="X must be non-negative"):
        layer.elbo(neg)
    frac = X.clone()
    frac[0, 0] = 0.5
    with pytest.raises(ValueError, match="must hold counts.*row 0, column 0 holds 0.5.*round it"):
        layer.fit(frac, max_iter=2)
    for bad in (float("nan"), float("inf")):
        Y = X.clone()
        Y[1, 1] = bad
        with pytest.raises(ValueError, match="NaN or infinity"):
            layer.statistics(Y)
    with pytest.raises(ValueError, match="shape"):
        layer.fit(X[:-1], max_iter=2)
    with pytest.raises(ValueError, match="shape"):
        layer.statistics(X[:5], rows=[0, 1])
    with pytest.raises(ValueError, match="2 dimensions"):
        layer.elbo(X[0])
    with pytest.raises(ValueError, match="rows"):
        layer.statistics(X[:2], rows=[0, 0])
    with pytest.raises(ValueError, match="rows"):
        layer.statistics(X[:2], rows=[0, 99])
    # non-integer counts with the explicit flag
    flexible = make(X, allow_noninteger=True)
    assert np.isfinite(flexible.fit(frac, max_iter=3, tol=0).values).all()
    # inputs are never modified
    Xn, Xs, Xt = X.numpy().copy(), scipy.sparse.csr_matrix(X.numpy()), X.clone()
    layer.fit(Xn, max_iter=2)
    layer.fit(Xs, max_iter=2)
    layer.fit(Xt, max_iter=2)
    layer.transform(Xt[:3])
    np.testing.assert_array_equal(Xn, X.numpy())
    np.testing.assert_array_equal(Xs.toarray(), X.numpy())
    assert torch.equal(Xt, X)


@pytest.mark.parametrize("kw,name", [(dict(a=0.0), "a"), (dict(b=-1.0), "b"), (dict(kappa=0.0), "kappa"),
                                     (dict(lambda_=-2.0), "lambda_"), (dict(kappa=torch.zeros(40)), "kappa"),
                                     (dict(lambda_=torch.ones(3)), "lambda_"), (dict(a=float("nan")), "a"),
                                     (dict(mode="bogus"), "mode")])
def test_bad_hyperparameters(kw, name):
    with pytest.raises(ValueError, match=name):
        GammaPoisson(40, 30, 4, **kw)


def test_bad_sizes():
    with pytest.raises((TypeError, ValueError), match="rank"):
        GammaPoisson(4, 3, 0)
    with pytest.raises((TypeError, ValueError), match="n_rows"):
        GammaPoisson(-1, 3, 2)
    X, _, _ = simulate()
    with pytest.raises(ValueError, match="chunk_size"):
        make(X).statistics(X, chunk_size=0)
    with pytest.raises(ValueError, match="which"):
        make(X).statistics(X, which=("V",))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    X, _, _ = simulate()
    cpu = make(X, dtype=torch.float32)
    gpu = make(X, dtype=torch.float32).to("cuda")
    hc = cpu.fit(X, max_iter=10, tol=0)
    hg = gpu.fit(X.cuda(), max_iter=10, tol=0)
    assert gpu.U_shape.device.type == "cuda"
    np.testing.assert_allclose(hg.values, hc.values, rtol=1e-4)


def test_float32_counts_too_large_are_refused_by_the_elbo():
    # issue 22 item 5: elbo returned NaN without an error
    X = _huge_float32()
    with pytest.raises(ValueError, match="X is too large for float32"):
        GammaPoisson(6, 5, 2, dtype=torch.float32).elbo(X)
    assert torch.isfinite(GammaPoisson(6, 5, 2, dtype=DT).elbo(X.double()).total)


# -- issue 22.10: set_means with denormal means --------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_set_means_with_denormal_means_leaves_finite_rates(dtype):
    tiny = torch.finfo(dtype).tiny
    layer = GammaPoisson(4, 3, 2, dtype=dtype)
    layer.set_means(torch.full((4, 2), tiny * 2.0 ** -20, dtype=dtype), torch.ones(3, 2, dtype=dtype))
    for name in ("U_rate", "alpha_rate", "U_shape", "alpha_shape"):
        assert bool(torch.isfinite(getattr(layer, name)).all()), name
    X = torch.poisson(torch.full((4, 3), 3.0, dtype=dtype), generator=torch.Generator().manual_seed(0))
    assert np.isfinite(float(layer.elbo(X)))


def test_start_of_many_rows_is_the_same_in_every_mode_and_dtype():
    """q(U)'s start is drawn in blocks of rows, written in place: one point for every mode and dtype."""
    from torchnmf.poisson import gamma

    n, rank = 3 * gamma._INIT_BLOCK // 4 + 5, 4  # three blocks and a short one
    kappa = torch.linspace(1, 2, n, dtype=torch.float64)

    def start(mode, dtype):
        layer = GammaPoisson(n, 7, rank, a=0.3, b=0.2, kappa=kappa.tolist(), mode=mode,
                             generator=torch.Generator().manual_seed(3), dtype=dtype)
        return [getattr(layer, k).detach() for k in ("U_shape", "alpha_shape", "U_rate", "alpha_rate")]

    ref = start("multiplicative", torch.float64)
    U = ref[0]
    assert ((U >= 0.3) & (U < 1.3)).all() and U.std() > 0.25  # prior + Uniform(0, 1)
    step = gamma._INIT_BLOCK // rank
    assert not torch.equal(U[:step], U[step:2 * step])  # every block draws new numbers
    torch.testing.assert_close(ref[2], kappa[:, None].expand(n, rank), rtol=0, atol=0)
    for mode, dtype in (("multiplicative", torch.float32), ("softplus", torch.float64), ("softplus", torch.float32),
                        ("projected", torch.float64)):
        tol = 1e-6 if dtype == torch.float32 or mode == "softplus" else 0
        for a, b in zip(start(mode, dtype), ref):
            assert a.dtype == dtype
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_count_matrix_of_a_canonical_csr_equals_the_general_path(dtype):
    """Streamed CSR blocks are indexed without COO copies or a sort: the same CountMatrix."""
    X, _, _ = simulate(40, 23, 3)
    X[5] = 0  # an empty row
    X[:, 7] = 0  # an empty column
    S = X.to(dtype).to_sparse_csr()
    S = torch.sparse_csr_tensor(S.crow_indices().int(), S.col_indices().int(), S.values(), S.shape)
    fast = CountMatrix.from_input(S)
    ref = CountMatrix(*torch.nonzero(X, as_tuple=True), X[X != 0].to(dtype), tuple(X.shape))
    assert fast.values.data_ptr() == S.values().data_ptr()  # shared, not copied
    for name in ("crow", "cols", "ccol", "csc_pos", "rows_by_col", "values", "row_totals", "col_totals",
                 "row_totals64", "col_totals64", "log_factorial64", "log_factorial"):
        a, b = getattr(fast, name), getattr(ref, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    # not canonical (a row's columns out of order, or an explicit zero): the general path, same result
    crow, col, val = S.crow_indices(), S.col_indices().clone(), S.values().clone()
    lo = int(crow[0])
    col[lo:lo + 2] = col[lo:lo + 2].flip(0)
    val[lo:lo + 2] = val[lo:lo + 2].flip(0)
    shuffled = CountMatrix.from_input(torch.sparse_csr_tensor(crow, col, val, S.shape, check_invariants=False))
    zero = val.clone()
    zero[3] = 0
    with_zero = CountMatrix.from_input(torch.sparse_csr_tensor(crow, S.col_indices(), zero, S.shape))
    assert torch.equal(shuffled.values, ref.values) and torch.equal(shuffled.csc_pos, ref.csc_pos)
    assert with_zero.nnz == ref.nnz - 1


@pytest.mark.parametrize("chunk", [None, 13])
@pytest.mark.parametrize("block", [None, 7])
def test_column_sums_of_a_streamed_batch_without_its_column_pattern(monkeypatch, chunk, block):
    """A CountMatrix made from canonical CSR builds no column-major pattern: the column sums go block by block."""
    from torchnmf.poisson import gamma as gamma_mod
    from torchnmf.poisson.gamma import expected_counts

    if block is not None:  # the transposes in parts of _BLOCK nonzeros, many parts per block
        monkeypatch.setattr(gamma_mod, "_BLOCK", block)

    X, _, _ = simulate(40, 23, 3)
    X[:, 7] = 0
    g = torch.Generator().manual_seed(4)
    elog_u, elog_a = torch.randn(40, 3, generator=g, dtype=DT), torch.randn(23, 3, generator=g, dtype=DT)
    lean = CountMatrix.from_input(X.to_sparse_csr())
    full = CountMatrix.from_input(X)
    assert not lean.has_csc and full.has_csc
    got = expected_counts(lean, elog_u, elog_a, chunk_size=chunk)
    ref = expected_counts(full, elog_u, elog_a, chunk_size=chunk)
    assert not lean.has_csc  # still not built
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    lean.csc_pos  # built on first use, equal to the general path's
    assert lean.has_csc and torch.equal(lean.csc_pos, full.csc_pos) and torch.equal(lean.ccol, full.ccol)
