"""SpatialPNMF: recovery of smooth spatial factors, predictive transform, options and bad input."""
import itertools

import numpy as np
import pytest
import torch
from sklearn.base import clone

from torchnmf.estimators import PNMF, SpatialPNMF
from torchnmf.poisson import LCGP, SVGP

DT = torch.float64


def _grid(side=20):
    xy = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1)
    return xy.reshape(-1, 2).to(DT) / side


@pytest.fixture(scope="module")
def simulated():
    """Counts from two smooth log-factors on a 20 x 20 grid, split in two by binomial thinning."""
    g = torch.Generator().manual_seed(0)
    xy = _grid()
    F1 = 2 * torch.exp(-((xy - torch.tensor([0.3, 0.3], dtype=DT)) ** 2).sum(1) / 0.05) - 1
    F2 = 2 * torch.exp(-((xy - torch.tensor([0.7, 0.6], dtype=DT)) ** 2).sum(1) / 0.08) - 1
    F = torch.stack([F1, F2])  # (K, N)
    D = 40
    W = torch.full((D, 2), 0.05, dtype=DT)
    W[:20, 0] += torch.rand(20, generator=g, dtype=DT) + 0.5
    W[20:, 1] += torch.rand(20, generator=g, dtype=DT) + 0.5
    X = torch.poisson(W @ F.exp(), generator=g)
    # count splitting: both halves are Poisson with half the rate, independent given the rate
    train = torch.binomial(X, torch.full_like(X, 0.5), generator=g)
    test = X - train
    return dict(xy=xy.numpy(), F=F.numpy(), train=train.T.numpy(), test=test.T.numpy())


def _heldout_loglik(model, log_factors, test):
    rate = model.layer_.W.detach() @ torch.exp(torch.as_tensor(log_factors).T)
    return float(torch.distributions.Poisson(rate).log_prob(torch.as_tensor(test).T).sum())


def _best_correlations(F_fit, F_true):
    K = F_true.shape[0]
    C = np.corrcoef(np.concatenate([F_fit.T, F_true]))[:K, K:]
    return max((np.array([C[i, p[i]] for i in range(K)]) for p in itertools.permutations(range(K))),
               key=lambda c: c.sum())


@pytest.fixture(scope="module")
def pnmf_baseline(simulated):
    torch.set_num_threads(1)
    model = PNMF(2, max_iter=150, tol=0, learning_rate=0.1, random_state=0, training_mode="standard",
                 loadings_mode="softplus").fit(simulated["train"])
    return _heldout_loglik(model, model.log_factors(), simulated["test"])


@pytest.mark.slow
@pytest.mark.parametrize("local", [False, True])
def test_recovers_smooth_factors_and_beats_nonspatial(simulated, pnmf_baseline, local):
    model = SpatialPNMF(2, max_iter=150, tol=0, learning_rate=0.1, random_state=0, local=local, num_inducing=100)
    model.fit(simulated["train"], coordinates=simulated["xy"])
    assert isinstance(model.layer_.factors, LCGP if local else SVGP)
    F_fit = model.log_factors()
    corr = _best_correlations(F_fit, simulated["F"])
    assert (corr > 0.9).all(), corr
    heldout = _heldout_loglik(model, F_fit, simulated["test"])
    assert heldout > pnmf_baseline + 50, (heldout, pnmf_baseline)
    assert np.isfinite(model.elbo_) and len(model.history_) == 150


@pytest.mark.slow
@pytest.mark.parametrize("loadings_mode", ["softplus", "multiplicative"])
def test_natural_training_recovers_smooth_factors(simulated, pnmf_baseline, loadings_mode):
    # natural steps for the whitened inducing values (diagonal SVGP: mean-field, exact steps),
    # Adam for the kernel and prior means, W by Adam or multiplicative updates
    model = SpatialPNMF(2, max_iter=150, tol=0, random_state=0, training_mode="natural", diagonal_only=True,
                        num_inducing=100, loadings_mode=loadings_mode)
    model.fit(simulated["train"], coordinates=simulated["xy"])
    F_fit = model.log_factors()
    corr = _best_correlations(F_fit, simulated["F"])
    assert (corr > 0.9).all(), corr
    assert _heldout_loglik(model, F_fit, simulated["test"]) > pnmf_baseline + 50
    h = model.history_.values
    assert np.isfinite(h).all() and h[-1] > h[0]


