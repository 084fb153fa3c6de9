"""Planned chain products of NMF layers and BetaMu's closed-form gradient parts (issue 16).

Every faster path is compared with the left-to-right / generic autograd result in float64
to 1e-10 relative.
"""
import copy

import pytest
import torch
from torch import nn

from torchnmf import NMF
from torchnmf import _matchain
from torchnmf.metrics import beta_div
from torchnmf.trainer import BetaMu


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def intro_chain(mode="multiplicative", trainable=(True, True, True, True)):
    """The introduction's 3-layer chain (smaller N), float64."""
    torch.manual_seed(0)
    return nn.Sequential(
        NMF((200, 10), rank=4, mode=mode, trainable_W=trainable[1], trainable_H=trainable[0]),
        NMF(W=(24, 10), mode=mode, trainable_W=trainable[2]),
        NMF(W=(64, 24), mode=mode, trainable_W=trainable[3]),
    ).double()


class Chain(nn.Module):
    """The introduction's explicit chain module (layers called with H=...)."""

    def __init__(self):
        super().__init__()
        self.nmf1 = NMF((50, 10), rank=4)
        self.nmf2 = NMF(W=(24, 10))
        self.nmf3 = NMF(W=(30, 24))

    def forward(self):
        return self.nmf3(H=self.nmf2(H=self.nmf1()))


def left_to_right(model):
    out = model[0].H @ model[0].W.t()
    for layer in list(model)[1:]:
        out = out @ layer.W.t()
    return out


def test_plan_contracts_small_factors_first():
    path, cost = _matchain.plan((1024, 4, 10, 24, 64))
    # W1ᵀW2ᵀ, then with W3ᵀ, then H: far cheaper than left to right
    assert path == ((1, 2), (1, 2), (0, 1))
    left_to_right_cost = 2 * 1024 * (4 * 10 + 10 * 24 + 24 * 64)  # opt_einsum counts 2 flops a product
    assert cost < left_to_right_cost / 5


@pytest.mark.parametrize("mats", [[(7, 3)], [(7, 3), (3, 5)], [(40, 2), (2, 9), (9, 11), (11, 30)],
                                  [(5, 30), (30, 2), (2, 40), (40, 3), (3, 6), (6, 50), (50, 2), (2, 8)]])
def test_chain_product_equals_left_to_right(mats):
    torch.manual_seed(1)
    A = [torch.rand(*s, dtype=torch.float64) for s in mats]
    ref = A[0]
    for m in A[1:]:
        ref = ref @ m
    assert rel(_matchain.chain_product(A), ref) < 1e-12


def test_sequential_forward_and_gradients_equal_left_to_right():
    model = intro_chain()
    out = model(None)
    ref = left_to_right(model)
    assert rel(out, ref) < 1e-12
    params = list(model.parameters())
    G = torch.rand_like(ref)
    g = torch.autograd.grad(out, params, G)
    g_ref = torch.autograd.grad(ref, params, G)
    for a, b in zip(g, g_ref):
        assert rel(a, b) < 1e-10
    rec = _matchain.record_of(out)
    assert rec is not None and rec.dims() == (200, 4, 10, 24, 64)


def test_record_is_dropped_after_in_place_changes():
    model = intro_chain()
    Y1 = model[0]()
    assert _matchain.record_of(Y1) is not None
    with torch.no_grad():
        Y1.mul_(2)  # the output no longer equals its factors' product
    assert _matchain.record_of(Y1) is None
    out = model[1](H=Y1)
    assert rel(out, Y1 @ model[1].W.t()) < 1e-12
    Y1 = model[0]()
    with torch.no_grad():
        model[0].H.mul_(3)  # a factor changed after the output was made
    assert _matchain.record_of(Y1) is None
    assert rel(model[1](H=Y1), Y1 @ model[1].W.t()) < 1e-12


def test_no_record_in_inference_mode_and_for_batched_input():
    m = NMF((6, 5), 2).double()
    with torch.inference_mode():
        out = m()
    assert _matchain.record_of(out) is None
    H = torch.rand(3, 6, 2, dtype=torch.float64)
    assert m(H=H).shape == (3, 6, 5)
    assert _matchain.record_of(m(H=H)) is None


def _run(model, V, steps, mask=None, **kw):
    trainer = BetaMu(model.parameters(), **kw)
    calls = [0]

    def closure():
        calls[0] += 1
        out = model() if isinstance(model, Chain) else model(None)
        return (V, out) if mask is None else (V, out, mask)

    losses = []
    for _ in range(steps):
        trainer.step(closure)
        with torch.no_grad():
            pred = model() if isinstance(model, Chain) else model(None)
            losses.append(float(beta_div(pred, V, kw.get("beta", 1))) if mask is None else 0.0)
    return losses, calls[0]


