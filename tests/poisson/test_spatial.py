"""GP factor priors: kernels, KLs and predictive equations against dense references."""
import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from torchnmf.poisson.kernels import Matern32, MultiGroupKernel
from torchnmf.poisson.lognormal import FactorPosterior
from torchnmf.poisson.spatial import (
    LCGP, SVGP, allocate_inducing, nearest_neighbors, place_inducing,
)

DT = torch.float64


@pytest.fixture(autouse=True)
def _seed_one_thread():
    torch.manual_seed(0)
    np.random.seed(0)
    # tiny problems: thread start-up costs more than it saves, and CI machines are shared
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _matern_np(X1, X2, ls, s):
    r = np.sqrt(((X1[:, None, :] - X2[None, :, :]) ** 2).sum(-1))
    a = np.sqrt(3.0) * r / ls
    return s ** 2 * (1 + a) * np.exp(-a)


def _kernel_np(prior, k, X1, X2, g1=None, g2=None):
    """Dense reference kernel of component ``k`` from the prior's current parameters."""
    kern = prior.kernel.base if prior.multigroup else prior.kernel
    K = _matern_np(X1, X2, float(kern.lengthscale[k].detach()), float(kern.sigma[k].detach()))
    if prior.multigroup:
        rho = 1.0 / (1.0 + float(prior.kernel.group_diff_param[k].detach()))
        K = K * np.where(g1[:, None] == g2[None, :], 1.0, rho)
    return K


