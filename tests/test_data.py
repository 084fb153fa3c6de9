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
    with pytest.raises(ValueError, match="integer counts"):
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
