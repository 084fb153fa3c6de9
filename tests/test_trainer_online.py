"""OnlineMU: a numpy reference, scikit-learn's MiniBatchNMF, the full-batch limit, bad input."""
import warnings

import numpy as np
import pytest
import torch

from torchnmf.constraints import positive
from torchnmf.nmf import NMF
from torchnmf.trainer import OnlineMU
from torchnmf.updates import mu_update

F64 = torch.float64


def _problem(N=30, C=8, R=3, seed=0):
    rng = np.random.default_rng(seed)
    V = rng.poisson(3.0, size=(N, C)).astype(float) + 0.25
    H = rng.random((N, R)) + 0.1
    W = rng.random((C, R)) + 0.1
    return V, H, W


def _gamma(beta):
    return 1 / (2 - beta) if beta < 1 else (1 / (beta - 1) if beta > 2 else 1.0)


def _reference(V, H, W, beta, rho, batches, inner, l1=0.0, l2=0.0):
    """Slow online MU (Lefèvre et al. 2011) in numpy, loops over entries for the statistics."""
    eps = np.finfo(np.float32).eps
    H, W = H.copy(), W.copy()
    g = _gamma(beta)
    A, B = W.copy(), np.ones_like(W)
    losses = []
    for rows in batches:
        Vb, Hb = V[rows], H[rows]
        for _ in range(inner):
            Y = np.maximum(Hb @ W.T, eps) if beta < 2 else Hb @ W.T
            num = (V[rows] * Y ** (beta - 2)) @ W
            den = Y ** (beta - 1) @ W + l1 + l2 * Hb
            den[den == 0] = eps
            Hb = Hb * (num / den) ** g
            if beta < 1:
                Hb[Hb < np.finfo(float).eps] = 0
        H[rows] = Hb
        Y = Hb @ W.T
        Yc = np.maximum(Y, eps) if beta < 2 else Y
        numW, denW = np.zeros_like(W), np.zeros_like(W)
        for n in range(len(rows)):
            for c in range(W.shape[0]):
                numW[c] += Vb[n, c] * Yc[n, c] ** (beta - 2) * Hb[n]
                denW[c] += Yc[n, c] ** (beta - 1) * Hb[n]
        if beta == 1:
            loss = np.sum(Vb * np.log(Vb / Yc) - Vb + Yc)
        elif beta == 2:
            loss = 0.5 * np.sum((Vb - Y) ** 2)
        else:
            loss = np.sum(Vb ** beta + (beta - 1) * Yc ** beta - beta * Vb * Yc ** (beta - 1)) / (beta * (beta - 1))
        losses.append(loss)
        denW = denW + l1 + l2 * W
        denW[denW == 0] = eps
        A = rho * A + numW * W ** (1 / g)
        B = rho * B + denW
        W = (A / B) ** g
        if beta <= 1:
            W[W < np.finfo(float).eps] = 0
    return H, W, losses


