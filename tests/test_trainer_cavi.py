"""Tests of the CAVI trainer (torchnmf.trainer.cavi)."""
import copy
import threading

import numpy as np
import pytest
import torch
from scipy.special import digamma, logsumexp

from torchnmf.poisson import CountMatrix, GammaPoisson
from gamma_helpers import gamma_params, make_gamma, simulate_gamma, huge_float32 as _huge_float32
from torchnmf.trainer import CAVI

DT = torch.float64


def simulate(n=30, m=20, K=3, seed=0):
    return simulate_gamma(n, m, K, seed=seed)[0]


def make(X, K=3, seed=0, **kw):
    return make_gamma(X, K, seed, **kw)


params = gamma_params


def np_sweep(X, sU, rU, sA, rA, a, b, kappa, lam):
    """One CAVI sweep written densely with explicit phi (independent reference)."""
    K = sU.shape[1]

    def counts(sU, rU, sA, rA):
        ElU, ElA = digamma(sU) - np.log(rU), digamma(sA) - np.log(rA)
        logits = ElU[:, None, :] + ElA[None, :, :]
        phi = np.exp(logits - logsumexp(logits, axis=2, keepdims=True))
        xphi = X[:, :, None] * phi
        return xphi.sum(1), xphi.sum(0)

    rows, _ = counts(sU, rU, sA, rA)
    sU, rU = a + rows, kappa[:, None] + (sA / rA).sum(0)
    _, cols = counts(sU, rU, sA, rA)
    sA, rA = b + cols, lam[:, None] + (sU / rU).sum(0)
    kappa = a * K / (sU / rU).sum(1)
    lam = b * K / (sA / rA).sum(1)
    return sU, rU, sA, rA, kappa, lam


def test_step_matches_numpy_sweep_and_returns_elbo_after():
    X = simulate()
    layer = make(X)
    trainer = CAVI(layer)
    state = [*params(layer), layer.kappa.numpy().copy(), layer.lambda_.numpy().copy()]
    for _ in range(3):
        record = trainer.step(lambda: X)
        sU, rU, sA, rA, kappa, lam = state
        state = list(np_sweep(X.numpy(), sU, rU, sA, rA, float(layer.a), float(layer.b), kappa, lam))
        for got, want in zip([*params(layer), layer.kappa.numpy(), layer.lambda_.numpy()], state):
            np.testing.assert_allclose(got, want, rtol=1e-10)
        fresh = layer.elbo(X)
        for name in ("Z", "U_kls", "alpha_kls", "total"):
            np.testing.assert_allclose(float(getattr(record, name)), float(getattr(fresh, name)), rtol=1e-12)
    assert trainer.steps == 3


def test_elbo_increases_every_step_on_digits(digits):
    X = digits[:500]
    trainer = CAVI(make(X, 6), chunk_size=4096)
    values = [float(trainer.step(lambda: X).total) for _ in range(25)]
    assert (np.diff(values) >= -1e-9 * np.abs(values[1:])).all()


def test_cache_invalidated_when_parameters_change():
    X = simulate()
    layer = make(X)
    trainer = CAVI(layer)
    trainer.step(lambda: X)
    layer.reset_parameters(torch.Generator().manual_seed(5))
    with torch.no_grad():
        layer.kappa.mul_(1.5)
    twin = copy.deepcopy(layer)
    trainer.step(lambda: X)
    CAVI(twin).step(lambda: X)
    for p, q in zip(params(layer), params(twin)):
        np.testing.assert_allclose(p, q, rtol=1e-12)


def test_resume_follows_same_trajectory():
    X = simulate()
    layer = make(X)
    trainer = CAVI(layer, chunk_size=50)
    for _ in range(4):
        trainer.step(lambda: X)
    saved_layer = copy.deepcopy(layer.state_dict())
    saved_trainer = copy.deepcopy(trainer.state_dict())
    expected = [float(trainer.step(lambda: X).total) for _ in range(4)]
    resumed = make(X, seed=7)
    resumed.load_state_dict(saved_layer)
    trainer2 = CAVI(resumed)
    trainer2.load_state_dict(saved_trainer)
    assert trainer2.steps == 4 and trainer2.param_groups[0]["chunk_size"] == 50
    got = [float(trainer2.step(lambda: X).total) for _ in range(4)]
    np.testing.assert_allclose(got, expected, rtol=1e-13)
    for p, q in zip(params(layer), params(resumed)):
        np.testing.assert_allclose(p, q, rtol=1e-13)
    assert trainer2.steps == 8


def test_fit_with_given_trainer_resumes():
    X = simulate()
    layer = make(X)
    trainer = CAVI(layer)
    layer.fit(X, max_iter=3, tol=0, trainer=trainer)
    assert trainer.steps == 3