def _same_as_generic(model, V, steps=5, mask=None, **kw):
    fast, slow = model, copy.deepcopy(model)
    lf, calls_fast = _run(fast, V, steps, mask, closed_form=True, **kw)
    ls, calls_slow = _run(slow, V, steps, mask, closed_form=False, **kw)
    for (n, a), (_, b) in zip(fast.named_parameters(), slow.named_parameters()):
        assert rel(a.detach(), b.detach()) < 1e-10, n
        if b.grad is not None:
            assert rel(a.grad, b.grad) < 1e-10, n
        else:
            assert a.grad is None
    return lf, calls_fast, calls_slow


def nonincreasing(losses, tol=1e-10):
    return all(b <= a + tol * abs(a) for a, b in zip(losses, losses[1:]))


@pytest.mark.parametrize("beta", [0, 0.5, 1, 1.5, 2, 3])
def test_closed_form_single_layer_equals_generic(beta):
    torch.manual_seed(2)
    V = torch.rand(30, 20, dtype=torch.float64) + 0.05
    model = NMF(V.shape, 4).double()
    losses, calls_fast, calls_slow = _same_as_generic(model, V, beta=beta)
    assert nonincreasing(losses) and losses[-1] < losses[0]
    assert calls_fast == 5 and calls_slow == 10  # one closure call per step on the closed form


@pytest.mark.parametrize("beta", [0.5, 1, 2])
def test_closed_form_with_mask_and_penalties_equals_generic(beta):
    torch.manual_seed(3)
    V = torch.rand(25, 12, dtype=torch.float64) + 0.05
    M = torch.rand(25, 12) > 0.3
    model = NMF(V.shape, 3).double()
    _same_as_generic(model, V, mask=M, beta=beta, l1_reg=0.1, l2_reg=0.2, orthogonal=0.05)


@pytest.mark.parametrize("beta", [0, 1, 1.5, 2])
def test_closed_form_chain_equals_generic(beta):
    V = torch.rand(200, 64, dtype=torch.float64) + 0.05
    losses, calls_fast, _ = _same_as_generic(intro_chain(), V, beta=beta)
    assert nonincreasing(losses) and losses[-1] < losses[0]
    assert calls_fast == 5


def test_closed_form_explicit_chain_module_and_fixed_factors():
    torch.manual_seed(4)
    V = torch.rand(50, 30, dtype=torch.float64) + 0.05
    _, calls, _ = _same_as_generic(Chain().double(), V, beta=1)
    assert calls == 5
    # a fixed layer stays fixed; the others follow the generic path exactly
    model = intro_chain(trainable=(True, False, True, True))
    W1 = model[0].W.detach().clone()
    V = torch.rand(200, 64, dtype=torch.float64) + 0.05
    _same_as_generic(model, V, beta=2)
    assert torch.equal(model[0].W, W1)


def test_softplus_layers_fall_back_to_autograd_and_agree():
    """Transformed factors are not leaves: each is served by a fresh closure call and backward."""
    V = torch.rand(200, 64, dtype=torch.float64) + 0.05
    model = intro_chain()
    model[1] = NMF(W=(24, 10), mode="softplus").double()
    losses, calls_fast, calls_slow = _same_as_generic(model, V, beta=1)
    assert nonincreasing(losses)
    assert calls_fast == calls_slow == 5 * 4  # the record holds a non-leaf: no reuse within a step


def test_closed_form_flag_is_checked():
    with pytest.raises(TypeError, match="closed_form"):
        BetaMu(NMF((4, 3), 2).parameters(), closed_form=1)


def test_transposed_target_view_of_the_introduction():
    """The introduction's closure returns ``V.t()``, a fresh view at every call: same result as
    a contiguous target and the generic path; a change of V in place is checked again."""
    torch.manual_seed(5)
    V = torch.rand(64, 200, dtype=torch.float64) + 0.05
    a, b, c = intro_chain(), intro_chain(), intro_chain()
    ta = BetaMu(a.parameters(), beta=2)
    tb = BetaMu(b.parameters(), beta=2, closed_form=False)
    tc = BetaMu(c.parameters(), beta=2)
    Vc = V.t().contiguous()
    for _ in range(4):
        ta.step(lambda: (V.t(), a(None)))
        tb.step(lambda: (V.t(), b(None)))
        tc.step(lambda: (Vc, c(None)))
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert rel(pa, pb) < 1e-10 and torch.equal(pa, pc)
    with torch.no_grad():
        V[0, 0] = -1.0
    with pytest.raises(ValueError, match="target"):
        ta.step(lambda: (V.t(), a(None)))


@pytest.mark.parametrize("beta", [0.5, 1, 2])
def test_closed_form_chain_with_mask_and_penalties_equals_generic(beta):
    torch.manual_seed(6)
    V = torch.rand(200, 64, dtype=torch.float64) + 0.05
    M = torch.rand(200, 64) > 0.25
    _same_as_generic(intro_chain(), V, mask=M, beta=beta, l1_reg=0.05, l2_reg=0.1)
