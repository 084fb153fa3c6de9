"""pytorch-NMF 0.3.5's own code runs on torchnmf (../shared/seeds/pytorch-NMF-intro.rst).

Each test is a code block of the seed document with only sizes/epochs reduced, asserting what
the document shows; the rest pins 0.3.5's public API and documented behaviour.
"""
import inspect
import math
import warnings

import pytest
import torch
import torch.nn as nn

import torchnmf
from torchnmf.metrics import beta_div

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # ConvergenceWarning of the short fits
        yield


def _V():
    torch.manual_seed(0)
    return torch.rand(64, 1024)


# -- "Basic Non-negative Matrix Factorization" ------------------------------------------
def test_intro_basic_block():
    V = _V()
    assert V.size() == torch.Size([64, 1024])
    from torchnmf.nmf import NMF

    model = NMF(V.t().shape, rank=10)
    mode = model  # the document's typo ("mode.W") names the same model
    assert mode.W.size() == torch.Size([64, 10])
    assert mode.H.size() == torch.Size([1024, 10])
    before = float(beta_div(model(), V.t(), 1))
    mode.fit(V.t())
    after = float(beta_div(model(), V.t(), 1))
    assert after < 0.9 * before
    WH = model.W @ model.H.t()
    assert WH.shape == V.shape
    WH = model()
    assert WH.shape == V.t().shape
    torch.testing.assert_close(model(), (model.W @ model.H.t()).t())


def test_intro_gpu_block():
    """'Training on GPU', run on the GPU when there is one (the same code on CPU otherwise)."""
    from torchnmf.nmf import NMF

    V = _V()
    model = NMF(V.t().shape, rank=10)
    V = V.to(DEVICE).t()
    model = model.to(DEVICE)
    n_iter = model.fit(V, max_iter=20)
    assert model.W.device.type == DEVICE and model().device.type == DEVICE
    assert isinstance(n_iter, int) and 1 <= n_iter <= 20
    model = model.double()  # "casting to different data type"
    assert model.W.dtype == torch.float64 and model().dtype == torch.float64


# -- "Model Concatenation" ----------------------------------------------------------------
def test_intro_chain_module_block():
    from torchnmf.nmf import NMF

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.nmf1 = NMF((1024, 10), rank=4)
            self.nmf2 = NMF(W=(24, 10))
            self.nmf3 = NMF(W=(64, 24))

        def forward(self):
            WH = self.nmf1()
            WWH = self.nmf2(H=WH)
            WWWH = self.nmf3(H=WWH)
            return WWWH

    model = Chain()
    output = model()
    assert output.shape == torch.Size([1024, 64])
    assert bool((output >= 0).all())


def test_intro_sequential_and_betamu_block():
    from torchnmf.nmf import NMF
    from torchnmf.trainer import BetaMu

    V = _V()
    torch.manual_seed(1)
    model = nn.Sequential(
        NMF((1024, 10), rank=4),
        NMF(W=(24, 10)),
        NMF(W=(64, 24))
    )
    output = model(None)
    assert output.shape == torch.Size([1024, 64])

    trainer = BetaMu(model.parameters())
    epochs = 30  # 200 in the document
    with torch.no_grad():
        losses = [float(beta_div(model(None), V.t(), 1))]
    for e in range(epochs):
        def closure():
            trainer.zero_grad()
            return V.t(), model(None)
        trainer.step(closure)
        with torch.no_grad():
            losses.append(float(beta_div(model(None), V.t(), 1)))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.01 * losses[0]
    # multiplicative updates of KL: every epoch lowers the divergence (float32 rounding aside)
    assert all(b <= a * (1 + 1e-5) for a, b in zip(losses, losses[1:]))


