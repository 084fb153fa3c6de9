import copy

import numpy as np
import pytest
import torch

from torchnmf import PLCA, SIPLCA, SIPLCA2, SIPLCA3
from torchnmf.history import History


def ref_em_step(V, W, H, Z):
    """One EM step of PLCA in numpy, through the posteriors P(z | n, c)."""
    V, W, H, Z = (np.asarray(x, dtype=np.float64) for x in (V, W, H, Z))
    Vn = V / V.sum()
    joint = H[:, None, :] * W[None, :, :] * Z[None, None, :]  # (N, C, R)
    post = joint / joint.sum(2, keepdims=True)
    q = Vn[:, :, None] * post
    Wn = q.sum(0)
    Hn = q.sum(1)
    Zn = q.sum((0, 1))
    return Wn / Wn.sum(0), Hn / Hn.sum(0), Zn / Zn.sum()


def test_em_step_matches_reference():
    V = torch.rand(9, 7, dtype=torch.float64)
    m = PLCA(V.shape, 3)
    m = m.double()
    W, H, Z = ref_em_step(V, m.W.detach(), m.H.detach(), m.Z.detach())
    n_iter, norm = m.fit(V, tol=0, max_iter=1)
    assert n_iter == 1 and float(norm) == pytest.approx(float(V.sum()))
    np.testing.assert_allclose(m.W.detach().numpy(), W, rtol=1e-10)
    np.testing.assert_allclose(m.H.detach().numpy(), H, rtol=1e-10)
    np.testing.assert_allclose(m.Z.detach().numpy(), Z, rtol=1e-10)


@pytest.mark.parametrize("cls,vshape,kw", [
    (PLCA, (12, 8), {}),
    (SIPLCA, (3, 5, 12), {"T": 3}),
    (SIPLCA2, (2, 3, 6, 5), {"kernel_size": 2}),
    (SIPLCA3, (2, 2, 4, 4, 3), {"kernel_size": (2, 2, 1)}),
])
def test_fit_monotone_and_normalised(cls, vshape, kw):
    V = torch.rand(*vshape, dtype=torch.float64)
    V0 = V.clone()
    m = cls(vshape, 3, **kw).double()
    h = History()
    n_iter, norm = m.fit(V, tol=0, max_iter=15, history=h)
    assert n_iter == 15 and len(h) == 16
    assert all(b <= a + 1e-12 for a, b in zip(h.values, h.values[1:]))
    assert torch.equal(V, V0)
    assert m().shape == V.shape
    torch.testing.assert_close(m().sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(m.Z.sum(), torch.tensor(1.0, dtype=torch.float64))
    dims = tuple(d for d in range(V.dim()) if d != 1)
    torch.testing.assert_close(m.W.sum(dims), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(m.H.sum(dims), torch.ones(3, dtype=torch.float64))


def test_sparse_prior_and_fixed_factor():
    V = torch.rand(20, 10, dtype=torch.float64)
    a = PLCA(V.shape, 3).double()
    b = copy.deepcopy(a)
    a.fit(V, tol=0, max_iter=30)
    b.fit(V, tol=0, max_iter=30, W_alpha=0.99)
    # alpha < 1 sparsifies on the scale of V / sum(V) (pytorch-NMF 0.3.5's): entries pushed
    # below zero sit at the floor instead of 0, so no component is lost for good
    from torchnmf.metrics import sparseness
    floored = (b.W <= 1e-5).sum()  # the floor, renormalised
    assert floored > (a.W <= 1e-5).sum() and floored > 0
    assert bool((b.W > 0).all())
    assert float(sparseness(b.W)) > float(sparseness(a.W))
    torch.testing.assert_close(b.W.sum(0), torch.ones(3, dtype=torch.float64))
    c = PLCA(V.shape, 3, trainable_W=False).double()
    W0 = c.W.detach().clone()
    c.fit(V, max_iter=5)
    assert torch.equal(c.W, W0)


def test_tol_and_errors():
    V = torch.rand(10, 6, dtype=torch.float64)
    m = PLCA(V.shape, 2).double()
    n_iter, _ = m.fit(V, tol=1e-2, max_iter=500)
    assert n_iter < 500
    with pytest.raises(ValueError, match="V"):
        m.fit(-V)
    with pytest.raises(ValueError, match="V"):
        m.fit(V[:, :3])
    with pytest.raises(ValueError, match="sum"):
        m.fit(V * 0)
    with pytest.raises(ValueError, match="W_alpha"):
        m.fit(V, W_alpha=0)
    with pytest.raises(ValueError, match="Z"):
        PLCA(W=torch.rand(6, 2), Z=torch.rand(3))
    with pytest.raises(ValueError, match="rank"):
        PLCA((10, 6), 0)


def test_state_dict_roundtrip():
    m = SIPLCA((2, 3, 8), 2, T=3).double()
    m2 = SIPLCA((2, 3, 8), 2, T=3).double()
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m(), m2())
