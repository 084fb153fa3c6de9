"""Every entry point gives on a transposed, sliced or otherwise non-contiguous input what it
gives on the same values stored contiguously (issue 14: a beta=1 objective paired the
entries of a column-major V with those of a row-major reconstruction)."""
import numpy as np
import pytest
import torch

from torchnmf.history import History
from torchnmf.nmf import NMF
from torchnmf.trainer import BetaMu, OnlineMU
from torchnmf.updates import mu_statistics, mu_update

N, C, R = 12, 9, 3


def _forms(V: torch.Tensor):
    """(name, tensor) pairs holding ``V``'s values in different memory layouts."""
    big = torch.zeros(2 * N + 1, 3 * C, dtype=V.dtype)
    big[1::2, ::3] = V
    bigT = torch.zeros(3 * C, 2 * N, dtype=V.dtype)
    bigT[::3, ::2] = V.t()
    return [
        ("transposed", V.t().contiguous().t()),
        ("sliced", big[1::2, ::3]),
        ("sliced-transposed", bigT[::3, ::2].t()),
        ("column-slice", torch.cat([V, V], 1)[:, :C]),
    ]


FORMS = ["transposed", "sliced", "sliced-transposed", "column-slice"]


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.poisson(torch.rand(N, C, generator=g, dtype=dtype) * 4) + 0.5


