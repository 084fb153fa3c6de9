"""Regression tests of issue 14, "wrong or silent results": each failed before its fix."""
import subprocess
import sys

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
    est = PNMF(n_components=2, max_iter=5, random_state=0).fit(np.floor(X / np.float32(1e36)))  # counts
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


# -- argument checks: BetaMu / OnlineMU / mu_update / randomized_svd and data's declarative checks --
def _beta_mu_model():
    from torchnmf.nmf import NMF

    return NMF((6, 5), 2)


@pytest.mark.parametrize("bad,err,word", [
    (torch.full((6, 5), float("nan")), ValueError, "target contains NaN or infinity"),
    (torch.full((6, 5), float("inf")), ValueError, "target contains NaN or infinity"),
    (-torch.ones(6, 5), ValueError, "target must be non-negative"),
    (torch.ones(6, 5, dtype=torch.bool), TypeError, "target must hold real numbers"),
    (torch.ones(6, 5, dtype=torch.complex64), TypeError, "target must hold real numbers"),
])
def test_beta_mu_checks_the_closure_target(bad, err, word):
    from torchnmf.trainer import BetaMu

    m = _beta_mu_model()
    W0, H0 = m.W.detach().clone(), m.H.detach().clone()
    opt = BetaMu(m.parameters(), beta=1)
    with pytest.raises(err, match=word):
        opt.step(lambda: (bad, m()))
    assert torch.equal(m.W, W0) and torch.equal(m.H, H0)  # nothing updated


def test_beta_mu_rechecks_a_modified_target():
    from torchnmf.trainer import BetaMu

    m = _beta_mu_model()
    V = torch.rand(6, 5)
    opt = BetaMu(m.parameters(), beta=1)
    opt.step(lambda: (V, m()))
    V[0, 0] = float("nan")  # in place: a new version of the same tensor
    with pytest.raises(ValueError, match="target contains NaN"):
        opt.step(lambda: (V, m()))


@pytest.mark.parametrize("beta,err", [(float("nan"), ValueError), (float("inf"), ValueError),
                                      (-float("inf"), ValueError), ("kl", TypeError), (True, TypeError)])
def test_beta_refused_everywhere(beta, err):
    from torchnmf.trainer import BetaMu, OnlineMU
    from torchnmf.updates import mu_statistics, mu_update

    m = _beta_mu_model()
    V = torch.rand(6, 5)
    W, H = torch.rand(5, 2), torch.rand(6, 2)
    with pytest.raises(err, match="beta"):
        BetaMu(m.parameters(), beta=beta)
    with pytest.raises(err, match="beta"):
        OnlineMU([torch.rand(5, 2)], beta=beta)
    with pytest.raises(err, match="beta"):
        mu_update(V, W, H, beta=beta)
    with pytest.raises(err, match="beta"):
        mu_statistics(V, W, H, beta=beta)
    with pytest.raises(err, match="beta"):
        m.fit(V, beta=beta)
    from torchnmf.metrics import beta_div

    with pytest.raises(err, match="beta"):
        beta_div(V, V, beta)
    if not isinstance(beta, str):
        pytest.importorskip("sklearn")
        from torchnmf.estimators import BetaNMF

        with pytest.raises(err, match="beta_loss"):
            BetaNMF(n_components=2, beta_loss=beta, device="cpu").fit(V.numpy())


def test_randomized_svd_checks_and_converts():
    sp = pytest.importorskip("scipy.sparse")
    from torchnmf.init import randomized_svd

    A = np.random.RandomState(0).rand(12, 7)
    for rank, err in ((-1, ValueError), (0, ValueError), (8, ValueError), (2.5, TypeError), ("3", TypeError)):
        with pytest.raises(err, match="rank"):
            randomized_svd(torch.as_tensor(A), rank)
    with pytest.raises(ValueError, match="n_iter"):
        randomized_svd(A, 2, n_iter="many")
    with pytest.raises(ValueError, match="X must have 2 dimensions"):
        randomized_svd(A[0], 1)
    with pytest.raises(ValueError, match="X contains NaN"):
        randomized_svd(np.full((3, 3), np.nan), 1)
    ref = randomized_svd(torch.as_tensor(A), 3, generator=torch.Generator().manual_seed(0))
    for X in (A, sp.csr_matrix(A), sp.coo_matrix(A)):
        U, S, Vh = randomized_svd(X, 3, generator=torch.Generator().manual_seed(0))
        assert U.shape == (12, 3) and S.shape == (3,) and Vh.shape == (3, 7)
        torch.testing.assert_close(S, ref[1])
    exact = torch.linalg.svdvals(torch.as_tensor(A))[:3]
    torch.testing.assert_close(ref[1], exact, rtol=1e-8, atol=1e-10)


