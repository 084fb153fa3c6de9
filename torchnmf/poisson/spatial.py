r"""Gaussian-process priors for the log-factors ``F`` (``K x N``) of log-normal Poisson layers.

Each class is a :class:`~torchnmf.poisson.lognormal.FactorPosterior`: it holds the
variational posterior ``q(F)`` *and* a GP prior over the samples' coordinates, one
independent GP per component with a constant mean :math:`\mu_k` and a Matern 3/2 kernel
(optionally attenuated across groups, MGGP: :class:`~torchnmf.poisson.kernels.MultiGroupKernel`).

:class:`SVGP`
    Sparse variational GP with ``M`` inducing points (k-means placed, per group when
    groups are given) and a whitened posterior ``q(v) = N(m, L L^T)``, ``u = chol(K_uu) v``.
    Its KL is global: :meth:`SVGP.kl` returns the full KL whatever the batch, to be
    subtracted once from an ELBO whose data term is scaled to the full data (so an epoch
    of ``N / B`` batches, each weighted ``B / N``, counts it once).
:class:`LCGP`
    Locally conditioned GP: every sample is an inducing point, ``q(u) = N(mu + m, V V^T +
    diag(s^2))`` (low rank plus diagonal), and the prior is the Vecchia approximation
    ``p(u) = prod_i p(u_i | u_{nb(i)})`` that conditions each point on its ``n_neighbors``
    nearest predecessors in a random ordering. That is a proper Gaussian density, so the
    KL is exact for it and splits into a sum over points: :meth:`LCGP.kl` on a batch is an
    unbiased estimate of the full KL (batch terms scaled by ``N / B``).

Both give the GP predictive ``q(F*)`` at new coordinates through
``marginals(coordinates=..., groups=...)``. Draws from :meth:`rsample` are independent
across samples given the marginals, which is exact for a data term that factorizes over
samples (the Poisson likelihood of a log-normal layer does).
"""
from __future__ import annotations

import math

from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..constraints import Exp, Softplus
from ..data import as_tensor, check_finite, check_option, check_positive, check_rank
from .kernels import Matern32, MultiGroupKernel, pairwise_distance
from .lognormal import FactorPosterior, _check_idx

__all__ = [
    "SVGP",
    "LCGP",
    "INDUCING_ALLOCATIONS",
    "CHOLESKY_MODES",
    "check_coordinates",
    "check_groups",
    "allocate_inducing",
    "place_inducing",
    "nearest_neighbors",
]

INDUCING_ALLOCATIONS = ("proportional", "equal", "derived")
CHOLESKY_MODES = ("exp", "softplus")
# the positive parametrizations of torchnmf.constraints, shared (stateless)
_DIAG_TRANSFORMS = {"exp": Exp(), "softplus": Softplus()}


# -- input checks -----------------------------------------------------------------------------
def check_coordinates(coordinates, n: Optional[int] = None, dim: Optional[int] = None,
                      name: str = "coordinates", dtype=None, device=None) -> Tensor:
    """Check and convert sample coordinates.

    Parameters
    ----------
    coordinates : array-like, shape (N, D)
    n : int, optional
        Required number of rows.
    dim : int, optional
        Required number of columns ``D``.

    Returns
    -------
    Tensor, shape (N, D)

    Raises
    ------
    ValueError
        ``None``, wrong shape, or NaN/infinite entries.
    """
    if coordinates is None:
        raise ValueError(f"{name} are required for a spatial prior: pass {name}= with shape (n_samples, n_dims)")
    C = as_tensor(coordinates, name, dtype=dtype, device=device, sparse="dense", float_only=False)
    if C.dim() != 2:
        raise ValueError(f"{name} must have shape (n_samples, n_dims), got shape {tuple(C.shape)}")
    if C.shape[0] == 0 or C.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(C.shape)}")
    if n is not None and C.shape[0] != n:
        raise ValueError(f"{name} has {C.shape[0]} rows, expected {n} (one per sample)")
    if dim is not None and C.shape[1] != dim:
        raise ValueError(f"{name} has {C.shape[1]} columns, expected {dim} (the dimension used in fitting)")
    check_finite(C, name)
    # squared differences of such coordinates overflow (inf distances, NaN covariances)
    limit = math.sqrt(torch.finfo(C.dtype).max) / (4 * math.sqrt(C.shape[1]))
    amax = float(C.abs().max())
    if amax > limit:
        raise ValueError(f"{name} are too large for {str(C.dtype).replace('torch.', '')}: the largest is "
                         f"{amax:.3g} and distances would overflow (limit {limit:.3g}); rescale them "
                         "(lengthscales are in the coordinates' units)")
    return C