def test_data_parallel_shards_with_reduce_equal_full_sweep():
    # Two "processes" (threads), each holding a copy of the layer and a shard of rows; reduce
    # sums the global statistics over the shards, as torch.distributed.all_reduce would.
    X = simulate(24, 15)
    full = make(X)
    shards = [torch.arange(0, 10), torch.arange(10, 24)]
    layers = [copy.deepcopy(full) for _ in shards]
    barrier = threading.Barrier(2)
    slots = [None, None]

    def reducer(i):
        def reduce(stats):
            slots[i] = stats
            barrier.wait()
            out = dict(stats)
            for key in GammaPoisson.global_statistics:
                if key in stats:
                    out[key] = slots[0][key] + slots[1][key]
            barrier.wait()
            return out
        return reduce

    records = [[], []]

    def work(i):
        trainer = CAVI(layers[i], reduce=reducer(i))
        rows = shards[i]
        Xi = X[rows]
        for _ in range(3):
            records[i].append(trainer.step(lambda: (Xi, rows)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ref = CAVI(full)
    ref_records = [ref.step(lambda: X) for _ in range(3)]
    for i, rows in enumerate(shards):
        np.testing.assert_allclose(layers[i].mean_alpha().detach(), full.mean_alpha().detach(), rtol=1e-10)
        np.testing.assert_allclose(layers[i].mean_U(rows).detach(), full.mean_U(rows).detach(), rtol=1e-10)
        np.testing.assert_allclose(layers[i].kappa[rows], full.kappa[rows], rtol=1e-10)
        np.testing.assert_allclose([float(r.total) for r in records[i]], [float(r.total) for r in ref_records],
                                   rtol=1e-10)


def test_frozen_alpha_is_left_alone():
    X = simulate()
    layer = make(X)
    layer.alpha_shape.requires_grad_(False)
    layer.alpha_rate.requires_grad_(False)
    before = params(layer)
    trainer = CAVI(layer, update_hyper=False)
    values = [float(trainer.step(lambda: X).total) for _ in range(5)]
    after = params(layer)
    np.testing.assert_array_equal(before[2], after[2])
    np.testing.assert_array_equal(before[3], after[3])
    assert not np.allclose(before[0], after[0])
    assert (np.diff(values) >= -1e-9 * np.abs(values[1:])).all()


def test_float32_step():
    X = simulate().float()
    layer = make(X, dtype=torch.float32)
    record = CAVI(layer).step(lambda: X)
    assert record.total.dtype == torch.float32 and torch.isfinite(record.total)


def test_bad_use():
    X = simulate()
    layer = make(X)
    trainer = CAVI(layer)
    with pytest.raises(ValueError, match="closure"):
        trainer.step()  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="rows"):
        trainer.step(lambda: (X[:5], torch.arange(5)))
    with pytest.raises(ValueError, match="closure"):
        trainer.step(lambda: (X, None, 1.0, 2))
    with pytest.raises(ValueError, match="shape"):
        trainer.step(lambda: X[:, :3])
    with pytest.raises(TypeError, match="conjugate"):
        CAVI(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="chunk_size"):
        CAVI(layer, chunk_size=0)
    with pytest.raises(TypeError, match="reduce"):
        CAVI(layer, reduce=3)
    with pytest.raises(ValueError, match="one parameter group"):
        trainer.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))]})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_matches_cpu():
    X = simulate()
    cpu, gpu = make(X), make(X).cuda()
    a = [float(CAVI(cpu).step(lambda: X).total) for _ in range(1)]
    b = [float(CAVI(gpu).step(lambda: X.cuda()).total) for _ in range(1)]
    np.testing.assert_allclose(a, b, rtol=1e-10)
    for p, q in zip(params(cpu), params(gpu)):
        np.testing.assert_allclose(p, q, rtol=1e-10)


def test_same_data_object_is_indexed_once(monkeypatch):
    X = simulate()
    layer = make(X)
    calls = []
    original = layer.prepare

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(layer, "prepare", counting)
    trainer = CAVI(layer)
    for _ in range(3):
        trainer.step(lambda: X)
    raw = [c for c in calls if not isinstance(c, CountMatrix)]  # statistics() re-checks CountMatrix input
    assert len(raw) == 1 and raw[0] is X
    trainer.step(lambda: X.clone())  # a new object is indexed again
    assert len([c for c in calls if not isinstance(c, CountMatrix)]) == 2


def test_float32_counts_too_large_are_refused_by_the_step():
    # issue 22 item 5: CAVI.step returned NaN (GammaPoisson and GammaNMF chains) while fit raised
    from torch import nn
    from torchnmf.poisson import GammaNMF
    X = _huge_float32()
    layer = GammaPoisson(6, 5, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="X is too large for float32"):
        CAVI(layer).step(lambda: X)
    model = nn.Sequential(GammaNMF((6, 3), rank=2, dtype=torch.float32), GammaNMF(W=(5, 3), dtype=torch.float32))
    with pytest.raises(ValueError, match="X is too large for float32"):
        CAVI(model.parameters()).step(lambda: (X, model(None)))
    record = CAVI(GammaPoisson(6, 5, 2, dtype=DT)).step(lambda: X.double())  # float64 has the range
    assert torch.isfinite(record.total)