def test_declarative_checks():
    assert data.check_int(np.int64(3), "n", low=1) == 3
    for bad in (2.0, True, "3", None):
        with pytest.raises(TypeError, match="n must be a positive integer"):
            data.check_int(bad, "n", low=1)
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        data.check_int(0, "n", low=1)
    with pytest.raises(ValueError, match=r"k must be an integer in \[2, 5\], got 6"):
        data.check_int(6, "k", low=2, high=5)
    assert data.check_real(np.float32(0.5), "r", 0, 1) == 0.5
    with pytest.raises(ValueError, match=r"r must be in \[0, 1\], got 1.5"):
        data.check_real(1.5, "r", 0, 1)
    with pytest.raises(ValueError, match=r"r must be in \(0, 1\], got 0"):
        data.check_real(0, "r", 0, 1, closed="right")
    with pytest.raises(ValueError, match="r must be > 0 and finite, got inf"):
        data.check_real(float("inf"), "r", 0, closed="neither")
    with pytest.raises(ValueError, match="r must be a finite real number, got nan"):
        data.check_real(float("nan"), "r")
    with pytest.raises(TypeError, match="r must be a real number"):
        data.check_real(torch.tensor(1.0), "r")
    # the positive vector of the Gamma and kernel hyperparameters
    v = [1.0, 2.0]
    out = data.check_positive_vector(v, 2, "kappa", dtype=torch.float64)
    assert out.dtype == torch.float64 and out.tolist() == v
    t = torch.ones(2, requires_grad=True)
    out = data.check_positive_vector(t, 2, "kappa")
    assert not out.requires_grad and out.data_ptr() != t.data_ptr()
    assert data.check_positive_vector(0.5, 3, "a").tolist() == [0.5] * 3
    with pytest.raises(ValueError, match="kappa must be a positive number or a vector of 2"):
        data.check_positive_vector([1.0, 2.0, 3.0], 2, "kappa")
    with pytest.raises(ValueError, match="kappa must be positive"):
        data.check_positive_vector([1.0, 0.0], 2, "kappa")
    with pytest.raises(ValueError, match="kappa contains NaN"):
        data.check_positive_vector([1.0, float("nan")], 2, "kappa")
    with pytest.raises(TypeError, match="kappa"):
        data.check_positive_vector(True, 2, "kappa")


@pytest.mark.parametrize("call,err,word", [
    (lambda: __import__("torchnmf.trainer", fromlist=["OnlineMU"]).OnlineMU([torch.rand(3, 2)], forget_factor=1.5),
     ValueError, r"forget_factor must be in \[0, 1\]"),
    (lambda: __import__("torchnmf.trainer", fromlist=["SparsityProj"]).SparsityProj([torch.rand(3, 2)], sparsity=-0.1),
     ValueError, r"sparsity must be in \[0, 1\]"),
    (lambda: __import__("torchnmf.trainer", fromlist=["SparsityProj"]).SparsityProj([torch.rand(3, 2)], 0.5,
                                                                                     max_iter=2.0),
     TypeError, "max_iter must be a positive integer"),
    (lambda: _beta_mu_model().fit(torch.rand(6, 5), l1_ratio=1.5), ValueError, r"l1_ratio must be in \[0, 1\]"),
    (lambda: _beta_mu_model().fit(torch.rand(6, 5), max_iter=2.5), TypeError, "max_iter must be a positive integer"),
    (lambda: _beta_mu_model().sparse_fit(torch.rand(6, 5), sW=2), ValueError, r"sW must be in \[0, 1\]"),
])
def test_interval_and_integer_checks(call, err, word):
    with pytest.raises(err, match=word):
        call()


# -- uncoalesced torch COO counts (data.py) -------------------------------------------------
def _uncoalesced():
    idx = torch.tensor([[0, 0, 1, 2, 3, 3], [0, 0, 1, 2, 0, 2]])
    vals = torch.tensor([1.5, 1.5, 2., 1., 4., 1.], dtype=torch.float64)
    X = torch.sparse_coo_tensor(idx, vals, (4, 3))
    assert not X.is_coalesced()
    return X


