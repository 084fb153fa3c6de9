"""Tests of deep Poisson factorization: GammaNMF chains trained by CAVI and NaturalGradient."""
import copy

import numpy as np
import pytest
import scipy.sparse
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import digamma, gammaln, logsumexp
from torch import nn

from gamma_helpers import DT, gamma_params, make_gamma, simulate_gamma, huge_float32 as _huge_float32
from torchnmf import NMF
from torchnmf.poisson import GammaNMF, chain_elbo
from torchnmf.trainer import CAVI, NaturalGradient


def deep(N=30, C=20, K0=3, K1=5, K2=None, seed=0, **kw):
    """A chain H (N, K0) · W1 (K1, K0)ᵀ [· W2 (K2, K1)ᵀ] · W_last (C, ·)ᵀ of GammaNMF layers."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(dtype=DT, generator=g, **kw)
    if K2 is None:
        return nn.Sequential(GammaNMF((N, K1), rank=K0, **kw), GammaNMF(W=(C, K1), **kw))
    return nn.Sequential(GammaNMF((N, K1), rank=K0, **kw), GammaNMF(W=(K2, K1), **kw), GammaNMF(W=(C, K2), **kw))


def simulate_deep(N=30, C=20, K0=3, K1=5, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    H = torch._standard_gamma(torch.full((N, K0), 0.5, dtype=DT), generator=g)
    W1 = torch._standard_gamma(torch.full((K1, K0), 0.5, dtype=DT), generator=g)
    W2 = torch._standard_gamma(torch.full((C, K1), 0.5, dtype=DT), generator=g) * scale
    return torch.poisson(H @ W1.T @ W2.T, generator=g), H, W1, W2


def run(trainer, model, X, n):
    return [trainer.step(lambda: (X, model(None))) for _ in range(n)]


def totals(records):
    return np.array([float(r.total) for r in records])


def assert_monotone(values):
    assert (np.diff(values) >= -1e-9 * np.abs(values[1:])).all(), np.diff(values).min()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- slow numpy references with explicit path counts -----------------------------------
def np_kl_gamma(s1, r1, s2, r2):
    return ((s1 - s2) * digamma(s1) - gammaln(s1) + gammaln(s2) + s2 * (np.log(r1) - np.log(r2))
            + s1 * (r2 - r1) / r1)


def np_state(model):
    """Per factor: (shape, rate, prior shape, prior rate) as numpy, in chain order H, W1, W2."""
    out = []
    for i, layer in enumerate(model):
        for name in (("H", "W") if i == 0 else ("W",)):
            out.append([getattr(layer, f"{name}_{p}").detach().numpy().copy()
                        for p in ("shape", "rate", "prior_shape", "prior_rate")])
    return out


def np_paths(X, elogs):
    """phi over explicit paths (k0, k1) of a depth-2 chain, and Σ X log Σ_path exp(...)."""
    lH, l1, l2 = elogs
    N, C = X.shape
    logits = lH[:, None, :, None] + l1.T[None, None, :, :] + l2[None, :, None, :]  # (N, C, K0, K1)
    flat = logits.reshape(N, C, -1)
    lse = logsumexp(flat, axis=2)
    phi = np.exp(flat - lse[..., None]).reshape(logits.shape)
    return phi, (X * lse).sum()


def np_elbo_depth2(X, state):
    elogs = [digamma(s) - np.log(r) for s, r, _, _ in state]
    means = [s / r for s, r, _, _ in state]
    _, lognorm = np_paths(X, elogs)
    expected = (means[0][:, None, :, None] * means[1].T[None, None] * means[2][None, :, None, :]).sum()
    data = lognorm - gammaln(X + 1).sum() - expected
    kls = [np_kl_gamma(s, r, a, b[:, None]).sum() for s, r, a, b in state]
    return data, kls


def np_sweep_depth2(X, state):
    """One CAVI sweep with explicit phi: H with phi at the start, then W1, W2 with phi refreshed once."""
    state = [list(f) for f in state]

    def elogs():
        return [digamma(s) - np.log(r) for s, r, _, _ in state]

    def means():
        return [s / r for s, r, _, _ in state]

    phi, _ = np_paths(X, elogs())
    xphi = X[:, :, None, None] * phi  # (N, C, K0, K1)
    M = means()
    a, b = state[0][2], state[0][3]
    state[0][0] = a + xphi.sum((1, 3))
    state[0][1] = b[:, None] + np.einsum("ij,cj->i", M[1].T, M[2])[None, :]
    phi, _ = np_paths(X, elogs())
    xphi = X[:, :, None, None] * phi
    M = means()
    a, b = state[1][2], state[1][3]
    state[1][0] = a + xphi.sum((0, 1)).T
    state[1][1] = b[:, None] + np.outer(M[2].sum(0), M[0].sum(0))
    M = means()
    a, b = state[2][2], state[2][3]
    state[2][0] = a + xphi.sum((0, 2))
    state[2][1] = b[:, None] + (M[0].sum(0) @ M[1].T)[None, :]
    for f in state:
        f[3] = f[2] * f[0].shape[1] / (f[0] / f[1]).sum(1)
    return state


# -- the layer ---------------------------------------------------------------------------
def test_layer_chains_like_nmf_outside_trainers():
    model = nn.Sequential(GammaNMF((12, 10), rank=4), GammaNMF(W=(24, 10)), GammaNMF(W=(7, 24)))
    out = model(None)
    assert out.shape == (12, 7) and bool((out > 0).all())
    first, second, third = model
    expected = first.H @ first.W.T @ second.W.T @ third.W.T
    torch.testing.assert_close(out, expected)
    assert first.H.shape == (12, 4) and first.W.shape == (10, 4) and second.H is None
    q = second.q("W")
    assert q.batch_shape == (24, 10)
    torch.testing.assert_close(q.mean, second.mean("W"))
    torch.testing.assert_close(second.geometric_mean("W"), torch.exp(second.log_mean("W")))
    assert float(second.kl("W").detach()) > 0


def test_layer_from_tensors_keeps_means_and_input():
    W = torch.rand(6, 3, dtype=DT) + 0.1
    H = torch.rand(5, 3, dtype=DT) + 0.1
    W0, H0 = W.clone(), H.clone()
    layer = GammaNMF(W=W, H=H, trainable_W=False)
    torch.testing.assert_close(layer.W, W)
    torch.testing.assert_close(layer.H, H)
    assert layer.dtype == DT and layer.rank == 3
    assert not layer.W_shape.requires_grad and layer.H_shape.requires_grad
    assert torch.equal(W, W0) and torch.equal(H, H0)


def test_depth_one_equals_gamma_poisson_trajectory():
    X = simulate_gamma(30, 20, 3)[0]
    ref = make_gamma(X, 3)
    model = nn.Sequential(GammaNMF(X.shape, rank=3, dtype=DT, generator=torch.Generator().manual_seed(0)))
    layer = model[0]
    ref_trainer, trainer = CAVI(ref), CAVI(model.parameters())
    for _ in range(12):
        a = ref_trainer.step(lambda: X)
        b = trainer.step(lambda: (X, model(None)))
        np.testing.assert_allclose(float(b.total), float(a.total), rtol=1e-10)
        np.testing.assert_allclose(float(b.Z), float(a.Z), rtol=1e-10)
        np.testing.assert_allclose(float(b.H_kls), float(a.U_kls), rtol=1e-10)
        np.testing.assert_allclose(float(b.W1_kls), float(a.alpha_kls), rtol=1e-10)
    got = [layer.H_shape, layer.H_rate, layer.W_shape, layer.W_rate]
    for p, q in zip(gamma_params(ref), got):
        np.testing.assert_allclose(q.detach().numpy(), p, rtol=1e-10)
    np.testing.assert_allclose(layer.H_prior_rate, ref.kappa, rtol=1e-10)
    np.testing.assert_allclose(layer.W_prior_rate, ref.lambda_, rtol=1e-10)


def test_depth_two_elbo_matches_numpy_path_counts():
    X = simulate_deep(9, 7, 2, 3)[0]
    model = deep(9, 7, 2, 3)
    trainer = CAVI(model.parameters())
    for _ in range(3):
        record = trainer.step(lambda: (X, model(None)))
        data, kls = np_elbo_depth2(X.numpy(), np_state(model))
        np.testing.assert_allclose(float(record.Z), data, rtol=1e-8)
        for name, kl in zip(("H_kls", "W1_kls", "W2_kls"), kls):
            np.testing.assert_allclose(float(getattr(record, name)), kl, rtol=1e-8)
        np.testing.assert_allclose(float(chain_elbo(X, model).total), float(record.total), rtol=1e-12)


def test_depth_two_sweep_matches_numpy_path_counts():
    X = simulate_deep(9, 7, 2, 3, seed=1)[0]
    model = deep(9, 7, 2, 3, seed=1)
    trainer = CAVI(model.parameters())
    for _ in range(3):
        want = np_sweep_depth2(X.numpy(), np_state(model))
        trainer.step(lambda: (X, model(None)))
        for got_f, want_f in zip(np_state(model), want):
            for got, w in zip(got_f, want_f):
                np.testing.assert_allclose(got, w, rtol=1e-9)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_elbo_never_decreases(depth):
    X = simulate_deep(40, 25, 3, 6)[0]
    model = {1: lambda: nn.Sequential(GammaNMF(X.shape, rank=4, dtype=DT)),
             2: lambda: deep(40, 25, 3, 6),
             3: lambda: deep(40, 25, 3, 6, K2=8)}[depth]()
    values = totals(run(CAVI(model.parameters()), model, X, 40))
    assert_monotone(values)
    assert values[-1] > values[0]


def test_mixed_chain_elbo_never_decreases_and_moves_nmf_factor():
    X = simulate_deep(40, 25, 3, 6)[0]
    g = torch.Generator().manual_seed(3)
    middle = NMF(W=torch.rand(6, 5, dtype=DT, generator=g) + 0.1)
    model = nn.Sequential(GammaNMF((40, 5), rank=3, dtype=DT), middle, GammaNMF(W=(25, 6), dtype=DT))
    before = middle.W.detach().clone()
    records = run(CAVI(model.parameters()), model, X, 40)
    assert_monotone(totals(records))
    assert set(records[-1].kls) == {"H_kls", "W1_kls", "W3_kls"}  # the point-mass W2 has no KL
    assert not torch.allclose(middle.W, before)
    # an NMF layer at the bottom of the chain: point-mass H and W
    model = nn.Sequential(NMF((40, 6), rank=3).double(), GammaNMF(W=(25, 6), dtype=DT))
    assert_monotone(totals(run(CAVI(model.parameters()), model, X, 30)))


def test_elbo_never_decreases_on_real_counts(digits):
    X = digits[:300]
    model = nn.Sequential(GammaNMF((300, 8), rank=3, dtype=DT), GammaNMF(W=(64, 8), dtype=DT))
    values = totals(run(CAVI(model.parameters(), chunk_size=2000), model, X, 25))
    assert_monotone(values)


def test_pure_nmf_chain_under_cavi_is_kl_multiplicative_update():
    # a chain of NMF layers: CAVI's sweep is the KL MU, the data term is -KL + const, never decreasing
    X = simulate_deep(30, 20, 3, 5)[0]
    model = nn.Sequential(NMF((30, 5), rank=3).double(), NMF(W=(20, 5)).double())
    values = totals(run(CAVI(model.parameters()), model, X, 30))
    assert_monotone(values)


def test_frozen_factor_is_left_alone():
    X = simulate_deep(30, 20, 3, 5)[0]
    model = deep(30, 20, 3, 5)
    model[0].W_shape.requires_grad_(False)
    model[0].W_rate.requires_grad_(False)
    before = model[0].W_shape.detach().clone(), model[0].W_rate.detach().clone(), model[0].W_prior_rate.clone()
    h_before = model[0].H_shape.detach().clone()
    assert_monotone(totals(run(CAVI(model.parameters()), model, X, 10)))
    assert torch.equal(model[0].W_shape, before[0]) and torch.equal(model[0].W_rate, before[1])
    assert torch.equal(model[0].W_prior_rate, before[2])
    assert not torch.equal(model[0].H_shape, h_before)
    # parameters not given to the trainer are not changed either
    model2 = deep(30, 20, 3, 5)
    w_last = model2[1].W_shape.detach().clone()
    run(CAVI(list(model2[0].parameters())), model2, X, 3)
    assert torch.equal(model2[1].W_shape, w_last)


def test_recovers_depth_two_factors():
    # best ELBO of three restarts (CAVI finds local optima, as NMF does)
    X, H, W1, W2 = simulate_deep(200, 100, 3, 6, scale=10.0, seed=2)
    best = None
    for seed in range(3):
        model = deep(200, 100, 3, 6, seed=seed)
        value = float(run(CAVI(model.parameters()), model, X, 200)[-1].total)
        if best is None or value > best[0]:
            best = (value, model)
    model = best[1]
    Hm = model[0].H.detach().numpy()
    Wm = (model[1].W @ model[0].W).detach().numpy()  # (C, K0): the product of the W's
    corr = np.corrcoef(H.numpy().T, Hm.T)[:3, 3:]
    rows, cols = linear_sum_assignment(-corr)
    assert corr[rows, cols].min() > 0.9, corr
    corr_w = np.corrcoef((W2 @ W1).numpy().T, Wm.T)[:3, 3:]
    assert corr_w[rows, cols].min() > 0.9, corr_w


@pytest.mark.parametrize("kind", ["torch_coo", "torch_csr", "scipy", "numpy"])
def test_sparse_and_dense_input_agree(kind):
    X = simulate_deep(30, 20, 3, 5)[0]
    Xs = {"torch_coo": lambda: X.to_sparse(), "torch_csr": lambda: X.to_sparse_csr(),
          "scipy": lambda: scipy.sparse.csr_matrix(X.numpy()), "numpy": lambda: X.numpy().copy()}[kind]()
    dense, sparse = deep(30, 20, 3, 5), deep(30, 20, 3, 5)
    a = totals(run(CAVI(dense.parameters()), dense, X, 5))
    b = totals(run(CAVI(sparse.parameters()), sparse, Xs, 5))
    np.testing.assert_allclose(b, a, rtol=1e-12)
    for (k, p), q in zip(dense.state_dict().items(), sparse.state_dict().values()):
        np.testing.assert_allclose(q, p, rtol=1e-12, err_msg=k)


def test_state_dict_resume_reproduces_trajectory():
    X = simulate_deep(30, 20, 3, 5)[0]
    model = deep(30, 20, 3, 5)
    trainer = CAVI(model.parameters(), chunk_size=40)
    run(trainer, model, X, 4)
    saved_model, saved_trainer = snapshot(model), copy.deepcopy(trainer.state_dict())
    expected = totals(run(trainer, model, X, 4))
    resumed = deep(30, 20, 3, 5, seed=9)
    resumed.load_state_dict(saved_model)
    trainer2 = CAVI(resumed.parameters())
    trainer2.load_state_dict(saved_trainer)
    assert trainer2.steps == 4 and trainer2.param_groups[0]["chunk_size"] == 40
    np.testing.assert_allclose(totals(run(trainer2, resumed, X, 4)), expected, rtol=1e-13)
    for (k, p), q in zip(model.state_dict().items(), resumed.state_dict().values()):
        np.testing.assert_allclose(q, p, rtol=1e-13, err_msg=k)


def test_input_is_not_modified():
    X = simulate_deep(20, 15, 2, 4)[0]
    X[0, :3] = torch.tensor([1.0, 2.0, 0.0])
    copies = {"dense": X.clone(), "numpy": X.numpy().copy(), "scipy": scipy.sparse.csr_matrix(X.numpy())}
    kept = {"dense": X.clone(), "numpy": X.numpy().copy(), "scipy": copies["scipy"].copy()}
    for key, value in copies.items():
        model = deep(20, 15, 2, 4)
        run(CAVI(model.parameters()), model, value, 2)
        rows = torch.arange(5)
        NaturalGradient(model.parameters()).step(lambda: (value[:5] if key != "scipy" else value[:5], model(None), rows))
    assert torch.equal(copies["dense"], kept["dense"])
    np.testing.assert_array_equal(copies["numpy"], kept["numpy"])
    np.testing.assert_array_equal(copies["scipy"].toarray(), kept["scipy"].toarray())


# -- stochastic variational inference ----------------------------------------------------
@pytest.mark.parametrize("mixed", [False, True])
def test_svi_rho_one_full_batch_equals_cavi_sweep(mixed):
    X = simulate_deep(30, 20, 3, 5)[0]

    def build():
        if mixed:
            g = torch.Generator().manual_seed(1)
            return nn.Sequential(GammaNMF((30, 4), rank=3, dtype=DT, generator=g),
                                 NMF(W=torch.rand(5, 4, dtype=DT, generator=g) + 0.1),
                                 GammaNMF(W=(20, 5), dtype=DT, generator=g))
        return deep(30, 20, 3, 5, K2=4)

    m1, m2 = build(), build()
    svi = NaturalGradient(m1.parameters(), lr=1.0, forgetting_rate=0.0, local_iters=1)
    cavi = CAVI(m2.parameters())
    rows = torch.arange(30)
    for step in range(3):
        svi.step(lambda: (X, m1(None), rows) if step % 2 else (X, m1(None)))
        cavi.step(lambda: (X, m2(None)))
        for (k, p), q in zip(m2.state_dict().items(), m1.state_dict().values()):
            np.testing.assert_allclose(q, p, rtol=1e-11, err_msg=k)


def test_svi_without_estimate_takes_the_same_steps():
    X = simulate_deep(40, 20, 3, 5, seed=2)[0]
    m1, m2 = deep(40, 20, 3, 5), deep(40, 20, 3, 5)
    with_elbo = NaturalGradient(m1.parameters(), tau0=2.0, local_iters=2)
    without = NaturalGradient(m2.parameters(), tau0=2.0, local_iters=2, elbo_every=2)
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        rows = torch.randperm(40, generator=g)[:10]
        ref = with_elbo.step(lambda: (X[rows], m1(None), rows))
        got = without.step(lambda: (X[rows], m2(None), rows))
        if step % 2:
            assert got is None
        else:
            np.testing.assert_allclose(float(got.total), float(ref.total), rtol=1e-12)
        for (k, p), q in zip(m1.state_dict().items(), m2.state_dict().values()):
            np.testing.assert_allclose(q, p, rtol=1e-12, err_msg=k)


def test_svi_minibatches_raise_the_full_elbo():
    X = simulate_deep(200, 30, 3, 5, seed=4)[0]
    model = deep(200, 30, 3, 5)
    start = float(chain_elbo(X, model).total)
    trainer = NaturalGradient(model.parameters(), tau0=2.0, local_iters=5)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        rows = torch.randperm(200, generator=g)[:40]
        estimate = trainer.step(lambda: (X[rows], model(None), rows))
        assert torch.isfinite(estimate.total)
    assert float(chain_elbo(X, model).total) > start + 0.3 * abs(start)
    assert trainer.steps == 30


def test_svi_batch_touches_only_its_rows():
    X = simulate_deep(30, 20, 3, 5)[0]
    model = deep(30, 20, 3, 5)
    before = model[0].H_shape.detach().clone()
    rows = torch.tensor([3, 7, 11])
    NaturalGradient(model.parameters()).step(lambda: (X[rows], model(None), rows))
    other = torch.ones(30, dtype=torch.bool)
    other[rows] = False
    assert torch.equal(model[0].H_shape[other], before[other])
    assert not torch.equal(model[0].H_shape[rows], before[rows])


# -- bad input ------------------------------------------------------------------------------
def test_bad_input_is_named():
    X = simulate_deep(20, 15, 2, 4)[0]
    model = deep(20, 15, 2, 4)
    trainer = CAVI(model.parameters())
    bad = nn.Sequential(GammaNMF((20, 4), rank=2, dtype=DT), GammaNMF(W=(15, 5), dtype=DT))
    with pytest.raises(ValueError, match=r"GammaNMF.*W.*\(15, 5\).*4 columns.*rank 5"):
        CAVI(bad.parameters()).step(lambda: (X, bad(None)))
    with pytest.raises(ValueError, match="GammaNMF: input H has 4 columns"):
        bad(None)
    with pytest.raises(ValueError, match="X has shape"):
        trainer.step(lambda: (X[:, :5], model(None)))
    with pytest.raises(ValueError, match="must hold counts.*allow_noninteger=True.*GammaNMF"):
        trainer.step(lambda: (X + 0.5, model(None)))
    for value, message in ((float("nan"), "NaN"), (float("inf"), "NaN or inf"), (-1.0, "non-negative")):
        Xb = X.clone()
        Xb[0, 0] = value
        with pytest.raises(ValueError, match=message):
            trainer.step(lambda: (Xb, model(None)))
    dense = model(None)  # computed outside the closure: a plain tensor, not the chain
    with pytest.raises(TypeError, match="inside the closure"):
        trainer.step(lambda: (X, dense))
    with pytest.raises(ValueError, match="rows: CAVI"):
        trainer.step(lambda: (X[:3], model(None), torch.arange(3)))
    with pytest.raises(ValueError, match="closure must return"):
        trainer.step(lambda: X)
    for kw, name in (({"a": 0.0}, "a"), ({"a": -1.0}, "a"), ({"prior_rate": 0.0}, "prior_rate")):
        with pytest.raises(ValueError, match=name):
            GammaNMF((5, 4), rank=2, **kw)
    with pytest.raises(ValueError, match="W has rank 3 in dim 1, expected rank=2"):
        GammaNMF(W=(4, 3), H=(5, 2))
    with pytest.raises(ValueError, match="GammaNMF: W must be finite and non-negative"):
        GammaNMF(W=-torch.ones(3, 2))
    with pytest.raises(TypeError, match="conjugate"):
        CAVI(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="reduce"):
        CAVI(model.parameters(), reduce=lambda s: s)
    soft = nn.Sequential(GammaNMF((20, 4), rank=2, dtype=DT), NMF(W=(15, 4), mode="softplus").double())
    with pytest.raises(TypeError, match="mode='multiplicative'"):
        CAVI(soft.parameters()).step(lambda: (X, soft(None)))
    twice = GammaNMF(W=(4, 4), dtype=DT)
    loop = nn.Sequential(GammaNMF((20, 4), rank=2, dtype=DT), twice, twice, GammaNMF(W=(15, 4), dtype=DT))
    with pytest.raises(ValueError, match="twice"):
        CAVI(loop.parameters()).step(lambda: (X, loop(None)))
    svi = NaturalGradient(model.parameters())
    with pytest.raises(ValueError, match="rows"):
        svi.step(lambda: (X[:2], model(None), torch.tensor([0, 0])))


def test_noninteger_counts_when_allowed():
    X = simulate_deep(20, 15, 2, 4)[0] * 0.5
    model = deep(20, 15, 2, 4, allow_noninteger=True)
    assert_monotone(totals(run(CAVI(model.parameters()), model, X, 10)))


def test_float32_chain_step():
    X = simulate_deep(20, 15, 2, 4)[0].float()
    model = nn.Sequential(GammaNMF((20, 4), rank=2, dtype=torch.float32), GammaNMF(W=(15, 4), dtype=torch.float32))
    record = CAVI(model.parameters()).step(lambda: (X, model(None)))
    assert torch.isfinite(record.total)  # (log X! is accumulated in float64 by CountMatrix)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_contraction_split_is_planned():
    from torchnmf.poisson.chain import _plan

    # K0 = 5 at the H side, K1 = 20: the sampled product runs at rank 5 (split after H)
    s, left, right = _plan(((1000, 5), (20, 5), (300, 20)), 100000)
    assert s == 0 and left is None and right is not None
    # a wide top rank: split where the rank is small
    s, _, _ = _plan(((1000, 50), (4, 50), (300, 4)), 100000)
    assert s == 1


def test_float32_chain_elbo_record_never_decreases():
    # issue 22 item 7: the float32 ELBO pass's rounding exceeded the change near convergence
    # (here it fell at sweeps 199, 205, 230, 245, ...); the pass now runs in float64
    X = simulate_deep(12, 10, 2, 3)[0].float()
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(GammaNMF((12, 3), rank=2, dtype=torch.float32, generator=g),
                          GammaNMF(W=(10, 3), dtype=torch.float32, generator=g))
    records = run(CAVI(model.parameters()), model, X, 300)
    assert records[-1].total.dtype == torch.float64
    values = totals(records)
    assert (np.diff(values) >= 0).all(), np.nonzero(np.diff(values) < 0)[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    np.testing.assert_allclose(float(chain_elbo(X, model).total), values[-1], rtol=1e-12)


def test_float32_depth_one_follows_gamma_poisson_float32():
    # issue 22 item 7: GammaPoisson's float32 layer computes its ELBO pass (and the counts the
    # next sweep starts from) in float64; the chain did it in float32 and drifted away
    X = simulate_gamma(30, 20, 3)[0].float()
    ref = make_gamma(X, 3).float()
    model = nn.Sequential(GammaNMF(X.shape, rank=3, dtype=DT, generator=torch.Generator().manual_seed(0))).float()
    layer = model[0]
    ref_trainer, trainer = CAVI(ref), CAVI(model.parameters())
    for _ in range(60):
        a = ref_trainer.step(lambda: X)
        b = trainer.step(lambda: (X, model(None)))
        np.testing.assert_allclose(float(b.total), float(a.total), rtol=1e-6)
    for p, q in zip(gamma_params(ref), [layer.H_shape, layer.H_rate, layer.W_shape, layer.W_rate]):
        np.testing.assert_allclose(q.detach().numpy(), p, rtol=1e-9)


def test_float32_counts_too_large_are_refused_by_the_elbo():
    # issue 22 item 5: the ELBO of a chain was NaN without an error
    X = _huge_float32()
    model = nn.Sequential(GammaNMF((6, 3), rank=2, dtype=torch.float32), GammaNMF(W=(5, 3), dtype=torch.float32))
    with pytest.raises(ValueError, match="X is too large for float32"):
        chain_elbo(X, model)
    with pytest.raises(ValueError, match="X is too large for float32"):
        GammaNMF((6, 5), rank=2, dtype=torch.float32).elbo(X)
