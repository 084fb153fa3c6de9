import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.special import digamma

from torchnmf.estimators import GammaPoissonFactorization, NotFittedError
from torchnmf.history import History


def counts(n=30, c=15, k=3, seed=0):
    rng = np.random.RandomState(seed)
    U = rng.gamma(0.5, 2.0, (n, k))
    A = rng.gamma(0.5, 2.0, (c, k))
    return rng.poisson(U @ A.T).astype(np.int64)


def local_cavi_reference(X, a, kappa0, s_alpha, r_alpha, n_iter, learn_kappa=True):
    """Row-factor posteriors of new rows with q(alpha) fixed: plain numpy CAVI with dense phi."""
    n, _ = X.shape
    K = s_alpha.shape[1]
    Ea = s_alpha / r_alpha
    Elog_a = digamma(s_alpha) - np.log(r_alpha)
    kappa = np.full(n, kappa0)
    shape = np.full((n, K), a + 1.0)
    rate = kappa[:, None] + Ea.sum(0)
    for _ in range(n_iter):
        Elog_u = digamma(shape) - np.log(rate)
        logits = Elog_u[:, None, :] + Elog_a[None, :, :]  # (n, c, K)
        phi = np.exp(logits - logits.max(-1, keepdims=True))
        phi /= phi.sum(-1, keepdims=True)
        shape = a + (X[:, :, None] * phi).sum(1)
        if learn_kappa:
            kappa = a * K / (shape / rate).sum(1)
        rate = kappa[:, None] + Ea.sum(0)
    return shape / rate


def test_fit_elbo_increases_and_shapes():
    X = counts()
    est = GammaPoissonFactorization(3, max_iter=15, tol=0, random_state=0, device="cpu", dtype="float64")
    U = est.fit_transform(X)
    assert U.shape == (30, 3) and est.components_.shape == (3, 15)
    assert isinstance(est.history_, History) and est.history_.maximize
    totals = np.array(est.history_.values)
    assert len(totals) == est.n_iter_ == 15
    assert np.all(np.diff(totals) >= -1e-8 * np.abs(totals[:-1]))
    assert est.elbo_ == pytest.approx(totals[-1])
    assert len(est.history_.elbos) == 15 and hasattr(est.history_.elbos[0], "U_kls")
    np.testing.assert_allclose(U, est.module_.mean_U().detach().numpy())
    recon = est.inverse_transform(U)
    np.testing.assert_allclose(recon, U @ est.components_)


def test_transform_matches_numpy_reference():
    X = counts()
    est = GammaPoissonFactorization(3, max_iter=10, transform_max_iter=25, random_state=0, device="cpu",
                                    dtype="float64").fit(X)
    m = est.module_
    Xnew = counts(n=6, seed=5)
    got = est.transform(Xnew)
    ref = local_cavi_reference(Xnew.astype(float), float(m.a), float(m.kappa.mean()),
                               m.q_alpha().concentration.detach().numpy(), m.q_alpha().rate.detach().numpy(), 25,
                               learn_kappa=est.learn_kappa)
    np.testing.assert_allclose(got, ref, rtol=1e-8)
    # rows are independent of each other
    np.testing.assert_allclose(est.transform(Xnew[:2]), got[:2], rtol=1e-10)


def test_transform_close_to_fit_after_convergence():
    X = counts()
    est = GammaPoissonFactorization(3, max_iter=100, tol=1e-10, transform_max_iter=100, random_state=0,
                                    device="cpu", dtype="float64")
    U = est.fit_transform(X)
    np.testing.assert_allclose(est.transform(X), U, rtol=0.02, atol=1e-3 * U.max())


def test_input_types_agree_and_input_untouched():
    X = counts()
    X0 = X.copy()
    kw = dict(n_components=3, max_iter=5, random_state=1, device="cpu", dtype="float64")
    U_np = GammaPoissonFactorization(**kw).fit_transform(X)
    assert isinstance(U_np, np.ndarray)
    U_sp = GammaPoissonFactorization(**kw).fit_transform(sp.csr_matrix(X))
    Xt = torch.tensor(X, dtype=torch.float64)
    U_t = GammaPoissonFactorization(**kw).fit_transform(Xt)
    U_ts = GammaPoissonFactorization(**kw).fit_transform(Xt.to_sparse())
    assert isinstance(U_t, torch.Tensor)
    np.testing.assert_allclose(U_sp, U_np, rtol=1e-9)
    np.testing.assert_allclose(U_t.numpy(), U_np, rtol=1e-9)
    np.testing.assert_allclose(U_ts.numpy(), U_np, rtol=1e-9)
    assert np.array_equal(X, X0)


