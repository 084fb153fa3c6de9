"""PNMF's API (../shared/seeds/PNMF-api-reference.txt) on torchnmf.compat.pnmf.

The signatures are read from the seed document (an embedded copy of its signature lines is
used where the document is not beside the checkout) and compared keyword by keyword; the
document's examples run with sizes/epochs reduced.
"""
import ast
import inspect
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from torchnmf.compat import pnmf as compat
from torchnmf.compat.pnmf import (PNMF, GaussianPrior, factor_samples, factor_uncertainty, factors_from_prior,
                                  get_factors, get_loadings, get_prior, initialize_factors, log_factors,
                                  log_factors_from_prior, transform_F, transform_W, uncertainty_from_prior)

SEED = Path(__file__).resolve().parents[1].parent / "shared" / "seeds" / "PNMF-api-reference.txt"
EMBEDDED = """\
PNMF.initialization.initialize_factors(X, n_components, init=None, random_state=None, scale_log_mu=True, target_std=1.0)
PNMF.transforms.factor_samples(model, n_samples=100, return_exp=False, coordinates=None, groups=None, return_tensor=False)
PNMF.transforms.factor_uncertainty(model, return_variance=False, coordinates=None, groups=None, return_tensor=False)
PNMF.transforms.factors_from_prior(prior, use_mgf=True, return_tensor=False)
PNMF.transforms.get_loadings(model, return_tensor=False)
PNMF.transforms.get_prior(model)
PNMF.transforms.log_factors(model, coordinates=None, groups=None, return_tensor=False)
PNMF.transforms.log_factors_from_prior(prior, return_tensor=False)
PNMF.transforms.transform_F(X, W, n_components=None, mode='expanded', E=3, max_iter=200, tol=0.0001, learning_rate=0.01, verbose=False, device='auto', return_prior=False)
PNMF.transforms.transform_W(X, F, W_init=None, n_components=None, max_iter=100, tol=0.0001, verbose=False, device='auto')
PNMF.transforms.uncertainty_from_prior(prior, return_variance=False, return_tensor=False)
class PNMF.PNMF(n_components=10, loadings_mode='projected', mode='expanded', training_mode='standard', E=3, max_iter=200, tol=0.0001, learning_rate=0.01, optimizer='Adam', random_state=None, verbose=False, device='auto', init='random', scheduler='one_cycle', scheduler_patience=200, scheduler_factor=0.8, scheduler_pct_start=0.3, scheduler_div_factor=25.0, scheduler_final_div_factor=10000.0, min_lr=1e-05, batch_size=None, y_batch_size=None, shuffle=True, spatial=False, local=False, kernel='Matern32', multigroup=False, num_inducing=3000, lengthscale=1.0, sigma=1.0, group_diff_param=10.0, jitter=1e-05, train_lengthscale=False, cholesky_mode='exp', diagonal_only=False, inducing_allocation='proportional', K=50, precompute_knn=True, neighbors='knn', scale_ll_D=True, scale_kl_NM=True)
class PNMF.custom_modules.ConstrainedParameter(shape, mode)
class PNMF.custom_modules.PositiveParameter(shape, mode='softplus', elbo_mode='expanded')
class PNMF.models.PoissonFactorization(prior, y, L=10, loadings_mode='softplus', mode='expanded')
class PNMF.priors.GaussianPrior(y, L=10, scale_pf=1.0, use_natural_gradients=False)
fit(X, y=None, coordinates=None, groups=None, return_history=False, callback=None, callback_interval=100)
fit_transform(X, coordinates=None, groups=None, **kwargs)
inverse_transform(transformed)
transform(X, coordinates=None, groups=None)
"""
PATTERN = re.compile(r"^(?:class )?(PNMF\.[\w.]+|fit|transform|fit_transform|inverse_transform)\(([^)]*)\)", re.M)


def _documented():
    text = SEED.read_text() if SEED.exists() else EMBEDDED
    out = {}
    for name, args in PATTERN.findall(text):
        fn = ast.parse(f"def f({args}): pass").body[0].args
        defaults = [None] * (len(fn.args) - len(fn.defaults)) + [ast.literal_eval(d) for d in fn.defaults]
        out[name] = ([a.arg for a in fn.args], defaults, fn.kwarg is not None)
    return out


DOC = _documented()
OURS = {
    "PNMF.PNMF": compat.PNMF.__init__,
    "fit": compat.PNMF.fit,
    "transform": compat.PNMF.transform,
    "fit_transform": compat.PNMF.fit_transform,
    "inverse_transform": compat.PNMF.inverse_transform,
    "PNMF.initialization.initialize_factors": compat.initialize_factors,
    "PNMF.priors.GaussianPrior": compat.GaussianPrior.__init__,
    "PNMF.models.PoissonFactorization": compat.PoissonFactorization.__init__,
    "PNMF.custom_modules.ConstrainedParameter": compat.ConstrainedParameter.__init__,
    "PNMF.custom_modules.PositiveParameter": compat.PositiveParameter.__init__,
}
for _name in ("log_factors", "factor_uncertainty", "factor_samples", "get_loadings", "get_prior", "transform_F",
              "transform_W", "log_factors_from_prior", "factors_from_prior", "uncertainty_from_prior"):
    OURS[f"PNMF.transforms.{_name}"] = getattr(compat, _name)


