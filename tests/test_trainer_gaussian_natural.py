"""Tests of torchnmf.trainer.GaussianNatural (natural-gradient steps for Gaussian q)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as Fn

from torchnmf.poisson import IndependentNormal
from torchnmf.trainer import GaussianNatural

# small problems: one intra-op thread avoids contention (conftest fixture)

DT = torch.float64


def conjugate_problem(seed=0):
    """y_rn ~ Normal(f_kn-sum, noise) toy: each f_kn observed R times with noise variance tau^-1."""
    g = torch.Generator().manual_seed(seed)
    K, N, R = 2, 5, 4
    y = torch.randn(R, K, N, generator=g, dtype=DT) + 1.5
    tau = 3.0
    s = 0.8
    # exact posterior (numpy, independent of the optimizer)
    yn = y.numpy()
    prec = 1 / s**2 + R * tau
    post_var = np.full((K, N), 1 / prec)
    post_mean = tau * yn.sum(0) / prec
    return y, tau, s, post_mean, post_var


def neg_elbo(q, y, tau):
    m, v = q.marginals()
    # E_q[log N(y | f, 1/tau)] up to a constant, then KL to the prior
    return 0.5 * tau * ((y - m) ** 2 + v).sum() + q.kl()


@pytest.mark.parametrize("init_scale", [0.05, 0.5, 2.0])
def test_step_of_size_one_lands_on_exact_posterior(init_scale):
    y, tau, s, post_mean, post_var = conjugate_problem()
    q = IndependentNormal(2, 5, prior_scale=s, init_scale=init_scale, init_loc=torch.randn(2, 5, dtype=DT), dtype=DT)
    opt = GaussianNatural(q.natural_groups(), lr=1.0, max_var_growth=1e6)

    def closure():
        opt.zero_grad()
        loss = neg_elbo(q, y, tau)
        loss.backward()
        return loss

    opt.step(closure)
    m, v = (t.detach().numpy() for t in q.marginals())
    np.testing.assert_allclose(m, post_mean, rtol=1e-9)
    np.testing.assert_allclose(v, post_var, rtol=1e-9)
    # a second step stays there (a fixed point)
    opt.step(closure)
    np.testing.assert_allclose(q.loc.detach().numpy(), post_mean, rtol=1e-9)


@pytest.mark.parametrize("scale", ["softplus", "exp", "log_var"])
@pytest.mark.parametrize("rho", [0.3, 1.0])
def test_step_interpolates_natural_parameters(scale, rho):
    y, tau, s, post_mean, post_var = conjugate_problem(1)
    loc = torch.zeros(2, 5, dtype=DT, requires_grad=True)
    v0 = torch.full((2, 5), 0.3, dtype=DT)
    raw0 = {"softplus": v0.sqrt() + torch.log(-torch.expm1(-v0.sqrt())), "exp": 0.5 * v0.log(), "log_var": v0.log()}[scale]
    raw = raw0.clone().requires_grad_(True)

    def var_of(r):
        return {"softplus": Fn.softplus(r) ** 2, "exp": torch.exp(2 * r), "log_var": torch.exp(r)}[scale]

    opt = GaussianNatural([{"params": [loc, raw], "scale": scale}], lr=rho, max_var_growth=1e6)

    def closure():
        opt.zero_grad()
        v = var_of(raw)
        kl = 0.5 * (v / s**2 + loc**2 / s**2 - 1 - torch.log(v / s**2)).sum()
        loss = 0.5 * tau * ((y - loc) ** 2 + v).sum() + kl
        loss.backward()
        return loss

    opt.step(closure)
    # natural parameters move a fraction rho of the way to the optimum (conjugate case)
    t1, t2 = 0.0, -1 / (2 * 0.3)
    s1, s2 = post_mean / post_var, -1 / (2 * post_var)
    v = var_of(raw).detach().numpy()
    m = loc.detach().numpy()
    np.testing.assert_allclose(-1 / (2 * v), (1 - rho) * t2 + rho * s2, rtol=1e-9)
    np.testing.assert_allclose(m / v, (1 - rho) * t1 + rho * s1, rtol=1e-9)


def test_zero_gradient_entries_unchanged_and_max_step():
    y, tau, s, _, _ = conjugate_problem()
    q = IndependentNormal(2, 5, prior_scale=s, dtype=DT)
    before = (q.loc.detach().clone(), q.raw_scale.detach().clone())
    opt = GaussianNatural(q.natural_groups(), lr=1.0, max_step=0.25)
    idx = torch.tensor([1, 3])
    opt.zero_grad()
    m, v = q.marginals(idx)
    (0.5 * tau * ((y[:, :, idx] - m) ** 2 + v).sum() + q.kl(idx)).backward()
    opt.step()
    others = torch.tensor([0, 2, 4])
    assert torch.equal(q.loc.detach()[:, others], before[0][:, others])
    assert torch.equal(q.raw_scale.detach()[:, others], before[1][:, others])
    step = (q.loc.detach() - before[0])[:, idx]
    assert float(step.abs().max()) == pytest.approx(0.25)


def test_works_with_lr_scheduler():
    q = IndependentNormal(1, 3, dtype=DT)
    opt = GaussianNatural(q.natural_groups(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5


def test_bad_arguments():
    q = IndependentNormal(1, 3)
    with pytest.raises(ValueError, match="lr"):
        GaussianNatural(q.natural_groups(), lr=0.0)
    with pytest.raises(ValueError, match="exactly"):
        GaussianNatural([{"params": [q.loc]}])
    with pytest.raises(ValueError, match="scale must be one of 'softplus', 'exp', 'log_var'"):
        GaussianNatural([{"params": [q.loc, q.raw_scale], "scale": "sigmoid"}])
    with pytest.raises(TypeError, match="list of dicts"):
        GaussianNatural([q.loc, q.raw_scale])
    with pytest.raises(ValueError, match="max_var_growth"):
        GaussianNatural(q.natural_groups(), max_var_growth=1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        GaussianNatural([{"params": [q.loc, torch.zeros(2, requires_grad=True)]}])
