import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from torchnmf.estimators import BetaNMF, NotFittedError
from torchnmf.history import History


def poisson_data(n=40, c=12, r=3, seed=0):
    rng = np.random.RandomState(seed)
    return rng.poisson(rng.gamma(1.0, 1.0, (n, r)) @ rng.gamma(1.0, 1.0, (r, c)) * 2).astype(np.float64)


def beta_div_np(X, Y, beta):
    """Independent numpy beta-divergence d(X | Y) with 0 log 0 = 0."""
    if beta == 1:
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(X > 0, X * np.log(X / Y), 0.0)
        return float((t - X + Y).sum())
    if beta == 0:
        return float((X / Y - np.log(X / Y) - 1).sum())
    return float(((X ** beta + (beta - 1) * Y ** beta - beta * X * Y ** (beta - 1)) / (beta * (beta - 1))).sum())


def mu_reference(X, W, H, beta, n_iter):
    """Plain numpy beta-divergence multiplicative updates in torchnmf's layout X ≈ H Wᵀ."""
    eps = np.finfo(np.float32).eps
    gamma = 1 / (2 - beta) if beta < 1 else (1 / (beta - 1) if beta > 2 else 1.0)
    W, H = W.copy(), H.copy()
    for _ in range(n_iter):
        Y = np.maximum(H @ W.T, eps)
        H *= ((X * Y ** (beta - 2)) @ W / np.maximum(Y ** (beta - 1) @ W, eps)) ** gamma
        Y = np.maximum(H @ W.T, eps)
        W *= ((X * Y ** (beta - 2)).T @ H / np.maximum((Y ** (beta - 1)).T @ H, eps)) ** gamma
    return W, H


@pytest.mark.parametrize("beta_loss, beta", [("kullback-leibler", 1.0), ("frobenius", 2.0), (1.5, 1.5)])
def test_fit_matches_numpy_reference(beta_loss, beta):
    X = poisson_data()
    rng = np.random.RandomState(1)
    W0, H0 = rng.rand(12, 3) + 0.1, rng.rand(40, 3) + 0.1
    est = BetaNMF(3, beta_loss=beta_loss, max_iter=30, tol=0, device="cpu")
    H = est.fit_transform(X, W=W0, H=H0)
    Wr, Hr = mu_reference(X, W0, H0, beta, est.n_iter_)
    np.testing.assert_allclose(est.components_.T, Wr, rtol=1e-6)
    np.testing.assert_allclose(H, Hr, rtol=1e-6)
    err = beta_div_np(X, Hr @ Wr.T, beta)
    expected = (2 * err) ** 0.5 if beta == 2 else err
    np.testing.assert_allclose(est.reconstruction_err_, expected, rtol=1e-6)


@pytest.mark.parametrize("beta_loss", ["kullback-leibler", "frobenius", 0.5, 3.0])
def test_history_is_monotone(beta_loss):
    X = poisson_data() + 0.5
    est = BetaNMF(3, beta_loss=beta_loss, init="nndsvdar", max_iter=15, tol=0, random_state=0, device="cpu",
                  check_every=1).fit(X)
    vals = np.array(est.history_.values)
    assert isinstance(est.history_, History) and len(vals) == est.n_iter_ + 1
    assert np.all(np.diff(vals) <= 1e-9 * np.abs(vals[:-1]))


def test_matches_sklearn_mu_from_same_init():
    sk = pytest.importorskip("sklearn.decomposition")
    X = poisson_data()
    rng = np.random.RandomState(2)
    W0, H0 = rng.rand(12, 3) + 0.1, rng.rand(40, 3) + 0.1
    ref = sk.NMF(3, solver="mu", beta_loss="kullback-leibler", init="custom", max_iter=50, tol=0)
    Hs = ref.fit_transform(X, W=H0.copy(), H=W0.T.copy())
    est = BetaNMF(3, beta_loss="kullback-leibler", max_iter=50, tol=0, device="cpu")
    H = est.fit_transform(X, W=W0, H=H0)
    np.testing.assert_allclose(H, Hs, rtol=1e-6)
    np.testing.assert_allclose(est.components_, ref.components_, rtol=1e-6)


