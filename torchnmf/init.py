r"""Initial factors for non-negative factorizations: random, NNDSVD(a/ar), k-means.

Layout
------
The data ``X`` has shape ``(N, C)`` (rows = samples, columns = features, as in
scikit-learn), and every function here returns ``(W, H)`` in torchnmf's layout

.. math:: X \approx H W^\top, \qquad W \in \mathbb{R}_+^{C \times R},\; H \in \mathbb{R}_+^{N \times R},

i.e. rank in dimension 1 of both factors, exactly as :class:`torchnmf.nmf.NMF` stores them.
Compared with :func:`sklearn.decomposition.non_negative_factorization`, which writes
``X ≈ W_sk @ H_sk``, torchnmf's ``H`` is scikit-learn's ``W_sk`` and torchnmf's ``W`` is
scikit-learn's ``H_sk.T``.

NNDSVD follows Boutsidis & Gallopoulos (2008) line by line as scikit-learn implements it; with
the exact SVD (the default for small inputs, and whenever ``X`` has rank at most
``rank + 10``) the factors equal scikit-learn's up to floating-point error.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .data import (as_tensor, check_finite, check_int, check_nonnegative, check_option, check_positive, check_rank,
                   is_sparse)

__all__ = ["METHODS", "initialize", "check_random_state", "randomized_svd"]

#: The valid ``method`` values of :func:`initialize` (``None`` means automatic).
METHODS = ("random", "nndsvd", "nndsvda", "nndsvdar", "k-means", None)

# Above this many entries a dense SVD is replaced by a randomized one.
_EXACT_SVD_MAX_ENTRIES = 4_000_000

RandomState = Union[None, int, np.integer, np.random.RandomState, np.random.Generator, torch.Generator]


#: Dtypes torch's linear algebra does not support: the SVD-based paths compute in float32.
_HALF = (torch.float16, torch.bfloat16)


def check_random_state(random_state: RandomState = None) -> torch.Generator:
    """Turn scikit-learn style ``random_state`` into a CPU :class:`torch.Generator`.

    Parameters
    ----------
    random_state : None, int, numpy RandomState or Generator, or torch.Generator
        ``None`` seeds a new generator from torch's global generator (so
        :func:`torch.manual_seed` makes it reproducible); an int seeds it; a numpy generator
        draws the seed from itself; a :class:`torch.Generator` is returned as is.

    Returns
    -------
    torch.Generator

    Raises
    ------
    TypeError
        For anything else.
    """
    if isinstance(random_state, torch.Generator):
        return random_state
    g = torch.Generator()
    if random_state is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    elif isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        if random_state < 0:
            raise ValueError(f"random_state must be a non-negative integer, got {random_state}")
        seed = int(random_state)
    elif isinstance(random_state, np.random.RandomState):
        seed = int(random_state.randint(0, 2**31 - 1))
    elif isinstance(random_state, np.random.Generator):
        seed = int(random_state.integers(0, 2**62))
    else:
        raise TypeError(
            "random_state must be None, an int, a numpy RandomState/Generator or a "
            f"torch.Generator; got {type(random_state).__name__}"
        )
    g.manual_seed(seed)
    return g


def _randn(shape, generator: torch.Generator, like: Tensor) -> Tensor:
    # Drawn on the CPU generator then moved, so a seed gives the same numbers on any device.
    return torch.randn(shape, generator=generator, dtype=like.dtype).to(like.device)


def _mm(X: Tensor, Y: Tensor) -> Tensor:
    return torch.sparse.mm(X, Y) if is_sparse(X) else X @ Y


def randomized_svd(
    X, rank: int, n_oversamples: int = 10, n_iter: Union[int, str] = "auto",
    generator: RandomState = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD by a randomized range finder (Halko et al. 2011), dense or sparse ``X``.

    Parameters
    ----------
    X : Tensor, numpy array or scipy.sparse matrix, shape (N, C)
        Dense or sparse (COO/CSR); never densified. Integer input becomes floating.
    rank : int
        Number of singular triplets, ``1 <= rank <= min(N, C)``.
    n_oversamples : int, default 10
        Extra random directions (>= 0).
    n_iter : int or 'auto', default 'auto'
        Power iterations (>= 0): 7 if ``rank < 0.1 * min(N, C)`` else 4, as scikit-learn.
    generator : torch.Generator, int or numpy generator, optional
        Source of the random test matrix (anything :func:`check_random_state` takes).

    Returns
    -------
    U : Tensor, shape (N, rank)
    S : Tensor, shape (rank,)
    Vh : Tensor, shape (rank, C)
    """
    X = as_tensor(X, "X", ndim=2, float_only=False)
    check_finite(X, "X")
    if X.dtype in _HALF:  # torch has no QR/SVD in half precision: compute in float32
        return tuple(t.to(X.dtype) for t in randomized_svd(X.float(), rank, n_oversamples, n_iter, generator))
    N, C = X.shape
    rank = check_int(rank, "rank", low=1)
    if rank > min(N, C):
        raise ValueError(f"rank must be at most min(N, C) = {min(N, C)} for X of shape {(N, C)}, got {rank}")
    n_oversamples = check_int(n_oversamples, "n_oversamples", low=0)
    q = min(rank + n_oversamples, N, C)
    if isinstance(n_iter, str):
        check_option(n_iter, ("auto",), "n_iter")
        n_iter = 7 if rank < 0.1 * min(N, C) else 4
    n_iter = check_int(n_iter, "n_iter", low=0)
    if is_sparse(X):
        X = X.to_sparse_coo().coalesce() if X.layout != torch.sparse_coo else X.coalesce()
        like, Xt = X.values(), X.t().coalesce()
    else:
        like, Xt = X, X.t()
    generator = check_random_state(generator)
    Q = _mm(X, _randn((C, q), generator, like))
    for _ in range(n_iter):
        Q = torch.linalg.qr(Q).Q
        Q = torch.linalg.qr(_mm(Xt, Q)).Q
        Q = _mm(X, Q)
    Q = torch.linalg.qr(Q).Q
    B = _mm(Xt, Q).t()  # (q, C) = Qᵀ X
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    return (Q @ Ub)[:, :rank], S[:rank], Vh[:rank]