def check_groups(groups, n: int, n_groups: Optional[int] = None, name: str = "groups", device=None) -> Tensor:
    """Check integer group labels ``0 .. n_groups - 1``, one per sample; return a LongTensor (n,)."""
    if groups is None:
        raise ValueError(f"{name} are required when multigroup=True")
    if isinstance(groups, Tensor):
        g = groups
    else:
        A = np.asarray(groups)
        if A.dtype.kind not in "iufb":
            raise TypeError(f"{name} must hold integer labels 0, 1, ..., got dtype {A.dtype} "
                            "(SpatialPNMF maps labels of any type to integers)")
        g = torch.as_tensor(A)
    if g.dtype == torch.bool or g.is_floating_point() or g.is_complex():
        if g.is_floating_point() and bool(torch.isfinite(g).all()) and bool((g == g.round()).all()):
            g = g.long()
        else:
            raise TypeError(f"{name} must hold integer labels, got dtype {g.dtype}")
    if g.dim() != 1 or g.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got shape {tuple(g.shape)}")
    g = g.long().to(device) if device is not None else g.long()
    if g.numel() and int(g.min()) < 0:
        raise ValueError(f"{name} must be labels 0, 1, ..., got minimum {int(g.min())}")
    if n_groups is not None and g.numel() and int(g.max()) >= n_groups:
        raise ValueError(f"{name} holds label {int(g.max())}, but the prior was fitted with {n_groups} groups")
    return g


# -- inducing points ----------------------------------------------------------------------------
def allocate_inducing(num_inducing: int, counts, extents=None, allocation: str = "proportional") -> np.ndarray:
    """Split ``num_inducing`` points among groups.

    Parameters
    ----------
    num_inducing : int
        Total ``M`` (at least the number of groups).
    counts : array-like of int, shape (G,)
        Samples per group; no group gets more inducing points than samples.
    extents : array-like of float, shape (G,), optional
        Spatial extent of each group (area of its bounding box); needed for ``'derived'``.
    allocation : {'proportional', 'equal', 'derived'}
        ``proportional`` to the group sizes, ``equal`` shares, or ``derived`` from each
        group's spatial extent, so a group gets the share of points its area needs at a
        common inducing-point density whatever its sampling density.

    Returns
    -------
    ndarray of int, shape (G,)
        At least 1 and at most ``counts[g]`` per group, summing to
        ``min(num_inducing, sum(counts))`` (largest-remainder rounding).
    """
    check_option(allocation, INDUCING_ALLOCATIONS, "inducing_allocation")
    counts = np.asarray(counts, dtype=np.int64)
    G = len(counts)
    M = min(int(num_inducing), int(counts.sum()))
    if M < G:
        raise ValueError(f"num_inducing={num_inducing} is smaller than the number of groups ({G})")
    if allocation == "proportional":
        weights = counts.astype(float)
    elif allocation == "equal":
        weights = np.ones(G)
    else:
        if extents is None:
            raise ValueError("inducing_allocation='derived' needs the groups' extents")
        weights = np.asarray(extents, dtype=float)
        weights = np.where(weights > 0, weights, weights[weights > 0].min() if (weights > 0).any() else 1.0)
    ideal = M * weights / weights.sum()
    share = np.clip(np.floor(ideal).astype(np.int64), 1, counts)
    while share.sum() < M:  # largest shortfall first, among groups with samples left
        gap = np.where(share < counts, ideal - share, -np.inf)
        share[np.argmax(gap)] += 1
    while share.sum() > M:  # the minimum of one per group can overshoot
        gap = np.where(share > 1, ideal - share, np.inf)
        share[np.argmin(gap)] -= 1
    return share


def _kmeans(points: np.ndarray, k: int, random_state) -> np.ndarray:
    unique = np.unique(points, axis=0)
    if k >= len(unique):
        return unique
    try:
        from sklearn.cluster import KMeans
    except ImportError:  # pragma: no cover - optional dependency
        raise ImportError("placing inducing points needs scikit-learn: pip install scikit-learn") from None
    km = KMeans(n_clusters=k, n_init=1, random_state=random_state).fit(points)
    return km.cluster_centers_


def place_inducing(coordinates, num_inducing: int, groups=None, allocation: str = "proportional",
                   random_state=None) -> Tuple[Tensor, Optional[Tensor]]:
    """Inducing points at k-means centres of the coordinates (per group when groups are given).

    Parameters
    ----------
    coordinates : Tensor, shape (N, D)
    num_inducing : int
        ``M``; at most the number of distinct coordinates are returned.
    groups : LongTensor, shape (N,), optional
        Labels ``0 .. G-1``; the points are then split by :func:`allocate_inducing`.
    allocation : {'proportional', 'equal', 'derived'}
    random_state : int or numpy RandomState, optional
        Seed of k-means.

    Returns
    -------
    Z : Tensor, shape (M, D)
        On the coordinates' device and dtype.
    Z_groups : LongTensor, shape (M,), or None without ``groups``
    """
    check_rank(num_inducing, "num_inducing")
    check_option(allocation, INDUCING_ALLOCATIONS, "inducing_allocation")
    X = coordinates.detach().cpu().double().numpy()
    if groups is None:
        Z = _kmeans(X, num_inducing, random_state)
        return torch.as_tensor(Z, dtype=coordinates.dtype, device=coordinates.device), None
    g = groups.detach().cpu().numpy()
    labels = np.arange(int(g.max()) + 1)
    counts = np.array([(g == lab).sum() for lab in labels])
    present = counts > 0
    extents = np.array([np.prod(np.ptp(X[g == lab], axis=0)) if c else 0.0 for lab, c in zip(labels, counts)])
    share = np.zeros(len(labels), dtype=np.int64)
    share[present] = allocate_inducing(num_inducing, counts[present], extents[present], allocation)
    Zs, Gs = [], []
    for lab in labels[present]:
        Zg = _kmeans(X[g == lab], int(share[lab]), random_state)
        Zs.append(Zg)
        Gs.append(np.full(len(Zg), lab))
    Z = torch.as_tensor(np.concatenate(Zs), dtype=coordinates.dtype, device=coordinates.device)
    return Z, torch.as_tensor(np.concatenate(Gs), dtype=torch.long, device=coordinates.device)