def test_input_types_give_same_result_and_output_type():
    X = poisson_data()
    kw = dict(n_components=3, max_iter=20, random_state=0, device="cpu", init="nndsvd")
    H_np = BetaNMF(**kw).fit_transform(X)
    assert isinstance(H_np, np.ndarray) and H_np.dtype == np.float64
    H_sp = BetaNMF(**kw).fit_transform(sp.csr_matrix(X))
    np.testing.assert_allclose(H_sp, H_np, rtol=1e-8, atol=1e-10)
    Xt = torch.tensor(X)
    H_t = BetaNMF(**kw).fit_transform(Xt)
    assert isinstance(H_t, torch.Tensor)
    np.testing.assert_allclose(H_t.numpy(), H_np, rtol=1e-8)
    H_ts = BetaNMF(**kw).fit_transform(Xt.to_sparse())
    np.testing.assert_allclose(H_ts.numpy(), H_np, rtol=1e-8, atol=1e-10)
    H_32 = BetaNMF(**kw).fit_transform(X.astype(np.float32))
    assert H_32.dtype == np.float32
    H_int = BetaNMF(**kw).fit_transform(X.astype(np.int64))
    assert H_int.dtype == np.float64
    H_forced = BetaNMF(dtype="float32", **kw).fit_transform(X)
    assert H_forced.dtype == np.float32


def test_input_is_not_modified():
    X = poisson_data()
    X0 = X.copy()
    Xt = torch.tensor(X)
    Xt0 = Xt.clone()
    est = BetaNMF(3, max_iter=10, random_state=0, device="cpu")
    est.fit_transform(X)
    est.transform(X)
    est.fit(Xt)
    est.transform(Xt)
    assert np.array_equal(X, X0) and torch.equal(Xt, Xt0)
    W0, H0 = np.ones((12, 3)), np.ones((40, 3))
    est.fit_transform(X, W=W0, H=H0)
    assert (W0 == 1).all() and (H0 == 1).all()


def test_transform_rows_independent_and_close_to_fit():
    X = poisson_data()
    est = BetaNMF(3, max_iter=300, tol=1e-9, random_state=0, device="cpu", init="nndsvda")
    H = est.fit_transform(X)
    Ht = est.transform(X)
    np.testing.assert_allclose(Ht, H, atol=0.05 * np.abs(H).max())
    np.testing.assert_allclose(est.transform(X[:7]), Ht[:7], rtol=1e-10)
    recon = est.inverse_transform(H)
    assert recon.shape == X.shape
    np.testing.assert_allclose(recon, H @ est.components_)


def test_transform_of_sparse_csr_tensor():
    X = torch.rand(20, 6, dtype=torch.float64)
    est = BetaNMF(n_components=2, max_iter=5, device="cpu", random_state=0).fit(X)
    dense = est.transform(X)
    for S in (X.to_sparse_csr(), X.to_sparse_coo()):
        torch.testing.assert_close(est.transform(S), dense)


def test_regularization_shrinks():
    X = poisson_data()
    plain = BetaNMF(3, max_iter=50, random_state=0, device="cpu").fit(X)
    reg = BetaNMF(3, max_iter=50, random_state=0, device="cpu", alpha=5.0, l1_ratio=1.0).fit(X)
    assert reg.components_.sum() < plain.components_.sum()


def test_nmfd_layer():
    t = np.arange(60)
    X = np.zeros((60, 5))
    X[t % 10 == 0, 0] = 3.0
    X[t % 10 == 1, 1] = 2.0
    X += 0.01
    est = BetaNMF(1, layer="nmfd", T=2, max_iter=30, tol=0, random_state=0, device="cpu").fit(X)
    vals = np.array(est.history_.values)
    assert np.all(np.diff(vals) <= 1e-9 * vals[:-1]) and vals[-1] < 0.2 * vals[0]
    H = est.transform(X)
    assert H.shape == (60, 1)
    assert est.inverse_transform(H).shape == X.shape
    assert est.module_.W.shape == (5, 1, 2)


def test_pickle_and_clone():
    from sklearn.base import clone

    X = poisson_data()
    est = BetaNMF(3, max_iter=10, random_state=0, device="cpu").fit(X)
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_allclose(again.transform(X), est.transform(X))
    assert again.history_.values == est.history_.values
    assert clone(est).get_params() == est.get_params()


def test_random_state_reproducible():
    X = poisson_data()
    a = BetaNMF(3, init="random", max_iter=5, random_state=3, device="cpu").fit_transform(X)
    b = BetaNMF(3, init="random", max_iter=5, random_state=3, device="cpu").fit_transform(X)
    c = BetaNMF(3, init="random", max_iter=5, random_state=4, device="cpu").fit_transform(X)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_set_output_pandas():
    pd = pytest.importorskip("pandas")
    X = pd.DataFrame(poisson_data(), columns=[f"f{i}" for i in range(12)])
    est = BetaNMF(3, max_iter=5, random_state=0, device="cpu").set_output(transform="pandas")
    out = est.fit_transform(X)
    assert isinstance(out, pd.DataFrame) and list(out.columns) == ["betanmf0", "betanmf1", "betanmf2"]
    assert list(est.feature_names_in_) == list(X.columns)


