import warnings

import numpy as np
import pytest
import torch

from torchnmf import data


def test_as_tensor_conversions():
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    t = data.as_tensor(a)
    assert t.dtype == torch.float64 and t.shape == (2, 3)
    assert data.as_tensor(np.arange(4)).dtype == torch.get_default_dtype()
    assert data.as_tensor([[1, 2], [3, 4]], dtype=torch.float64).dtype == torch.float64
    x = torch.rand(3, 2)
    assert data.as_tensor(x) is x  # no copy, never written to
    with pytest.raises(TypeError, match="floating"):
        data.as_tensor(torch.ones(2, dtype=torch.int64), "V")
    with pytest.raises(TypeError, match="real"):
        data.as_tensor(np.array([True, False]), "V")
    with pytest.raises(TypeError, match="None"):
        data.as_tensor(None, "V")
    with pytest.raises(ValueError, match="V must have 2 dimensions"):
        data.as_tensor(torch.rand(3), "V", ndim=2)


def test_as_tensor_sparse():
    sp = pytest.importorskip("scipy.sparse")
    S = sp.random(5, 4, density=0.4, format="csr", random_state=0)
    t = data.as_tensor(S)
    assert data.is_sparse(t) and t.dtype == torch.float64
    np.testing.assert_allclose(t.to_dense().numpy(), S.toarray())
    assert not data.is_sparse(data.as_tensor(S, sparse="dense"))
    assert data.as_tensor(torch.rand(3, 3), sparse="coo").layout == torch.sparse_coo


def test_checks_name_the_argument():
    x = torch.tensor([1.0, -1.0])
    with pytest.raises(ValueError, match="V must be non-negative"):
        data.check_nonnegative(x, "V")
    with pytest.raises(ValueError, match="V contains NaN"):
        data.check_finite(torch.tensor([float("nan")]), "V")
    with pytest.raises(ValueError, match="V contains NaN"):
        data.check_nonnegative(torch.tensor([float("inf")]).to_sparse(), "V")
    with pytest.raises(ValueError, match=r"X must hold counts \(non-negative integers\), but entry 0 holds 0.5"):
        data.check_counts(torch.tensor([0.5]), "X")
    with pytest.raises(ValueError, match=r"X has shape \(2, 3\), expected \(2, 4\)"):
        data.check_shape(torch.rand(2, 3), (2, 4))
    assert data.check_shape(torch.rand(2, 3), (None, 3)) is not None
    with pytest.raises(ValueError, match="rank"):
        data.check_rank(0)
    with pytest.raises(TypeError, match="rank"):
        data.check_rank(True)
    with pytest.raises(ValueError, match="tol"):
        data.check_positive(-1, "tol", allow_zero=True)
    with pytest.raises(ValueError, match="solver"):
        data.check_option("x", ("mu", "cd"), "solver")


def test_check_mask():
    m = data.check_mask(torch.tensor([[True, False]]), (1, 2), dtype=torch.float64)
    assert m.dtype == torch.float64 and m.tolist() == [[1.0, 0.0]]
    assert data.check_mask(None, (1, 2)) is None
    with pytest.raises(ValueError, match="mask has shape"):
        data.check_mask(torch.ones(2, 1), (1, 2))
    with pytest.raises(ValueError, match="only 0 and 1"):
        data.check_mask(torch.full((1, 2), 0.5), (1, 2))


def test_nonzeros():
    X = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    for T in (X, X.to_sparse(), X.to_sparse_csr()):
        r, c, v = data.nonzeros(T)
        assert sorted(zip(r.tolist(), c.tolist(), v.tolist())) == [(0, 1, 2.0), (1, 0, 3.0)]
    with pytest.raises(ValueError, match="2-D"):
        data.nonzeros(torch.rand(3))


def test_as_tensor_detaches_inputs_that_require_grad():
    # issue 22 item 6: data is never part of the caller's graph (a fit's backward failed or
    # wrote into the caller's .grad)
    x = torch.ones(3, 2, requires_grad=True)
    p = torch.nn.Parameter(torch.ones(3, 2))
    for t in (x, p, x * 2):
        out = data.as_tensor(t)
        assert not out.requires_grad and out.grad_fn is None and type(out) is torch.Tensor
        torch.testing.assert_close(out, t.detach())
    assert x.requires_grad and p.requires_grad