def test_recovers_factors_on_simulated_data():
    rng = np.random.RandomState(0)
    K = 3
    U = rng.gamma(0.3, 10.0, (120, K))
    A = rng.gamma(0.3, 3.0, (60, K))
    X = rng.poisson(U @ A.T)
    est = GammaPoissonFactorization(K, max_iter=50, random_state=0, device="cpu", dtype="float64")
    Uhat = est.fit_transform(X)
    C = np.corrcoef(U.T, Uhat.T)[:K, K:]
    # greedy matching of components
    best = [C[i].max() for i in range(K)]
    assert min(best) > 0.8


def test_pickle_roundtrip():
    X = counts()
    est = GammaPoissonFactorization(2, max_iter=3, transform_max_iter=5, random_state=0, device="cpu").fit(X)
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_allclose(again.transform(X), est.transform(X))


@pytest.mark.parametrize(
    "params, X, match",
    [
        (dict(), np.array([[1.5, 2.0], [1.0, 0.0]]), "integer"),
        (dict(), -np.ones((3, 2)), "Negative values"),
        (dict(), np.full((3, 2), np.inf), "infinity|inf"),
        (dict(n_components=0), np.ones((3, 2)), "n_components"),
        (dict(a=0.0), np.ones((3, 2)), "a must"),
        (dict(max_iter=0), np.ones((3, 2)), "max_iter"),
    ],
)
def test_bad_input(params, X, match):
    with pytest.raises(ValueError, match=match):
        GammaPoissonFactorization(**{"device": "cpu", "max_iter": 2, **params}).fit(X)


def test_noninteger_allowed_with_flag():
    X = np.array([[1.5, 2.0, 0.0], [1.0, 0.0, 3.2], [0.5, 0.5, 0.5]])
    U = GammaPoissonFactorization(2, max_iter=3, allow_noninteger=True, random_state=0, device="cpu").fit_transform(X)
    assert np.isfinite(U).all()


def test_not_fitted():
    with pytest.raises(NotFittedError):
        GammaPoissonFactorization(device="cpu").transform(np.ones((2, 2)))


