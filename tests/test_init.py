import numpy as np
import pytest
import scipy.sparse as sp
import torch

from torchnmf.init import check_random_state, initialize, randomized_svd

sk_nmf = pytest.importorskip("sklearn.decomposition._nmf")


def low_rank(n=40, c=25, r=6, seed=0):
    rng = np.random.RandomState(seed)
    return rng.rand(n, r) @ rng.rand(r, c)


def nndsvd_reference(X, k, eps=1e-6):
    """Boutsidis & Gallopoulos NNDSVD with an exact numpy SVD, loop by loop; sklearn layout."""
    U, S, Vt = np.linalg.svd(X, full_matrices=False)
    W = np.zeros((X.shape[0], k))
    H = np.zeros((k, X.shape[1]))
    W[:, 0] = np.sqrt(S[0]) * np.abs(U[:, 0])
    H[0] = np.sqrt(S[0]) * np.abs(Vt[0])
    for j in range(1, k):
        x, y = U[:, j], Vt[j]
        xp, yp, xn, yn = np.maximum(x, 0), np.maximum(y, 0), -np.minimum(x, 0), -np.minimum(y, 0)
        mp = np.linalg.norm(xp) * np.linalg.norm(yp)
        mn = np.linalg.norm(xn) * np.linalg.norm(yn)
        if mp > mn:
            u, v, s = xp / np.linalg.norm(xp), yp / np.linalg.norm(yp), mp
        else:
            u, v, s = xn / np.linalg.norm(xn), yn / np.linalg.norm(yn), mn
        W[:, j] = np.sqrt(S[j] * s) * u
        H[j] = np.sqrt(S[j] * s) * v
    W[W < eps] = 0
    H[H < eps] = 0
    return W, H


@pytest.mark.parametrize("method", ["nndsvd", "nndsvda"])
def test_matches_sklearn_on_low_rank(method):
    # rank(X) <= k + 10, so sklearn's randomized SVD is exact and both must agree.
    X = low_rank()
    Wsk, Hsk = sk_nmf._initialize_nmf(X, 4, init=method, random_state=0)
    W, H = initialize(X, 4, method=method)
    assert W.shape == (25, 4) and H.shape == (40, 4)
    np.testing.assert_allclose(W.numpy(), Hsk.T, atol=1e-10)
    np.testing.assert_allclose(H.numpy(), Wsk, atol=1e-10)


def test_matches_sklearn_nndsvdar_structure():
    X = low_rank()
    Wsk, Hsk = sk_nmf._initialize_nmf(X, 4, init="nndsvd", random_state=0)
    W, H = initialize(X, 4, method="nndsvdar", random_state=0)
    # same non-zero part as NNDSVD, zeros replaced by small positive values
    np.testing.assert_allclose(W.numpy()[Hsk.T > 0], Hsk.T[Hsk.T > 0], atol=1e-10)
    fill = W.numpy()[Hsk.T == 0]
    assert (fill >= 0).all() and (fill <= X.mean()).all()


def test_matches_reference_on_full_rank_digits():
    digits = pytest.importorskip("sklearn.datasets").load_digits().data
    Wr, Hr = nndsvd_reference(digits, 10)
    W, H = initialize(digits, 10, method="nndsvd")
    np.testing.assert_allclose(W.numpy(), Hr.T, atol=1e-8)
    np.testing.assert_allclose(H.numpy(), Wr, atol=1e-8)
    # the randomized path is close to the exact one on real data
    W2, H2 = initialize(digits, 10, method="nndsvd", svd="randomized", random_state=0)
    rel = np.linalg.norm(H2.numpy() @ W2.numpy().T - Wr @ Hr) / np.linalg.norm(Wr @ Hr)
    assert rel < 1e-3


@pytest.mark.parametrize("layout", ["coo", "csr", "scipy"])
def test_sparse_equals_dense(layout):
    # 12 columns <= rank + 10 oversamples: the randomized SVD spans the whole row space.
    X = low_rank(c=12, seed=1)
    X[X < np.quantile(X, 0.5)] = 0
    dense = initialize(X, 3, method="nndsvda")
    if layout == "scipy":
        S = sp.csr_matrix(X)
    else:
        S = torch.tensor(X).to_sparse() if layout == "coo" else torch.tensor(X).to_sparse_csr()
    for svd in ("auto", "randomized"):
        W, H = initialize(S, 3, method="nndsvda", svd=svd, random_state=0)
        np.testing.assert_allclose(W.numpy(), dense[0].numpy(), atol=1e-9)
        np.testing.assert_allclose(H.numpy(), dense[1].numpy(), atol=1e-9)