def _svd(X: Tensor, rank: int, svd: str, generator: torch.Generator):
    N, C = X.shape
    if svd == "auto":
        svd = "exact" if N * C <= _EXACT_SVD_MAX_ENTRIES else "randomized"
    if svd == "exact":
        D = X.to_dense() if is_sparse(X) else X
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    return randomized_svd(X, rank, generator=generator)


def _nndsvd(U: Tensor, S: Tensor, Vh: Tensor) -> Tuple[Tensor, Tensor]:
    """Return (Hs, Ws) in scikit-learn's layout: Hs (N,R) left factor, Ws (R,C) right."""
    left = torch.empty_like(U)
    right = torch.empty_like(Vh)
    # The leading singular pair of a non-negative matrix is non-negative up to sign.
    left[:, 0] = S[0].sqrt() * U[:, 0].abs()
    right[0] = S[0].sqrt() * Vh[0].abs()
    if U.shape[1] > 1:
        x, y = U[:, 1:], Vh[1:].t()
        xp, yp = x.clamp(min=0), y.clamp(min=0)
        xn, yn = (-x).clamp(min=0), (-y).clamp(min=0)
        xpn, ypn = xp.norm(dim=0), yp.norm(dim=0)
        xnn, ynn = xn.norm(dim=0), yn.norm(dim=0)
        mp, mn = xpn * ypn, xnn * ynn
        use_p = mp > mn
        # the floor only guards 0/0 (norms that are 0 are of unused halves); it must be a
        # positive number of the dtype: a literal 1e-300 is 0 in float32 and gave NaN
        tiny = torch.finfo(U.dtype).tiny
        u = torch.where(use_p, xp / xpn.clamp_min(tiny), xn / xnn.clamp_min(tiny))
        v = torch.where(use_p, yp / ypn.clamp_min(tiny), yn / ynn.clamp_min(tiny))
        lbd = (S[1:] * torch.where(use_p, mp, mn)).sqrt()
        left[:, 1:] = lbd * u
        right[1:] = (lbd * v).t()
    return left, right


def _mean(X: Tensor) -> Tensor:
    if is_sparse(X):
        vals = X.coalesce().values() if X.layout == torch.sparse_coo else X.values()
        return vals.sum() / (X.shape[0] * X.shape[1])
    return X.mean()


