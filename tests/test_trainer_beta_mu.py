import copy

import pytest
import torch
from torch import nn

from torchnmf import NMF, NMF2D, NMFD
from torchnmf.constraints import MODES, value_of
from torchnmf.metrics import beta_div
from torchnmf.trainer import BetaMu
from gamma_helpers import huge_float32 as _huge_float32


BETAS = [0, 0.5, 1, 1.5, 2, 3]


def run(model, V, beta, steps, mask=None, **kw):
    trainer = BetaMu(model.parameters(), beta=beta, **kw)

    def closure():
        return (V, model(None)) if mask is None else (V, model(None), mask)

    losses = []
    for _ in range(steps):
        with torch.no_grad():
            pred = model(None)
            losses.append(float(beta_div(pred if mask is None else pred[mask], V if mask is None else V[mask], beta)))
        trainer.step(closure)
    return losses


def nonincreasing(losses, rel=1e-10):
    return all(b <= a + rel * abs(a) for a, b in zip(losses, losses[1:]))


@pytest.mark.parametrize("beta", BETAS)
def test_monotone_random(beta):
    V = torch.rand(30, 20, dtype=torch.float64) + 0.01
    losses = run(NMF(V.shape, 4).double(), V, beta, 25)
    assert nonincreasing(losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("beta", BETAS)
def test_monotone_digits(beta, digits):
    # Itakura-Saito (beta <= 0) is infinite at zero counts: shift the counts by one there
    V = digits + 1 if beta <= 0 else digits
    losses = run(NMF(V.shape, 8).double(), V, beta, 10)
    assert nonincreasing(losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("beta", [0.5, 1, 2, 3])
def test_monotone_conv_layers(beta):
    V = torch.rand(3, 4, 12, dtype=torch.float64) + 0.01
    assert nonincreasing(run(NMFD(V.shape, 2, T=3).double(), V, beta, 10))
    V2 = torch.rand(2, 3, 6, 7, dtype=torch.float64) + 0.01
    assert nonincreasing(run(NMF2D(V2.shape, 2, kernel_size=(2, 3)).double(), V2, beta, 10))


@pytest.mark.parametrize("beta", [1, 2])
def test_chain_of_three_layers(beta):
    torch.manual_seed(1)
    model = nn.Sequential(NMF((25, 6), 3), NMF(W=(10, 6)), NMF(W=(15, 10))).double()
    V = torch.rand(25, 15, dtype=torch.float64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = run(model, V, beta, 30)
    assert nonincreasing(losses) and losses[-1] < 0.9 * losses[0]
    for n, p in model.named_parameters():  # every layer moved
        assert not torch.equal(p, before[n]), n


def _objective(pred, V, beta, p_value, l1, l2):
    return beta_div(pred, V, beta) + l1 * p_value.sum() + 0.5 * l2 * p_value.pow(2).sum()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("beta", [0.5, 1, 2, 3])
def test_grad_is_true_gradient_before_update(mode, beta):
    V = torch.rand(8, 6, dtype=torch.float64) + 0.1
    m = NMF(V.shape, 3, mode=mode).double()
    l1, l2 = 0.1, 0.3
    raws = [p for p in m.parameters()]
    # expected gradients: each parameter's at the point just before its own update
    # (parameters are updated in order, so the second sees the first already updated)
    probe = copy.deepcopy(m)
    trainer = BetaMu(m.parameters(), beta=beta, l1_reg=l1, l2_reg=l2)
    expected = []
    probe_raws = list(probe.parameters())
    probe_trainer = BetaMu(probe.parameters(), beta=beta, l1_reg=l1, l2_reg=l2)
    for i, q in enumerate(probe_raws):
        pred = probe()
        obj = beta_div(pred, V, beta) + sum(
            l1 * value_of(r).sum() + 0.5 * l2 * value_of(r).pow(2).sum() for r in [q])
        (g,) = torch.autograd.grad(obj, q)
        expected.append(g)
        # advance the probe by updating only q
        only = BetaMu([q], beta=beta, l1_reg=l1, l2_reg=l2)
        only.step(lambda: (V, probe()))
    trainer.step(lambda: (V, m()))
    for p, g in zip(raws, expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=1e-10)
    # and the update itself matches the probe's one-at-a-time updates
    for p, q in zip(raws, probe_raws):
        torch.testing.assert_close(p, q)
    del probe_trainer


def test_grad_gradcheck_single_parameter():
    """p.grad equals torch.autograd.gradcheck-verified gradient of beta_div in H."""
    V = torch.rand(5, 4, dtype=torch.float64) + 0.1
    W = torch.rand(4, 2, dtype=torch.float64)
    m = NMF(W=W, H=torch.rand(5, 2, dtype=torch.float64), trainable_W=False)
    H0 = m.H.detach().clone().requires_grad_()
    f = lambda H: beta_div(H @ W.T, V, 1.5)  # noqa: E731
    assert torch.autograd.gradcheck(f, (H0,))
    (g,) = torch.autograd.grad(f(H0), H0)
    BetaMu(m.parameters(), beta=1.5).step(lambda: (V, m()))
    torch.testing.assert_close(m.H.grad, g)
    assert m.W.grad is None


def test_unused_and_fixed_parameters_left_alone():
    V = torch.rand(6, 5, dtype=torch.float64)
    a = NMF(V.shape, 2).double()
    other = NMF(V.shape, 2).double()
    fixed = NMF(V.shape, 2, trainable_W=False).double()
    snap = [p.detach().clone() for p in list(other.parameters()) + [fixed.W]]
    trainer = BetaMu(list(a.parameters()) + list(other.parameters()) + list(fixed.parameters()))
    trainer.step(lambda: (V, a() + fixed.W.sum() * 0 + fixed(H=fixed.H.detach()) * 0))
    for p, s in zip(list(other.parameters()) + [fixed.W], snap):
        assert torch.equal(p, s)
    assert all(p.grad is None for p in other.parameters())
    assert a.W.grad is not None and a.H.grad is not None
    assert not fixed.W.requires_grad and fixed.H.requires_grad  # flags restored


def test_mask_entries_do_not_count():
    V = torch.rand(10, 8, dtype=torch.float64)
    M = torch.rand(10, 8) > 0.4
    V2 = V.clone()
    V2[~M] = 50.0
    a = NMF(V.shape, 3).double()
    b = copy.deepcopy(a)
    la = run(a, V, 1, 10, mask=M)
    run(b, V2, 1, 10, mask=M)
    torch.testing.assert_close(a.W, b.W)
    torch.testing.assert_close(a.H, b.H)
    assert nonincreasing(la)


def test_mask_shape_error():
    V = torch.rand(4, 3)
    m = NMF(V.shape, 2)
    with pytest.raises(ValueError, match="mask"):
        BetaMu(m.parameters()).step(lambda: (V, m(), torch.ones(3, 4)))
    with pytest.raises(ValueError, match="target"):
        BetaMu(m.parameters()).step(lambda: (V[:2], m()))
    with pytest.raises(TypeError, match="closure"):
        BetaMu(m.parameters()).step(lambda: m())


def test_regularisers_shrink_and_orthogonal():
    V = torch.rand(20, 10, dtype=torch.float64)
    a = NMF(V.shape, 3).double()
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    run(a, V, 1, 30)
    run(b, V, 1, 30, l1_reg=2.0, l2_reg=1.0)
    run(c, V, 1, 30, orthogonal=1.0)
    assert b.W.sum() + b.H.sum() < a.W.sum() + a.H.sum()

    def overlap(P):
        """Share of Σ_i (Σ_r P_ir)² coming from cross terms r != r' (0: one component per row)."""
        P = P.detach()
        s = P.sum(1)
        return float((s ** 2 - (P ** 2).sum(1)).sum() / (s ** 2).sum())

    assert overlap(c.H) < 0.1 < 0.3 < overlap(a.H)


def test_lr_scheduler_does_not_crash():
    V = torch.rand(6, 5)
    m = NMF(V.shape, 2)
    trainer = BetaMu(m.parameters())
    sched = torch.optim.lr_scheduler.StepLR(trainer, step_size=1, gamma=0.5)
    for _ in range(3):
        trainer.step(lambda: (V, m()))
        sched.step()
    assert trainer.param_groups[0]["lr"] == pytest.approx(0.125)


def test_float32_and_state_dict():
    V = torch.rand(6, 5)
    m = NMF(V.shape, 2)
    trainer = BetaMu(m.parameters(), beta=2)
    trainer.step(lambda: (V, m()))
    sd = trainer.state_dict()
    t2 = BetaMu(m.parameters(), beta=1)
    t2.load_state_dict(sd)
    assert t2.param_groups[0]["beta"] == 2.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs cuda")
def test_cuda():
    V = torch.rand(20, 10, dtype=torch.float64)
    m = NMF(V.shape, 3).double()
    c = copy.deepcopy(m).cuda()
    run(m, V, 1, 5)
    run(c, V.cuda(), 1, 5)
    torch.testing.assert_close(c.W.cpu(), m.W, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("beta, kind", [(2, "scaled"), (2, "one"), (1, "one"), (0, "one")])
def test_float32_target_too_large_is_refused(beta, kind):
    # issue 22 item 5: the step turned W and H into NaN without an error (beta=2 overflows
    # its Gram products already at 1e20: Σ x² is checked too)
    X = _huge_float32(kind)
    m = NMF(W=torch.rand(5, 2) + 0.1, H=torch.rand(6, 2) + 0.1)
    W0 = m.W.detach().clone()
    with pytest.raises(ValueError, match="target is too large for float32"):
        BetaMu(m.parameters(), beta=beta).step(lambda: (X, m(None)))
    assert torch.equal(m.W.detach(), W0)
    # float64 has the range for it
    m = NMF(W=torch.rand(5, 2, dtype=torch.float64) + 0.1, H=torch.rand(6, 2, dtype=torch.float64) + 0.1)
    BetaMu(m.parameters(), beta=beta).step(lambda: (X.double(), m(None)))
    assert torch.isfinite(m.W).all() and torch.isfinite(m.H).all()