def test_natural_training_groups_of_spatial_priors(small):
    xy, X = small
    svgp = SVGP(xy, 2, num_inducing=10, diagonal_only=True, cholesky_mode="softplus")
    (group,) = svgp.natural_groups()
    assert group["params"][0] is svgp.q_loc and group["params"][1] is svgp.q_diag_raw
    assert group["scale"] == "softplus"
    with pytest.raises(NotImplementedError, match="diagonal_only=True"):
        SVGP(xy, 2, num_inducing=10).natural_groups()
    # not mean-field (full SVGP, LCGP): the GP's variational parameters take gradient steps
    for kw in (dict(), dict(local=True, K=4)):
        model = SpatialPNMF(2, training_mode="natural", num_inducing=10, max_iter=15, tol=0, random_state=0, **kw)
        model.fit(X, coordinates=xy)
        h = model.history_.values
        assert np.isfinite(h).all() and h[-1] > h[0], kw
        assert model.transform(X[:5], coordinates=xy[:5]).shape == (5, 2)


@pytest.fixture(scope="module")
def small():
    g = torch.Generator().manual_seed(1)
    xy = _grid(8).numpy()
    X = torch.poisson(torch.full((64, 12), 2.0, dtype=DT), generator=g).numpy()
    return xy, X


def test_predict_and_transform_use_the_gp(small):
    xy, X = small
    model = SpatialPNMF(2, max_iter=5, num_inducing=16, random_state=0, transform_max_iter=5).fit(X, coordinates=xy)
    mean, std = model.predict_factors(xy[:7])
    torch.testing.assert_close(torch.as_tensor(mean), torch.as_tensor(model.log_factors()[:7]))
    torch.testing.assert_close(torch.as_tensor(std), torch.as_tensor(model.factor_uncertainty()[:7]))
    new = xy[:5] + 0.01
    Y = model.transform(X[:5], coordinates=new)
    assert Y.shape == (5, 2) and np.isfinite(Y).all() and (Y > 0).all()
    mu, sd = model.transform_F(X[:5], coordinates=new)
    assert mu.shape == sd.shape == (5, 2)
    # tensor coordinates give tensors
    m_t, _ = model.predict_factors(torch.as_tensor(new))
    assert isinstance(m_t, torch.Tensor)
    # the counts move the new factors away from the pure predictive
    model.set_params(transform_max_iter=50)
    mu50, _ = model.transform_F(X[:5], coordinates=new)
    pred, _ = model.predict_factors(new)
    assert not np.allclose(mu50, pred)


@pytest.mark.parametrize("local", [False, True])
def test_multigroup_with_any_labels(small, local):
    xy, X = small
    labels = np.where(xy[:, 0] < 0.5, "left", "right")
    model = SpatialPNMF(2, max_iter=5, num_inducing=12, multigroup=True, local=local, random_state=0,
                        inducing_allocation="equal", K=4, transform_max_iter=3)
    model.fit(X, coordinates=xy, groups=labels)
    assert list(model.groups_) == ["left", "right"]
    prior = model.layer_.factors
    assert prior.multigroup and prior.n_groups == 2
    if not local:
        assert prior.inducing_groups.bincount().tolist() == [6, 6]
    mean, _ = model.predict_factors(xy[:3], groups=labels[:3])
    assert mean.shape == (3, 2)
    assert model.transform(X[:3], coordinates=xy[:3], groups=labels[:3]).shape == (3, 2)
    with pytest.raises(ValueError, match="groups holds labels not seen"):
        model.predict_factors(xy[:2], groups=["left", "middle"])
    with pytest.raises(ValueError, match="groups are required"):
        model.transform(X[:2], coordinates=xy[:2])


@pytest.mark.parametrize("options", [
    dict(diagonal_only=True, cholesky_mode="softplus"),
    dict(local=True, precompute_knn=False, K=3),
    dict(local=True, diagonal_only=True),
    dict(mode="expanded", batch_size=20, lengthscale=0.3, sigma=0.5, jitter=1e-4),
])
def test_options_fit_and_stay_finite(small, options):
    xy, X = small
    model = SpatialPNMF(2, max_iter=4, num_inducing=10, random_state=0, **options).fit(X, coordinates=xy)
    assert np.isfinite(model.elbo_)
    assert np.isfinite(model.log_factors()).all()
    if "lengthscale" in options:
        assert model.layer_.factors.kernel.lengthscale.shape == (2,)


def test_spatial_false_is_pnmf(small):
    xy, X = small
    a = SpatialPNMF(2, spatial=False, max_iter=5, random_state=0).fit(X)
    # the same settings (SpatialPNMF's defaults are Adam with softplus loadings, PNMF's are not)
    b = PNMF(2, max_iter=5, random_state=0, training_mode="standard", loadings_mode="softplus").fit(X)
    np.testing.assert_allclose(a.components_, b.components_)
    with pytest.raises(ValueError, match="spatial=False"):
        SpatialPNMF(2, spatial=False, max_iter=2).fit(X, coordinates=xy)