def _randomize(module, scale=0.3):
    """Move every parameter away from its initial value (so tests see non-trivial posteriors)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(scale * torch.randn_like(p))


# -- kernels ----------------------------------------------------------------------------------
def test_matern_matches_formula_and_is_psd():
    X = torch.rand(30, 2, dtype=DT)
    k = Matern32(3, lengthscale=[0.2, 0.5, 1.0], sigma=[1.0, 2.0, 0.5]).double()
    K = k(X)
    assert K.shape == (3, 30, 30)
    np.testing.assert_allclose(k.lengthscale.detach().numpy(), [0.2, 0.5, 1.0], rtol=1e-6)
    for c in range(3):
        ls, s = float(k.lengthscale[c].detach()), float(k.sigma[c].detach())
        np.testing.assert_allclose(K[c].detach().numpy(), _matern_np(X.numpy(), X.numpy(), ls, s), rtol=1e-10)
        assert torch.linalg.eigvalsh(K[c]).min() > -1e-10
    np.testing.assert_allclose(k(X, diag=True).detach().numpy(), torch.diagonal(K, 0, -2, -1).detach().numpy())


def test_multigroup_kernel_attenuates_and_stays_psd():
    X = torch.rand(25, 2, dtype=DT)
    g = torch.randint(0, 3, (25,))
    base = Matern32(2, lengthscale=0.4).double()
    mg = MultiGroupKernel(base, group_diff_param=[0.5, 4.0]).double()
    K = mg(X, g)
    B = base(X)
    same = (g[:, None] == g[None, :])
    for c in range(2):
        a = float(mg.group_diff_param[c].detach())
        expected = torch.where(same, B[c], B[c] / (1 + a))
        torch.testing.assert_close(K[c], expected)
        assert torch.linalg.eigvalsh(K[c]).min() > -1e-10
    # a -> 0 shares one field across groups
    mg0 = MultiGroupKernel(base, group_diff_param=1e-12).double()
    torch.testing.assert_close(mg0(X, g), B)


def test_kernel_gradients_finite_differences():
    X = torch.rand(6, 2, dtype=DT)
    g = torch.tensor([0, 0, 1, 1, 2, 2])
    mg = MultiGroupKernel(Matern32(2).double(), 0.7).double()
    raws = [p for p in mg.parameters()]

    def f(*ps):
        with torch.no_grad():
            for p, v in zip(raws, ps):
                p.copy_(v)
        return mg(X, g).sum()

    for p in raws:
        p.requires_grad_(True)
    out = mg(X, g).sum()
    grads = torch.autograd.grad(out, raws)
    eps = 1e-6
    for p, gr in zip(raws, grads):
        for i in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[i] += eps
                up = float(mg(X, g).sum())
                p.view(-1)[i] -= 2 * eps
                down = float(mg(X, g).sum())
                p.view(-1)[i] += eps
            assert abs((up - down) / (2 * eps) - float(gr.view(-1)[i])) < 1e-6


def test_bad_kernel_parameters():
    with pytest.raises(ValueError, match="lengthscale"):
        Matern32(2, lengthscale=-1.0)
    with pytest.raises(ValueError, match="sigma"):
        Matern32(2, sigma=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="group_diff_param"):
        MultiGroupKernel(Matern32(2), group_diff_param=0.0)


# -- SVGP -------------------------------------------------------------------------------------
def _svgp(diagonal_only=False, cholesky_mode="exp", multigroup=False, n=40, M=9, K=2):
    X = torch.rand(n, 2, dtype=DT)
    g = torch.randint(0, 2, (n,)) if multigroup else None
    prior = SVGP(X, K, num_inducing=M, groups=g, multigroup=multigroup, lengthscale=0.4, sigma=1.2,
                 diagonal_only=diagonal_only, cholesky_mode=cholesky_mode, random_state=0, dtype=DT)
    _randomize(prior)
    return prior, X, g


@pytest.mark.parametrize("diagonal_only", [False, True])
@pytest.mark.parametrize("cholesky_mode", ["exp", "softplus"])
def test_svgp_kl_matches_dense_mvn(diagonal_only, cholesky_mode):
    prior, X, _ = _svgp(diagonal_only, cholesky_mode)
    kl = prior.kl()
    R = prior.q_scale_tril.detach()
    m = prior.q_loc.detach()
    M = prior.num_inducing
    # whitened form through torch.distributions
    white = kl_divergence(MultivariateNormal(m, scale_tril=R),
                          MultivariateNormal(torch.zeros_like(m), scale_tril=torch.eye(M, dtype=DT).expand_as(R)))
    torch.testing.assert_close(kl.detach(), white.sum())
    # and in the original space: q(u) = N(mu + L m, L S L^T) against p(u) = N(mu, Kuu + jitter I)
    L = prior.prior_cholesky().detach()
    mu = prior.mean.detach()[:, None]
    qu = MultivariateNormal(mu + (L @ m[..., None])[..., 0], scale_tril=L @ R)
    pu = MultivariateNormal(mu.expand_as(m), scale_tril=L)
    torch.testing.assert_close(kl.detach(), kl_divergence(qu, pu).sum())
    # the KL is global: the same for any batch
    torch.testing.assert_close(prior.kl(torch.arange(3)), kl)


def _svgp_dense_predictive(prior, Xs, gs=None):
    """Dense numpy q(f*) = int p(f* | u) q(u) du with u = mu + L v."""
    Z = prior.inducing_points.numpy()
    Zg = prior.inducing_groups.numpy() if prior.inducing_groups is not None else None
    means, variances = [], []
    for k in range(prior.n_components):
        Kuu = _kernel_np(prior, k, Z, Z, Zg, Zg) + prior.jitter * np.eye(len(Z))
        Ksu = _kernel_np(prior, k, Xs, Z, gs, Zg)
        kss = np.diag(_kernel_np(prior, k, Xs, Xs, gs, gs))
        L = np.linalg.cholesky(Kuu)
        R = prior.q_scale_tril[k].detach().numpy()
        m = prior.q_loc[k].detach().numpy()
        Su = L @ R @ R.T @ L.T
        P = Ksu @ np.linalg.inv(Kuu)
        means.append(float(prior.mean[k].detach()) + P @ (L @ m))
        variances.append(kss - np.einsum("ij,ij->i", P, Ksu) + np.einsum("ij,jk,ik->i", P, Su, P))
    return np.array(means), np.array(variances)


@pytest.mark.parametrize("multigroup", [False, True])
@pytest.mark.parametrize("diagonal_only", [False, True])
def test_svgp_predictive_matches_dense_gp(multigroup, diagonal_only):
    prior, X, g = _svgp(diagonal_only=diagonal_only, multigroup=multigroup)
    Xs = torch.rand(7, 2, dtype=DT)
    gs = torch.randint(0, 2, (7,)) if multigroup else None
    mean, var = prior.marginals(coordinates=Xs, groups=gs)
    m_ref, v_ref = _svgp_dense_predictive(prior, Xs.numpy(), gs.numpy() if multigroup else None)
    np.testing.assert_allclose(mean.detach().numpy(), m_ref, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(var.detach().numpy(), v_ref, rtol=1e-6, atol=1e-9)
    # training samples by index give the same as their coordinates
    idx = torch.tensor([3, 0, 11])
    mi, vi = prior.marginals(idx)
    mc, vc = prior.marginals(coordinates=X[idx], groups=g[idx] if multigroup else None)
    torch.testing.assert_close(mi, mc)
    torch.testing.assert_close(vi, vc)
    draws = prior.rsample(idx, n_samples=3)
    assert draws.shape == (3, prior.n_components, 3)


def test_svgp_chunked_marginals_without_grad(monkeypatch):
    prior, _, _ = _svgp(multigroup=True)
    mean, var = prior.marginals()
    monkeypatch.setattr(SVGP, "_chunk", 7)
    with torch.no_grad():
        m2, v2 = prior.marginals()
    torch.testing.assert_close(m2, mean.detach())
    torch.testing.assert_close(v2, var.detach())


def test_svgp_rsample_moments():
    prior, _, _ = _svgp()
    idx = torch.arange(4)
    mean, var = prior.marginals(idx)
    draws = prior.rsample(idx, n_samples=20000).detach()
    atol = 0.05 * float(var.detach().max().sqrt()) + 1e-3
    torch.testing.assert_close(draws.mean(0), mean.detach(), atol=atol, rtol=0)
    torch.testing.assert_close(draws.var(0), var.detach(), rtol=0.05, atol=1e-4)


def _check_gradients(prior, objective, n_checks=5):
    """Autograd against central finite differences on a few entries of every parameter."""
    params = list(prior.parameters())
    grads = torch.autograd.grad(objective(), params, allow_unused=True)
    eps = 1e-6
    for p, gr in zip(params, grads):
        gr = torch.zeros_like(p) if gr is None else gr
        flat = p.data.view(-1)
        for i in range(0, flat.numel(), max(1, flat.numel() // n_checks)):
            old = float(flat[i])
            with torch.no_grad():
                flat[i] = old + eps
                up = float(objective())
                flat[i] = old - eps
                dn = float(objective())
                flat[i] = old
            fd = (up - dn) / (2 * eps)
            assert abs(fd - float(gr.view(-1)[i])) < 1e-5 * max(1.0, abs(fd)), (p.shape, i)


@pytest.mark.parametrize("multigroup", [False, True])
def test_svgp_gradients_match_finite_differences(multigroup):
    prior, _, _ = _svgp(multigroup=multigroup, n=12, M=4)
    idx = torch.arange(5)

    def objective():
        mean, var = prior.marginals(idx)
        return mean.sum() + var.sum() + prior.kl()

    _check_gradients(prior, objective)


def test_inducing_allocation():
    counts = np.array([100, 10, 1])
    for allocation in ("proportional", "equal", "derived"):
        share = allocate_inducing(20, counts, extents=[1.0, 4.0, 0.5], allocation=allocation)
        assert share.sum() == 20 and (share >= 1).all() and (share <= counts).all()
    np.testing.assert_array_equal(allocate_inducing(30, [50, 50, 50], allocation="equal"), [10, 10, 10])
    np.testing.assert_array_equal(allocate_inducing(10, [70, 30], allocation="proportional"), [7, 3])
    # derived: the group covering four times the area gets four times the points
    np.testing.assert_array_equal(allocate_inducing(10, [100, 100], [4.0, 1.0], "derived"), [8, 2])
    # capped by the group sizes, and never more points than samples
    assert allocate_inducing(100, [3, 5]).tolist() == [3, 5]
    with pytest.raises(ValueError, match="num_inducing"):
        allocate_inducing(1, [5, 5])
    with pytest.raises(ValueError, match="inducing_allocation"):
        allocate_inducing(4, [5, 5], allocation="bogus")


def test_place_inducing_per_group():
    X = torch.cat([torch.rand(60, 2, dtype=DT), torch.rand(20, 2, dtype=DT) + 5])
    g = torch.cat([torch.zeros(60, dtype=torch.long), torch.ones(20, dtype=torch.long)])
    Z, Zg = place_inducing(X, 8, g, "proportional", random_state=0)
    assert Z.shape == (8, 2) and Zg.tolist().count(0) == 6 and Zg.tolist().count(1) == 2
    assert bool((Z[Zg == 1] > 4).all()) and bool((Z[Zg == 0] < 1.01).all())
    Z, Zg = place_inducing(X[:5], 50)
    assert Z.shape == (5, 2) and Zg is None  # capped at the distinct points


def test_svgp_fixed_inducing_points():
    X = torch.rand(30, 2, dtype=DT)
    Z = torch.rand(6, 2, dtype=DT)
    prior = SVGP(X, 2, inducing_points=Z, dtype=DT)
    assert prior.num_inducing == 6 and torch.equal(prior.inducing_points, Z)
    g = torch.arange(30) % 2
    mg = SVGP(X, 2, groups=g, multigroup=True, inducing_points=Z, inducing_groups=torch.arange(6) % 2, dtype=DT)
    assert mg.inducing_groups.tolist() == [0, 1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="inducing_groups are required"):
        SVGP(X, 2, groups=g, multigroup=True, inducing_points=Z)
    with pytest.raises(ValueError, match="inducing_points has 3 columns"):
        SVGP(X, 2, inducing_points=torch.rand(4, 3))


# -- LCGP -------------------------------------------------------------------------------------
def _lcgp(n_neighbors, diagonal_only=False, multigroup=False, n=25, K=2, precompute_knn=True, rank=3):
    X = torch.rand(n, 2, dtype=DT)
    g = torch.randint(0, 2, (n,)) if multigroup else None
    prior = LCGP(X, K, n_neighbors=n_neighbors, rank=rank, groups=g, multigroup=multigroup, lengthscale=0.3,
                 sigma=0.8, jitter=1e-4, diagonal_only=diagonal_only, precompute_knn=precompute_knn,
                 random_state=1, dtype=DT)
    _randomize(prior, 0.2)
    return prior, X, g


def _lcgp_q(prior, k):
    m = (prior.mean[k] + prior.q_loc[k]).detach()
    S = torch.diag(prior.q_scale[k].detach() ** 2)
    if not prior.diagonal_only:
        V = prior.q_factor[k].detach()
        S = S + V @ V.T
    return m, S


@pytest.mark.parametrize("multigroup", [False, True])
@pytest.mark.parametrize("diagonal_only", [False, True])
def test_lcgp_kl_with_all_predecessors_is_exact(multigroup, diagonal_only):
    n = 20
    prior, X, g = _lcgp(n - 1, diagonal_only, multigroup, n=n)
    Xn, gn = X.numpy(), (g.numpy() if multigroup else None)
    total = 0.0
    for k in range(prior.n_components):
        m, S = _lcgp_q(prior, k)
        Kff = torch.as_tensor(_kernel_np(prior, k, Xn, Xn, gn, gn)) + prior.jitter * torch.eye(n, dtype=DT)
        p = MultivariateNormal(prior.mean[k].detach().expand(n), covariance_matrix=Kff)
        total += float(kl_divergence(MultivariateNormal(m, covariance_matrix=S), p))
    np.testing.assert_allclose(prior.kl().item(), total, rtol=1e-8)


def _vecchia_precision(prior, k):
    """Dense precision B^T D^-1 B of the Vecchia prior, built point by point in numpy."""
    X = prior.coordinates.numpy()
    g = prior.groups.numpy() if prior.multigroup else None
    n = len(X)
    pos = prior.position.numpy()
    B = np.eye(n)
    Dinv = np.zeros(n)
    for i in range(n):
        pred = np.where(pos < pos[i])[0]
        d = np.sqrt(((X[pred] - X[i]) ** 2).sum(-1))
        nb = pred[np.argsort(d, kind="stable")[: prior.n_neighbors]]
        gi = g[[i]] if g is not None else None
        gnb = g[nb] if g is not None else None
        kii = _kernel_np(prior, k, X[[i]], X[[i]], gi, gi)[0, 0] + prior.jitter
        if len(nb):
            Knn = _kernel_np(prior, k, X[nb], X[nb], gnb, gnb) + prior.jitter * np.eye(len(nb))
            kin = _kernel_np(prior, k, X[nb], X[[i]], gnb, gi)[:, 0]
            b = np.linalg.solve(Knn, kin)
            B[i, nb] = -b
            kii = kii - kin @ b
        Dinv[i] = 1.0 / kii
    return B.T @ np.diag(Dinv) @ B


@pytest.mark.parametrize("multigroup", [False, True])
def test_lcgp_kl_matches_dense_vecchia(multigroup):
    prior, _, _ = _lcgp(3, multigroup=multigroup, n=30)
    total = 0.0
    for k in range(prior.n_components):
        m, S = _lcgp_q(prior, k)
        P = torch.as_tensor(_vecchia_precision(prior, k))
        p = MultivariateNormal(prior.mean[k].detach().expand(len(m)), precision_matrix=P)
        total += float(kl_divergence(MultivariateNormal(m, covariance_matrix=S), p))
    np.testing.assert_allclose(prior.kl().item(), total, rtol=1e-8)


def test_lcgp_batch_kl_is_unbiased_and_knn_backends_agree():
    prior, X, _ = _lcgp(4, n=40)
    full = prior.kl()
    perm = torch.randperm(40)
    batches = perm.split(10)
    # each batch's estimate weighted by its share sums to the full KL over an epoch
    epoch = sum(prior.kl(b) * (len(b) / 40) for b in batches)
    torch.testing.assert_close(epoch, full)
    # neighbours found per batch on the fly give the same numbers
    lazy = LCGP(X, 2, n_neighbors=4, rank=3, lengthscale=0.3, sigma=0.8, jitter=1e-4, precompute_knn=False,
                random_state=1, dtype=DT)
    lazy.load_state_dict(prior.state_dict(), strict=False)
    assert lazy.neighbors is None
    torch.testing.assert_close(lazy.kl(), full)
    torch.testing.assert_close(lazy.kl(batches[0]), prior.kl(batches[0]))


def test_predecessor_knn_backends_agree():
    X = torch.rand(3000, 2, dtype=DT)  # more than one block of the sklearn path
    pos = torch.randperm(3000)
    a, va = nearest_neighbors(X, X, 6, pos, pos, backend="sklearn")
    b, vb = nearest_neighbors(X, X, 6, pos, pos, backend="torch")
    assert torch.equal(va, vb)
    assert torch.equal(a[va], b[vb])
    assert bool((pos[a][va] < pos[:, None].expand_as(a)[va]).all())
    assert int((~va).sum()) == sum(range(1, 7))  # the first six points lack predecessors
    q = torch.rand(50, 2, dtype=DT)
    a, _ = nearest_neighbors(q, X, 5, backend="sklearn")
    b, _ = nearest_neighbors(q, X, 5, backend="torch")
    assert torch.equal(a, b)


@pytest.mark.parametrize("multigroup", [False, True])
def test_lcgp_predictive_matches_dense_gp_with_all_neighbours(multigroup):
    n = 15
    prior, X, g = _lcgp(n, multigroup=multigroup, n=n)
    Xs = torch.rand(6, 2, dtype=DT)
    gs = torch.randint(0, 2, (6,)) if multigroup else None
    mean, var = prior.marginals(coordinates=Xs, groups=gs)
    Xn, Xsn = X.numpy(), Xs.numpy()
    gn, gsn = (g.numpy(), gs.numpy()) if multigroup else (None, None)
    for k in range(prior.n_components):
        m, S = (t.numpy() for t in _lcgp_q(prior, k))
        mu = float(prior.mean[k].detach())
        Kff = _kernel_np(prior, k, Xn, Xn, gn, gn) + prior.jitter * np.eye(n)
        Ksf = _kernel_np(prior, k, Xsn, Xn, gsn, gn)
        kss = np.diag(_kernel_np(prior, k, Xsn, Xsn, gsn, gsn)) + prior.jitter
        P = Ksf @ np.linalg.inv(Kff)
        np.testing.assert_allclose(mean[k].detach().numpy(), mu + P @ (m - mu), rtol=1e-7, atol=1e-9)
        v_ref = kss - np.einsum("ij,ij->i", P, Ksf) + np.einsum("ij,jk,ik->i", P, S, P)
        np.testing.assert_allclose(var[k].detach().numpy(), v_ref, rtol=1e-6, atol=1e-9)
    # at training samples the marginals are q(u)'s own
    m0, S0 = _lcgp_q(prior, 0)
    mi, vi = prior.marginals(torch.tensor([2, 5]))
    torch.testing.assert_close(mi[0].detach(), m0[[2, 5]])
    torch.testing.assert_close(vi[0].detach(), torch.diagonal(S0)[[2, 5]])


@pytest.mark.parametrize("multigroup", [False, True])
def test_lcgp_gradients_match_finite_differences(multigroup):
    prior, _, _ = _lcgp(3, n=12, K=1, rank=2, multigroup=multigroup)
    idx = torch.tensor([1, 4, 7, 9])

    def objective():
        mean, var = prior.marginals(idx)
        return prior.kl(idx) + mean.sum() + var.sum()

    _check_gradients(prior, objective)


# -- interface and bad input ------------------------------------------------------------------
@pytest.mark.parametrize("cls", [SVGP, LCGP])
def test_interface_and_input_untouched(cls):
    X = torch.rand(30, 2, dtype=DT)
    X_copy = X.clone()
    g = torch.randint(0, 2, (30,))
    g_copy = g.clone()
    prior = cls(X, 2, groups=g, multigroup=True, dtype=DT)
    assert isinstance(prior, FactorPosterior)
    prior.marginals(coordinates=X[:3] + 0.01, groups=g[:3])
    prior.kl().backward()
    assert torch.equal(X, X_copy) and torch.equal(g, g_copy)
    assert prior.coordinates.data_ptr() != X.data_ptr()
    mean, var = prior.marginals()
    assert mean.shape == var.shape == (2, 30) and bool((var > 0).all())
    # float32 and module.to work
    p32 = cls(X.float(), 2, dtype=torch.float32)
    m, v = p32.marginals(torch.arange(4))
    assert m.dtype == torch.float32 and torch.isfinite(p32.kl())
    p64 = p32.double()
    assert p64.marginals(torch.arange(4))[0].dtype == DT


@pytest.mark.parametrize("cls", [SVGP, LCGP])
def test_bad_input_names_the_argument(cls):
    X = torch.rand(20, 2, dtype=DT)
    with pytest.raises(ValueError, match="coordinates"):
        cls(None, 2)
    with pytest.raises(ValueError, match="coordinates"):
        cls(torch.rand(20), 2)
    bad = X.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="coordinates contains NaN"):
        cls(bad, 2)
    with pytest.raises(ValueError, match="multigroup"):
        cls(X, 2, groups=torch.zeros(20, dtype=torch.long))
    with pytest.raises(ValueError, match="groups"):
        cls(X, 2, multigroup=True)
    with pytest.raises(ValueError, match="groups"):
        cls(X, 2, groups=torch.zeros(19, dtype=torch.long), multigroup=True)
    with pytest.raises(TypeError, match="groups"):
        cls(X, 2, groups=torch.rand(20), multigroup=True)
    with pytest.raises(TypeError, match="groups must hold integer labels"):
        cls(X, 2, groups=["a"] * 20, multigroup=True)
    with pytest.raises(ValueError, match="cholesky_mode"):
        cls(X, 2, cholesky_mode="relu")
    with pytest.raises(ValueError, match="jitter"):
        cls(X, 2, jitter=-1.0)
    prior = cls(X, 2, dtype=DT)
    with pytest.raises(ValueError, match="coordinates has 3 columns"):
        prior.marginals(coordinates=torch.rand(4, 3))
    with pytest.raises(ValueError, match="coordinates contains NaN"):
        prior.marginals(coordinates=torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="not both"):
        prior.marginals(torch.arange(2), coordinates=torch.rand(2, 2))
    with pytest.raises(ValueError, match="groups"):
        prior.marginals(coordinates=torch.rand(2, 2), groups=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="idx"):
        prior.marginals(torch.tensor([25]))
    mg = cls(X, 2, groups=torch.arange(20) % 2, multigroup=True, dtype=DT)
    with pytest.raises(ValueError, match="groups are required"):
        mg.marginals(coordinates=torch.rand(2, 2))
    with pytest.raises(ValueError, match="2 groups"):
        mg.marginals(coordinates=torch.rand(2, 2), groups=torch.tensor([0, 5]))
    if cls is SVGP:
        with pytest.raises(ValueError, match="inducing_allocation"):
            SVGP(X, 2, inducing_allocation="random")
        with pytest.raises(ValueError, match="num_inducing"):
            SVGP(X, 2, num_inducing=0)
    else:
        with pytest.raises(ValueError, match="K must"):
            LCGP(X, 2, n_neighbors=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [SVGP, LCGP])
def test_cuda_matches_cpu(cls):
    X = torch.rand(50, 2, dtype=DT)
    prior = cls(X, 2, dtype=DT, random_state=0)
    gpu = cls(X, 2, dtype=DT, random_state=0, device="cuda")
    gpu.load_state_dict(prior.state_dict())
    torch.testing.assert_close(gpu.kl().cpu(), prior.kl())
    Xs = torch.rand(5, 2, dtype=DT)
    torch.testing.assert_close(gpu.marginals(coordinates=Xs.cuda())[1].cpu(), prior.marginals(coordinates=Xs)[1])