def test_uncoalesced_coo_counts_accepted():
    from torchnmf.poisson.gamma import GammaPoisson
    from torchnmf.poisson.lognormal import Counts

    X = _uncoalesced()
    assert data.check_counts(X) is X
    assert not X.is_coalesced()  # not modified
    # duplicates that sum to a non-negative entry are non-negative
    Y = torch.sparse_coo_tensor(torch.tensor([[0, 0], [1, 1]]), torch.tensor([-1.0, 2.0]), (2, 2))
    data.check_nonnegative(Y)
    with pytest.raises(ValueError, match="non-negative"):
        data.check_nonnegative(torch.sparse_coo_tensor(torch.tensor([[0, 0], [1, 1]]), torch.tensor([-3.0, 2.0]),
                                                       (2, 2)))
    dense = X.to_dense()
    torch.testing.assert_close(Counts(X).lgamma, Counts(dense).lgamma)
    out = []
    for T in (X, dense):
        torch.manual_seed(0)
        layer = GammaPoisson(4, 3, 2, dtype=torch.float64)
        layer.fit(T, max_iter=3, tol=0)
        out.append((float(layer.elbo(T).total), layer.transform(T, max_iter=3)))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-12)
    torch.testing.assert_close(out[0][1], out[1][1])


def test_uncoalesced_coo_counts_estimators():
    pytest.importorskip("sklearn")
    from torchnmf.estimators import GammaPoissonFactorization

    X = _uncoalesced()
    a = GammaPoissonFactorization(2, max_iter=3, tol=0, random_state=0, device="cpu").fit(X)
    b = GammaPoissonFactorization(2, max_iter=3, tol=0, random_state=0, device="cpu").fit(X.to_dense())
    np.testing.assert_allclose(a.components_, b.components_, rtol=1e-10)


# -- Gamma-Poisson ELBO in float32 for large counts (poisson/gamma.py) ----------------------
def _gamma_as_float64(l32):
    from torchnmf import constraints
    from torchnmf.poisson.gamma import GammaPoisson

    l64 = GammaPoisson(l32.n_rows, l32.n_cols, l32.rank, dtype=torch.float64)
    with torch.no_grad():
        for n in ("U_shape", "U_rate", "alpha_shape", "alpha_rate"):
            constraints.assign_(l64._raw(n), getattr(l32, n).double())
        for n in ("a", "b", "kappa", "lambda_"):
            getattr(l64, n).copy_(getattr(l32, n).double())
    return l64


@pytest.mark.parametrize("kind", ["2^24", "poisson-1e7", "small"])
def test_gamma_poisson_float32_elbo_is_the_float64_figure(kind):
    from torchnmf.poisson.gamma import GammaPoisson
    from torchnmf.trainer.cavi import CAVI

    X = {"2^24": torch.full((3, 3), 2.0 ** 24), "poisson-1e7": torch.poisson(torch.full((6, 5), 1e7)),
         "small": torch.poisson(torch.full((8, 7), 2.0))}[kind]
    l32 = GammaPoisson(X.shape[0], X.shape[1], 2, dtype=torch.float32)
    l32.fit(X, max_iter=10, tol=0)
    e32 = float(l32.elbo(X).total)
    e64 = float(_gamma_as_float64(l32).elbo(X.double()).total)
    assert e32 < 0
    assert e32 == pytest.approx(e64, rel=1e-6)
    # a fit's record (statistics of a CAVI sweep) is the float64 ELBO of the swept state
    record = float(CAVI(l32).step(lambda: X).total)
    assert record == pytest.approx(float(_gamma_as_float64(l32).elbo(X.double()).total), rel=1e-6)
    assert l32.U_shape.dtype == torch.float32  # the layer itself stays float32


# -- spatial priors (poisson/spatial.py) ----------------------------------------------------
def test_spatial_cholesky_message_fits_the_dtype():
    from torchnmf.poisson.spatial import _cholesky

    bad = -torch.eye(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="not positive definite") as info:
        _cholesky(bad, "inducing-point")
    assert "use float64" not in str(info.value) and "jitter" in str(info.value)
    with pytest.raises(RuntimeError, match="use float64"):
        _cholesky(bad.float(), "inducing-point")


def test_svgp_marginals_float64_failure_does_not_advise_float64():
    from torchnmf.poisson.spatial import SVGP

    model = SVGP(torch.rand(30, 2, dtype=torch.float64), 2, num_inducing=10, sigma=1e8, dtype=torch.float64)
    with torch.no_grad():  # two coincident inducing points: K_uu singular far beyond the jitter
        model.inducing_points[1] = model.inducing_points[0]
    with pytest.raises(RuntimeError, match="not positive definite") as info:
        model.marginals()
    assert "use float64" not in str(info.value)