def test_empty_rows_and_columns_are_finite():
    X = counts()
    X[0] = 0
    X[:, 3] = 0
    est = GammaPoissonFactorization(3, max_iter=5, random_state=0, device="cpu").fit(X)
    assert np.isfinite(est.components_).all() and np.isfinite(est.transform(X)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs cuda")
def test_cuda_matches_cpu():
    X = counts()
    kw = dict(n_components=3, max_iter=5, random_state=0, dtype="float64")
    U_cpu = GammaPoissonFactorization(device="cpu", **kw).fit_transform(X)
    U_gpu = GammaPoissonFactorization(device="cuda", **kw).fit_transform(X)
    np.testing.assert_allclose(U_gpu, U_cpu, rtol=1e-6)


# -- init: posterior means from a KL-NMF solution or NNDSVDa ------------------------------

def test_set_means_gives_the_means_and_coordinate_step_shapes():
    from torchnmf.poisson import GammaPoisson

    rng = np.random.RandomState(0)
    U, A = rng.gamma(1.0, 1.0, (12, 3)), rng.gamma(1.0, 1.0, (9, 3))
    U[0, 0] = 0.0  # a zero mean is raised to the floor, not turned into a NaN
    U_in, A_in = U.copy(), A.copy()
    layer = GammaPoisson(12, 9, 3, a=0.3, b=0.5, dtype=torch.float64)
    layer.set_means(U, A)
    np.testing.assert_array_equal(U, U_in)  # inputs untouched
    np.testing.assert_array_equal(A, A_in)
    mU, mA = layer.mean_U().detach().numpy(), layer.mean_alpha().detach().numpy()
    np.testing.assert_allclose(mU[1:], U[1:], rtol=1e-12)
    np.testing.assert_allclose(mA, A, rtol=1e-12)
    assert 0 < mU[0, 0] <= 1e-11 * U.max()
    np.testing.assert_allclose(layer.U_shape.detach().numpy()[1:], 0.3 + U[1:] * A.sum(0), rtol=1e-12)
    np.testing.assert_allclose(layer.alpha_shape.detach().numpy(), 0.5 + A * mU.sum(0), rtol=1e-12)
    # learned prior rates at their empirical-Bayes values for these means
    np.testing.assert_allclose(layer.lambda_.numpy(), 0.5 * 3 / A.sum(1), rtol=1e-12)
    for bad, match in [(-U, "non-negative"), (np.zeros_like(U), "all zero"), (U[:5], "shape"),
                       (np.full_like(U, np.nan), "finite")]:
        with pytest.raises(ValueError, match=match):
            layer.set_means(bad, A)


def test_nmf_init_starts_at_the_kl_nmf_solution():
    from torchnmf.estimators import BetaNMF

    X = counts(40, 20, 3, seed=1)
    est = GammaPoissonFactorization(3, init="nmf", init_max_iter=30, max_iter=1, random_state=0,
                                    device="cpu", dtype="float64")
    V = torch.as_tensor(X, dtype=torch.float64)
    H, W = est._start(V, 3)
    assert H.shape == (40, 3) and W.shape == (20, 3)
    nmf = BetaNMF(3, beta_loss="kullback-leibler", init="nndsvda", max_iter=30, tol=1e-4, device="cpu",
                 dtype="float64")
    H0 = nmf.fit_transform(X)
    # the same product, rescaled per component so both factors have equal totals
    np.testing.assert_allclose((H @ W.T).numpy(), H0 @ nmf.components_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(H.sum(0).numpy(), W.sum(0).numpy(), rtol=1e-9)


@pytest.mark.parametrize("init", ["nmf", "nndsvda", "random"])
def test_inits_are_finite_and_reproducible(init):
    X = counts()
    X[0] = 0
    X[:, 3] = 0
    kw = dict(init=init, max_iter=5, tol=0, device="cpu", dtype="float64")
    est = GammaPoissonFactorization(3, random_state=0, **kw)
    U = est.fit_transform(X)
    assert np.isfinite(U).all() and np.isfinite(est.components_).all() and np.isfinite(est.elbo_)
    np.testing.assert_array_equal(U, GammaPoissonFactorization(3, random_state=0, **kw).fit_transform(X))
    other = GammaPoissonFactorization(3, random_state=1, **kw).fit_transform(X)
    # the NMF and NNDSVDa starts do not draw random numbers (exact SVD at this size)
    assert np.array_equal(U, other) == (init != "random")


@pytest.mark.parametrize("params, match", [(dict(init="kmeans"), "init"), (dict(init=None), "init"),
                                           (dict(init_max_iter=0), "init_max_iter")])
def test_bad_init_refused(params, match):
    with pytest.raises(ValueError, match=match):
        GammaPoissonFactorization(2, device="cpu", **params).fit(counts())


def test_nmf_start_reaches_a_higher_elbo_than_random_starts():
    from gamma_helpers import simulate_gamma

    gaps = []
    for seed in range(4):
        X = simulate_gamma(60, 40, 4, seed=seed)[0].numpy()
        kw = dict(max_iter=60, tol=0, device="cpu", dtype="float64")
        nmf = GammaPoissonFactorization(4, init="nmf", **kw).fit(X).elbo_
        rand = GammaPoissonFactorization(4, init="random", random_state=seed, **kw).fit(X).elbo_
        gaps.append((nmf - rand) / abs(rand))
    assert np.mean(gaps) > 0, gaps


def test_all_zero_counts_are_named_as_X():
    # issue 22.10: was "U is all zero", the name of set_means' argument, not the user's
    for X in (np.zeros((4, 3)), sp.csr_matrix((4, 3))):
        with pytest.raises(ValueError, match=r"X is all zero: init='nmf' .* init='random'"):
            GammaPoissonFactorization(2).fit(X)
    est = GammaPoissonFactorization(2, init="random", max_iter=2, random_state=0).fit(np.zeros((4, 3)))
    assert np.isfinite(est.elbo_)
