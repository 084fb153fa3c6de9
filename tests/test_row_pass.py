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


@pytest.fixture
def any_beta(monkeypatch):
    """Take the one pass for beta=2 in float64 too (left to the two halves by default, for speed)."""
    real = row_pass.supports
    monkeypatch.setattr(row_pass, "supports", lambda V, mask=None, beta=None: real(V, mask))


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
    assert "WH" in cache["worker0"] and all(torch.equal(a, b) for a, b in zip(out1, out2))


def test_supports():
    V = torch.rand(6, 5)
    assert row_pass.supports(V, beta=2) and not row_pass.supports(V.double(), beta=2)
    assert row_pass.supports(V.double(), beta=1)
    assert row_pass.supports(V) and row_pass.supports(V.double())
    assert not row_pass.supports(V, mask=torch.ones(6, 5))
    assert not row_pass.supports(V.t().contiguous().t())  # column-major: strided rows
    assert row_pass.supports(V[::2])  # row-strided views keep rows contiguous
    assert not row_pass.supports(V.to_sparse())
    assert not row_pass.supports(V.half())


@pytest.mark.parametrize("beta", [0, 1, 2])
def test_fit_one_pass_equals_half_updates(monkeypatch, beta):
    real_supports = row_pass.supports
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
                monkeypatch.setattr(row_pass, "supports", lambda V, mask=None, beta=None: real_supports(V, mask))
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


def _betamu_run(V, W, H, beta, closed, steps=4, order="HW", mask=None, mode=None, **reg):
    from torchnmf.trainer import BetaMu

    m = NMF(W=W.clone(), H=H.clone()) if mode is None else NMF(W=W.clone(), H=H.clone(), mode=mode)
    params = list(m.parameters()) if mode is not None else ([m.H, m.W] if order == "HW" else [m.W, m.H])
    trainer = BetaMu(params, beta=beta, closed_form=closed, **reg)

    def closure():
        return (V, m()) if mask is None else (V, m(), mask)

    for _ in range(steps):
        trainer.step(closure)
    return m


def _spy_iterate(monkeypatch):
    calls = []
    real = row_pass.iterate
    monkeypatch.setattr(row_pass, "iterate", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("order", ["HW", "WH"])
@pytest.mark.parametrize("reg", [{}, {"l1_reg": 0.1, "l2_reg": 0.2, "orthogonal": 0.05}])
def test_betamu_one_pass_equals_generic(small_blocks, any_beta, monkeypatch, beta, order, reg):
    """BetaMu on H and W of one layer (either order) takes the one pass; factors and grads
    equal the autograd path's."""
    V, W, H = problem(seed=2)
    calls = _spy_iterate(monkeypatch)
    fast = _betamu_run(V, W, H, beta, True, order=order, **reg)
    assert len(calls) == 4
    slow = _betamu_run(V, W, H, beta, False, order=order, **reg)
    for name in ("H", "W"):
        a, b = getattr(fast, name), getattr(slow, name)
        assert rel(a.detach(), b.detach()) < 1e-10
        assert rel(a.grad, b.grad) < 1e-10
    assert torch.equal(V, problem(seed=2)[0])  # the target is not modified


@pytest.mark.parametrize("case", ["mask", "softplus", "column-major V", "beta 2 float64"])
def test_betamu_other_cases(monkeypatch, case):
    V, W, H = problem(seed=3)
    calls = _spy_iterate(monkeypatch)
    kw, beta = {}, 1
    if case == "mask":
        kw["mask"] = (torch.rand(V.shape, generator=torch.Generator().manual_seed(0)) > 0.2).double()
    if case == "softplus":
        kw["mode"] = "softplus"
    if case == "beta 2 float64":
        beta = 2
    Vx = V.t().contiguous().t() if case == "column-major V" else V
    fast = _betamu_run(Vx, W, H, beta, True, **kw)
    # a column-major target is copied once by rows and takes the pass; the others keep their path
    assert len(calls) == (4 if case == "column-major V" else 0)
    slow = _betamu_run(Vx, W, H, beta, False, **kw)
    assert rel(fast.W.detach(), slow.W.detach()) < 1e-10 and rel(fast.H.detach(), slow.H.detach()) < 1e-10


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("beta", [0.5, 1, 2, 3])
def test_worker_threads_equal_one_thread(small_blocks, two_threads, monkeypatch, beta):
    """Blocks split over two worker threads: same result (up to the order of the row sums),
    torch's thread count restored, the pool's threads used."""
    import threading

    V, W, H = problem(N=90, seed=4)
    names = []
    real = row_pass._row_range
    monkeypatch.setattr(row_pass, "_row_range",
                        lambda *a: names.append((threading.current_thread().name, torch.get_num_threads())) or real(*a))
    par = row_pass.mu_iteration(V, W, H, beta, 0.1, 0.2, with_loss=True)
    assert torch.get_num_threads() == 2
    # two row ranges, run by the pool's threads with single-threaded ops
    assert len(names) == 2 and all(n.startswith("torchnmf-rows") and t == 1 for n, t in names)
    monkeypatch.setattr(row_pass, "parallel_blocks", False)
    names.clear()
    one = row_pass.mu_iteration(V, W, H, beta, 0.1, 0.2, with_loss=True)
    assert names == [(threading.current_thread().name, 2)]
    assert rel(par[0], one[0]) < 1e-10 and rel(par[1], one[1]) < 1e-10
    assert float(par[2]) == pytest.approx(float(one[2]), rel=1e-10)


def test_worker_error_propagates_and_threads_restored(small_blocks, two_threads):
    V, W, H = problem(N=90, seed=5)

    def bad_rule(X, num, den, out, start):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        row_pass.iterate(V, W, H, 1, bad_rule)
    assert torch.get_num_threads() == 2


def test_betamu_in_workers_updates_leaf_parameters(small_blocks, two_threads, monkeypatch):
    """Grad mode is per thread: the workers update BetaMu's leaf parameters in place under no_grad."""
    V, W, H = problem(N=90, seed=6)
    fast = _betamu_run(V, W, H, 1, True)
    monkeypatch.setattr(row_pass, "parallel_blocks", False)
    slow = _betamu_run(V, W, H, 1, True)
    assert rel(fast.H.detach(), slow.H.detach()) < 1e-10 and rel(fast.W.grad, slow.W.grad) < 1e-10