def _overflow_scale(X: Tensor) -> float:
    """A power of 4 to divide ``X`` by so that its sums and SVD cannot overflow (1 if none is needed).

    Sums of ``N * C`` entries near the dtype's maximum (float32: 3.4e38) overflow to inf
    and the SVD then gives NaN. Powers of 4 scale exactly, and their square roots (the
    factors' share) are powers of 2, so the scaled computation loses nothing.
    """
    vals = X.coalesce().values() if X.layout == torch.sparse_coo else (X.values() if is_sparse(X) else X)
    if vals.numel() == 0:
        return 1.0
    amax = float(vals.max())
    limit = math.sqrt(torch.finfo(X.dtype).max) / max(X.shape[0], X.shape[1], 1)
    if amax <= limit:
        return 1.0
    return 4.0 ** math.floor(math.log(amax, 4))  # <= amax, so representable in the dtype


def _kmeans(X: Tensor, rank: int, generator: torch.Generator, eps: float):
    try:
        from sklearn.cluster import KMeans
    except ImportError:  # pragma: no cover - optional dependency
        raise ImportError("method='k-means' needs scikit-learn: pip install scikit-learn") from None
    if rank > X.shape[0]:
        raise ValueError(f"rank={rank} is larger than the number of rows ({X.shape[0]}) for k-means")
    if is_sparse(X):
        import scipy.sparse as sp

        C = X.to_sparse_coo().coalesce().cpu()
        idx = C.indices().numpy()
        A = sp.csr_matrix((C.values().double().numpy(), (idx[0], idx[1])), shape=tuple(X.shape))
    else:
        A = X.detach().cpu().double().numpy()
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
    km = KMeans(n_clusters=rank, n_init=4, random_state=seed).fit(A)
    centers = torch.as_tensor(np.maximum(km.cluster_centers_, 0.0))
    labels = torch.as_tensor(km.labels_, dtype=torch.long)
    # Memberships 1 for the row's cluster and 0.2 / (R - 1) elsewhere (0.2 in all), so
    # multiplicative updates can move every entry without inflating the reconstruction;
    # centres below eps become eps for the same reason.
    H = torch.full((X.shape[0], rank), 0.2 / max(rank - 1, 1), dtype=torch.float64)
    H[torch.arange(X.shape[0]), labels] = 1.0
    W = centers.t().clamp_min(eps).contiguous()
    return W, H