# -- issue 22.8: non-native numpy arrays --------------------------------------------------------
@pytest.mark.parametrize("kind, dtype", [(">f8", torch.float64), (">f4", torch.float32), (">i4", torch.float32),
                                         ("<i8", torch.float32), (np.longdouble, torch.float64)])
def test_as_tensor_converts_non_native_arrays(kind, dtype):
    import scipy.sparse as sp

    A = np.array([[1.0, 0.0], [2.5 if "i" not in str(kind) else 2, 3.0]]).astype(kind)
    T = data.as_tensor(A, "V")
    assert T.dtype == dtype
    np.testing.assert_array_equal(T.numpy(), A.astype(np.float64))
    if np.dtype(kind).isnative:  # scipy.sparse holds native dtypes only (longdouble among them)
        S = data.as_tensor(sp.csr_matrix(A), "V")
        assert S.dtype == dtype
        np.testing.assert_array_equal(S.to_dense().numpy(), A.astype(np.float64))


def test_check_magnitude_reads_x_to_the_beta():
    # issue 22 item 5: beta = 2 overflows float32 through Σ x² long before Σ x log x does
    X = torch.full((6, 5), 3e20)
    assert data.check_magnitude(X, "V") is X
    assert data.check_magnitude(X, "V", beta=1) is X
    with pytest.raises(ValueError, match=r"V is too large for float32 .*Σ x\^2"):
        data.check_magnitude(X, "V", beta=2)
    data.check_magnitude(X, "V", torch.float64, beta=2)
    data.check_magnitude(torch.full((6, 5), 1e3), "V", beta=2)


# -- issue 22.11 / 23.2: one rule for float-valued counts in every count model ---------------
def _count_models():
    from torchnmf.compat import fireyfish
    from torchnmf.compat import pnmf as compat_pnmf
    from torchnmf.compat.spfa import SPFA
    from torchnmf.estimators import PNMF, GammaPoissonFactorization, SpatialPNMF
    from torchnmf.poisson import GammaPoisson
    from torchnmf.poisson.lognormal import LogNormalPoisson
    from torchnmf.poisson.spfa import SparsePoissonFA

    xy = np.random.default_rng(0).uniform(size=(6, 2))
    # name -> call on the (6, 5) matrix the model receives
    return {
        "GammaPoisson.fit": lambda X: GammaPoisson(6, 5, 2).fit(X, max_iter=2),
        "GammaPoissonFactorization": lambda X: GammaPoissonFactorization(2, max_iter=2, random_state=0).fit(X),
        "PNMF": lambda X: PNMF(2, max_iter=2, random_state=0).fit(X),
        "SpatialPNMF": lambda X: SpatialPNMF(2, num_inducing=4, max_iter=2, random_state=0).fit(X, coordinates=xy),
        "compat.pnmf.PNMF": lambda X: compat_pnmf.PNMF(2, max_iter=2, random_state=0, device="cpu").fit(X),
        "compat.pnmf.initialize_factors": lambda X: compat_pnmf.initialize_factors(X, 2, random_state=0),
        "LogNormalPoisson.elbo": lambda X: LogNormalPoisson(6, 5, 2).elbo(X),  # features x samples
        "SparsePoissonFA.elbo": lambda X: SparsePoissonFA(6, 5, 2).elbo(X),
        "compat.spfa.SPFA.fit": lambda X: SPFA(6, 5, 2).fit(X, torch.ones(6, 1, dtype=X.dtype), n_epochs=2),
        "compat.fireyfish.PoisModel": lambda X: fireyfish.PoisModel(X, 2),
    }


def _pandas_counts():
    """Counts as pandas reads them after arithmetic: 1e-11 off the integers in a few entries."""
    X = torch.tensor(np.random.default_rng(1).poisson(2.0, size=(6, 5)) + 1.0, dtype=torch.float64)
    noisy = X.clone()
    noisy[0, 0] += 1e-11
    noisy[2, 3] -= 1e-11
    noisy[5, 4] += 3e-12
    return X, noisy