# -- nearest neighbours -------------------------------------------------------------------------
def _topk_torch(query: Tensor, ref: Tensor, k: int, query_pos: Optional[Tensor] = None,
                ref_pos: Optional[Tensor] = None, chunk: int = 1024) -> Tuple[Tensor, Tensor]:
    k_eff = min(k, ref.shape[0])
    idx_out, dist_out = [], []
    for s in range(0, query.shape[0], chunk):
        d = pairwise_distance(query[s:s + chunk], ref)
        if query_pos is not None:
            d = d.masked_fill(ref_pos[None, :] >= query_pos[s:s + chunk, None], float("inf"))
        dist, idx = torch.topk(d, k_eff, dim=1, largest=False)
        idx_out.append(idx)
        dist_out.append(dist)
    return torch.cat(idx_out), torch.cat(dist_out)


def _pad(idx: Tensor, dist: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    if idx.shape[1] < k:
        pad = k - idx.shape[1]
        idx = torch.cat([idx, idx.new_zeros(idx.shape[0], pad)], 1)
        dist = torch.cat([dist, dist.new_full((dist.shape[0], pad), float("inf"))], 1)
    valid = torch.isfinite(dist)
    return torch.where(valid, idx, torch.zeros_like(idx)), valid


def nearest_neighbors(query: Tensor, ref: Tensor, k: int, query_pos: Optional[Tensor] = None,
                      ref_pos: Optional[Tensor] = None, backend: str = "torch") -> Tuple[Tensor, Tensor]:
    """The ``k`` nearest rows of ``ref`` for each row of ``query``, optionally among predecessors.

    Parameters
    ----------
    query : Tensor, shape (B, D)
    ref : Tensor, shape (N, D)
    k : int
    query_pos, ref_pos : LongTensor, shapes (B,) and (N,), optional
        Positions in an ordering; when given, only ``ref`` rows with a smaller position
        than the query's are candidates (the Vecchia predecessor sets).
    backend : {'torch', 'sklearn'}
        Chunked brute force on the tensors' device, or scikit-learn's
        :class:`~sklearn.neighbors.NearestNeighbors` on CPU (a tree per block of the
        ordering when positions are given).

    Returns
    -------
    idx : LongTensor, shape (B, k)
        Rows of ``ref``, nearest first (0 where invalid).
    valid : BoolTensor, shape (B, k)
        False where fewer than ``k`` candidates exist.
    """
    check_rank(k, "n_neighbors")
    check_option(backend, ("torch", "sklearn"), "backend")
    if (query_pos is None) != (ref_pos is None):
        raise ValueError("query_pos and ref_pos must be given together")
    if backend == "torch":
        return _pad(*_topk_torch(query, ref, k, query_pos, ref_pos), k)
    try:
        from sklearn.neighbors import NearestNeighbors
    except ImportError:  # pragma: no cover - optional dependency
        raise ImportError("backend='sklearn' needs scikit-learn: pip install scikit-learn") from None
    Q = query.detach().cpu().double().numpy()
    R = ref.detach().cpu().double().numpy()
    if query_pos is None:
        k_eff = min(k, len(R))
        dist, idx = NearestNeighbors(n_neighbors=k_eff).fit(R).kneighbors(Q)
        return _pad(torch.as_tensor(idx, device=query.device), torch.as_tensor(dist, device=query.device), k)
    # Predecessors: walk the ordering in blocks; a tree on everything before the block
    # plus brute force inside the block covers exactly the earlier positions.
    qp, rp = query_pos.cpu(), ref_pos.cpu()
    by_pos = torch.argsort(rp)  # ref rows in order
    R_ord = R[by_pos.numpy()]
    rp_sorted = rp[by_pos]
    out_idx = torch.zeros(len(Q), k, dtype=torch.long)
    out_dist = torch.full((len(Q), k), float("inf"), dtype=torch.float64)
    block = 1024
    q_order = torch.argsort(qp)
    starts = torch.searchsorted(rp_sorted, qp[q_order])  # number of predecessors of each query
    for s in range(0, len(Q), block):
        rows = q_order[s:s + block]
        lo = int(starts[s])  # fewest predecessors in this block
        hi = int(starts[min(s + block, len(Q)) - 1])
        cand_i, cand_d = [], []
        if lo > 0:
            k_eff = min(k, lo)
            d, i = NearestNeighbors(n_neighbors=k_eff).fit(R_ord[:lo]).kneighbors(Q[rows.numpy()])
            cand_i.append(torch.as_tensor(i))
            cand_d.append(torch.as_tensor(d))
        if hi > lo:
            d = torch.cdist(torch.as_tensor(Q[rows.numpy()]), torch.as_tensor(R_ord[lo:hi]),
                            compute_mode="donot_use_mm_for_euclid_dist")
            d = d.masked_fill(rp_sorted[lo:hi][None, :] >= qp[rows][:, None], float("inf"))
            dd, ii = torch.topk(d, min(k, hi - lo), dim=1, largest=False)
            cand_i.append(ii + lo)
            cand_d.append(dd)
        if not cand_i:
            continue
        ci, cd = torch.cat(cand_i, 1), torch.cat(cand_d, 1)
        dd, sel = torch.topk(cd, min(k, cd.shape[1]), dim=1, largest=False)
        out_idx[rows, : sel.shape[1]] = by_pos[torch.gather(ci, 1, sel)]
        out_dist[rows, : sel.shape[1]] = dd
    idx, valid = _pad(out_idx, out_dist, k)
    return idx.to(query.device), valid.to(query.device)


# -- shared machinery -------------------------------------------------------------------------
class _SpatialPrior(FactorPosterior):
    """Coordinates, groups, kernel and prior mean shared by :class:`SVGP` and :class:`LCGP`."""

    def __init__(self, coordinates, n_components: int, groups=None, multigroup: bool = False,
                 lengthscale=1.0, sigma=1.0, group_diff_param=1.0, jitter: float = 1e-5,
                 cholesky_mode: str = "exp", diagonal_only: bool = False, dtype=None, device=None):
        super().__init__()
        self.n_components = check_rank(n_components, "n_components")
        C = check_coordinates(coordinates, dtype=dtype or torch.get_default_dtype(), device=device)
        self.n_samples, self.n_dims = C.shape
        self.multigroup = bool(multigroup)
        if groups is not None and not self.multigroup:
            raise ValueError("groups were given but multigroup=False; pass multigroup=True to use them")
        g = check_groups(groups, self.n_samples, device=C.device) if self.multigroup else None
        self.n_groups = int(g.max()) + 1 if g is not None else 1
        self.jitter = check_positive(jitter, "jitter")
        self.cholesky_mode = check_option(cholesky_mode, CHOLESKY_MODES, "cholesky_mode")
        self.diagonal_only = bool(diagonal_only)
        self.register_buffer("coordinates", C.detach().clone())
        self.register_buffer("groups", g.clone() if g is not None else None)
        base = Matern32(self.n_components, lengthscale, sigma)
        self.kernel = MultiGroupKernel(base, group_diff_param) if self.multigroup else base
        self.kernel.to(dtype=C.dtype, device=C.device)
        # constant prior mean of each component's GP (learned with the kernel)
        self.mean = nn.Parameter(torch.zeros(self.n_components, dtype=C.dtype, device=C.device))

    def covariance(self, xa: Tensor, ga: Optional[Tensor], xb: Tensor, gb: Optional[Tensor]) -> Tensor:
        """Prior covariances of every component between points ``xa`` and ``xb``.

        Parameters
        ----------
        xa : Tensor, shape (..., P, D)
        ga : LongTensor, shape (..., P), or None
            Group codes of ``xa`` (used with the multi-group kernel only).
        xb : Tensor, shape (..., Q, D)
        gb : LongTensor, shape (..., Q), or None

        Returns
        -------
        Tensor, shape (K, ..., P, Q)
        """
        r = pairwise_distance(xa, xb)
        if self.multigroup:
            return self.kernel.from_distance(r, ga, gb)
        return self.kernel.from_distance(r)

    def _var(self, x: Tensor) -> Tensor:
        """Prior variances at ``x`` (..., P, D), shape (K, ..., P)."""
        base = self.kernel.base if self.multigroup else self.kernel
        s2 = base(x.reshape(-1, x.shape[-1]), diag=True)
        return s2.reshape((self.n_components,) + tuple(x.shape[:-1]))

    def _diag_transform(self, raw: Tensor) -> Tensor:
        return _DIAG_TRANSFORMS[self.cholesky_mode](raw)

    def _diag_inverse(self, value: Tensor) -> Tensor:
        return _DIAG_TRANSFORMS[self.cholesky_mode].right_inverse(value)

    def _batch(self, idx, coordinates, groups) -> Tuple[Optional[Tensor], Tensor, Optional[Tensor]]:
        """Resolve a batch: training indices, or new coordinates (and groups)."""
        if coordinates is not None:
            if idx is not None:
                raise ValueError("pass idx (training samples) or coordinates (new locations), not both")
            x = check_coordinates(coordinates, dim=self.n_dims, dtype=self.coordinates.dtype,
                                  device=self.coordinates.device)
            if self.multigroup:
                g = check_groups(groups, x.shape[0], self.n_groups, device=x.device)
            elif groups is not None:
                raise ValueError("groups were given but this prior was built with multigroup=False")
            else:
                g = None
            return None, x, g
        if groups is not None:
            raise ValueError("groups need coordinates: pass coordinates= and groups= for new locations")
        idx = _check_idx(idx, self.n_samples)
        if idx is None:
            return None, self.coordinates, self.groups
        if idx.device != self.coordinates.device:
            idx = idx.to(self.coordinates.device)
        return idx, self.coordinates[idx], (self.groups[idx] if self.groups is not None else None)

    def rsample(self, idx: Optional[Tensor] = None, n_samples: int = 1, coordinates=None, groups=None,
                **covariates) -> Tensor:
        """Reparameterised draws of ``F`` at a batch, shape ``(n_samples, K, B)``.

        Independent across samples given the marginals (exact for a factorized data term).
        """
        mean, var = self.marginals(idx, coordinates=coordinates, groups=groups)
        eps = torch.randn((check_rank(n_samples, "n_samples"),) + tuple(mean.shape), dtype=mean.dtype,
                          device=mean.device)
        return mean + var.clamp_min(0).sqrt() * eps

    def extra_repr(self) -> str:
        return (f"n_components={self.n_components}, n_samples={self.n_samples}, n_dims={self.n_dims}, "
                f"multigroup={self.multigroup}, n_groups={self.n_groups}")


def _cholesky(A: Tensor, what: str) -> Tensor:
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info > 0).any()):
        # float64 is advice only for lower precisions; in float64 the cause is the points
        advice = ("increase jitter or use float64" if A.dtype != torch.float64 else
                  "increase jitter, or remove duplicate or nearly coincident points (inducing points)")
        raise RuntimeError(f"the {what} covariance is not positive definite in {A.dtype}; {advice}")
    return L