# -- 0.3.5's public API --------------------------------------------------------------------
def test_import_torchnmf_exposes_035_modules():
    expected = {
        "nmf": ["BaseComponent", "NMF", "NMFD", "NMF2D", "NMF3D"],
        "plca": ["BaseComponent", "PLCA", "SIPLCA", "SIPLCA2", "SIPLCA3"],
        "trainer": ["BetaMu", "SparsityProj"],
        "metrics": ["kl_div", "euclidean", "is_div", "beta_div", "sparseness"],
    }
    for module, names in expected.items():
        mod = getattr(torchnmf, module)
        for name in names:
            assert hasattr(mod, name), f"torchnmf.{module}.{name} is missing"
    # trainers exported alike: every one in torchnmf.trainer is at top level too
    for name in ("BetaMu", "SparsityProj", "CAVI", "NaturalGradient", "GaussianNatural", "OnlineMU"):
        assert getattr(torchnmf, name) is getattr(torchnmf.trainer, name)


@pytest.mark.parametrize("cls,Vshape,expected", [
    ("NMF", (20, 7), ((7, 7), (20, 7))),
    ("NMFD", (2, 5, 9), ((5, 5, 1), (2, 5, 9))),
    ("NMF2D", (2, 3, 6, 8), ((3, 6, 1, 1), (2, 6, 6, 8))),
    ("NMF3D", (2, 3, 4, 5, 6), ((3, 5, 1, 1, 1), (2, 5, 4, 5, 6))),
    ("PLCA", (20, 7), ((7, 7), (20, 7))),
    ("SIPLCA", (2, 5, 9), ((5, 5, 1), (2, 5, 9))),
    ("SIPLCA2", (2, 3, 6, 8), ((3, 6, 1, 1), (2, 6, 6, 8))),
    ("SIPLCA3", (2, 3, 4, 5, 6), ((3, 5, 1, 1, 1), (2, 5, 4, 5, 6))),
])
def test_rank_omitted_defaults_as_035(cls, Vshape, expected):
    """0.3.5: ``rank = rank if rank else K`` with K its second name in the unpacked Vshape."""
    m = getattr(torchnmf, cls)(Vshape)
    assert (tuple(m.W.shape), tuple(m.H.shape)) == expected
    assert m.rank == expected[0][1]
    # a tensor factor still sets the rank
    m = getattr(torchnmf, cls)(Vshape, W=torch.rand(*expected[0][:1], 2, *expected[0][2:]))
    assert m.rank == 2


REFUSED_BY_035 = {
    "NMF()": lambda: torchnmf.NMF(),
    "NMF(5)": lambda: torchnmf.NMF(5),
    "negative W": lambda: torchnmf.NMF(W=-torch.rand(3, 2)),
    "negative H": lambda: torchnmf.NMF(H=-torch.rand(3, 2)),
    "W/H ranks": lambda: torchnmf.NMF(W=torch.rand(3, 2), H=torch.rand(4, 3)),
    "1-d W shape": lambda: torchnmf.NMF(W=(3,)),
    "3-d Vshape": lambda: torchnmf.NMF((4, 3, 2)),
    "NMFD T > L": lambda: torchnmf.NMFD((2, 3, 4), rank=2, T=5),
    "PLCA()": lambda: torchnmf.PLCA(),
    "2-d Z": lambda: torchnmf.PLCA(Z=torch.rand(2, 2)),
    "negative Z": lambda: torchnmf.PLCA(Z=-torch.rand(3)),
    "W/Z ranks": lambda: torchnmf.PLCA(W=torch.rand(3, 2), Z=torch.rand(3)),
    "negative PLCA W": lambda: torchnmf.PLCA(W=-torch.rand(3, 2)),
    "PLCA W/H ranks": lambda: torchnmf.PLCA(W=torch.rand(3, 2), H=torch.rand(4, 3)),
    "rank vs W": lambda: torchnmf.PLCA(rank=2, W=torch.rand(4, 3)),
    "SIPLCA T > L": lambda: torchnmf.SIPLCA((2, 3, 4), T=6),
    "SIPLCA2 kernel > V": lambda: torchnmf.SIPLCA2((2, 3, 4, 5), kernel_size=5),
}


