"""One MU iteration in one pass over V's row blocks (torchnmf.row_pass) equals the two halves."""
import warnings

import numpy as np
import pytest
import torch

from torchnmf import NMF, row_pass
from torchnmf.history import History
from torchnmf.metrics import beta_div
from torchnmf.updates import mu_update

BETAS = [0, 0.5, 1, 1.5, 2, 3]
TINY = torch.finfo(torch.float64).eps


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 8 rows, so a 37-row V takes 5 blocks, the last one short."""
    monkeypatch.setattr(row_pass, "_BLOCK_BYTES", 8 * 8 * 11)
    monkeypatch.setattr(row_pass, "_MIN_ROWS", 1)


def problem(N=37, C=11, R=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = torch.rand(N, C, dtype=torch.float64, generator=g) + 0.05
    return V, torch.rand(C, 3, dtype=torch.float64, generator=g), torch.rand(N, 3, dtype=torch.float64, generator=g)


def two_halves(V, W, H, beta, l1=0.0, l2=0.0, zero_below=None):
    H1, loss = mu_update(V, W, H, beta=beta, l1=l1, l2=l2, with_loss=True)
    if zero_below is not None:
        H1.masked_fill_(H1 < zero_below, 0.0)
    W1 = mu_update(V.t(), H1, W, beta=beta, l1=l1, l2=l2)
    if zero_below is not None:
        W1.masked_fill_(W1 < zero_below, 0.0)
    return H1, W1, loss


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("pen", [(0.0, 0.0), (0.1, 0.3)])
def test_equals_two_half_updates(small_blocks, beta, pen):
    V, W, H = problem()
    zb = TINY if beta < 1 else None
    assert row_pass.block_rows(V) == 8
    H_ref, W_ref, loss_ref = two_halves(V, W, H, beta, *pen, zero_below=zb)
    H1, W1, loss = row_pass.mu_iteration(V, W, H, beta, *pen, with_loss=True, zero_below=zb)
    assert rel(H1, H_ref) < 1e-10 and rel(W1, W_ref) < 1e-10
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-10)
    # the loss is the divergence at the input point
    assert float(loss) == pytest.approx(float(beta_div((H @ W.t()).clamp_min(1.1920929e-07), V, beta)), rel=1e-8)


def test_inputs_untouched_and_cache_reused(small_blocks):
    V, W, H = problem()
    copies = [t.clone() for t in (V, W, H)]
    cache = {}
    out1 = row_pass.mu_iteration(V, W, H, 1, with_loss=True, cache=cache)
    out2 = row_pass.mu_iteration(V, W, H, 1, with_loss=True, cache=cache)
    for t, c in zip((V, W, H), copies):
        assert torch.equal(t, c)
    assert "WH" in cache and all(torch.equal(a, b) for a, b in zip(out1, out2))


def test_supports():
    V = torch.rand(6, 5)
    assert row_pass.supports(V) and row_pass.supports(V.double())
    assert not row_pass.supports(V, mask=torch.ones(6, 5))
    assert not row_pass.supports(V.t().contiguous().t())  # column-major: strided rows
    assert row_pass.supports(V[::2])  # row-strided views keep rows contiguous
    assert not row_pass.supports(V.to_sparse())
    assert not row_pass.supports(V.half())


@pytest.mark.parametrize("beta", [0, 1, 2])
def test_fit_one_pass_equals_half_updates(monkeypatch, beta):
    """NMF.fit on a dense CPU V takes the one-pass iteration; its trajectory equals the old path."""
    V, W, H = problem(N=300, C=40, seed=1)
    calls = []
    real = row_pass.mu_iteration

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    def fit(one_pass):
        m, hist = NMF(W=W.clone(), H=H.clone()), History()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if one_pass:
                monkeypatch.setattr(row_pass, "mu_iteration", spy)
            else:
                monkeypatch.setattr(row_pass, "supports", lambda *a, **k: False)
            m.fit(V, beta=beta, max_iter=25, tol=0, history=hist, check_every=1)
            monkeypatch.undo()
        return m, np.asarray(hist.values, dtype=float)

    (a, ha), (b, hb) = fit(True), fit(False)
    assert len(calls) >= 25
    assert rel(a.W.detach(), b.W.detach()) < 1e-10 and rel(a.H.detach(), b.H.detach()) < 1e-10
    assert len(ha) == len(hb) == 26 and np.allclose(ha, hb, rtol=1e-10, atol=0)


@pytest.mark.parametrize("beta", [1, 1.5, 2])
def test_divergence_never_increases(digits, beta):
    """MU is monotone for beta in [1, 2]; the fused pass must keep it, step by step (digits)."""
    V = digits + 0.0
    g = torch.Generator().manual_seed(0)
    H = torch.rand(V.shape[0], 8, dtype=V.dtype, generator=g)
    W = torch.rand(V.shape[1], 8, dtype=V.dtype, generator=g)
    cache, losses = {}, []
    for _ in range(40):
        H, W, loss = row_pass.mu_iteration(V, W, H, beta, with_loss=True, cache=cache)
        losses.append(float(loss))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.8 * losses[0]