def _form(V, name):
    out = dict(_forms(V))[name]
    assert torch.equal(out, V)
    assert not out.is_contiguous()
    return out


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("beta", [0, 0.5, 1, 1.5, 2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_mu_update_and_statistics(form, beta, masked):
    V = _data()
    Vs = _form(V, form)
    W, H = torch.rand(C, R, dtype=V.dtype), torch.rand(N, R, dtype=V.dtype)
    M = (torch.rand(N, C) > 0.3).double() if masked else None
    for args, ref_args in (((Vs, W, H), (V, W, H)), ((Vs.t(), H, W), (V.t().contiguous(), H, W))):
        m = None if M is None else (M if args[0].shape == M.shape else M.t())
        new, loss = mu_update(*args, beta=beta, mask=m, with_loss=True)
        ref, ref_loss = mu_update(*ref_args, beta=beta, mask=m, with_loss=True)
        torch.testing.assert_close(new, ref, rtol=1e-12, atol=0)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
        num, den, l2 = mu_statistics(*args, beta=beta, mask=m, with_loss=True)
        rnum, rden, rl2 = mu_statistics(*ref_args, beta=beta, mask=m, with_loss=True)
        torch.testing.assert_close((num, den, l2), (rnum, rden, rl2), rtol=1e-12, atol=0)


def test_mu_update_reused_cache_with_other_strides():
    # a cache filled for one layout must not be reused wrongly for another
    V = _data()
    W, H = torch.rand(C, R, dtype=V.dtype), torch.rand(N, R, dtype=V.dtype)
    cache: dict = {}
    for form in FORMS:
        Vs = _form(V, form)
        _, loss = mu_update(Vs.t(), H, W, beta=1, with_loss=True, cache={})
        _, ref = mu_update(V.t().contiguous(), H, W, beta=1, with_loss=True, cache=cache)
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("beta", [0.5, 1, 2])
@pytest.mark.parametrize("trainable_H", [True, False])
def test_nmf_fit_history(form, beta, trainable_H):
    V = _data()
    W0, H0 = torch.rand(C, R, dtype=V.dtype), torch.rand(N, R, dtype=V.dtype)
    runs = []
    for X in (V, _form(V, form)):
        m = NMF(W=W0, H=H0, trainable_H=trainable_H)
        h = History()
        m.fit(X, beta=beta, tol=0, max_iter=12, check_every=1, history=h)
        runs.append((m.W.detach(), m.H.detach(), list(h.values)))
        assert len(h.values) >= 12
    torch.testing.assert_close(runs[1][:2], runs[0][:2], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(runs[1][2], runs[0][2], rtol=1e-10)


@pytest.mark.parametrize("form", FORMS)
def test_nmf_fit_trainer_path(form):
    # softplus factors go through BetaMu, not the functional updates
    V = _data()
    W0, H0 = torch.rand(C, R, dtype=V.dtype) + 0.1, torch.rand(N, R, dtype=V.dtype) + 0.1
    out = []
    for X in (V, _form(V, form)):
        m = NMF(W=W0, H=H0, mode="softplus")
        m.fit(X, beta=1, tol=0, max_iter=5, check_every=1)
        out.append((m.W.detach(), m.H.detach()))
    torch.testing.assert_close(out[1], out[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
def test_nmf_transform(form):
    V = _data()
    m = NMF(W=torch.rand(C, R, dtype=V.dtype), H=torch.rand(N, R, dtype=V.dtype))
    H0 = torch.rand(N, R, dtype=V.dtype)
    ref = m.transform(V, H=H0, tol=0, max_iter=8)
    got = m.transform(_form(V, form), H=H0, tol=0, max_iter=8)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("beta", [0.5, 1, 2])
def test_online_mu_step(form, beta):
    V = _data()
    Vs = _form(V, form)
    W0 = torch.rand(C, R, dtype=V.dtype)
    H0 = torch.rand(N, R, dtype=V.dtype)
    out = []
    for X in (V, Vs):
        W, H = W0.clone(), H0.clone()
        opt = OnlineMU([W], beta=beta, n_samples=N, inner_iter=2)
        losses = [float(opt.step(lambda: (X[:6], H[:6]))), float(opt.step(lambda: (X[6:], H[6:])))]
        out.append((W, H, losses))
    torch.testing.assert_close(out[1][:2], out[0][:2], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out[1][2], out[0][2], rtol=1e-10)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("beta", [0.5, 1, 2])
def test_beta_mu(form, beta):
    V = _data()
    out = []
    for X in (V, _form(V, form)):
        torch.manual_seed(3)
        m = NMF((N, C), rank=R)
        opt = BetaMu(m.parameters(), beta=beta)
        for _ in range(3):
            opt.step(lambda: (X, m()))
        out.append((m.W.detach(), m.H.detach()))
    torch.testing.assert_close(out[1], out[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", ["transposed", "sliced"])
def test_estimators(form):
    pytest.importorskip("sklearn")
    from torchnmf.estimators import BetaNMF, GammaPoissonFactorization, PNMF

    V = _data() - 0.5  # integer counts for the Poisson models
    Vs = _form(V, form)
    for make in (lambda: BetaNMF(n_components=R, max_iter=10, tol=0, random_state=0, device="cpu"),
                 lambda: BetaNMF(n_components=R, beta_loss=2, max_iter=10, tol=0, random_state=0, device="cpu"),
                 lambda: GammaPoissonFactorization(n_components=R, max_iter=5, tol=0, random_state=0,
                                                   device="cpu", dtype=torch.float64),
                 lambda: PNMF(n_components=R, max_iter=5, tol=0, random_state=0, dtype=torch.float64)):
        ref = make().fit(V)
        got = make().fit(Vs)
        np.testing.assert_allclose(got.components_, ref.components_, rtol=1e-8, atol=1e-10,
                                   err_msg=type(ref).__name__)
        # numpy views (a transposed / strided ndarray) as well
        got_np = make().fit(Vs.numpy())
        np.testing.assert_allclose(got_np.components_, ref.components_, rtol=1e-8, atol=1e-10,
                                   err_msg=type(ref).__name__)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", ["random", "nndsvd", "nndsvda"])
def test_initialize(form, method):
    from torchnmf.init import initialize

    V = _data()
    W, H = initialize(V, R, method=method, random_state=0)
    Ws, Hs = initialize(_form(V, form), R, method=method, random_state=0)
    torch.testing.assert_close((Ws, Hs), (W, H), rtol=1e-8, atol=1e-10)