@pytest.mark.parametrize("beta", [0.5, 1.0, 1.5, 2.0, 3.0])
def test_matches_numpy_reference(beta):
    V, H0, W0 = _problem()
    batches = [np.arange(s, s + 7) for s in range(0, 28, 7)] + [np.array([28, 29, 3])]
    rho = 0.6 ** (7 / 30)
    Hr, Wr, losses = _reference(V, H0, W0, beta, rho, batches, inner=2, l1=0.05, l2=0.1)
    Vt, H, W = torch.tensor(V), torch.tensor(H0), torch.tensor(W0)
    opt = OnlineMU([W], beta=beta, forget_factor=0.6, n_samples=30, inner_iter=2, l1=0.05, l2=0.1)
    got = []
    for rows in batches[:-1]:
        Hb = H[rows[0]:rows[-1] + 1]  # a view: the step writes the fitted rows back into H
        got.append(float(opt.step(lambda: (Vt[rows[0]:rows[-1] + 1], Hb))))
    idx = torch.as_tensor(batches[-1])
    Hb = H[idx]
    opt.param_groups[0]["n_samples"] = None  # rho = forget_factor per step from here on
    opt.param_groups[0]["forget_factor"] = rho
    got.append(float(opt.step(lambda: (Vt[idx], Hb))))
    H[idx] = Hb
    np.testing.assert_allclose(W.numpy(), Wr, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(H.numpy(), Hr, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(got, losses, rtol=1e-10)
    assert opt.state[W]["step"] == 5


@pytest.mark.parametrize("beta", [1.0, 2.0, 0.5])
def test_matches_scikit_learn_minibatch_nmf(beta):
    sk = pytest.importorskip("sklearn.decomposition")
    V, H0, W0 = _problem(N=40, C=12, R=3, seed=1)
    m = sk.MiniBatchNMF(3, init="custom", batch_size=10, beta_loss=beta, max_iter=3, tol=0, max_no_improvement=None,
                        forget_factor=0.6, fresh_restarts=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        H_sk = m.fit_transform(V, W=H0.copy(), H=W0.T.copy())  # scikit-learn writes V ≈ W_sk H_sk
    Vt, H, W = torch.tensor(V), torch.tensor(H0), torch.tensor(W0)
    opt = OnlineMU([W], beta=beta, forget_factor=0.6, n_samples=40)
    for _ in range(3):
        for s in range(0, 40, 10):
            Hb = H[s:s + 10]
            opt.step(lambda: (Vt[s:s + 10], Hb))
    np.testing.assert_allclose(W.numpy(), m.components_.T, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(H.numpy(), H_sk, rtol=1e-9, atol=1e-12)


def test_no_forgetting_on_the_full_data_is_plain_mu_and_monotone():
    V, H0, W0 = _problem()
    for beta in (1.0, 2.0, 0.5, 3.0):
        Vt, H, W = torch.tensor(V), torch.tensor(H0), torch.tensor(W0)
        opt = OnlineMU([W], beta=beta, forget_factor=0.0)
        Href, Wref = H.clone(), W.clone()
        losses = []
        for _ in range(15):
            losses.append(float(opt.step(lambda: (Vt, H))))
            Href = mu_update(Vt, Wref, Href, beta)
            if beta < 1:
                Href.masked_fill_(Href < np.finfo(float).eps, 0)
            Wref = mu_update(Vt.t(), Href, Wref, beta)
            if beta <= 1:
                Wref.masked_fill_(Wref < np.finfo(float).eps, 0)
        torch.testing.assert_close(W, Wref, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(H, Href, rtol=1e-10, atol=1e-13)
        assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:])), (beta, losses)


def test_sparse_and_masked_batches():
    V, H0, W0 = _problem()
    V[V < 2] = 0
    Vt = torch.tensor(V)
    dense_W, sparse_W = torch.tensor(W0), torch.tensor(W0)
    Hd, Hs = torch.tensor(H0[:10]), torch.tensor(H0[:10])
    a = OnlineMU([dense_W], beta=1, inner_iter=3)
    b = OnlineMU([sparse_W], beta=1, inner_iter=3)
    la = a.step(lambda: (Vt[:10], Hd))
    lb = b.step(lambda: (Vt[:10].to_sparse_csr(), Hs))
    torch.testing.assert_close(sparse_W, dense_W, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(Hs, Hd, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(la, lb, rtol=1e-10, atol=0)
    # a mask: unobserved entries do not count, whatever value they hold
    mask = torch.ones(10, 8, dtype=torch.bool)
    mask[2, 3] = False
    W1, W2 = torch.tensor(W0), torch.tensor(W0)
    H1, H2 = torch.tensor(H0[:10]), torch.tensor(H0[:10])
    V2 = Vt[:10].clone()
    V2[2, 3] = 1e6
    OnlineMU([W1]).step(lambda: (Vt[:10], H1, mask))
    OnlineMU([W2]).step(lambda: (V2, H2, mask))
    torch.testing.assert_close(W1, W2)
    torch.testing.assert_close(H1, H2)


def test_any_positivity_mode_and_state_dict_round_trip():
    V, H0, W0 = _problem()
    Vt = torch.tensor(V)
    plain = torch.tensor(W0)
    m = NMF(W=torch.tensor(W0), mode="softplus")
    a = OnlineMU([plain], forget_factor=0.5)
    b = OnlineMU([m.parametrizations.W.original], forget_factor=0.5)
    for s in range(0, 30, 10):
        H1, H2 = torch.tensor(H0[s:s + 10]), torch.tensor(H0[s:s + 10])
        a.step(lambda: (Vt[s:s + 10], H1))
        b.step(lambda: (Vt[s:s + 10], H2))
    torch.testing.assert_close(m.W.detach(), plain, rtol=1e-8, atol=1e-10)
    # resuming from a state dict continues exactly
    W_copy = plain.clone()
    c = OnlineMU([W_copy], forget_factor=0.5)
    c.load_state_dict(a.state_dict())
    H1, H2 = torch.tensor(H0[:10]), torch.tensor(H0[:10])
    a.step(lambda: (Vt[:10], H1))
    c.step(lambda: (Vt[:10], H2))
    assert torch.equal(plain, W_copy)


def test_bad_input_raises_before_any_change():
    V, H0, W0 = _problem()
    W = torch.tensor(W0)
    Vt, H = torch.tensor(V[:5]), torch.tensor(H0[:5])
    before = (W.clone(), Vt.clone(), H.clone())
    with pytest.raises(ValueError, match="exactly one parameter"):
        OnlineMU([W, torch.tensor(W0)])
    with pytest.raises(ValueError, match="exactly one parameter"):
        OnlineMU([torch.ones(3)])
    with pytest.raises(ValueError, match="forget_factor"):
        OnlineMU([W], forget_factor=1.5)
    with pytest.raises(ValueError, match="inner_iter"):
        OnlineMU([W], inner_iter=0)
    with pytest.raises(TypeError, match="beta"):
        OnlineMU([W], beta="kl")
    with pytest.raises(ValueError, match="n_samples"):
        OnlineMU([W], n_samples=-3)
    opt = OnlineMU([W])
    with pytest.raises(ValueError, match="closure"):
        opt.step(None)
    with pytest.raises(TypeError, match="closure must return"):
        opt.step(lambda: Vt)
    with pytest.raises(ValueError, match="H_b"):
        opt.step(lambda: (Vt, H[:, :2]))
    with pytest.raises(TypeError, match="dtype"):
        opt.step(lambda: (Vt, H.float()))
    with pytest.raises(ValueError, match="V_b has shape"):
        opt.step(lambda: (Vt[:4], H))
    with pytest.raises(ValueError, match="non-negative"):
        opt.step(lambda: (-Vt, H))
    with pytest.raises(ValueError, match="H_b must be non-negative"):
        opt.step(lambda: (Vt, -H))
    with pytest.raises(ValueError, match="mask_b"):
        opt.step(lambda: (Vt, H, torch.ones(2, 2)))
    assert torch.equal(W, before[0]) and torch.equal(Vt, before[1]) and torch.equal(H, before[2])
    assert not opt.state[W]


def test_non_finite_divergence_is_reported():
    W = torch.tensor([[1.0], [1.0]], dtype=F64)
    opt = OnlineMU([W], beta=1)
    V = torch.tensor([[1e308, 1e308]], dtype=F64)
    H = torch.tensor([[1e308]], dtype=F64)
    with pytest.raises(FloatingPointError, match="divergence"):
        opt.step(lambda: (V, H))


def test_positive_parameter_value_is_updated_in_place():
    m = torch.nn.Module()
    m.W = torch.nn.Parameter(torch.rand(8, 3, dtype=F64))
    positive(m, "W", "multiplicative")
    raw = m.W
    V, H0, _ = _problem()
    H = torch.tensor(H0[:6])
    OnlineMU(m.parameters()).step(lambda: (torch.tensor(V[:6]), H))
    assert m.W is raw and bool((raw >= 0).all())


@pytest.mark.parametrize("beta", [1, 2, 1.5])
def test_a_sparse_batch_taken_in_parts_equals_the_dense_step(beta):
    """A CSR batch of more non-zeros than OnlineMU's parts (32,768): the same H, W and divergence as dense."""
    from torchnmf.trainer import online

    g = torch.Generator().manual_seed(0)
    V = torch.rand(300, 160, generator=g, dtype=torch.float64)
    V[V < 0.2] = 0
    assert int((V != 0).sum()) > online._NNZ_BLOCK  # two parts at least
    results = []
    for X in (V, V.to_sparse_csr()):
        W = torch.rand(160, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        H = torch.rand(300, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        opt = OnlineMU([W], beta=beta, n_samples=600, inner_iter=3)
        loss = opt.step(lambda: (X, H))
        results.append((H, W, loss))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
