import copy
import itertools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import torchnmf
from torchnmf import NMF, NMF2D, NMF3D, NMFD
from torchnmf.constraints import MODES, mode_of
from torchnmf.history import History
from torchnmf.metrics import beta_div


LAYERS = [
    (NMF, (12, 9), {}),
    (NMFD, (3, 5, 11), {"T": 3}),
    (NMF2D, (2, 3, 7, 6), {"kernel_size": (2, 3)}),
    (NMF3D, (2, 2, 5, 4, 4), {"kernel_size": 2}),
]


# ---------------------------------------------------------------- references
def ref_conv(H, W):
    """Slow full convolution V[n,c,l...] = Σ_r Σ_t W[c,r,t...] H[n,r,l-t...] (numpy loops)."""
    H, W = np.asarray(H), np.asarray(W)
    N, R = H.shape[:2]
    C = W.shape[0]
    Ls = tuple(h + k - 1 for h, k in zip(H.shape[2:], W.shape[2:]))
    V = np.zeros((N, C) + Ls)
    for idx in itertools.product(*(range(h) for h in H.shape[2:])):
        for t in itertools.product(*(range(k) for k in W.shape[2:])):
            out = tuple(i + j for i, j in zip(idx, t))
            V[(slice(None), slice(None)) + out] += H[(slice(None), slice(None)) + idx] @ W[(slice(None), slice(None)) + t].T
    return V


@pytest.mark.parametrize("cls,vshape,kw", LAYERS)
def test_shapes_and_reconstruction(cls, vshape, kw):
    m = cls(vshape, 4, **kw).double()
    V = m()
    assert tuple(V.shape) == vshape
    assert m.W.shape[:2] == (vshape[1], 4) and m.H.shape[:2] == (vshape[0], 4)
    ref = ref_conv(m.H.detach(), m.W.detach()) if cls is not NMF else (m.H @ m.W.T).detach().numpy()
    np.testing.assert_allclose(V.detach().numpy(), ref, rtol=1e-12)


def test_nmfd_same_length():
    m = NMFD((2, 3, 10), 2, T=4, same_length=True).double()
    assert m.H.shape == (2, 2, 10) and m().shape == (2, 3, 10)
    full = ref_conv(m.H.detach(), m.W.detach())
    np.testing.assert_allclose(m().detach().numpy(), full[..., :10], rtol=1e-12)
    V = torch.rand(2, 3, 10, dtype=torch.float64)
    m.fit(V, max_iter=5)


def test_forward_with_external_factors_and_chain():
    m = NMF(W=torch.rand(6, 3))
    H = torch.rand(4, 3)
    torch.testing.assert_close(m(H), H @ m.W.T)
    with pytest.raises(ValueError, match="H"):
        m()
    chain = nn.Sequential(NMF((5, 4), 2), NMF(W=(7, 4)), NMF(W=(3, 7)))
    assert chain(None).shape == (5, 3)


def test_top_level_exports():
    for name in ("NMF", "NMFD", "NMF2D", "NMF3D", "BaseComponent", "PLCA", "SIPLCA", "SIPLCA2", "SIPLCA3"):
        assert hasattr(torchnmf, name)
    assert hasattr(torchnmf.trainer, "BetaMu") and hasattr(torchnmf.trainer, "SparsityProj")


def test_tensor_factors_keep_dtype_and_are_copied():
    W = torch.rand(5, 2, dtype=torch.float64)
    m = NMF(W=W, H=torch.rand(3, 2, dtype=torch.float64))
    assert m.W.dtype == torch.float64 and m.rank == 2
    with torch.no_grad():
        m.W.mul_(0)
    assert W.abs().sum() > 0


def test_trainable_flags():
    m = NMF((4, 3), 2, trainable_W=False)
    assert not m.W.requires_grad and m.H.requires_grad
    W0 = m.W.detach().clone()
    m.fit(torch.rand(4, 3), max_iter=5)
    assert torch.equal(m.W, W0)