def test_params_clone_and_input_untouched(small):
    xy, X = small
    X0, xy0 = X.copy(), xy.copy()
    model = SpatialPNMF(3, local=True, K=5, num_inducing=7, group_diff_param=2.0)
    params = model.get_params()
    for name in ("spatial", "local", "multigroup", "num_inducing", "lengthscale", "sigma", "group_diff_param",
                 "jitter", "cholesky_mode", "diagonal_only", "inducing_allocation", "K", "precompute_knn"):
        assert name in params
    assert clone(model).get_params() == params
    model.set_params(max_iter=2).fit(X, coordinates=xy)
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(xy, xy0)
    Z = model.fit_transform(X, coordinates=xy)
    assert Z.shape == (64, 3)


def test_bad_input_names_the_argument(small):
    xy, X = small
    model = SpatialPNMF(2, max_iter=2, num_inducing=5)
    with pytest.raises(ValueError, match="coordinates are required"):
        model.fit(X)
    with pytest.raises(ValueError, match="coordinates has 10 rows"):
        model.fit(X, coordinates=xy[:10])
    with pytest.raises(ValueError, match="coordinates must have shape"):
        model.fit(X, coordinates=xy[:, 0])
    bad = xy.copy()
    bad[4, 0] = np.nan
    with pytest.raises(ValueError, match="coordinates contains NaN"):
        model.fit(X, coordinates=bad)
    with pytest.raises(ValueError, match="groups were given but multigroup=False"):
        model.fit(X, coordinates=xy, groups=np.zeros(64))
    with pytest.raises(ValueError, match="groups are required"):
        SpatialPNMF(2, multigroup=True).fit(X, coordinates=xy)
    with pytest.raises(ValueError, match="groups must have shape"):
        SpatialPNMF(2, multigroup=True).fit(X, coordinates=xy, groups=np.zeros(3))
    with pytest.raises(ValueError, match="training_mode"):
        SpatialPNMF(2, training_mode="ngd").fit(X, coordinates=xy)
    with pytest.raises(ValueError, match="multigroup=True needs spatial=True"):
        SpatialPNMF(2, spatial=False, multigroup=True).fit(X)
    with pytest.raises(ValueError, match="inducing_allocation"):
        SpatialPNMF(2, inducing_allocation="random").fit(X, coordinates=xy)
    with pytest.raises(ValueError, match="cholesky_mode"):
        SpatialPNMF(2, cholesky_mode="relu").fit(X, coordinates=xy)
    with pytest.raises(ValueError, match="K must"):
        SpatialPNMF(2, local=True, K=0).fit(X, coordinates=xy)
    with pytest.raises(ValueError, match="lengthscale"):
        SpatialPNMF(2, lengthscale=-1.0).fit(X, coordinates=xy)
    with pytest.raises(TypeError, match="spatial"):
        SpatialPNMF(2, spatial="yes").fit(X, coordinates=xy)
    model.fit(X, coordinates=xy)
    with pytest.raises(ValueError, match="coordinates are required"):
        model.transform(X[:3])
    with pytest.raises(ValueError, match="coordinates has 3 columns"):
        model.transform(X[:2], coordinates=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="coordinates has 5 rows"):
        model.transform(X[:2], coordinates=xy[:5])
    with pytest.raises(ValueError, match="coordinates contains NaN"):
        model.predict_factors(np.full((2, 2), np.nan))


@pytest.mark.parametrize("kind", ["requires_grad", "parameter"])
def test_an_input_that_requires_grad_is_data(kind):
    # issue 22 item 6: "backward through the graph a second time" before the input was detached
    g = torch.Generator().manual_seed(0)
    X = torch.poisson(torch.full((25, 6), 3.0, dtype=DT), generator=g)
    xy = _grid(5)
    x = torch.nn.Parameter(X.clone()) if kind == "parameter" else X.clone().requires_grad_(True)
    c = torch.nn.Parameter(xy.clone())
    ref = SpatialPNMF(2, max_iter=3, tol=0, random_state=0).fit(X, coordinates=xy)
    m = SpatialPNMF(2, max_iter=3, tol=0, random_state=0).fit(x, coordinates=c)
    torch.testing.assert_close(m.transform(x, coordinates=c), ref.transform(X, coordinates=xy))
    assert x.grad is None and c.grad is None and torch.equal(x.detach(), X) and torch.equal(c.detach(), xy)