def test_plot_history(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    est = BetaNMF(3, max_iter=5, random_state=0, device="cpu").fit(poisson_data())
    ax = est.plot_history()
    ax.figure.savefig(tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 0


def test_verbose_progress_bar(capsys):
    BetaNMF(3, max_iter=5, random_state=0, device="cpu", verbose=True).fit(poisson_data())
    assert "BetaNMF" in capsys.readouterr().err


@pytest.mark.parametrize(
    "params, X, err, match",
    [
        (dict(), -np.ones((4, 3)), ValueError, "Negative values"),
        (dict(), np.full((4, 3), np.nan), ValueError, "NaN"),
        (dict(n_components=0), np.ones((4, 3)), ValueError, "n_components"),
        (dict(beta_loss="l2"), np.ones((4, 3)), ValueError, "beta_loss"),
        (dict(beta_loss="itakura-saito"), np.eye(3), ValueError, "strictly positive"),
        (dict(max_iter=0), np.ones((4, 3)), ValueError, "max_iter"),
        (dict(layer="cnn"), np.ones((4, 3)), ValueError, "layer"),
        (dict(device="tpu"), np.ones((4, 3)), ValueError, "device"),
        (dict(dtype="int8"), np.ones((4, 3)), ValueError, "dtype"),
        (dict(l1_ratio=2.0), np.ones((4, 3)), ValueError, "l1_ratio"),
        (dict(), np.ones(3), ValueError, "2D|2-D|dimensions"),
        (dict(), torch.ones(4, 3, dtype=torch.complex64), TypeError, "real"),
    ],
)
def test_bad_input(params, X, err, match):
    with pytest.raises(err, match=match):
        BetaNMF(**{"device": "cpu", "max_iter": 2, **params}).fit(X)


def test_not_fitted_and_wrong_width():
    est = BetaNMF(2, device="cpu")
    with pytest.raises(NotFittedError):
        est.transform(np.ones((3, 3)))
    est.set_params(max_iter=2).fit(np.ones((4, 3)))
    with pytest.raises(ValueError, match="features"):
        est.transform(np.ones((4, 5)))
    with pytest.raises(ValueError, match="features"):
        est.transform(torch.ones(4, 5))


def test_device_auto():
    est = BetaNMF(2, max_iter=2).fit(np.ones((4, 3)))
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert est.module_.W.device.type == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs cuda")
def test_cuda_matches_cpu():
    X = poisson_data()
    kw = dict(n_components=3, max_iter=20, random_state=0, init="nndsvd")
    H_cpu = BetaNMF(device="cpu", **kw).fit_transform(X)
    H_gpu = BetaNMF(device="cuda", **kw).fit_transform(X)
    np.testing.assert_allclose(H_gpu, H_cpu, rtol=1e-6, atol=1e-9)
    out = BetaNMF(device="auto", **kw).fit_transform(torch.tensor(X, device="cuda"))
    assert out.is_cuda


# -- issue 22.10: named errors for what scikit-learn's checks say without a name ---------------
@pytest.mark.parametrize("bad, message", [
    (np.float64(3.0), "Expected 2D array, got scalar array"),
    (np.ones(3), "Expected 2D array, got 1D array"),
    (np.ones((0, 3)), "Found array with 0 sample"),
    (np.ones((3, 3, 3)), "Found array with dim 3"),
    ([[1.0, 2.0], [3.0]], "inhomogeneous"),
])
def test_sklearn_input_errors_name_X(bad, message):
    from torchnmf.estimators import PNMF, GammaPoissonFactorization

    for est in (BetaNMF(2, max_iter=2), GammaPoissonFactorization(2, max_iter=2), PNMF(2, max_iter=2)):
        with pytest.raises(ValueError, match=rf"^X \(shape \(n_samples, n_features\)\): .*{message}"):
            est.fit(bad)


def test_inverse_transform_refuses_non_finite_factors():
    from torchnmf.estimators import PNMF, GammaPoissonFactorization

    X = np.random.default_rng(0).poisson(3.0, (8, 5)).astype(np.float64)
    for est in (BetaNMF(2, max_iter=5, random_state=0), GammaPoissonFactorization(2, max_iter=2, random_state=0),
                PNMF(2, max_iter=2, random_state=0)):
        H = est.fit_transform(X)
        for value in (np.nan, np.inf):
            bad = H.copy()
            bad[1, 0] = value
            with pytest.raises(ValueError, match="X contains NaN or infinity"):
                est.inverse_transform(bad)
