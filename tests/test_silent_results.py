"""Regression tests of issue 14, "wrong or silent results": each failed before its fix."""
import numpy as np
import pytest
import torch

from torchnmf import data
from torchnmf.init import initialize


# -- float32 NNDSVD, empty and huge inputs (init.py) ------------------------------------------
@pytest.mark.parametrize("method", ["nndsvd", "nndsvda", "nndsvdar"])
def test_nndsvd_float32_one_nonzero(method):
    A = np.zeros((7, 3), np.float32)
    A[1, 0] = 1
    W, H = initialize(A, 3, method=method, random_state=0)
    assert W.dtype == torch.float32
    assert torch.isfinite(W).all() and torch.isfinite(H).all()
    if method == "nndsvdar":  # its fill is random, drawn in the data's dtype
        return
    # the leading pair is determined (the others span a null space the SVD picks freely)
    W64, H64 = initialize(A.astype(np.float64), 3, method=method, random_state=0)
    torch.testing.assert_close(W[:, 0].double(), W64[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(H[:, 0].double(), H64[:, 0], rtol=1e-5, atol=1e-6)


def test_beta_nmf_float32_one_nonzero():
    pytest.importorskip("sklearn")
    from torchnmf.estimators import BetaNMF

    A = np.zeros((7, 3), np.float32)
    A[1, 0] = 1
    H = BetaNMF(n_components=3, max_iter=20, random_state=0, device="cpu").fit_transform(A)
    assert np.isfinite(H).all()


@pytest.mark.parametrize("shape", [(0, 8), (5, 0)])
@pytest.mark.parametrize("method", ["random", "nndsvda", None])
def test_initialize_empty_refused(shape, method):
    with pytest.raises(ValueError, match="X is empty"):
        initialize(np.zeros(shape), 3, method=method)


@pytest.mark.parametrize("method", ["random", "nndsvd", "nndsvda", "nndsvdar"])
def test_initialize_near_float32_max(method):
    rng = np.random.RandomState(0)
    X = rng.rand(20, 6).astype(np.float32) * 3e38
    W, H = initialize(X, 3, method=method, random_state=0)
    assert W.dtype == torch.float32
    assert torch.isfinite(W).all() and torch.isfinite(H).all()
    # the same factors as for X / 4^k, scaled back by 2^k each (exact powers of two)
    k = 63
    Ws, Hs = initialize(X / np.float32(4.0 ** k), 3, method=method, random_state=0)
    torch.testing.assert_close(W, Ws * 2.0 ** k, rtol=1e-4, atol=0)
    torch.testing.assert_close(H, Hs * 2.0 ** k, rtol=1e-4, atol=0)
    if method == "nndsvda":  # its zeros are filled with mean(X): no approximation claimed
        return
    # a product of the factors approximates X
    rel = float(torch.linalg.norm(H.double() @ W.double().t() - torch.as_tensor(X, dtype=torch.float64))
                / np.linalg.norm(X.astype(np.float64)))
    assert rel < 1.0


def test_huge_float32_refused_by_estimators_and_layers():
    pytest.importorskip("sklearn")
    from torchnmf.estimators import BetaNMF, GammaPoissonFactorization, PNMF
    from torchnmf.nmf import NMF

    X = np.floor(np.random.RandomState(0).rand(20, 6).astype(np.float32) * 3e38)
    for est in (PNMF(n_components=2, max_iter=5, random_state=0),
                BetaNMF(n_components=2, max_iter=5, random_state=0, device="cpu"),
                GammaPoissonFactorization(n_components=2, max_iter=5, random_state=0, device="cpu")):
        with pytest.raises(ValueError, match="too large for float32"):
            est.fit(X)
    m = NMF((20, 6), rank=2, dtype=torch.float32) if "dtype" in NMF.__init__.__code__.co_varnames else NMF((20, 6), 2)
    m = m.float()
    with pytest.raises(ValueError, match="too large for float32"):
        m.fit(torch.as_tensor(X))
    # a transform of huge data by a model fitted on ordinary data is refused too
    est = PNMF(n_components=2, max_iter=5, random_state=0).fit(X / np.float32(1e36))
    with pytest.raises(ValueError, match="too large for float32"):
        est.transform(X)
    # float64 has the range for it
    assert np.isfinite(BetaNMF(n_components=2, max_iter=5, random_state=0, device="cpu")
                       .fit_transform(X.astype(np.float64))).all()


def test_check_magnitude_accepts_ordinary_data():
    X = torch.rand(100, 50, dtype=torch.float32) * 1e6
    assert data.check_magnitude(X) is X
    with pytest.raises(ValueError, match="X2 is too large"):
        data.check_magnitude(torch.full((4, 4), 1e37), "X2")
    # the computation's dtype decides, not the storage's
    data.check_magnitude(torch.full((4, 4), 1e37, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32"):
        data.check_magnitude(torch.full((4, 4), 1e37, dtype=torch.float64), dtype=torch.float32)


# -- log-normal Poisson: zero rates under positive counts (poisson/lognormal.py) ----------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["lower-bound", "expanded", "simple"])
@pytest.mark.parametrize("control_variates", [True, False])
def test_lognormal_zero_row_of_W(dtype, mode, control_variates):
    from torchnmf.poisson.lognormal import LogNormalPoisson

    X = torch.tensor([[4., 1.], [2., 3.]], dtype=dtype)
    W = torch.tensor([[0., 0.], [1., .5]])
    values = []
    for dt in (dtype, torch.float64):
        torch.manual_seed(0)
        m = LogNormalPoisson(2, 2, 2, mode=mode, W=W, loadings_mode="projected",
                             control_variates=control_variates, dtype=dt)
        total = m.elbo(X.to(dt)).total
        assert torch.isfinite(total)
        total.backward()
        for name, p in m.named_parameters():
            assert p.grad is None or bool(torch.isfinite(p.grad).all()), name
        values.append(float(total.detach()))
    # one floor for every dtype: float32 reports the float64 figure
    assert values[0] == pytest.approx(values[1], rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lognormal_responsibilities_are_the_gradient_of_the_floored_log_rate(dtype):
    from torchnmf.poisson.lognormal import _log_rate_nz, _weighted_responsibilities

    W = torch.tensor([[0., 0., 0.], [1., .5, 0.], [2., 1e-30, 3.], [0., 1e-45, 0.]], dtype=dtype)
    rows, cols = torch.tensor([0, 1, 2, 3, 0, 2]), torch.tensor([0, 0, 1, 1, 2, 2])
    x = torch.tensor([4., 1., 7., 1e6, 30., 2.], dtype=dtype)
    mu = torch.randn(3, 3, dtype=dtype).requires_grad_(True)
    grad, = torch.autograd.grad((x * _log_rate_nz(W, mu, rows, cols)).sum(), mu)
    A = _weighted_responsibilities(W, mu.detach(), rows, cols, x)
    assert torch.isfinite(A).all()
    torch.testing.assert_close(A, grad)


def test_lognormal_update_W_with_zero_row_stays_finite():
    from torchnmf.poisson.lognormal import LogNormalPoisson

    X = torch.tensor([[4., 1.], [2., 3.], [0., 5.]], dtype=torch.float64)
    W = torch.tensor([[0., 0.], [1., .5], [.2, 0.]])
    m = LogNormalPoisson(3, 2, 2, mode="expanded", W=W, loadings_mode="multiplicative", dtype=torch.float64)
    for _ in range(3):
        new = m.update_W_(X)
        assert torch.isfinite(new).all()
    assert torch.isfinite(m.elbo(X).total)