@pytest.mark.parametrize("case", sorted(REFUSED_BY_035))
def test_constructions_035_refuses_are_refused(case):
    with pytest.raises((ValueError, TypeError)):
        REFUSED_BY_035[case]()


def test_plca_forward_norm_and_fit_positional():
    from torchnmf.plca import PLCA

    torch.manual_seed(0)
    V = torch.rand(30, 12, dtype=torch.float64) * 5
    V0 = V.clone()
    m = PLCA(V.shape, 3).double()
    params = list(inspect.signature(m.fit).parameters)[:7]
    assert params == ["V", "tol", "max_iter", "verbose", "W_alpha", "H_alpha", "Z_alpha"]
    assert list(inspect.signature(m.forward).parameters)[:4] == ["H", "W", "Z", "norm"]
    out = m.fit(V, 1e-4, 50, False, 1., 1., 1.)
    assert isinstance(out, tuple) and len(out) == 2
    n_iter, norm = out
    assert isinstance(n_iter, int) and 1 <= n_iter <= 50
    torch.testing.assert_close(norm, V.sum())
    assert torch.equal(V, V0)
    torch.testing.assert_close(m(norm=norm), m() * V.sum())
    torch.testing.assert_close(m(norm=norm).sum(), V.sum())
    torch.testing.assert_close(m(None, None, None, 2.0), 2 * m())
    assert float((m(norm=norm) - V).abs().mean()) < float((V - V.mean()).abs().mean())
    with pytest.raises(ValueError, match="norm"):
        m(norm=-1.0)


def test_plca_sparse_prior_keeps_every_component():
    """alpha < 1 floors entries at 0.3.5's eps (never 0) and the reported objective is the one optimised."""
    from torchnmf.plca import PLCA, PRIOR_FLOOR

    torch.manual_seed(0)
    V = torch.rand(30, 20, dtype=torch.float64) ** 4
    m = PLCA(V.shape, 5).double()
    hist = torchnmf.History()
    n_iter, norm = m.fit(V, 0, 40, False, 0.95, 0.99, 0.9, history=hist)
    assert n_iter == 40
    for name in ("W", "H", "Z"):
        p = getattr(m, name)
        assert bool((p > 0).all()) and bool(torch.isfinite(p).all()), name
    assert bool((m.W.max(0).values > 1e-3).all()) and bool((m.H.max(0).values > 1e-3).all())
    assert all(math.isfinite(float(r)) for r in hist)
    # the last record is the penalised objective at the returned factors
    Vn = V / V.sum()
    expected = float(torchnmf.metrics.kl_div(m(), Vn)
                     - (0.95 - 1) * torch.log(m.W.clamp_min(PRIOR_FLOOR)).sum()
                     - (0.99 - 1) * torch.log(m.H.clamp_min(PRIOR_FLOOR)).sum()
                     - (0.9 - 1) * torch.log(m.Z.clamp_min(PRIOR_FLOOR)).sum())
    assert float(hist[-1]) == pytest.approx(expected, rel=1e-9)
    # tensor alphas (broadcast to the factor) as 0.3.5 documents
    m2 = PLCA(V.shape, 5).double()
    m2.fit(V, 0, 5, False, torch.full((1, 5), 1.5))
    with pytest.raises(ValueError, match="W_alpha"):
        m2.fit(V, 0, 5, False, torch.ones(3))
    with pytest.raises(ValueError, match="H_alpha"):
        m2.fit(V, 0, 5, False, 1, -1.0)