def initialize(
    X,
    rank: int,
    method: Optional[str] = "nndsvda",
    random_state: RandomState = None,
    eps: float = 1e-6,
    svd: str = "auto",
) -> Tuple[Tensor, Tensor]:
    r"""Initial non-negative factors ``(W, H)`` with ``X ≈ H @ W.T``.

    Parameters
    ----------
    X : Tensor, numpy array, scipy.sparse matrix or DataFrame, shape (N, C)
        Non-negative data, rows are samples. Dense or sparse; never modified.
    rank : int
        Number of components R.
    method : {'nndsvda', 'nndsvd', 'nndsvdar', 'random', 'k-means', None}, default 'nndsvda'
        - ``'random'``: ``|N(0, 1)| * sqrt(mean(X) / R)`` (scikit-learn's scaling).
        - ``'nndsvd'``: non-negative double SVD; keeps zeros (good for sparse factors).
        - ``'nndsvda'``: NNDSVD with zeros filled by ``mean(X)``.
        - ``'nndsvdar'``: NNDSVD with zeros filled by ``|N(0, 1)| * mean(X) / 100``.
        - ``'k-means'``: :class:`sklearn.cluster.KMeans` with R clusters on the rows;
          ``W`` holds the cluster centres, ``H`` is 1 for a row's cluster and ``0.2 / (R - 1)`` elsewhere.
        - ``None``: ``'nndsvda'`` if ``R <= min(N, C)``, else ``'random'`` (as scikit-learn).
    random_state : None, int, numpy or torch generator
        For ``'random'``, ``'nndsvdar'``, ``'k-means'`` and the randomized SVD.
    eps : float, default 1e-6
        NNDSVD entries below ``eps`` are set to zero (before filling); k-means centres are
        raised to at least ``eps``.
    svd : {'auto', 'exact', 'randomized'}, default 'auto'
        SVD for the NNDSVD methods: ``'exact'`` (:func:`torch.linalg.svd`, densifies sparse
        input), ``'randomized'`` (:func:`randomized_svd`, sparse stays sparse) or ``'auto'``
        (exact up to 4e6 entries).

    Returns
    -------
    W : Tensor, shape (C, R)
        Column (feature) factors.
    H : Tensor, shape (N, R)
        Row (sample) factors.

        Both have ``X``'s floating dtype (float32 for integer input) and device.

    Raises
    ------
    ValueError
        Negative, NaN or infinite ``X``, ``rank <= 0``, an unknown ``method``, or an NNDSVD
        method with ``rank > min(N, C)``.

    Examples
    --------
    >>> import torch
    >>> from torchnmf.init import initialize
    >>> X = torch.rand(30, 8)
    >>> W, H = initialize(X, 3, method="nndsvd")
    >>> W.shape, H.shape
    (torch.Size([8, 3]), torch.Size([30, 3]))
    """
    check_option(method, METHODS, "method")
    check_option(svd, ("auto", "exact", "randomized"), "svd")
    eps = check_positive(eps, "eps", allow_zero=True)
    X = as_tensor(X, "X", ndim=2, float_only=False)
    check_nonnegative(X, "X")
    N, C = X.shape
    if N == 0 or C == 0:
        raise ValueError(f"X is empty (shape {tuple(X.shape)}): there is nothing to initialize factors from")
    rank = check_rank(rank, "rank")
    if method not in (None, "random", "k-means") and rank > min(N, C):
        raise ValueError(f"method={method!r} needs rank <= min(N, C) = {min(N, C)}, got rank={rank}")
    if method is None:
        method = "nndsvda" if rank <= min(N, C) else "random"
    if X.dtype in _HALF and method not in ("random", "k-means"):
        # torch has no SVD in half precision: compute in float32, hand the factors back in X's dtype
        W, H = initialize(X.float(), rank, method, eps=eps, random_state=random_state, svd=svd)
        return _finite(W.to(X.dtype), H.to(X.dtype))
    g = check_random_state(random_state)
    if X.layout == torch.sparse_coo:
        X = X.coalesce()
    dtype, device = X.dtype, X.device
    like = torch.empty(0, dtype=dtype, device=device)
    if method == "k-means":  # computed in float64, which does not overflow
        W, H = _kmeans(X, rank, g, eps)
        return _finite(W.to(device=device, dtype=dtype), H.to(device=device, dtype=dtype))
    # data near the dtype's maximum: work on X / s and give each factor sqrt(s) back
    s = _overflow_scale(X)
    if s != 1.0:
        X = X / s
        eps = eps / s
    root = math.sqrt(s)
    avg = _mean(X)

    if method == "random":
        scale = (avg / rank).sqrt()
        H = scale * _randn((N, rank), g, like).abs()
        W = scale * _randn((C, rank), g, like).abs()
        return _finite(W * root, H * root)

    U, S, Vh = _svd(X, rank, svd, g)
    left, right = _nndsvd(U, S, Vh)
    left = torch.where(left < eps, torch.zeros_like(left), left)
    right = torch.where(right < eps, torch.zeros_like(right), right)
    if method == "nndsvda":
        left = torch.where(left == 0, avg, left)
        right = torch.where(right == 0, avg, right)
    elif method == "nndsvdar":
        left = torch.where(left == 0, (avg * _randn(left.shape, g, like) / 100).abs(), left)
        right = torch.where(right == 0, (avg * _randn(right.shape, g, like) / 100).abs(), right)
    return _finite(right.t().contiguous() * root, left.contiguous() * root)


def _finite(W: Tensor, H: Tensor) -> Tuple[Tensor, Tensor]:
    """Return ``(W, H)``, raising instead of handing on non-finite factors."""
    if not (bool(torch.isfinite(W).all()) and bool(torch.isfinite(H).all())):
        raise FloatingPointError(
            f"the initial factors overflowed {W.dtype}: X is too large for this dtype; "
            "use float64 or divide X by a constant"
        )
    return W, H