def test_document_signatures_were_found():
    assert "PNMF.PNMF" in DOC and len(DOC["PNMF.PNMF"][0]) == 41
    assert set(OURS) <= set(DOC)


@pytest.mark.parametrize("name", sorted(OURS))
def test_signature_keyword_by_keyword(name):
    names, defaults, var_kw = DOC[name]
    params = inspect.signature(OURS[name]).parameters
    ours = [p for p in params if p != "self" and params[p].kind not in (inspect.Parameter.VAR_KEYWORD,
                                                                      inspect.Parameter.KEYWORD_ONLY)]
    assert ours[:len(names)] == names, f"{name}: documented {names}, ours {ours}"
    for arg, default in zip(names, defaults):
        p = params[arg]
        if default is not None or p.default is not inspect.Parameter.empty:
            assert p.default == default, f"{name}({arg}=...): documented {default!r}, ours {p.default!r}"
    if var_kw:
        assert any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        yield


def _counts(n=60, d=20, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.poisson(rng.gamma(2.0, 1.0, (n, k)) @ rng.gamma(1.0, 1.0, (k, d))).astype(np.float64)


def test_main_interface_example():
    X = np.random.default_rng(0).random((100, 50))  # the document's np.random.rand(100, 50)
    X0 = X.copy()
    model = PNMF(n_components=5, random_state=42, max_iter=10, device="cpu")
    with pytest.warns(UserWarning, match="does not hold integer counts: it is fitted as given"):
        transformed = model.fit_transform(X)
    components = model.components_
    X_reconstructed = model.inverse_transform(transformed)
    assert transformed.shape == (100, 5) and components.shape == (5, 50) and X_reconstructed.shape == X.shape
    assert np.array_equal(X, X0)
    assert bool((transformed > 0).all()) and bool((components >= 0).all())
    assert model.n_components_ == 5 and model.n_features_in_ == 50 and model.n_iter_ <= 10
    assert np.isfinite(model.elbo_)


def test_minibatch_example_and_return_history():
    X_large = np.random.default_rng(1).random((400, 30))  # the document's np.random.rand(10000, 500), smaller
    model = PNMF(n_components=4, batch_size=100, shuffle=True, max_iter=4, random_state=0)
    with pytest.warns(UserWarning, match="does not hold integer counts"):
        assert model.fit(X_large) is model
    history, same = PNMF(n_components=3, max_iter=15, random_state=0, optimizer="NAdam",
                         scheduler="plateau").fit(_counts(), return_history=True)
    assert isinstance(history, list) and len(history) == same.n_iter_ and all(isinstance(v, float) for v in history)
    assert history[-1] > history[0]  # the ELBO rises


def test_document_example_data_is_fitted_here_and_refused_by_torchnmf_pnmf():
    # the document's np.random.rand data: the adapter fits it as the PNMF package does (with a
    # warning); torchnmf's own PNMF keeps the one rule for count models (issue 22.11)
    from torchnmf.estimators import PNMF as CorePNMF

    X = np.random.default_rng(0).random((20, 8))
    with pytest.raises(ValueError, match=r"X must hold counts .* row 0, column 0 holds 0\.63.*round it"):
        CorePNMF(n_components=2, max_iter=2).fit(X)
    with pytest.warns(UserWarning, match="fitted as given"):
        W, exp_F = initialize_factors(X, n_components=2, random_state=0)
    with pytest.warns(UserWarning, match="fitted as given"):
        m = PNMF(n_components=2, max_iter=2, random_state=0).fit(X)
    with pytest.warns(UserWarning, match="fitted as given"):
        F = transform_F(X, m.components_.T, n_components=2, max_iter=2)
    assert np.isfinite(m.components_).all() and np.isfinite(np.asarray(F)).all()
    # counts stored as floats are still rounded by the count rule, without the quasi-likelihood warning
    C = _counts(20, 8) + 1e-11
    with pytest.warns(UserWarning, match="rounded"):
        PNMF(n_components=2, max_iter=2, random_state=0).fit(C)


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW", "NAdam", "SGD", "RMSprop"])
def test_documented_optimizer_names(optimizer):
    m = PNMF(n_components=2, optimizer=optimizer, max_iter=3, random_state=0, mode="lower-bound").fit(_counts())
    assert m.components_.shape == (2, 20)


def test_scheduler_knobs_reach_the_scheduler():
    X = _counts()
    m = PNMF(n_components=2, max_iter=6, random_state=0, learning_rate=0.1, scheduler="one_cycle",
             scheduler_div_factor=10.0, scheduler_final_div_factor=100.0, scheduler_pct_start=0.5)
    core = m._core(60, 20)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    kind, sch = core._make_scheduler(opt, 10)
    assert kind == "batch" and opt.param_groups[0]["lr"] == pytest.approx(0.1 / 10)
    for _ in range(9):
        opt.step()
        sch.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 10 / 100, rel=1e-3)
    m = PNMF(scheduler="plateau", scheduler_patience=7, scheduler_factor=0.5, min_lr=1e-3)
    kind, sch = m._core(60, 20)._make_scheduler(opt, 10)
    assert kind == "epoch" and sch.patience == 7 and sch.factor == 0.5 and sch.min_lrs == [1e-3]
    m.set_params(max_iter=3).fit(X)