@pytest.mark.parametrize("beta", [0, -0.5, -1, -2, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_beta_div_zeros_finite_nonnegative(beta, dtype):
    x = torch.tensor([0.0, 1.0, 2.0, 0.0, 3.0], dtype=dtype)
    y = torch.tensor([1.0, 0.0, 2.0, 0.0, 3.5], dtype=dtype)
    for a, b in ((x, y), (y, x), (x, x)):
        v = float(beta_div(a, b, beta))
        assert math.isfinite(v) and v >= 0
    assert float(beta_div(x, x, beta)) == pytest.approx(0.0, abs=1e-6)
    # positive entries are untouched by the floor
    p, q = torch.tensor([0.5, 2.0], dtype=dtype), torch.tensor([1.0, 1.5], dtype=dtype)
    if beta == 0:
        ref = float((q / p - torch.log(q / p) - 1).sum())
    else:
        ref = float(((q ** beta + (beta - 1) * p ** beta - beta * q * p ** (beta - 1)) / (beta * (beta - 1))).sum())
    assert float(beta_div(p, q, beta)) == pytest.approx(ref, rel=1e-5)
    # NaN and inf input still say so
    nan = torch.tensor([float("nan"), 1.0], dtype=dtype)
    assert math.isnan(float(beta_div(nan, p, beta))) and math.isnan(float(beta_div(p, nan, beta)))
    inf = torch.tensor([float("inf"), 1.0], dtype=dtype)
    assert not math.isfinite(float(beta_div(p, inf, beta)))


@pytest.mark.parametrize("cls,kw", [("BaseComponent", {}), ("PLCA", {}), ("SIPLCA", {"T": 1})])
def test_plca_z_only_from_rank_or_given_z(cls, kw):
    """0.3.5 creates Z only from ``rank`` or a given ``Z``: W and H alone leave it None."""
    from torchnmf import plca

    torch.manual_seed(0)
    shape_w, shape_h = ((5, 2), (6, 2)) if cls != "SIPLCA" else ((5, 2, 1), (6, 2, 4))
    W, H = torch.rand(*shape_w), torch.rand(*shape_h)
    m = getattr(plca, cls)(rank=None, W=W, H=H, Z=None, **kw)
    assert m.Z is None and m.rank == 2
    assert "Z" not in dict(m.named_parameters()) and "Z" not in m.state_dict()
    # ours beside: equal weights in forward, and fit trains W and H
    torch.testing.assert_close(m(), m(Z=torch.full((2,), 0.5)))
    torch.testing.assert_close(m().sum(), torch.tensor(1.0))
    V = torch.rand(*m().shape)
    W0 = m.W.detach().clone()
    n_iter, _ = m.fit(V, max_iter=3)
    assert n_iter == 3 and m.Z is None and not torch.equal(m.W, W0)
    # rank or an int/tensor Z still create it
    assert getattr(plca, cls)(rank=2, W=W, H=H, **kw).Z.shape == (2,)
    assert getattr(plca, cls)(W=W, H=H, Z=2, **kw).Z.shape == (2,)
    assert getattr(plca, cls)(W=W, H=H, Z=torch.ones(2), **kw).Z.shape == (2,)
    with pytest.raises(ValueError, match="Z"):
        getattr(plca, cls)(W=W, H=H, Z=3, **kw)


@pytest.mark.parametrize("beta", [-2, -1, -0.5, 0, 1, 2, 3])
def test_betamu_grad_is_beta_div_autograd_float32(beta):
    """After a step, each parameter's ``.grad`` is autograd's gradient of ``beta_div`` at the
    point just before its own update (W is updated first, then H), in float32.

    Zero targets make the float32 cancellation of beta_div's ratio form (beta < 0) visible."""
    from copy import deepcopy

    from torchnmf.nmf import NMF
    from torchnmf.trainer import BetaMu

    torch.manual_seed(0)
    V = (torch.rand(200, 64) - 0.3).clamp_min(0)  # zeros, as in counts
    model = NMF(V.shape, 10)
    probe = deepcopy(model)
    expected = []
    for name in ("W", "H"):
        (g,) = torch.autograd.grad(beta_div(probe(), V, beta), getattr(probe, name))
        expected.append(g)
        BetaMu([getattr(probe, name)], beta=beta).step(lambda: (V, probe()))
    BetaMu(model.parameters(), beta=beta).step(lambda: (V, model()))
    for p, g in zip((model.W, model.H), expected):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))
