import math

import numpy as np
import pytest
import torch

from torchnmf import NMF
from torchnmf.metrics import beta_div, sparseness
from torchnmf.trainer import SparsityProj
from torchnmf.trainer.sparsity import project_sparseness


def ref_project(x, s):
    """Hoyer (2004) projection, one vector at a time, written plainly in numpy."""
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    L2 = np.linalg.norm(x)
    L1 = L2 * (math.sqrt(n) - s * (math.sqrt(n) - 1))
    v = x + (L1 - x.sum()) / n
    Z = np.zeros(n, dtype=bool)
    while True:
        m = np.where(Z, 0.0, L1 / (n - Z.sum()))
        d = v - m
        a, b, c = d @ d, 2 * m @ d, m @ m - L2 ** 2
        alpha = (-b + math.sqrt(max(b * b - 4 * a * c, 0))) / (2 * a)
        v = m + alpha * d
        if (v >= 0).all():
            return v
        Z |= v < 0
        v[Z] = 0
        v[~Z] -= (v.sum() - L1) / (n - Z.sum())


@pytest.mark.parametrize("s", [0.1, 0.5, 0.8, 0.95])
def test_projection_reaches_sparseness_and_matches_reference(s):
    x = torch.randn(20, 4, dtype=torch.float64)
    y = project_sparseness(x, s, dim=1)
    assert y.shape == x.shape and bool((y >= 0).all())
    for r in range(4):
        assert float(sparseness(y[:, r])) == pytest.approx(s, abs=1e-8)
        assert float(y[:, r].norm()) == pytest.approx(float(x[:, r].norm()), rel=1e-8)
        np.testing.assert_allclose(y[:, r].numpy(), ref_project(x[:, r].numpy(), s), atol=1e-10)


def test_projection_other_dims_and_zero_slice():
    x = torch.rand(3, 2, 5, dtype=torch.float64)
    x[:, 1] = 0
    y = project_sparseness(x, 0.6, dim=1)
    assert float(sparseness(y[:, 0])) == pytest.approx(0.6, abs=1e-8)
    assert bool((y[:, 1] == 0).all())


@pytest.mark.parametrize("mode", ["multiplicative", "softplus"])
def test_sparsity_proj_trainer(mode):
    V = torch.rand(25, 12, dtype=torch.float64)
    m = NMF(V.shape, 3, mode=mode).double()
    raw = list(m.parameters())[0] if mode == "multiplicative" else m.parametrizations.W.original
    trainer = SparsityProj([raw], sparsity=0.6, dim=1)
    losses = []
    for _ in range(15):
        losses.append(float(trainer.step(lambda: beta_div(m(), V, 2))))
    for r in range(3):
        assert float(sparseness(m.W.detach()[:, r])) == pytest.approx(0.6, abs=1e-5)
    assert all(b <= a * (1 + 1e-10) for a, b in zip(losses[1:], losses[2:]))
    assert raw.grad is not None


def test_errors():
    p = torch.nn.Parameter(torch.rand(4, 2))
    with pytest.raises(ValueError, match="sparsity"):
        SparsityProj([p], sparsity=1.5)
    with pytest.raises(ValueError, match="max_iter"):
        SparsityProj([p], sparsity=0.5, max_iter=0)
    with pytest.raises(ValueError, match="closure"):
        SparsityProj([p], sparsity=0.5).step(None)