def test_bad_values_are_refused():
    X = _counts()
    for kw, err in ((dict(optimizer="adam"), ValueError), (dict(kernel="RBF"), ValueError),
                    (dict(neighbors="radius"), ValueError), (dict(scheduler_factor=1.5), ValueError),
                    (dict(scheduler_pct_start=0), ValueError), (dict(min_lr=-1.0), ValueError),
                    (dict(train_lengthscale="yes"), TypeError), (dict(n_components=0), ValueError)):
        with pytest.raises(err):
            PNMF(max_iter=2, **kw).fit(X)
    with pytest.raises(ValueError, match="coordinates"):
        PNMF(max_iter=2).fit(X, coordinates=np.zeros((60, 2)))


def test_spatial_true_builds_on_spatial_pnmf_with_fixed_kernel():
    X = _counts()
    xy = np.random.default_rng(2).random((60, 2))
    m = PNMF(n_components=2, spatial=True, max_iter=5, random_state=0).fit(X, coordinates=xy)
    kernel = m.estimator_.layer_.factors.kernel
    assert not any(p.requires_grad for p in kernel.parameters())
    assert float(kernel.lengthscale[0]) == pytest.approx(1.0) and float(kernel.sigma[0]) == pytest.approx(1.0)
    assert m.estimator_.layer_.factors.num_inducing == 60  # 3000 capped at the number of spots
    assert m.transform(X[:5], coordinates=xy[:5]).shape == (5, 2)
    assert log_factors(m, coordinates=xy[:4]).shape == (4, 2)
    m2 = PNMF(n_components=2, spatial=True, local=True, K=5, train_lengthscale=True, max_iter=5,
              random_state=0).fit(X, coordinates=xy)
    assert all(p.requires_grad for p in m2.estimator_.layer_.factors.kernel.parameters())


def test_transforms_and_initialization_examples():
    X = np.random.default_rng(0).poisson(5, size=(100, 50)).astype(np.float32)
    X0 = X.copy()
    W, exp_F = initialize_factors(X, n_components=5, init='nndsvda', random_state=42)
    assert W.shape == (50, 5) and exp_F.shape == (100, 5)
    logF = np.log(exp_F)
    assert abs(logF.mean()) < 1e-6 and logF.std(ddof=1) == pytest.approx(1.0, rel=1e-6)
    _, e2 = initialize_factors(X, 5, init="random", random_state=0, target_std=0.5)
    assert np.log(e2).std(ddof=1) == pytest.approx(0.5, rel=1e-6)
    model = PNMF(n_components=5, max_iter=10, random_state=0, mode="lower-bound").fit(X)
    F_log = log_factors(model)
    F_std = factor_uncertainty(model)
    F_var = factor_uncertainty(model, return_variance=True)
    assert F_log.shape == F_std.shape == (100, 5) and np.allclose(F_var, F_std ** 2)
    samples = factor_samples(model, n_samples=100)
    assert samples.shape == (100, 100, 5)
    assert np.abs(samples.mean(0) - F_log).max() < 5 * F_std.max() / np.sqrt(100) + 1e-6
    assert bool((factor_samples(model, n_samples=3, return_exp=True) > 0).all())
    assert isinstance(log_factors(model, return_tensor=True), torch.Tensor)
    Wl = get_loadings(model)
    assert Wl.shape == (50, 5) and np.allclose(Wl, model.components_.T)
    prior = get_prior(model)
    qF, pF = prior()
    assert tuple(qF.mean.shape) == (5, 100) and float(pF.stddev.mean()) == pytest.approx(1.0)
    np.testing.assert_allclose(log_factors_from_prior(prior), F_log, rtol=1e-6)
    np.testing.assert_allclose(uncertainty_from_prior(prior), F_std, rtol=1e-6)
    np.testing.assert_allclose(factors_from_prior(prior), np.exp(F_log + F_std ** 2 / 2), rtol=1e-5)
    np.testing.assert_allclose(factors_from_prior(prior, use_mgf=False), np.exp(F_log), rtol=1e-5)
    X_new = X[:20]
    F_new = transform_F(X_new, Wl, max_iter=20)
    assert F_new.shape == (20, 5) and bool((F_new > 0).all())
    prior_new = transform_F(X_new, Wl, return_prior=True, max_iter=5)
    assert isinstance(prior_new, GaussianPrior)
    F_exp = get_factors(model)
    W_new = transform_W(X, F_exp, max_iter=50)
    assert W_new.shape == (50, 5) and bool((W_new >= 0).all())
    # the refitted loadings explain X at least as well as a flat guess
    flat = np.full_like(W_new, X.mean() / F_exp.sum(1).mean())
    def kl(Wm):
        R = F_exp @ Wm.T
        return float((X * np.log(np.maximum(X, 1e-12) / R) - X + R).sum())
    assert kl(W_new) < kl(flat)
    assert np.array_equal(X, X0)