def test_randomized_svd_exact_on_low_rank():
    X = torch.tensor(low_rank())
    U, S, Vh = randomized_svd(X, 4, generator=torch.Generator().manual_seed(0))
    S_ex = torch.linalg.svdvals(X)[:4]
    torch.testing.assert_close(S, S_ex)
    assert torch.allclose(U.t() @ U, torch.eye(4, dtype=X.dtype), atol=1e-10)


@pytest.mark.parametrize("method", ["random", "nndsvd", "nndsvda", "nndsvdar", "k-means", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_dtype_nonnegative_reproducible(method, dtype):
    X = torch.rand(30, 12, dtype=dtype, generator=torch.Generator().manual_seed(0))
    X0 = X.clone()
    W, H = initialize(X, 5, method=method, random_state=3)
    W2, H2 = initialize(X, 5, method=method, random_state=3)
    assert torch.equal(X, X0)
    assert W.shape == (12, 5) and H.shape == (30, 5)
    assert W.dtype == dtype and H.dtype == dtype
    assert (W >= 0).all() and (H >= 0).all()
    assert torch.isfinite(W).all() and torch.isfinite(H).all()
    assert torch.equal(W, W2) and torch.equal(H, H2)


def test_random_scaling_like_sklearn():
    X = torch.full((200, 100), 4.0, dtype=torch.float64)
    W, H = initialize(X, 4, method="random", random_state=0)
    # E|N(0,1)| = sqrt(2/pi); each factor is sqrt(mean/R) * |N(0,1)|
    expected = np.sqrt(4.0 / 4) * np.sqrt(2 / np.pi)
    assert abs(float(W.mean()) - expected) < 0.1 and abs(float(H.mean()) - expected) < 0.1


def test_kmeans_centres_and_memberships():
    X = np.vstack([np.tile([5.0, 0.0, 0.0], (10, 1)), np.tile([0.0, 0.0, 7.0], (10, 1))])
    W, H = initialize(X, 2, method="k-means", random_state=0)
    labels = H.argmax(1).numpy()
    assert len(set(labels[:10])) == 1 and len(set(labels[10:])) == 1 and labels[0] != labels[10]
    centre = W[:, labels[0]].numpy()
    np.testing.assert_allclose(centre, [5.0, 1e-6, 1e-6])


def test_auto_method_follows_sklearn():
    X = torch.rand(6, 4, dtype=torch.float64)
    W, H = initialize(X, 3, method=None)
    W2, H2 = initialize(X, 3, method="nndsvda")
    assert torch.equal(W, W2)
    W, H = initialize(X, 10, method=None, random_state=0)  # rank > min(N, C) -> random
    assert W.shape == (4, 10)


def test_integer_input_gives_float():
    W, H = initialize(np.arange(12).reshape(4, 3), 2, method="nndsvd")
    assert W.dtype == torch.get_default_dtype()


def test_random_state_conversions():
    assert isinstance(check_random_state(None), torch.Generator)
    g = torch.Generator()
    assert check_random_state(g) is g
    a = torch.rand(3, generator=check_random_state(np.random.RandomState(0)))
    b = torch.rand(3, generator=check_random_state(np.random.RandomState(0)))
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="random_state"):
        check_random_state("seed")
    with pytest.raises(ValueError, match="random_state"):
        check_random_state(-1)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(X=-np.ones((3, 3)), rank=2), ValueError, "non-negative"),
        (dict(X=np.full((3, 3), np.nan), rank=2), ValueError, "NaN"),
        (dict(X=np.ones((3, 3)), rank=0), ValueError, "rank"),
        (dict(X=np.ones((3, 3)), rank=2.5), TypeError, "rank"),
        (dict(X=np.ones((3, 3)), rank=2, method="svd"), ValueError, "method"),
        (dict(X=np.ones((3, 3)), rank=4, method="nndsvd"), ValueError, "rank <= min"),
        (dict(X=np.ones(3), rank=1), ValueError, "dimensions"),
        (dict(X=np.ones((3, 3)), rank=2, svd="fast"), ValueError, "svd"),
        (dict(X=np.ones((3, 3)), rank=4, method="k-means"), ValueError, "rows"),
    ],
)
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        initialize(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs cuda")
def test_cuda_same_as_cpu():
    X = torch.tensor(low_rank())
    for method in ("nndsvda", "random", "nndsvdar"):
        W, H = initialize(X.cuda(), 3, method=method, random_state=0)
        Wc, Hc = initialize(X, 3, method=method, random_state=0)
        assert W.is_cuda
        torch.testing.assert_close(W.cpu(), Wc)
        torch.testing.assert_close(H.cpu(), Hc)