@pytest.mark.parametrize("model", list(_count_models()))
def test_count_models_round_near_integers_with_a_warning(model):
    call = _count_models()[model]
    X, noisy = _pandas_counts()
    before = noisy.clone()
    with pytest.warns(UserWarning, match=r"X?: rounded 3 values within 1e-06 of an integer"):
        call(noisy)
    assert torch.equal(noisy, before)  # the caller's matrix is not rounded in place


@pytest.mark.parametrize("model", [m for m in _count_models() if not m.startswith("compat.pnmf")])
def test_count_models_refuse_non_integers_naming_the_first(model):
    # the PNMF package's API fits non-integer data as given (its document's example feeds
    # np.random.rand): tests/test_seed_pnmf.py
    call = _count_models()[model]
    X, _ = _pandas_counts()
    X[1, 2] = 0.5
    X[4, 0] = 2.25
    name = "x" if "spfa.SPFA" in model else "countmatrix" if "fireyfish" in model else "X"
    with pytest.raises(ValueError, match=rf"^{name} must hold counts \(non-negative integers\), but row 1, column 2 "
                                         r"holds 0.5, which is not within 1e-06 of an integer: .*round it"):
        call(X)


def test_check_counts_sparse_layouts_and_escape():
    X = torch.tensor([[0.0, 2.0, 1.0 + 1e-9], [3.0, 0.0, 4.0]], dtype=torch.float64)
    for T in (X, X.to_sparse(), X.to_sparse_csr(), X.to_sparse_csc()):
        with pytest.warns(UserWarning, match="rounded 1 value within"):
            R = data.check_counts(T, "V")
        assert R.layout == T.layout
        torch.testing.assert_close(R.to_dense(), X.round(), rtol=0, atol=0)
        bad = T.to_dense().clone()
        bad[1, 2] = 4.5
        bad = bad.to_sparse() if T.layout == torch.sparse_coo else bad
        with pytest.raises(ValueError, match=r"V must hold counts .* row 1, column 2 holds 4.5.*"
                                             r"V.round\(\).*or pass allow_noninteger=True"):
            data.check_counts(bad, "V", escape="allow_noninteger=True")
        assert data.check_counts(bad, "V", allow_noninteger=True) is bad
    # integer and exact float counts come back as they are, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.check_counts(X.round(), "V") is not None
        I = torch.tensor([[1, 2]])
        assert data.check_counts(I, "V") is I


def test_count_and_magnitude_checks_in_blocks_name_the_same_entries(monkeypatch):
    """check_counts and check_magnitude go through the values in blocks: same warnings, errors and results."""
    import warnings

    from torchnmf import data

    X = torch.zeros(6, 5, dtype=torch.float64)
    X[::2, ::2] = torch.arange(1.0, 10.0, dtype=torch.float64).reshape(3, 3)
    X[1, 1], X[3, 4] = 4 + 1e-9, 2 - 1e-9  # near-integers, in different blocks
    for block in (data._CHECK_BLOCK, 2):
        monkeypatch.setattr(data, "_CHECK_BLOCK", block)
        for T in (X, X.to_sparse_csr(), X.to_sparse()):
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                out = data.check_counts(T, "X")
            assert [str(m.message).split(" within")[0] for m in w] == ["X: rounded 2 values"]
            dense = out.to_dense() if out.layout != torch.strided else out
            assert torch.equal(dense, X.round())
            bad = T.clone() if T.layout == torch.strided else T.to_dense()
            bad[4, 2] = 2.5  # in the last block
            bad = bad if T.layout == torch.strided else (bad.to_sparse_csr() if T.layout == torch.sparse_csr
                                                           else bad.to_sparse())
            with pytest.raises(ValueError, match="row 4, column 2 holds 2.5"):
                data.check_counts(bad, "X")
        big = X.float().clone()
        big[5, 4] = 3e38
        with pytest.raises(ValueError, match="too large for float32"):
            data.check_magnitude(big.to_sparse_csr(), "X")
        data.check_magnitude(X.to_sparse_csr(), "X", beta=2)