# ---------------------------------------------------------------- scikit-learn
@pytest.mark.parametrize("beta", [1, 2])
def test_fit_matches_sklearn(beta):
    sk = pytest.importorskip("sklearn.decomposition")
    rng = np.random.RandomState(0)
    X = rng.rand(40, 25)
    X[X < 0.2] = 0
    W0, H0 = rng.rand(40, 5), rng.rand(5, 25)
    est = sk.NMF(n_components=5, solver="mu", init="custom", tol=0, max_iter=50, beta_loss=beta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Wsk = est.fit_transform(X, W=W0.copy(), H=H0.copy())
    m = NMF(W=torch.tensor(H0.T), H=torch.tensor(W0))  # our layout is the transpose
    n = m.fit(torch.tensor(X), beta=beta, tol=0, max_iter=50)
    assert n == 50
    np.testing.assert_allclose(m.H.detach().numpy(), Wsk, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(m.W.detach().numpy().T, est.components_, rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------- fit
@pytest.mark.parametrize("beta", [0, 0.5, 1, 1.5, 2, 3])
def test_fit_history_monotone(beta):
    V = torch.rand(20, 15, dtype=torch.float64) + 0.05
    m = NMF(V.shape, 4).double()
    h = History()
    n = m.fit(V, beta=beta, tol=0, max_iter=30, history=h, check_every=1)
    vals = h.values
    assert n == 30 and len(vals) == 31
    assert all(b <= a * (1 + 1e-12) for a, b in zip(vals, vals[1:]))
    assert vals[-1] == pytest.approx(float(beta_div(m().detach(), V, beta)), rel=1e-9)


@pytest.mark.parametrize("cls,vshape,kw", LAYERS)
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_fits_every_layer(cls, vshape, kw, mode):
    V = torch.rand(*vshape, dtype=torch.float64)
    m = cls(vshape, 3, mode=mode, **kw).double()
    assert mode_of(m.parametrizations.W.original if hasattr(m, "parametrizations") else m.W) == mode
    before = float(beta_div(m(), V, 1))
    h = History()
    m.fit(V, beta=1, tol=0, max_iter=8, history=h)
    after = float(beta_div(m(), V, 1))
    assert after < before
    assert all(b <= a * (1 + 1e-9) for a, b in zip(h.values, h.values[1:]))
    assert bool((m.W >= 0).all()) and bool((m.H >= 0).all())


def test_check_every():
    V = torch.rand(20, 10, dtype=torch.float64)
    m = NMF(V.shape, 3).double()
    h = History()
    m.fit(V, beta=1, tol=0, max_iter=25, history=h)  # default: every 10 iterations for beta != 2
    assert len(h) == 4  # 0, 10, 20, 25
    h2 = History()
    m.fit(V, beta=2, tol=0, max_iter=5, history=h2)
    assert len(h2) == 6
    h3 = History()
    NMFD((2, 3, 6), 2, T=2).fit(torch.rand(2, 3, 6), max_iter=7, check_every=3, history=h3)
    assert len(h3) == 4  # 0, 3, 6, 7
    with pytest.raises(ValueError, match="check_every"):
        m.fit(V, check_every=0)


def test_tol_stops_early_and_verbose():
    V = torch.rand(20, 10, dtype=torch.float64)
    m = NMF(V.shape, 3).double()
    n = m.fit(V, tol=1e-2, max_iter=500, verbose=True)
    assert 1 <= n < 500


def test_stop_request():
    V = torch.rand(20, 10, dtype=torch.float64)
    h = History()
    h.request_stop()
    assert NMF(V.shape, 3).double().fit(V, history=h) == 0


def test_regularisation_shrinks():
    V = torch.rand(20, 10, dtype=torch.float64)
    a, b = NMF(V.shape, 3).double(), None
    b = copy.deepcopy(a)
    a.fit(V, tol=0, max_iter=30)
    b.fit(V, tol=0, max_iter=30, alpha=5.0, l1_ratio=1.0)
    assert b.H.sum() + b.W.sum() < a.H.sum() + a.W.sum()


@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("beta", [1, 2, 1.5])
def test_sparse_fit_equals_dense(layout, beta):
    V = torch.rand(30, 20, dtype=torch.float64)
    V[V < 0.7] = 0
    a = NMF(V.shape, 4).double()
    b = copy.deepcopy(a)
    a.fit(V, beta=beta, tol=0, max_iter=15)
    S = V.to_sparse() if layout == "coo" else V.to_sparse_csr()
    b.fit(S, beta=beta, tol=0, max_iter=15)
    torch.testing.assert_close(b.W, a.W, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b.H, a.H, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cls,vshape,kw", LAYERS)
def test_mask_ignores_masked_entries(cls, vshape, kw):
    V = torch.rand(*vshape, dtype=torch.float64)
    M = torch.rand(*vshape) > 0.3
    V2 = V.clone()
    V2[~M] = 100.0
    a = cls(vshape, 3, **kw).double()
    b = copy.deepcopy(a)
    a.fit(V, mask=M, tol=0, max_iter=10)
    b.fit(V2, mask=M, tol=0, max_iter=10)
    torch.testing.assert_close(a.W, b.W, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.H, b.H, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("beta", [1, 2, 1.5])
@pytest.mark.parametrize("masked", [False, True])
def test_sparse_fit_equals_dense_exactly(layout, beta, masked):
    # the CSR kernels of the sparse path (issue 16) keep it equal to the dense fit to fp64 rounding
    g = torch.Generator().manual_seed(3)
    V = torch.rand(50, 37, dtype=torch.float64, generator=g) * 5
    V[V < 3.5] = 0
    M = torch.rand(50, 37, generator=g) > 0.25 if masked else None
    a = NMF(V.shape, 5).double()
    b = copy.deepcopy(a)
    a.fit(V, beta=beta, tol=0, max_iter=20, mask=M)
    S = V.to_sparse() if layout == "coo" else V.to_sparse_csr()
    b.fit(S, beta=beta, tol=0, max_iter=20, mask=M)
    torch.testing.assert_close(b.W, a.W, rtol=1e-10, atol=0)
    torch.testing.assert_close(b.H, a.H, rtol=1e-10, atol=0)


def test_mask_with_sparse_V():
    V = torch.rand(12, 8, dtype=torch.float64)
    V[V < 0.5] = 0
    M = torch.rand(12, 8) > 0.3
    a = NMF(V.shape, 3).double()
    b = copy.deepcopy(a)
    a.fit(V, mask=M, beta=1.5, tol=0, max_iter=5)
    b.fit(V.to_sparse(), mask=M, beta=1.5, tol=0, max_iter=5)
    torch.testing.assert_close(a.H, b.H)


def test_transform_fixed_W():
    W = torch.rand(12, 3, dtype=torch.float64)
    H_true = torch.rand(7, 3, dtype=torch.float64)
    V = H_true @ W.T
    m = NMF(W=W, H=torch.rand(30, 3, dtype=torch.float64))
    H0 = m.H.detach().clone()
    Hn = m.transform(V, beta=2, tol=0, max_iter=3000)
    assert torch.equal(m.W, W) and torch.equal(m.H, H0) and Hn.shape == (7, 3)
    torch.testing.assert_close(Hn, H_true, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="columns"):
        m.transform(V[:, :5])


def test_double_and_state_dict_roundtrip():
    m = NMFD((2, 3, 9), 2, T=3, mode="softplus")
    md = m.double()
    assert md.W.dtype == torch.float64
    m2 = NMFD((2, 3, 9), 2, T=3, mode="softplus").double()
    m2.load_state_dict(md.state_dict())
    assert torch.equal(m2(), md())
    keys = set(md.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in md.state_dict().values()) and keys


def test_deepcopy_after_fit():
    m = NMF((6, 5), 2).double()
    m.fit(torch.rand(6, 5, dtype=torch.float64), max_iter=3)
    c = copy.deepcopy(m)
    assert torch.equal(c(), m())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs cuda")
@pytest.mark.parametrize("cls,vshape,kw", LAYERS)
def test_cuda_fit(cls, vshape, kw):
    V = torch.rand(*vshape, dtype=torch.float64)
    m = cls(vshape, 3, **kw).double()
    c = copy.deepcopy(m).to("cuda")
    m.fit(V, tol=0, max_iter=10)
    c.fit(V.cuda(), tol=0, max_iter=10)
    torch.testing.assert_close(c.W.cpu(), m.W, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- bad input
def bad_inputs():
    V = torch.rand(6, 5)
    neg = V.clone()
    neg[0, 0] = -1
    nan = V.clone()
    nan[1, 1] = float("nan")
    inf = V.clone()
    inf[1, 1] = float("inf")
    return [
        (neg, {}, ValueError, "V"),
        (nan, {}, ValueError, "V"),
        (inf, {}, ValueError, "V"),
        (V[None], {}, ValueError, "V"),
        (torch.rand(6, 4), {}, ValueError, "V"),
        (torch.ones(6, 5, dtype=torch.int64), {}, TypeError, "V"),
        (V, {"mask": torch.ones(5, 6)}, ValueError, "mask"),
        (V, {"beta": "kl"}, TypeError, "beta"),
        (V, {"max_iter": 0}, ValueError, "max_iter"),
        (V, {"tol": -1.0}, ValueError, "tol"),
        (V, {"alpha": -1.0}, ValueError, "alpha"),
        (V, {"l1_ratio": 2.0}, ValueError, "l1_ratio"),
        (V * 0, {"beta": 0}, ValueError, "positive"),
    ]


@pytest.mark.parametrize("V,kw,err,word", bad_inputs())
def test_fit_bad_input(V, kw, err, word):
    m = NMF((6, 5), 2)
    V0 = V.clone()
    W0, H0 = m.W.detach().clone(), m.H.detach().clone()
    with pytest.raises(err, match=word):
        m.fit(V, **kw)
    assert torch.equal(V, V0) or torch.isnan(V).any()
    assert torch.equal(m.W, W0) and torch.equal(m.H, H0)  # no work done


def test_fit_does_not_modify_V():
    for V in (torch.rand(6, 5, dtype=torch.float64), torch.rand(6, 5)):  # same and other dtype
        V0 = V.clone()
        NMF((6, 5), 2).double().fit(V, beta=1.5, max_iter=5)
        assert torch.equal(V, V0)
    S = torch.rand(6, 5).to_sparse()
    S0 = S.to_dense().clone()
    NMF((6, 5), 2).fit(S, max_iter=3)
    assert torch.equal(S.to_dense(), S0)


def test_constructor_errors():
    with pytest.raises(ValueError, match="rank"):
        NMF((4, 3), 0)
    with pytest.raises(TypeError, match="rank"):
        NMF((4, 3), 2.5)
    with pytest.raises(ValueError, match="W"):
        NMF(W=-torch.rand(3, 2))
    with pytest.raises(ValueError, match="rank"):
        NMF(W=torch.rand(3, 2), H=torch.rand(4, 3))
    with pytest.raises(TypeError, match="W"):
        NMF(W=torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="mode"):
        NMF((4, 3), 2, mode="relu")
    with pytest.raises(ValueError, match="Vshape"):
        NMF((4, 3, 2), 2)
    with pytest.raises(ValueError, match="T"):
        NMFD((2, 3, 4), 2, T=5)
    with pytest.raises(ValueError, match="kernel_size"):
        NMF2D((2, 3, 4, 4), 2, kernel_size=(1, 2, 3))
    with pytest.raises(ValueError, match="H"):
        NMF(W=(3, 2)).fit(torch.rand(4, 3))


def test_fit_nan_is_not_silent():
    m = NMF((6, 5), 2).double()
    with torch.no_grad():
        m.H.fill_(float("inf"))
    with pytest.raises(FloatingPointError):
        m.fit(torch.rand(6, 5, dtype=torch.float64), max_iter=3)


# ---------------------------------------------------------------- sparse_fit
def test_sparse_fit_reaches_sparseness():
    from torchnmf.metrics import sparseness

    V = torch.rand(20, 15, dtype=torch.float64)
    m = NMF(V.shape, 3).double()
    h = History()
    n = m.sparse_fit(V, max_iter=20, sW=0.7, history=h)
    assert n == 20 and len(h) == 20
    for r in range(3):
        assert float(sparseness(m.W[:, r])) == pytest.approx(0.7, abs=1e-6)
    assert h.values[-1] < h.values[0]


def test_vshape_with_given_factor_and_custom_component():
    W = torch.rand(9, 4, dtype=torch.float64)
    m = NMF((12, 9), W=W)
    assert m.rank == 4 and torch.equal(m.W, W) and m.H.shape == (12, 4)

    class Scaled(torchnmf.BaseComponent):
        """A user-defined layer: 2 H Wᵀ."""

        @staticmethod
        def reconstruct(H, W):
            return 2 * H @ W.T

        @staticmethod
        def _vshape(Hs, Ws):
            return (Hs[0], Ws[0])

    s = Scaled(W=(9, 3), H=(12, 3)).double()
    V = torch.rand(12, 9, dtype=torch.float64)
    h = History()
    s.fit(V, max_iter=10, tol=0, history=h)  # the generic BetaMu path
    assert all(b <= a * (1 + 1e-12) for a, b in zip(h.values, h.values[1:]))


# -- issue 22.10: factors given as arrays are values; empty factors are refused ---------------
@pytest.mark.parametrize("kind", ["ndarray", "list", "DataFrame", "scipy"])
def test_array_factors_are_values_not_shapes(kind):
    import pandas as pd
    import scipy.sparse as sp

    A = np.random.default_rng(0).random((5, 3)) + 0.1
    W = {"ndarray": A, "list": A.tolist(), "DataFrame": pd.DataFrame(A), "scipy": sp.csr_matrix(A)}[kind]
    m = NMF(W=W, H=(4, 3))
    assert m.rank == 3 and m.W.dtype == torch.float64
    np.testing.assert_array_equal(m.W.detach().numpy(), A)
    assert NMF((4, 5), W=W).rank == 3  # the rank of given values, as for a tensor
    if kind == "ndarray":
        A[0, 0] = 99.0  # a copy: the caller's array is not the parameter
        assert float(m.W[0, 0]) != 99.0


def test_factor_shapes_and_bad_factor_values():
    for shape in ((5, 3), [5, 3], torch.Size([5, 3])):
        assert NMF(W=shape, H=(4, 3)).W.shape == (5, 3)
    for empty in (torch.ones(5, 0), np.ones((0, 3)), torch.ones(0, 2)):
        with pytest.raises(ValueError, match=r"W has shape \((5, 0|0, 3|0, 2)\): every dimension of a factor"):
            NMF(W=empty)
    with pytest.raises(ValueError, match=r"H has shape \(4, 0\)"):
        NMF(W=(5, 2), H=np.ones((4, 0)))
    with pytest.raises(TypeError, match="W must hold real numbers"):
        NMF(W=np.ones((5, 3), dtype=complex))
    with pytest.raises(ValueError, match="W must be non-negative"):
        NMF(W=-np.ones((5, 3)))
    with pytest.raises(ValueError, match="W contains NaN"):
        NMF(W=[[1.0, float("nan")], [0.5, 1.0]])
    with pytest.raises(ValueError, match="W must have 2 dimensions"):
        NMF(W=np.ones((5, 3, 2)))
    for bad_shape in ((5, 3.0), [5, 0], (5, 3, 1)):  # flat sequences are shapes, checked as such
        with pytest.raises(ValueError, match="W shape must be 2 positive ints"):
            NMF(W=bad_shape)