# -- SVGP -------------------------------------------------------------------------------------
class SVGP(_SpatialPrior):
    r"""Sparse variational GP prior over ``F`` with whitened inducing variables.

    For component ``k``: ``F_k ~ GP(mu_k, k_k)``, inducing values ``u_k = f_k(Z)``
    written ``u_k = mu_k + L_k v_k`` with ``L_k = chol(K_uu + jitter I)``, prior
    ``v_k ~ N(0, I)`` and posterior ``q(v_k) = N(m_k, S_k)``, ``S_k = R_k R_k^T``. Then

    .. math::
        q(f_k(x)) = N\big(\mu_k + a_x^\top m_k,\; k(x, x) - a_x^\top a_x + a_x^\top S_k a_x\big),
        \qquad a_x = L_k^{-1} k_k(Z, x),

    at training or new coordinates, and ``KL = sum_k KL(N(m_k, S_k) || N(0, I))``.

    Parameters
    ----------
    coordinates : array-like, shape (N, D)
        Training coordinates (finite).
    n_components : int
        ``K``.
    num_inducing : int, default 100
        ``M``, capped at the number of distinct coordinates.
    groups : array-like of int, shape (N,), optional
        Labels ``0 .. G-1``; only with ``multigroup=True``.
    multigroup : bool, default False
        Use the MGGP kernel (:class:`~torchnmf.poisson.kernels.MultiGroupKernel`).
    lengthscale, sigma, group_diff_param : float or sequence of K floats
        Initial kernel parameters.
    jitter : float, default 1e-5
        Added to the diagonal of ``K_uu`` (part of the prior).
    cholesky_mode : {'exp', 'softplus'}, default 'exp'
        Positive transform of the diagonal of ``R``.
    diagonal_only : bool, default False
        Diagonal ``S`` (``M`` variances per component instead of a full Cholesky factor).
    inducing_allocation : {'proportional', 'equal', 'derived'}, default 'proportional'
        Split of ``M`` among groups (:func:`allocate_inducing`).
    inducing_points : array-like, shape (M, D), optional
        Fixed inducing locations instead of k-means (``inducing_groups`` with them for MGGP).
    inducing_groups : array-like of int, shape (M,), optional
    init_scale : float, default 0.1
        Initial diagonal of ``R`` (posterior standard deviations of ``v``).
    random_state : int, optional
        Seed of k-means.
    dtype, device : optional

    Attributes
    ----------
    inducing_points : Tensor, shape (M, D)
    inducing_groups : LongTensor, shape (M,) or None
    q_loc : Parameter, shape (K, M)
        ``m``.
    q_diag_raw : Parameter, shape (K, M)
        Raw diagonal of ``R``.
    q_tril : Parameter, shape (K, M, M), absent with ``diagonal_only``
        Strictly lower part of ``R`` (the rest is ignored).
    mean : Parameter, shape (K,)
        Prior means ``mu_k``.
    """

    def __init__(self, coordinates, n_components: int, num_inducing: int = 100, groups=None,
                 multigroup: bool = False, lengthscale=1.0, sigma=1.0, group_diff_param=1.0,
                 jitter: float = 1e-5, cholesky_mode: str = "exp", diagonal_only: bool = False,
                 inducing_allocation: str = "proportional", inducing_points=None, inducing_groups=None,
                 init_scale: float = 0.1, random_state=None, dtype=None, device=None):
        super().__init__(coordinates, n_components, groups, multigroup, lengthscale, sigma, group_diff_param,
                         jitter, cholesky_mode, diagonal_only, dtype, device)
        check_rank(num_inducing, "num_inducing")
        self.inducing_allocation = check_option(inducing_allocation, INDUCING_ALLOCATIONS, "inducing_allocation")
        init_scale = check_positive(init_scale, "init_scale")
        C = self.coordinates
        if inducing_points is None:
            Z, Zg = place_inducing(C, num_inducing, self.groups, inducing_allocation, random_state)
        else:
            Z = check_coordinates(inducing_points, dim=self.n_dims, name="inducing_points", dtype=C.dtype,
                                  device=C.device).detach().clone()
            Zg = None
            if self.multigroup:
                Zg = check_groups(inducing_groups, Z.shape[0], self.n_groups, "inducing_groups", C.device)
            elif inducing_groups is not None:
                raise ValueError("inducing_groups were given but multigroup=False")
        self.num_inducing = Z.shape[0]
        self.register_buffer("inducing_points", Z)
        self.register_buffer("inducing_groups", Zg)
        K, M = self.n_components, self.num_inducing
        self.q_loc = nn.Parameter(torch.zeros(K, M, dtype=C.dtype, device=C.device))
        self.q_diag_raw = nn.Parameter(self._diag_inverse(torch.full((K, M), init_scale, dtype=C.dtype,
                                                                     device=C.device)))
        if not self.diagonal_only:
            self.q_tril = nn.Parameter(torch.zeros(K, M, M, dtype=C.dtype, device=C.device))

    @property
    def q_scale_tril(self) -> Tensor:
        """``R``, the Cholesky factor of ``S``, shape ``(K, M, M)`` (diagonal with ``diagonal_only``)."""
        d = self._diag_transform(self.q_diag_raw)
        if self.diagonal_only:
            return torch.diag_embed(d)
        return torch.tril(self.q_tril, -1) + torch.diag_embed(d)

    def prior_cholesky(self) -> Tensor:
        """``L = chol(K_uu + jitter I)``, shape ``(K, M, M)``."""
        Z, Zg = self.inducing_points, self.inducing_groups
        Kuu = self.covariance(Z, Zg, Z, Zg)
        eye = torch.eye(self.num_inducing, dtype=Kuu.dtype, device=Kuu.device)
        return _cholesky(Kuu + self.jitter * eye, "inducing-point")

    def marginals(self, idx: Optional[Tensor] = None, coordinates=None, groups=None,
                  **covariates) -> Tuple[Tensor, Tensor]:
        """Mean and variance of ``q(F)`` at training samples ``idx`` or at new ``coordinates``.

        Parameters
        ----------
        idx : LongTensor, shape (B,), optional
            Training samples (default all).
        coordinates : array-like, shape (B, D), optional
            New locations (GP predictive); not together with ``idx``.
        groups : array-like of int, shape (B,), optional
            Their groups (required with ``multigroup``).

        Returns
        -------
        mean, var : Tensor, each (K, B)

        Notes
        -----
        Memory is ``O(K M B)``; under :func:`torch.no_grad` large batches are processed in
        chunks of 4096 locations.
        """
        _, x, g = self._batch(idx, coordinates, groups)
        L = self.prior_cholesky()
        if not torch.is_grad_enabled() and x.shape[0] > self._chunk:  # bound memory to O(K M chunk)
            parts = [self._marginals_at(L, x[s:s + self._chunk], None if g is None else g[s:s + self._chunk])
                     for s in range(0, x.shape[0], self._chunk)]
            return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
        return self._marginals_at(L, x, g)

    _chunk = 4096

    def _marginals_at(self, L: Tensor, x: Tensor, g: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        Kux = self.covariance(self.inducing_points, self.inducing_groups, x, g)  # (K, M, B)
        A = torch.linalg.solve_triangular(L, Kux, upper=False)  # L^{-1} K_ux
        mean = self.mean[:, None] + torch.einsum("km,kmb->kb", self.q_loc, A)
        d = self._diag_transform(self.q_diag_raw)
        if self.diagonal_only:
            explained = torch.einsum("km,kmb->kb", d.square(), A.square())
        else:
            RA = torch.tril(self.q_tril, -1).transpose(-1, -2) @ A + d[:, :, None] * A  # R^T A
            explained = RA.square().sum(1)
        var = self._var(x) - A.square().sum(1) + explained
        return mean, var.clamp_min(0)

    def kl(self, idx: Optional[Tensor] = None, **covariates) -> Tensor:
        """``sum_k KL(q(v_k) || N(0, I))``, shape (): the full KL whatever ``idx`` (global prior).

        Closed form of the whitened KL, ``0.5 (tr S + m^T m - M - log det S)``; it costs
        ``O(K M^2)``, where the generic MVN KL would solve an ``M x M`` system per component.
        """
        d = self._diag_transform(self.q_diag_raw)
        trace = d.square().sum()
        if not self.diagonal_only:
            trace = trace + torch.tril(self.q_tril, -1).square().sum()
        logdet = 2.0 * torch.log(d).sum()
        return 0.5 * (trace + self.q_loc.square().sum() - self.n_components * self.num_inducing - logdet)

    def natural_groups(self) -> List[dict]:
        """``[{'params': [q_loc, q_diag_raw], 'scale': cholesky_mode}]`` with ``diagonal_only``.

        With a diagonal ``S`` the whitened ``q(v) = N(m, diag(d^2))`` is mean-field Gaussian
        under the ``N(0, I)`` prior, so :class:`torchnmf.trainer.GaussianNatural` takes exact
        natural-gradient steps on it (the kernel and ``mean`` stay with a gradient optimizer).
        A full Cholesky factor is not mean-field: ``NotImplementedError``.
        """
        if not self.diagonal_only:
            raise NotImplementedError("SVGP natural steps need diagonal_only=True (a mean-field q(v)); the full "
                                      "Cholesky factor is trained by gradient steps")
        return [{"params": [self.q_loc, self.q_diag_raw], "scale": self.cholesky_mode}]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_inducing={self.num_inducing}, diagonal_only={self.diagonal_only}"


# -- LCGP -------------------------------------------------------------------------------------
class LCGP(_SpatialPrior):
    r"""Locally conditioned GP prior: every sample inducing, Vecchia-conditioned KL.

    ``q(F_k) = N(mu_k + m_k, V_k V_k^T + diag(s_k^2))`` over the ``N`` training samples,
    and the prior density is approximated by

    .. math:: p(f_k) \approx \prod_i N\big(f_{ki} \mid \mu_k + b_{ki}^\top (f_{k,nb(i)} - \mu_k),\; D_{ki}\big),

    with ``nb(i)`` the ``n_neighbors`` nearest points preceding ``i`` in a random ordering,
    ``b = (K_nn + jitter I)^{-1} k_n``, ``D = k_ii + jitter - k_n^T b``. This is the exact
    density ``N(mu, (B^T D^{-1} B)^{-1})`` (``B`` unit lower triangular in the ordering), and
    equals ``N(mu, K_ff + jitter I)`` when every predecessor is a neighbour. The KL is

    .. math:: \sum_i \tfrac12\Big[\frac{E_q (r_i^2)}{D_i} + \log D_i - 1\Big] - \tfrac12 \log\det S,
              \qquad r_i = f_i - \mu - b_i^\top (f_{nb(i)} - \mu),

    a sum over points except ``log det S = sum log s^2 + log det(I + V^T diag(s^-2) V)``.
    New locations are predicted from their ``n_neighbors`` nearest training samples.

    Parameters
    ----------
    coordinates : array-like, shape (N, D)
    n_components : int
    n_neighbors : int, default 8
        ``K`` of the issue: neighbours each point is conditioned on.
    rank : int, default 4
        Columns of ``V``; ignored with ``diagonal_only``.
    groups, multigroup, lengthscale, sigma, group_diff_param, jitter :
        As in :class:`SVGP`.
    cholesky_mode : {'exp', 'softplus'}, default 'exp'
        Positive transform of ``s``.
    diagonal_only : bool, default False
        ``V = 0``: independent posterior marginals.
    precompute_knn : bool, default True
        Find every point's predecessor neighbours once here (scikit-learn); otherwise find
        them for each batch with a brute-force search on the coordinates' device.
    init_scale : float, default 0.1
        Initial ``s``.
    random_state : int, optional
        Seed of the ordering and of the initial ``V`` (``N(0, (init_scale / 10)^2)``).
    dtype, device : optional

    Attributes
    ----------
    q_loc : Parameter, shape (K, N)
    q_diag_raw : Parameter, shape (K, N)
    q_factor : Parameter, shape (K, N, rank), absent with ``diagonal_only``
    order, position : LongTensor, shape (N,)
        The ordering and each sample's place in it.
    neighbors : LongTensor, shape (N, n_neighbors), and neighbor_mask : BoolTensor
        Precomputed predecessor neighbours (None without ``precompute_knn``).
    """

    def __init__(self, coordinates, n_components: int, n_neighbors: int = 8, rank: int = 4, groups=None,
                 multigroup: bool = False, lengthscale=1.0, sigma=1.0, group_diff_param=1.0,
                 jitter: float = 1e-5, cholesky_mode: str = "exp", diagonal_only: bool = False,
                 precompute_knn: bool = True, init_scale: float = 0.1, random_state=None, dtype=None,
                 device=None):
        super().__init__(coordinates, n_components, groups, multigroup, lengthscale, sigma, group_diff_param,
                         jitter, cholesky_mode, diagonal_only, dtype, device)
        self.n_neighbors = check_rank(n_neighbors, "K")
        self.rank = 0 if self.diagonal_only else check_rank(rank, "rank")
        self.precompute_knn = bool(precompute_knn)
        init_scale = check_positive(init_scale, "init_scale")
        C = self.coordinates
        gen = torch.Generator().manual_seed(int(random_state) if random_state is not None
                                            else int(torch.randint(2**31 - 1, ()).item()))
        order = torch.randperm(self.n_samples, generator=gen).to(C.device)
        position = torch.empty_like(order)
        position[order] = torch.arange(self.n_samples, device=C.device)
        self.register_buffer("order", order)
        self.register_buffer("position", position)
        if self.precompute_knn:
            nb, valid = nearest_neighbors(C, C, self.n_neighbors, position, position, backend="sklearn")
            self.register_buffer("neighbors", nb)
            self.register_buffer("neighbor_mask", valid)
        else:
            self.register_buffer("neighbors", None)
            self.register_buffer("neighbor_mask", None)
        K, N = self.n_components, self.n_samples
        self.q_loc = nn.Parameter(torch.zeros(K, N, dtype=C.dtype, device=C.device))
        self.q_diag_raw = nn.Parameter(self._diag_inverse(torch.full((K, N), init_scale, dtype=C.dtype,
                                                                     device=C.device)))
        if not self.diagonal_only:
            # random, not zero: at V = 0 every gradient with respect to V vanishes
            V = torch.randn(K, N, self.rank, generator=gen, dtype=C.dtype) * (init_scale / 10)
            self.q_factor = nn.Parameter(V.to(C.device))

    @property
    def q_scale(self) -> Tensor:
        """``s``, the diagonal standard deviations, shape ``(K, N)``."""
        return self._diag_transform(self.q_diag_raw)

    def _neighbors_of(self, idx: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if self.precompute_knn:
            if idx is None:
                return self.neighbors, self.neighbor_mask
            return self.neighbors[idx], self.neighbor_mask[idx]
        C = self.coordinates
        q = C if idx is None else C[idx]
        qp = self.position if idx is None else self.position[idx]
        return nearest_neighbors(q, C, self.n_neighbors, qp, self.position, backend="torch")

    def conditional(self, x: Tensor, g: Optional[Tensor], nb: Tensor, valid: Tensor) -> Tuple[Tensor, Tensor]:
        """Regression weights and conditional variances of ``f(x)`` given ``f`` at neighbours.

        Parameters
        ----------
        x : Tensor, shape (B, D)
        g : LongTensor, shape (B,), or None
        nb : LongTensor, shape (B, n) and valid : BoolTensor, shape (B, n)
            Training neighbours of each point; invalid slots get weight 0.

        Returns
        -------
        b : Tensor, shape (K, B, n)
        D : Tensor, shape (K, B)
            ``k(x, x) + jitter - k_n^T (K_nn + jitter I)^{-1} k_n`` (at least ``jitter``).
        """
        xn = self.coordinates[nb]  # (B, n, D)
        gn = self.groups[nb] if self.multigroup else None
        vm = valid.to(x.dtype)
        Knn = self.covariance(xn, gn, xn, gn) * (vm[:, :, None] * vm[:, None, :])  # (K, B, n, n)
        # invalid slots become independent unit variables with zero covariance to x: weight 0
        Knn = Knn + torch.diag_embed(self.jitter * vm + (1.0 - vm))
        kxn = self.covariance(x[:, None, :], g[:, None] if g is not None else None, xn, gn)[:, :, 0, :] * vm
        L = _cholesky(Knn, "neighbourhood")
        c = torch.linalg.solve_triangular(L, kxn.unsqueeze(-1), upper=False)
        b = torch.linalg.solve_triangular(L.transpose(-1, -2), c, upper=True).squeeze(-1)
        D = self._var(x) + self.jitter - c.squeeze(-1).square().sum(-1)
        return b, D.clamp_min(self.jitter)

    def _neighbour_moments(self, b: Tensor, nb: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """``b^T m_nb``, ``sum b^2 s_nb^2`` and ``b^T V_nb`` for weights ``b`` (K, B, n)."""
        m_nb = self.q_loc[:, nb]  # (K, B, n)
        s2_nb = self.q_scale[:, nb].square()
        bm = (b * m_nb).sum(-1)
        bs = (b.square() * s2_nb).sum(-1)
        bV = None if self.diagonal_only else torch.einsum("kbn,kbnr->kbr", b, self.q_factor[:, nb])
        return bm, bs, bV

    def marginals(self, idx: Optional[Tensor] = None, coordinates=None, groups=None,
                  **covariates) -> Tuple[Tensor, Tensor]:
        """Mean and variance of ``q(F)`` at training samples ``idx`` or at new ``coordinates``.

        At training samples they are read off ``q(u)``; at new coordinates they follow the
        local predictive ``f* | u_nb ~ N(mu + b^T (u_nb - mu), D*)`` from the
        ``n_neighbors`` nearest training samples.

        Returns
        -------
        mean, var : Tensor, each (K, B)
        """
        idx, x, g = self._batch(idx, coordinates, groups)
        if coordinates is None:
            m = self.q_loc if idx is None else self.q_loc[:, idx]
            s = self.q_scale if idx is None else self.q_scale[:, idx]
            var = s.square()
            if not self.diagonal_only:
                V = self.q_factor if idx is None else self.q_factor[:, idx]
                var = var + V.square().sum(-1)
            return self.mean[:, None] + m, var
        backend = "sklearn" if self.precompute_knn else "torch"
        nb, valid = nearest_neighbors(x, self.coordinates, self.n_neighbors, backend=backend)
        b, D = self.conditional(x, g, nb, valid)
        bm, bs, bV = self._neighbour_moments(b, nb)
        var = D + bs + (bV.square().sum(-1) if bV is not None else 0.0)
        return self.mean[:, None] + bm, var

    def kl(self, idx: Optional[Tensor] = None, **covariates) -> Tensor:
        """KL between ``q`` and the Vecchia prior, shape ().

        With ``idx`` the per-point terms of the batch are scaled by ``N / B`` (an unbiased
        estimate of the full KL) and the global ``log det(I + V^T diag(s^-2) V)`` is added
        whole.
        """
        idx, x, g = self._batch(idx, None, None)
        nb, valid = self._neighbors_of(idx)
        b, D = self.conditional(x, g, nb, valid)
        bm, bs, bV = self._neighbour_moments(b, nb)
        m = self.q_loc if idx is None else self.q_loc[:, idx]
        s2 = (self.q_scale if idx is None else self.q_scale[:, idx]).square()
        resid_var = s2 + bs
        if bV is not None:
            V = self.q_factor if idx is None else self.q_factor[:, idx]
            resid_var = resid_var + (V - bV).square().sum(-1)
        per_point = 0.5 * (((m - bm).square() + resid_var) / D + torch.log(D) - 1.0 - torch.log(s2))
        total = per_point.sum() * (self.n_samples / x.shape[0])
        if not self.diagonal_only:
            W = self.q_factor / self.q_scale[:, :, None]
            inner = torch.eye(self.rank, dtype=W.dtype, device=W.device) + W.transpose(-1, -2) @ W
            total = total - torch.log(torch.diagonal(_cholesky(inner, "posterior"), 0, -2, -1)).sum()
        return total

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", n_neighbors={self.n_neighbors}, rank={self.rank}, "
                f"precompute_knn={self.precompute_knn}")