@pytest.mark.parametrize("dtype,scale", [(torch.float64, 1e300), (torch.float32, 1e30)])
def test_spatial_priors_refuse_overflowing_coordinates(dtype, scale):
    from torchnmf.poisson.spatial import LCGP, SVGP

    C = torch.rand(30, 2, dtype=torch.float64) * scale
    for make in (lambda: LCGP(C, 2, dtype=dtype), lambda: SVGP(C, 2, num_inducing=10, dtype=dtype)):
        with pytest.raises(ValueError, match="coordinates are too large"):
            make()
    # large but representable coordinates still give a finite KL
    m = LCGP(torch.rand(30, 2, dtype=torch.float64) * 1e10, 2, dtype=torch.float64)
    assert torch.isfinite(m.kl())


# -- meta tensors: refused up front (data.py) -----------------------------------------------
def _meta_cases():
    from torchnmf.init import initialize, randomized_svd
    from torchnmf.nmf import NMF
    from torchnmf.plca import PLCA
    from torchnmf.poisson.gamma import GammaPoisson
    from torchnmf.poisson.lognormal import LogNormalPoisson
    from torchnmf.trainer import BetaMu, OnlineMU
    from torchnmf.updates import mu_update

    M = torch.rand(6, 5, device="meta")

    def beta_mu():
        m = NMF((6, 5), 2)
        BetaMu(m.parameters()).step(lambda: (M, m()))

    return {
        "NMF.fit": (lambda: NMF((6, 5), 2).fit(M), "V"),
        "NMF(W=meta)": (lambda: NMF(W=torch.rand(5, 2, device="meta")), "W"),
        "NMF on meta": (lambda: NMF((6, 5), 2).to("meta").fit(torch.rand(6, 5)), "V"),
        "initialize": (lambda: initialize(M, 2), "X"),
        "randomized_svd": (lambda: randomized_svd(M, 2), "X"),
        "mu_update": (lambda: mu_update(M, torch.rand(5, 2), torch.rand(6, 2)), "V"),
        "GammaPoisson.fit": (lambda: GammaPoisson(6, 5, 2).fit(M), "X"),
        "LogNormalPoisson.elbo": (lambda: LogNormalPoisson(6, 5, 2).elbo(M), "X"),
        "PLCA.fit": (lambda: PLCA((6, 5), 2).fit(M), "V"),
        "BetaMu.step": (beta_mu, "target"),
        "OnlineMU.step": (lambda: OnlineMU([torch.rand(5, 2)]).step(lambda: (M, torch.rand(6, 2))), "V_b"),
        "check_counts": (lambda: data.check_counts(data.as_tensor(M)), "X"),
    }


@pytest.mark.parametrize("case", sorted(_meta_cases()))
def test_meta_tensors_refused(case):
    call, name = _meta_cases()[case]
    with pytest.raises(TypeError, match=f"{name} is on the meta device"):
        call()


def test_meta_refused_by_estimators():
    pytest.importorskip("sklearn")
    from torchnmf.estimators import BetaNMF, GammaPoissonFactorization, PNMF

    M = torch.rand(6, 5, device="meta")
    for est in (BetaNMF(2, device="cpu"), PNMF(2), GammaPoissonFactorization(2, device="cpu")):
        with pytest.raises(TypeError, match="X is on the meta device"):
            est.fit(M)
    with pytest.raises(ValueError, match="device='meta'"):
        BetaNMF(2, device="meta").fit(torch.rand(6, 5))


# -- seams (issue 12): one-way dependency between updates and the fused kernels ---------------
def test_updates_does_not_import_kernels():
    import ast
    import inspect

    import torchnmf.updates as updates

    tree = ast.parse(inspect.getsource(updates))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert "kernels" not in (node.module or "") and all("kernels" not in a.name for a in node.names)
        elif isinstance(node, ast.Import):
            assert all("kernels" not in a.name for a in node.names)
    # the package imports its names lazily: the first cuda update loads the fused path by name
    code = ("import sys, torchnmf.updates as u; assert 'torchnmf.kernels' not in sys.modules; "
            "u._load_fast_path(); import torchnmf.kernels as k; "
            "assert u._fast_path == (k.supports, k.mu_update); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