def test_gaussian_prior_example():
    y = torch.randn(100, 50)
    prior = GaussianPrior(y, L=10)
    qF, pF = prior()
    F = qF.rsample((5,))
    assert F.shape == (5, 10, 50)
    prior_nat = GaussianPrior(y, L=10, use_natural_gradients=True)
    t1, t2 = prior_nat.natural_parameters()
    torch.testing.assert_close(t1, prior_nat.mean / prior_nat.scale ** 2)
    assert bool((t2 < 0).all())
    qB, _ = prior.forward_batched([0, 3, 4])
    assert tuple(qB.mean.shape) == (10, 3)


def test_poisson_factorization_example_and_documented_members():
    y = torch.randn(100, 50)
    y0 = y.clone()
    prior = GaussianPrior(y, L=10)
    model = compat.PoissonFactorization(prior, y, L=10)
    rate, qF, pF = model(E=10)
    assert torch.equal(y, y0)
    assert tuple(rate["rate"].shape) == (100, 50) and tuple(qF.mean.shape) == (10, 50)
    assert tuple(rate["exp_F_samples"].shape) == (10, 10, 50)
    assert "elbo" not in rate  # y is not count data: shapes only, as in the document's example
    assert (model.D, model.N, model.L, model.loadings_mode) == (100, 50, 10, "softplus")
    assert model.prior is prior and isinstance(model.W, compat.PositiveParameter)
    assert model.W.shape == (100, 10) and bool((model.W.data > 0).all())
    Z = model.get_rate(qF.rsample((4,)), idy=torch.tensor([0, 5]))
    assert tuple(Z.shape) == (4, 2, 50) and bool((Z > 0).all())
    with pytest.raises(ValueError, match="L=3"):
        compat.PoissonFactorization(prior, y, L=3)
    with pytest.raises(ValueError, match="spatial"):
        model(spatial=True)


