"""GammaChain: a deep Poisson chain with fit (through the engine) and transform, used like one layer."""
import warnings

import numpy as np
import pytest
import torch

from torchnmf.engine import ConvergenceWarning
from torchnmf.poisson import GammaChain, GammaNMF
from torchnmf.trainer import CAVI


def planted(N=40, C=24, seed=0):
    """Counts of a depth-2 chain with block-disjoint factors (4 topics, 2 super-topics): H is well determined."""
    g = np.random.RandomState(seed)
    W2 = np.zeros((C, 4))
    for k in range(4):
        W2[k * C // 4:(k + 1) * C // 4, k] = g.uniform(0.5, 1.5, C // 4)
    W1 = np.array([[1.0, 0], [0.8, 0], [0, 1.0], [0, 0.6]])
    H = g.gamma(2.0, 2.0, size=(N, 2))
    return torch.from_numpy(g.poisson(H @ W1.T @ W2.T * 3).astype(np.float64))


def chain_for(X, seed=0):
    g = torch.Generator().manual_seed(seed)
    return GammaChain(GammaNMF((X.shape[0], 4), rank=2, dtype=torch.float64, generator=g),
                      GammaNMF(W=(X.shape[1], 4), dtype=torch.float64, generator=g))


def test_fit_runs_the_engine_and_matches_the_hand_loop():
    X = planted()
    chain, hand = chain_for(X), chain_for(X)
    history = chain.fit(X, max_iter=15, tol=0)
    trainer = CAVI(hand.parameters())
    elbos = [float(trainer.step(lambda: (X, hand(None))).total) for _ in range(15)]
    assert len(history) == 15 and history.steps == list(range(15)) and history.maximize
    np.testing.assert_allclose(history.values, elbos, rtol=1e-10)  # the same sweeps, recorded by the engine
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(history.values, history.values[1:]))
    # the stop rule ends it before max_iter, without a warning; max_iter first warns at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        h = chain_for(X).fit(X, max_iter=2000, tol=1e-4)
    assert h.converged_ and len(h) < 2000 and h.changes[-1] <= 1e-4
    with pytest.warns(ConvergenceWarning, match="GammaChain.fit reached max_iter=3") as rec:
        chain_for(X).fit(X, max_iter=3, tol=1e-12)
    assert rec[0].filename == __file__


def test_transform_of_the_training_rows_gives_the_fitted_loadings():
    X = planted()
    chain = chain_for(X)
    chain.fit(X, max_iter=2000, tol=1e-5)
    H = chain[0].H
    before = {k: v.clone() for k, v in chain.state_dict().items()}
    U = chain.transform(X, max_iter=300)
    assert U.shape == H.shape and not U.requires_grad
    assert float((U - H).norm() / H.norm()) < 0.05
    for k, v in chain.state_dict().items():  # the fitted chain is not changed
        assert torch.equal(v, before[k]), k
    assert chain.transform(X[:0]).shape == (0, 2)
    with pytest.raises(ValueError, match="X"):
        chain.transform(X[:, :5])


def test_factors_convert_with_numpy_and_need_a_gamma_first_layer():
    X = planted()
    chain = chain_for(X)
    chain.fit(X, max_iter=3, tol=0)
    H, W1, W2 = chain[0].H.numpy(), chain[0].W.numpy(), chain[1].W.numpy()  # posterior means, no .detach()
    assert H.shape == (40, 2) and W1.shape == (4, 2) and W2.shape == (24, 4)
    assert chain[0].mean("H").requires_grad  # the differentiable one is still there
    with pytest.raises(TypeError, match="first layer must be a GammaNMF holding both H and W"):
        GammaChain(GammaNMF(W=(24, 4))).fit(X)
