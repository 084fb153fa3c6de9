"""Tests of the stochastic variational inference trainer (torchnmf.trainer.natural)."""
import contextlib
import copy

import numpy as np
import pytest
import torch
from scipy.special import digamma, logsumexp

from gamma_helpers import gamma_params, make_gamma, simulate_gamma, huge_float32 as _huge_float32
from torchnmf.trainer import CAVI, NaturalGradient

DT = torch.float64


def simulate(n=60, m=20, K=3, seed=0):
    return simulate_gamma(n, m, K, seed=seed)[0]


def make(X, K=3, seed=0, **kw):
    return make_gamma(X, K, seed, **kw)


params = gamma_params


def batches(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randperm(n, generator=g)[:size]


@pytest.mark.parametrize("full_rows", [False, True])
def test_rho_one_full_batch_equals_cavi_sweep(full_rows):
    X = simulate()
    svi_layer, cavi_layer = make(X), make(X)
    svi = NaturalGradient(svi_layer, lr=1.0, forgetting_rate=0.0, local_iters=1)
    cavi = CAVI(cavi_layer)
    rows = torch.arange(X.shape[0])
    for _ in range(3):
        assert svi.rho() == 1.0
        svi.step(lambda: (X, rows) if full_rows else X)
        cavi.step(lambda: X)
        for p, q in zip(params(svi_layer), params(cavi_layer)):
            np.testing.assert_allclose(p, q, rtol=1e-12)
        np.testing.assert_allclose(svi_layer.kappa, cavi_layer.kappa, rtol=1e-12)
        np.testing.assert_allclose(svi_layer.lambda_, cavi_layer.lambda_, rtol=1e-12)


def test_global_step_is_natural_gradient_towards_scaled_batch_estimate():
    X = simulate()
    layer = make(X)
    trainer = NaturalGradient(layer, lr=1.0, tau0=3.0, forgetting_rate=0.6, local_iters=4, local_tol=0)
    rows = torch.arange(10, 25)
    rho = trainer.rho()
    np.testing.assert_allclose(rho, 3.0 ** -0.6)
    old_sA, old_rA = params(layer)[2:]
    old_lam = layer.lambda_.numpy().copy()
    old_elog_a = (digamma(old_sA) - np.log(old_rA))
    trainer.step(lambda: (X[rows], rows))
    sU, rU, sA, rA = params(layer)
    # independent batch estimate from the new local posterior and the old q(alpha)
    scale = X.shape[0] / len(rows)
    ElU = digamma(sU[rows]) - np.log(rU[rows])
    logits = ElU[:, None, :] + old_elog_a[None]
    phi = np.exp(logits - logsumexp(logits, axis=2, keepdims=True))
    shape_hat = float(layer.b) + scale * (X[rows].numpy()[:, :, None] * phi).sum(0)
    rate_hat = old_lam[:, None] + scale * (sU[rows] / rU[rows]).sum(0)
    np.testing.assert_allclose(sA, (1 - rho) * old_sA + rho * shape_hat, rtol=1e-10)
    np.testing.assert_allclose(rA, (1 - rho) * old_rA + rho * rate_hat, rtol=1e-10)
    # rows outside the batch are untouched
    other = torch.arange(0, 10)
    fresh = make(X)
    np.testing.assert_array_equal(sU[other], params(fresh)[0][other])


def test_svi_approaches_cavi_optimum():
    X = simulate(120, 25)
    cavi_layer = make(X)
    cavi_layer.fit(X, max_iter=150, tol=1e-9)
    target = float(cavi_layer.elbo(X).total)
    layer = make(X)
    start = float(layer.elbo(X).total)
    trainer = NaturalGradient(layer, tau0=2.0, forgetting_rate=0.7, local_iters=10)
    it = batches(120, 30, 0)
    for _ in range(60):
        rows = next(it)
        est = trainer.step(lambda: (X[rows], rows))
        assert torch.isfinite(est.total)
    final = float(layer.elbo(X).total)
    assert final > start
    # 15 epochs of noisy steps: close to the CAVI optimum (which may be another local optimum)
    assert (target - final) < 0.06 * abs(target), (start, final, target)


def test_scheduler_drives_rho():
    X = simulate()
    layer = make(X)
    trainer = NaturalGradient(layer, lr=0.5, tau0=1.0, forgetting_rate=0.0, local_iters=2)
    sched = torch.optim.lr_scheduler.StepLR(trainer, step_size=2, gamma=0.5)
    rhos = []
    it = batches(60, 20, 1)
    for _ in range(5):
        rhos.append(trainer.rho())
        rows = next(it)
        trainer.step(lambda: (X[rows], rows))
        sched.step()
    np.testing.assert_allclose(rhos, [0.5, 0.5, 0.25, 0.25, 0.125])
    decaying = NaturalGradient(make(X), lr=1.0, tau0=4.0, forgetting_rate=0.5)
    assert decaying.rho() == pytest.approx(0.5)


def test_resume_follows_same_trajectory():
    X = simulate()
    layer = make(X)
    trainer = NaturalGradient(layer, tau0=2.0, local_iters=3)
    it = batches(60, 15, 2)
    for _ in range(3):
        rows = next(it)
        trainer.step(lambda: (X[rows], rows))
    saved = copy.deepcopy((layer.state_dict(), trainer.state_dict()))
    future = [next(it) for _ in range(3)]
    expected = [float(trainer.step(lambda: (X[r], r)).total) for r in future]
    resumed = make(X, seed=11)
    resumed.load_state_dict(saved[0])
    trainer2 = NaturalGradient(resumed)
    trainer2.load_state_dict(saved[1])
    assert trainer2.steps == 3 and trainer2.param_groups[0]["tau0"] == 2.0
    got = [float(trainer2.step(lambda: (X[r], r)).total) for r in future]
    np.testing.assert_allclose(got, expected, rtol=1e-13)
    for p, q in zip(params(layer), params(resumed)):
        np.testing.assert_allclose(p, q, rtol=1e-13)


def test_chunked_and_sparse_batches_agree():
    X = simulate()
    rows = torch.arange(5, 30)
    a, b = make(X), make(X)
    NaturalGradient(a, local_iters=3).step(lambda: (X[rows], rows))
    NaturalGradient(b, local_iters=3, chunk_size=11).step(lambda: (X[rows].to_sparse_csr(), rows.numpy()))
    for p, q in zip(params(a), params(b)):
        np.testing.assert_allclose(p, q, rtol=1e-12)


def test_bad_use():
    X = simulate()
    layer = make(X)
    for kw, name in [(dict(lr=0.0), "lr"), (dict(tau0=0.0), "tau0"), (dict(forgetting_rate=1.5), "forgetting_rate"),
                     (dict(forgetting_rate=-0.1), "forgetting_rate"), (dict(local_iters=0), "local_iters"),
                     (dict(local_tol=-1.0), "local_tol"), (dict(chunk_size=0), "chunk_size")]:
        with pytest.raises(ValueError, match=name):
            NaturalGradient(layer, **kw)
    trainer = NaturalGradient(layer, lr=2.0, forgetting_rate=0.0)
    before = params(layer)
    with pytest.raises(ValueError, match="rho"):
        trainer.step(lambda: X)
    trainer = NaturalGradient(layer)
    with pytest.raises(ValueError, match="no rows"):
        trainer.step(lambda: (X[:0], torch.arange(0)))
    with pytest.raises(ValueError, match="shape"):
        trainer.step(lambda: (X[:4], torch.arange(5)))
    with pytest.raises(ValueError, match="scale"):
        trainer.step(lambda: (X[:4], torch.arange(4), -1.0))
    with pytest.raises(ValueError, match="closure"):
        trainer.step()  # type: ignore[call-arg]
    for p, q in zip(before, params(layer)):
        np.testing.assert_array_equal(p, q)
    with pytest.raises(TypeError, match="conjugate"):
        NaturalGradient(torch.nn.Linear(2, 2))


def test_alpha_logs_cached_within_a_step_only(monkeypatch):
    """The SVI step computes digamma/log of q(α) once per batch (issue 16); same trajectory as
    recomputing them at every local iteration, and nothing is reused outside the step."""
    X = simulate()
    a, b = make(X), make(X)
    ta = NaturalGradient(a, local_iters=5, local_tol=0)
    tb = NaturalGradient(b, local_iters=5, local_tol=0)
    calls = []
    real = torch.digamma
    monkeypatch.setattr(torch, "digamma", lambda t: calls.append(tuple(t.shape)) or real(t))
    rows = torch.arange(5, 20)
    ta.step(lambda: (X[rows], rows))
    n_alpha = sum(1 for s in calls if s == tuple(a.alpha_shape.shape))
    monkeypatch.setattr(type(b), "alpha_fixed", lambda self: contextlib.nullcontext())
    tb.step(lambda: (X[rows], rows))
    for p, q in zip(params(a), params(b)):
        np.testing.assert_allclose(p, q, rtol=1e-12)
    # one for the local iterations (layer dtype), one for the ELBO pass, one for its KL:
    # at most 3 digammas of q(α) instead of one per local iteration
    assert n_alpha <= 3
    # after the step q(α) may change again: statistics see the new values
    before = a.statistics(X[rows], rows=rows, which=("U",))["U_counts"]
    a._write("alpha_shape", a.alpha_shape.detach() * 2)
    after = a.statistics(X[rows], rows=rows, which=("U",))["U_counts"]
    assert not torch.allclose(before, after)
    with a.alpha_fixed():
        np.testing.assert_allclose(a.statistics(X[rows], rows=rows, which=("U",))["U_counts"], after, rtol=1e-14)


def test_elbo_every_skips_the_estimate_not_the_step():
    """elbo_every=k (issue 16): the estimate only at steps t % k == 0, None elsewhere; a float64
    trajectory is the same as when every step computes it, and so are the estimates it gives."""
    X = simulate()
    a, b, c = make(X), make(X), make(X)
    every = NaturalGradient(a, tau0=2.0, local_iters=3)
    third = NaturalGradient(b, tau0=2.0, local_iters=3, elbo_every=3)
    never = NaturalGradient(c, tau0=2.0, local_iters=3, elbo_every=0)
    it = batches(60, 15, 3)
    for t in range(7):
        rows = next(it)
        ref = every.step(lambda: (X[rows], rows))
        got = third.step(lambda: (X[rows], rows))
        assert never.step(lambda: (X[rows], rows)) is None
        if t % 3:
            assert got is None
        else:
            np.testing.assert_allclose(float(got.total), float(ref.total), rtol=1e-12)
            np.testing.assert_allclose(float(got.data), float(ref.data), rtol=1e-12)
        for p, q, r in zip(params(a), params(b), params(c)):
            np.testing.assert_allclose(q, p, rtol=1e-10)
            np.testing.assert_allclose(r, p, rtol=1e-10)
        np.testing.assert_allclose(b.kappa, a.kappa, rtol=1e-10)
        np.testing.assert_allclose(c.lambda_, a.lambda_, rtol=1e-10)
    # the keyword overrides the setting for one step; the setting is kept in the state dict
    rows = next(it)
    assert never.step(lambda: (X[rows], rows), elbo=True) is not None
    assert every.step(lambda: (X[rows], rows), elbo=False) is None
    assert third.state_dict()["param_groups"][0]["elbo_every"] == 3
    for bad in (-1, 1.5, "2"):
        with pytest.raises((ValueError, TypeError), match="elbo_every"):
            NaturalGradient(make(X), elbo_every=bad)


def test_float32_layer_without_estimate_stays_close():
    """On steps without the estimate a float32 layer computes the q(α) statistics in float32
    (with it, in float64 for the ELBO): the two trajectories differ by float32 rounding only."""
    X = simulate()
    a, b = make(X, dtype=torch.float32), make(X, dtype=torch.float32)
    ta = NaturalGradient(a, tau0=2.0, local_iters=3, local_tol=0)
    tb = NaturalGradient(b, tau0=2.0, local_iters=3, local_tol=0, elbo_every=0)
    it = batches(60, 15, 4)
    for _ in range(6):
        rows = next(it)
        assert torch.isfinite(ta.step(lambda: (X[rows], rows)).total)
        tb.step(lambda: (X[rows], rows))
    for p, q in zip(params(a), params(b)):
        np.testing.assert_allclose(q, p, rtol=1e-4)


def test_batch_rows_checked_once_not_at_every_local_iteration(monkeypatch):
    """The rows tensor an SVI step passes at every local iteration is checked once (the
    checks cost host syncs); changed in place it is checked again, and bad rows still raise."""
    X = simulate()
    layer = make(X)
    trainer = NaturalGradient(layer, local_iters=5, local_tol=0)
    calls = []
    real = torch.unique
    monkeypatch.setattr(torch, "unique", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = torch.arange(5, 20)
    trainer.step(lambda: (X[rows], rows))
    assert len(calls) == 1
    # a float64 step with the checks every time gives the same values
    ref = make(X)
    NaturalGradient(ref, local_iters=5, local_tol=0).step(lambda: (X[rows], rows.tolist()))
    for p, q in zip(params(layer), params(ref)):
        np.testing.assert_allclose(p, q, rtol=1e-12)
    r = torch.arange(3)
    assert layer._rows(r) is r
    r[2] = 0  # now repeats an index: checked again
    with pytest.raises(ValueError, match="repeat"):
        layer.mean_U(r)
    with pytest.raises(ValueError, match="rows"):
        layer.mean_U(torch.tensor([0, 60]))


def test_float32_step_with_cache_equals_recomputing(monkeypatch):
    """float32 layer: the cached E log α / column factors (float32, local iterations) and the
    float64 ELBO pass beside them give the very values of recomputing everything per call."""
    X = simulate()
    a, b = make(X, dtype=torch.float32), make(X, dtype=torch.float32)
    ta = NaturalGradient(a, local_iters=4, local_tol=0)
    tb = NaturalGradient(b, local_iters=4, local_tol=0)
    rows = torch.arange(3, 33)
    ea = ta.step(lambda: (X[rows], rows))
    monkeypatch.setattr(type(b), "alpha_fixed", lambda self: contextlib.nullcontext())
    eb = tb.step(lambda: (X[rows], rows))
    assert float(ea.total) == float(eb.total)
    for p, q in zip(params(a), params(b)):
        np.testing.assert_array_equal(p, q)


def test_float32_counts_too_large_are_refused_by_the_step():
    # issue 22 item 5: NaturalGradient.step returned NaN (GammaPoisson and GammaNMF chains)
    from torch import nn
    from torchnmf.poisson import GammaNMF, GammaPoisson
    X = _huge_float32()
    layer = GammaPoisson(6, 5, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="X is too large for float32"):
        NaturalGradient(layer, tau0=2.0).step(lambda: (X, torch.arange(6)))
    model = nn.Sequential(GammaNMF((6, 3), rank=2, dtype=torch.float32), GammaNMF(W=(5, 3), dtype=torch.float32))
    with pytest.raises(ValueError, match="X is too large for float32"):
        NaturalGradient(model.parameters(), tau0=2.0).step(lambda: (X, model(None)))