@pytest.mark.parametrize("mode", ["lower-bound", "expanded", "simple"])
def test_poisson_factorization_trains_by_gradients_and_multiplicative_updates(mode):
    g = torch.Generator().manual_seed(0)
    Y = torch.poisson(torch.rand(30, 3, generator=g, dtype=torch.float64)
                      @ torch.rand(3, 40, generator=g, dtype=torch.float64) * 5, generator=g)
    torch.manual_seed(0)
    model = compat.PoissonFactorization(GaussianPrior(Y, L=3), Y, L=3, mode=mode)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        opt.zero_grad()
        terms, _, _ = model(E=3)
        (-terms["elbo"]).backward()
        opt.step()
        first = float(terms["elbo"]) if first is None else first
    assert float(terms["elbo"]) > first + 0.2 * abs(first)
    # the terms are the layer's: log_likelihood - kl == elbo, batches scale to the full data
    t, _, _ = model(idx=torch.arange(20), idy=torch.arange(15), E=2)
    assert float(t["elbo"]) == pytest.approx(float(t["log_likelihood"] - t["kl"]))
    assert tuple(t["rate"].shape) == (15, 20)
    # multiplicative updates of W from the terms: the Jensen bound never decreases
    mult = compat.PoissonFactorization(GaussianPrior(Y, L=3), Y, L=3, loadings_mode="multiplicative", mode=mode)
    values = []
    for _ in range(15):
        torch.manual_seed(1)
        terms, _, _ = mult(E=4)
        values.append(float(terms["elbo"]))
        mult.W.multiplicative_update(Y, terms)
    assert values[-1] > values[0]
    if mode == "lower-bound":
        assert all(b >= a - 1e-9 * abs(a) for a, b in zip(values, values[1:]))
    rows = torch.tensor([2, 7])
    W0 = mult.W.detach().clone()
    new = mult.W.multiplicative_update(Y[rows], mult(idy=rows)[0], idy=rows)
    assert tuple(new.shape) == (2, 3)
    keep = torch.ones(30, dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(mult.W.detach()[keep], W0[keep])


def test_positive_and_constrained_parameters():
    for mode in ("softplus", "exp", "projected", "multiplicative"):
        p = compat.PositiveParameter((3, 2), mode=mode, value=torch.full((3, 2), 0.7, dtype=torch.float64))
        torch.testing.assert_close(p.data, torch.full((3, 2), 0.7, dtype=torch.float64))
        assert p.shape == (3, 2) and p.size() == (3, 2) and p.size(1) == 2 and p.dim() == 2 and p.numel() == 6
        assert p.dtype == torch.float64 and p.device.type == "cpu" and not p.is_cuda and p.is_leaf
        assert isinstance(p.numpy(), np.ndarray) and float(p[1, 1]) == pytest.approx(0.7)
        assert not p.detach().requires_grad and p.clone().shape == (3, 2)
        p.freeze()
        assert not p.requires_grad
        p.unfreeze()
        assert p.requires_grad and p.raw is p._raw and p.grad is None
    p = compat.PositiveParameter(4, mode="projected")
    with torch.no_grad():
        p.raw.sub_(10.0)
    p.project()
    assert bool((p.data >= 0).all())
    p = compat.PositiveParameter((2, 2), mode="softplus")
    p.data.sum().backward()
    assert p.grad is not None and bool((p.grad > 0).all())
    with pytest.raises(ValueError, match="mode"):
        compat.PositiveParameter((2, 2), mode="relu")
    with pytest.raises(ValueError, match="elbo_mode"):
        compat.PositiveParameter((2, 2), elbo_mode="exact")
    with pytest.raises(ValueError, match="value"):
        compat.PositiveParameter((2, 2), value=-torch.ones(2, 2))
    with pytest.raises(TypeError, match="shape"):
        compat.PositiveParameter("2x2")

    class Interval(compat.ConstrainedParameter):  # the document's subclassing contract
        def __init__(self, shape):
            super().__init__(shape, "sigmoid")
            self._raw = torch.nn.Parameter(torch.zeros(self._shape))

        def _to_constrained(self, raw):
            return torch.sigmoid(raw)

        def _to_unconstrained(self, value):
            return torch.logit(value)

    q = Interval((2, 3))
    assert q.shape == (2, 3) and torch.equal(q.data, torch.full((2, 3), 0.5))
    assert [n for n, _ in q.named_parameters()] == ["_raw"]
    with pytest.raises(NotImplementedError):  # the base class leaves the bijection to subclasses
        compat.ConstrainedParameter(2, "none")._to_constrained(q.raw)


def test_transform_F_tol_stops_the_refit(monkeypatch):
    from torchnmf import engine

    X = _counts()
    model = PNMF(n_components=3, max_iter=10, random_state=0, mode="lower-bound").fit(X)
    W = compat.get_loadings(model)
    steps = []
    run = engine.run

    def spy(*args, **kwargs):
        res = run(*args, **kwargs)
        steps.append(res.n_iter)
        return res

    monkeypatch.setattr(engine, "run", spy)
    transform_F(X, W, mode="lower-bound", max_iter=300, tol=1e-3)
    transform_F(X, W, mode="lower-bound", max_iter=300, tol=0)
    assert steps[0] < 300 and steps[1] == 300


def test_natural_training_under_the_documented_one_cycle_schedule():
    # OneCycleLR cycles momentum by default, which natural steps have not: it raised
    m = PNMF(n_components=2, training_mode="natural", loadings_mode="multiplicative", max_iter=8,
             random_state=0).fit(_counts())
    assert m.n_iter_ <= 8 and np.isfinite(m.elbo_)


def test_documented_defaults_do_not_stop_in_the_one_cycle_warm_up():
    # issue 22 item 4: the relative-change rule fired while the one-cycle learning rate was
    # still tiny (seed 3 stopped after 12 of 200 epochs with correlation -0.02)
    from sklearn.datasets import load_digits
    X = load_digits().data[:300]
    for seed in range(5):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = PNMF(n_components=10, random_state=seed).fit(X)
        assert m.n_iter_ > 0.3 * 200  # past the warm-up (pct_start=0.3 of max_iter=200)
        R = np.asarray(get_factors(m)) @ np.asarray(get_loadings(m)).T
        assert np.corrcoef(R.ravel(), X.ravel())[0, 1] > 0.6, seed


def test_sgd_at_the_document_learning_rate_warns():
    with pytest.warns(UserWarning, match="SGD at learning_rate=0.01 hardly moves the ELBO"):
        PNMF(n_components=2, optimizer="SGD", max_iter=2, tol=0, random_state=0).fit(_counts())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PNMF(n_components=2, optimizer="SGD", learning_rate=5.0, max_iter=2, tol=0, random_state=0).fit(_counts())


@pytest.mark.parametrize("kind", ["requires_grad", "parameter"])
def test_an_input_that_requires_grad_is_data(kind):
    # issue 22 item 6: "backward through the graph a second time" before the input was detached
    X = torch.as_tensor(_counts(20, 8))
    x = torch.nn.Parameter(X.clone()) if kind == "parameter" else X.clone().requires_grad_(True)
    ref = PNMF(n_components=2, max_iter=4, random_state=0).fit(X)
    m = PNMF(n_components=2, max_iter=4, random_state=0).fit(x)
    np.testing.assert_allclose(np.asarray(m.transform(x)), np.asarray(ref.transform(X)))
    W = get_loadings(ref)
    np.testing.assert_allclose(np.asarray(transform_F(x, W, mode="lower-bound", max_iter=3)),
                               np.asarray(transform_F(X, W, mode="lower-bound", max_iter=3)))
    assert x.grad is None and x.requires_grad and torch.equal(x.detach(), X)


# -- issue 22 item 12: the document's last differences ---------------------------------------
def test_unfitted_model_says_call_fit():
    from sklearn.exceptions import NotFittedError

    for fn in (get_loadings, log_factors, get_factors, get_prior):
        with pytest.raises(NotFittedError, match=r"not fitted yet: call fit\(X\)"):
            fn(PNMF(n_components=2))
    with pytest.raises(TypeError, match="PNMF estimator"):
        get_loadings(object())


def test_tensor_input_gives_documented_ndarrays():
    X = torch.as_tensor(_counts())
    m = PNMF(n_components=2, max_iter=3, random_state=0, device="cpu")
    out = [m.fit_transform(X), m.transform(X), m.inverse_transform(torch.ones(4, 2, dtype=X.dtype)),
           m.inverse_transform(np.ones((4, 2)))]
    assert all(type(o) is np.ndarray for o in out)
    assert out[0].shape == (60, 2) and out[2].shape == (4, 20)


def test_n_components_above_min_allowed_with_a_warning():
    X = _counts(n=30, d=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = PNMF(n_components=8, max_iter=3, random_state=0, device="cpu").fit(X)
    assert any("over-complete" in str(w.message) for w in caught)
    assert m.components_.shape == (8, 6) and m.transform(X).shape == (30, 8)
    # torchnmf's own estimator keeps refusing
    from torchnmf.estimators import PNMF as CorePNMF
    with pytest.raises(ValueError, match="n_components=8"):
        CorePNMF(n_components=8, max_iter=2).fit(X)


@pytest.mark.parametrize("mode", ["lower-bound", "expanded"])
def test_compute_log_likelihood_terms(mode):
    torch.manual_seed(0)
    y = torch.as_tensor(_counts()).t().contiguous()  # (D, N)
    prior = GaussianPrior(y, L=3)
    model = compat.PoissonFactorization(prior, y, L=3, mode=mode, loadings_mode="multiplicative")
    idx = torch.tensor([0, 4, 7])
    qF, _ = prior.forward_batched(idx)
    terms = model.compute_log_likelihood_terms(qF, idx=idx, E=4)
    assert "exp_F_samples" not in terms
    forward_terms, _, _ = model(idx=idx, E=4)
    for key in ("exp_mu", "exp_mu_sigma", "rate", "rate_mean", "kl", "rate_term", "lgamma"):
        torch.testing.assert_close(terms[key], forward_terms[key])
    if mode == "lower-bound":
        torch.testing.assert_close(terms["elbo"], forward_terms["elbo"])
    with_samples = model.compute_log_likelihood_terms(qF, idx=idx, E=4, return_samples=True)
    if mode != "lower-bound":
        assert tuple(with_samples["exp_F_samples"].shape) == (4, 3, 3)
    W0 = model.W.data.detach().clone()
    model.W.multiplicative_update(y[:, idx], with_samples)
    assert not torch.equal(model.W.data, W0)


def test_gaussian_prior_scale_is_a_positive_parameter():
    y = torch.randn(100, 50)
    prior = GaussianPrior(y, L=10)
    assert isinstance(prior.scale, compat.PositiveParameter) and prior.scale.mode == "softplus"
    assert prior.scale.shape == (10, 50) and bool((prior.scale.data > 0).all())
    assert prior.scale.raw is prior.factors.raw_scale  # shared: training the prior moves it
    qF, _ = prior()
    torch.testing.assert_close(qF.stddev, prior.scale.data)
    assert {id(p) for p in prior.parameters()} == {id(prior.mean), id(prior.scale.raw)}


def test_natural_mode_theta_are_the_parameters():
    """Natural mode: theta1 = mu/s², theta2 = -1/(2s²) are leaf parameters that gradients reach."""
    y = torch.as_tensor(_counts()).t().contiguous()
    prior = GaussianPrior(y, L=3, use_natural_gradients=True)
    theta1, theta2 = prior.natural_parameters()
    assert theta1.is_leaf and theta1.requires_grad and theta2.is_leaf and theta2.requires_grad
    assert theta1 is prior.theta1 and theta2 is prior.theta2
    assert tuple(theta1.shape) == tuple(theta2.shape) == (3, 60) and bool((theta2 < 0).all())
    assert {id(p) for p in prior.parameters()} == {id(theta1), id(theta2)}
    qF, _ = prior()
    torch.testing.assert_close(qF.mean, theta1 / (-2 * theta2))
    torch.testing.assert_close(qF.stddev, (-0.5 / theta2).sqrt())
    model = compat.PoissonFactorization(prior, y, L=3, mode="lower-bound")
    terms, _, _ = model()
    (-terms["elbo"]).backward()
    assert theta1.grad is not None and bool(theta1.grad.abs().sum() > 0) and bool(theta2.grad.abs().sum() > 0)
    # a step on the natural parameters changes q(F)
    before = prior.mean.detach().clone()
    with torch.no_grad():
        theta1.add_(1e-3 * theta1.grad.sign())
    assert not torch.equal(prior.mean.detach(), before)


def test_transform_offers_the_documented_nnls_updates():
    X = _counts()
    m = PNMF(n_components=3, max_iter=5, random_state=0, device="cpu", mode="lower-bound").fit(X)
    W = m.components_.T
    # the document's NNLS multiplicative updates, written out in numpy
    H = 0.1 * torch.rand(60, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).numpy()
    for _ in range(100):
        H = H * (X @ W) / (H @ (W.T @ W))
    out = m.transform(X)
    np.testing.assert_allclose(out, H, rtol=1e-6)
    assert np.linalg.norm(X - out @ W.T) < np.linalg.norm(X - get_factors(m) @ W.T)  # least squares
    # torchnmf's variational refit is still there
    v = m.transform(X, method="variational")
    assert v.shape == (60, 3) and not np.allclose(v, out)
    with pytest.raises(ValueError, match="method"):
        m.transform(X, method="lsq")


def test_get_prior_of_a_spatial_model():
    X = _counts()
    xy = np.random.default_rng(2).random((60, 2))
    m = PNMF(n_components=2, spatial=True, max_iter=3, random_state=0).fit(X, coordinates=xy)
    prior = get_prior(m)
    assert isinstance(prior, GaussianPrior)
    qF, pF = prior()
    assert tuple(qF.mean.shape) == (2, 60)
    np.testing.assert_allclose(qF.mean.detach().numpy().T, log_factors(m), rtol=1e-6)
    np.testing.assert_allclose(qF.stddev.detach().numpy().T, factor_uncertainty(m), rtol=1e-5)
    np.testing.assert_allclose(uncertainty_from_prior(prior), factor_uncertainty(m), rtol=1e-5)
    assert float(pF.stddev.mean()) == pytest.approx(1.0)


def test_minibatch_iteration_is_one_batch():
    """With batch_size the document's iteration is one mini-batch: max_iter batch steps in all."""
    X = _counts(n=60)
    steps = {"n": 0}
    from torchnmf.poisson.lognormal import LogNormalPoisson
    real = LogNormalPoisson.elbo

    def counting(self, *args, **kwargs):
        steps["n"] += 1
        return real(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LogNormalPoisson, "elbo", counting)
        history, m = PNMF(n_components=2, batch_size=20, max_iter=7, tol=0, random_state=0,
                          device="cpu").fit(X, return_history=True)
    assert steps["n"] == 7 and m.n_iter_ == 7 and len(history) == 7
    seen = []
    PNMF(n_components=2, batch_size=20, max_iter=6, tol=0, random_state=0, device="cpu").fit(
        X, callback=lambda est, it, elbo: seen.append(it), callback_interval=2)
    assert seen == [2, 4, 6]
    # the one-cycle schedule spans the max_iter batch steps
    core = PNMF(n_components=2, batch_size=20, max_iter=7, tol=0, random_state=0, device="cpu")._core(60, 20)
    assert core._batch_iterations
    # torchnmf's own estimator counts epochs (3 batches each)
    from torchnmf.estimators import PNMF as CorePNMF
    steps["n"] = 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LogNormalPoisson, "elbo", counting)
        CorePNMF(n_components=2, batch_size=20, max_iter=2, tol=0, random_state=0).fit(X)
    assert steps["n"] == 6


def test_scale_ll_D_and_scale_kl_NM_weigh_the_loss():
    X = _counts(n=40, d=10)
    core = PNMF(scale_ll_D=False, scale_kl_NM=False)._core(40, 10)
    assert (core._ll_weight, core._kl_weight) == (10.0, 400.0)
    assert (PNMF()._core(40, 10)._ll_weight, PNMF()._core(40, 10)._kl_weight) == (1.0, 1.0)

    def fit(**kw):
        m = PNMF(n_components=2, mode="lower-bound", max_iter=150, tol=0, learning_rate=0.05, scheduler=None,
                 random_state=0, device="cpu", **kw).fit(X)
        prior = get_prior(m)
        return m, float(prior.factors.kl()), m.estimator_.layer_

    base, kl0, _ = fit()
    heavy_kl, kl1, _ = fit(scale_kl_NM=False)
    assert kl1 < 0.5 * kl0  # the KL weighs N D times more: q(F) is pulled to p(F)
    heavy_ll, kl2, layer = fit(scale_ll_D=False)
    assert kl2 > kl0  # the likelihood weighs D times more: q(F) moves further from p(F)
    # elbo_ is the ELBO itself whatever the weights: the ELBO's own fit has the best one
    assert base.elbo_ > heavy_kl.elbo_ and base.elbo_ > heavy_ll.elbo_


def test_poisson_factorization_spatial_forward():
    from torchnmf.poisson.spatial import LCGP, SVGP

    y = torch.as_tensor(_counts()).t().contiguous()  # (D=20, N=60)
    xy = torch.as_tensor(np.random.default_rng(2).random((60, 2)))
    for gp in (SVGP(xy, 3, num_inducing=10, diagonal_only=True, random_state=0),
               SVGP(xy, 3, num_inducing=10, random_state=0), LCGP(xy, 3, n_neighbors=5, random_state=0)):
        model = compat.PoissonFactorization(gp, y, L=3, mode="lower-bound")
        terms, qF, qU, pU = model(spatial=True)
        assert tuple(qF.mean.shape) == (3, 60) and pU is None
        assert qU.mean.shape[0] == 3
        mean, var = gp.marginals()
        torch.testing.assert_close(qF.mean, mean)
        assert bool(torch.isfinite(terms["elbo"])) and tuple(terms["rate"].shape) == (20, 60)
        (-terms["elbo"]).backward()
        assert gp.q_loc.grad is not None and bool(gp.q_loc.grad.abs().sum() > 0)
        idx = torch.tensor([1, 5, 9])
        terms_b, qF_b, _, _ = model(idx=idx, spatial=True)
        torch.testing.assert_close(qF_b.mean, mean[:, idx])
        new, qF_new, _, _ = model(coordinates=xy[:4] + 0.01, spatial=True)
        assert tuple(qF_new.mean.shape) == (3, 4) and tuple(new["rate"].shape) == (20, 4)
        with pytest.raises(ValueError, match="spatial=True"):
            model()
    with pytest.raises(ValueError, match="spatial=True needs a GP prior"):
        compat.PoissonFactorization(GaussianPrior(y, L=3), y, L=3)(spatial=True)


def test_messages_name_pnmf_not_the_internal_core():
    # issue 22.10: the compat estimator's core class (_Plain) showed in messages
    X = _counts()
    with pytest.raises(ValueError, match=r"^Negative values in data passed to PNMF"):
        PNMF(n_components=2, max_iter=2).fit(-X)
    model = PNMF(n_components=2, max_iter=2, random_state=0).fit(X)
    with pytest.raises(ValueError, match=r"but PNMF is expecting") as err:
        model.transform(X[:, :3])
    assert "_Plain" not in str(err.value)
    with pytest.raises(ValueError, match=r"required by PNMF") as err:
        PNMF(n_components=2, max_iter=2).fit(X[:0])


def test_transform_F_and_multiplicative_update_apply_the_data_rule():
    # issue 22.11: the compat PNMF's other count inputs follow the same rule as its fit: counts
    # stored as floats are rounded, other non-integers fitted as given with a warning (the document's)
    X = _counts()
    model = PNMF(n_components=2, max_iter=3, random_state=0).fit(X)
    W = model.components_.T
    bad = X[:5].copy()
    bad[1, 2] = 0.5
    with pytest.warns(UserWarning, match="does not hold integer counts: it is fitted as given"):
        transform_F(bad, W, max_iter=2)
    with pytest.warns(UserWarning, match="rounded 1 value within"):
        noisy = X[:5].copy()
        noisy[0, 0] += 1e-11
        transform_F(noisy, W, max_iter=2)
    Y = torch.as_tensor(X.T.copy())  # (D, N) counts
    pf = compat.PoissonFactorization(GaussianPrior(Y, L=2), Y, L=2, mode="lower-bound")
    terms, _, _ = pf(E=2)
    Yb = Y.clone()
    Yb[3, 4] = 2.5
    with pytest.warns(UserWarning, match="fitted as given"):
        pf.W.multiplicative_update(Yb, terms)
    with pytest.raises(ValueError, match="X must be non-negative"):
        pf.W.multiplicative_update(-Yb, terms)


@pytest.mark.parametrize("options, seed", [(dict(optimizer="NAdam"), 3), (dict(training_mode="natural"), 3),
                                           (dict(loadings_mode="exp"), 0), (dict(spatial=True, num_inducing=20), 2)])
def test_other_options_do_not_stop_in_the_one_cycle_warm_up(options, seed):
    # issue 22 item 4: each of these stopped after 7 of 200 epochs before the warm-up rule
    from sklearn.datasets import load_digits
    X = load_digits().data[:300]
    m = PNMF(n_components=10, random_state=seed, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if options.get("spatial"):
            m.fit(X, coordinates=np.random.default_rng(0).uniform(size=(300, 2)))
        else:
            m.fit(X)
    assert m.n_iter_ > 0.3 * 200
    R = np.asarray(get_factors(m)) @ np.asarray(get_loadings(m)).T
    assert np.corrcoef(R.ravel(), X.ravel())[0, 1] > 0.6
