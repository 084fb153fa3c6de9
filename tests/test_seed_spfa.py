"""The sparse Poisson factor analysis notes (../shared/seeds/sparse-poisson-factor-analysis.txt).

The notes' two simulations run with their class definitions replaced by the import of
torchnmf.compat.spfa and fewer epochs; the fits recover the simulated non-zero pattern of l and f
better than chance (area under the ROC curve of the posterior inclusion probabilities > 0.5).
"""
import builtins

import numpy as np
import pytest
import torch

from torchnmf.compat.spfa import SFA, SPFA, NonFiniteLossError, SpikeSlab


def _simulate(poisson: bool):
    """The notes' simulation code, verbatim but for the sizes."""
    rng = np.random.default_rng(1)
    n = 100
    p = 200  # 500 in the notes
    k = 3
    pi0 = [0.1, 0.9, 0.99]
    sa = np.array([[.5, 1, 2]])
    l = np.zeros((n, k))
    zl = rng.uniform(size=(n, k)) > pi0
    l[zl] = rng.normal(size=(n, k), scale=sa)[zl]
    f = np.zeros((p, k))
    zf = rng.uniform(size=(p, k)) > pi0
    f[zf] = rng.normal(size=(p, k), scale=sa)[zf]
    if poisson:
        lam = np.log1p(np.exp(l @ f.T))
        x = rng.poisson(lam)
    else:
        x = rng.normal(loc=l @ f.T)
    return n, p, k, l, f, x, zl, zf


def _auc(score, truth):
    """Mann-Whitney AUC of ``score`` for the positives of ``truth`` (0.5 is chance)."""
    score, truth = np.asarray(score).ravel(), np.asarray(truth).ravel().astype(bool)
    pos, neg = score[truth], score[~truth]
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return greater + 0.5 * ties


def _pattern_auc(fit, zl, zf):
    pip_l = torch.sigmoid(fit.l.logits).detach().numpy()
    pip_f = torch.sigmoid(fit.f.logits).detach().numpy()
    # column 0 of the simulation is 90% non-zero, column 2 1%: score the pooled entries
    return _auc(np.concatenate([pip_l.ravel(), pip_f.ravel()]), np.concatenate([zl.ravel(), zf.ravel()]))


def test_sanity_check_gaussian(tmp_path):
    torch.manual_seed(0)
    n, p, k, l, f, x, zl, zf = _simulate(poisson=False)
    x0 = x.copy()
    l_init, f_init = torch.tensor(l), torch.tensor(f)
    l_copy = l_init.clone()
    fit = (SFA(n=n, p=p, k=k)
           .fit(torch.tensor(x, dtype=torch.float), init=(l_init, f_init), n_epochs=300,
                log_dir=str(tmp_path / 'runs/spfa/norm-1/')))
    assert isinstance(fit, SFA) and isinstance(fit.l, SpikeSlab)
    assert np.array_equal(x, x0) and torch.equal(l_init, l_copy)
    assert fit.l.mean.dtype == torch.float32  # init copied in the parameters' dtype
    elbo = np.array([float(r) for r in fit.history_])
    assert len(elbo) == 300 and np.isfinite(elbo).all()
    assert elbo[-50:].mean() > elbo[:50].mean()
    auc = _pattern_auc(fit, zl, zf)
    print(f"SFA non-zero pattern AUC: {auc:.3f}")
    assert auc > 0.55
    # the means started at the truth and stay close where the truth is non-zero
    pm = (torch.sigmoid(fit.l.logits) * fit.l.mean).detach().numpy()
    assert np.corrcoef(pm[:, 0], l[:, 0])[0, 1] > 0.8
    # TensorBoard scalars: the ELBO and its parts, one per epoch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / 'runs/spfa/norm-1/'))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"loss/elbo", "loss/err", "loss/kl_l", "loss/kl_f"}
    scalars = acc.Scalars("loss/elbo")
    assert len(scalars) == 300 and scalars[-1].step == 299
    assert scalars[-1].value == pytest.approx(float(fit.history_[-1]), rel=1e-5)


def test_simulated_example_poisson_softplus():
    torch.manual_seed(0)
    n, p, k, l, f, x, zl, zf = _simulate(poisson=True)
    fit = (SPFA(n=n, p=p, k=k)
           .fit(torch.tensor(x, dtype=torch.float), s=torch.ones([x.shape[0], 1]),
                init=(torch.tensor(l), torch.tensor(f)), n_epochs=300))
    assert isinstance(fit, SPFA)
    elbo = np.array([float(r) for r in fit.history_])
    assert np.isfinite(elbo).all() and elbo[-50:].mean() > elbo[:50].mean()
    auc = _pattern_auc(fit, zl, zf)
    print(f"SPFA non-zero pattern AUC: {auc:.3f}")
    assert auc > 0.55


def test_log_dir_without_tensorboard_says_so(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    x = torch.randn(5, 4)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        SFA(n=5, p=4, k=2).fit(x, n_epochs=2, log_dir=str(tmp_path / "tb"))
    SFA(n=5, p=4, k=2).fit(x, n_epochs=2)  # no log_dir: no tensorboard needed


def test_nonfinite_loss_names_the_epoch_and_keeps_last_finite_state():
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    m = SFA(n=6, p=5, k=2)
    m.fit(x, n_epochs=3)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    calls = {"n": 0}
    forward = m.forward

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = forward(*args, **kwargs)
        return out * float("nan") if calls["n"] == 3 else out

    m.forward = poisoned
    with pytest.raises(NonFiniteLossError, match="epoch 2") as info:
        m.fit(x, n_epochs=10)
    assert isinstance(info.value, RuntimeError)  # what the notes raise
    assert all(bool(torch.isfinite(v).all()) for v in m.state_dict().values())
    assert any(not torch.equal(state[k], v) for k, v in m.state_dict().items())  # two epochs were applied
    assert len(m.history_) == 2  # the records of the finite epochs


def test_bad_input_is_refused():
    x = torch.poisson(torch.full((6, 5), 2.0))
    x0 = x.clone()
    with pytest.raises(ValueError, match="shape"):
        SPFA(n=6, p=5, k=2).fit(x[:, :4], s=torch.ones(6, 1), n_epochs=1)
    with pytest.raises(ValueError, match="s must have shape"):
        SPFA(n=6, p=5, k=2).fit(x, s=torch.ones(6), n_epochs=1)
    with pytest.raises(ValueError, match="positive"):
        SPFA(n=6, p=5, k=2).fit(x, s=torch.zeros(6, 1), n_epochs=1)
    with pytest.raises(ValueError, match="non-negative"):
        SPFA(n=6, p=5, k=2).fit(-x, s=torch.ones(6, 1), n_epochs=1)
    with pytest.raises(ValueError, match="init l"):
        SFA(n=6, p=5, k=2).fit(x, init=(torch.zeros(5, 2), torch.zeros(5, 2)), n_epochs=1)
    with pytest.raises(TypeError, match="x must be a tensor"):
        SFA(n=6, p=5, k=2).fit(x.numpy(), n_epochs=1)
    with pytest.raises(ValueError, match="n_epochs"):
        SFA(n=6, p=5, k=2).fit(x, n_epochs=0)
    with pytest.raises(ValueError, match="k"):
        SFA(n=6, p=5, k=0)
    assert torch.equal(x, x0)


@pytest.mark.parametrize("kind", ["requires_grad", "parameter"])
def test_an_input_that_requires_grad_is_left_alone(kind):
    # issue 22 item 6: the fit's backward wrote into the caller's x.grad
    X = torch.poisson(torch.full((10, 6), 2.0, dtype=torch.float64), generator=torch.Generator().manual_seed(0))
    x = torch.nn.Parameter(X.clone()) if kind == "parameter" else X.clone().requires_grad_(True)
    s = torch.ones(10, 1, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    SPFA(10, 6, 2).fit(x, s, n_epochs=3)
    torch.manual_seed(0)
    SFA(10, 6, 2).fit(x, n_epochs=3)
    assert x.grad is None and s.grad is None and torch.equal(x.detach(), X)


def _numpy_spike_slab_kl(logits, mean, log_prec, prior_logodds, log_prior_prec):
    """KL(q || p) of q = pip N(mean, 1/prec) + (1 - pip) δ0 and p = π N(0, 1/prec0) + (1 - π) δ0,
    written out from first principles.

    Both measures are a point mass at 0 plus a density, so the log density ratio is
    log((1-pip)/(1-π)) at 0 and log(pip N(m; mean, 1/prec) / (π N(m; 0, 1/prec0))) elsewhere:
    KL = (1-pip) log((1-pip)/(1-π)) + pip log(pip/π) + pip E_N[log N(m; mean, 1/prec) - log N(m; 0, 1/prec0)],
    and with E[m] = mean, E[m²] = mean² + 1/prec under the slab, that last expectation is
    ½ log prec - ½ (prec · 1/prec) - ½ log prec0 + ½ prec0 (mean² + 1/prec)
    = ½ (log prec - log prec0 + prec0 (mean² + 1/prec) - 1).
    """
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    pip, pi = sig(logits), sig(prior_logodds)
    prec, prec0 = np.exp(log_prec), np.exp(log_prior_prec)
    gauss = 0.5 * (log_prec - log_prior_prec + prec0 * (mean ** 2 + 1 / prec) - 1)
    return (pip * np.log(pip / pi) + (1 - pip) * np.log((1 - pip) / (1 - pi)) + pip * gauss).sum()


def _notes_kl(logits, mean, log_prec, prior_logodds, log_prior_prec):
    """The notes' SpikeSlab.forward expression (numpy)."""
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    pip, prec = sig(logits), np.exp(log_prec)
    return (pip * np.log(pip / sig(prior_logodds)) + (1 - pip) * np.log((1 - pip) / sig(-prior_logodds))
            + .5 * pip * (1 + log_prec - log_prior_prec + np.exp(log_prior_prec) * (mean ** 2 + 1 / prec))).sum()


def test_spike_slab_kl_is_the_exact_one_and_the_notes_differ_by_sum_pip():
    torch.manual_seed(0)
    m = SpikeSlab(7, 3).double()
    with torch.no_grad():
        m.log_prec.normal_()
    params = [getattr(m, n).detach().numpy() for n in ("logits", "mean", "log_prec", "prior_logodds",
                                                         "log_prior_prec")]
    exact = _numpy_spike_slab_kl(*params)
    # the slab term by quadrature: the closed form above is the integral it claims to be
    grid = np.linspace(-40, 40, 400001)
    mu, lp, lp0 = params[1][0, 0], params[2][0, 0], params[4][0, 0]
    logq = 0.5 * lp - 0.5 * np.log(2 * np.pi) - 0.5 * np.exp(lp) * (grid - mu) ** 2
    logp = 0.5 * lp0 - 0.5 * np.log(2 * np.pi) - 0.5 * np.exp(lp0) * grid ** 2
    quad = np.trapezoid(np.exp(logq) * (logq - logp), grid)
    assert quad == pytest.approx(0.5 * (lp - lp0 + np.exp(lp0) * (mu ** 2 + np.exp(-lp)) - 1), rel=1e-8)
    # ours is the exact KL; the notes' is larger by the sum of the inclusion probabilities
    with torch.no_grad():
        _, _, kl = m()
    assert float(kl) == pytest.approx(exact, rel=1e-10)
    pip_sum = float(torch.sigmoid(m.logits).sum())
    assert _notes_kl(*params) == pytest.approx(exact + pip_sum, rel=1e-10)


def test_logged_kl_and_elbo_are_the_exact_ones(tmp_path):
    """What the fit logs (TensorBoard and history_) uses the exact KL at the epoch's parameters."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    x = torch.randn(6, 5)
    m = SFA(n=6, p=5, k=2)
    params = {n: [getattr(mod, n).detach().double().numpy().copy() for mod in (m.l, m.f)]
              for n in ("logits", "mean", "log_prec", "prior_logodds", "log_prior_prec")}
    m.fit(x, n_epochs=1, log_dir=str(tmp_path))
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    for i, tag in enumerate(("loss/kl_l", "loss/kl_f")):
        exact = _numpy_spike_slab_kl(*(params[n][i] for n in params))
        assert acc.Scalars(tag)[0].value == pytest.approx(exact, rel=1e-5), tag
    err = acc.Scalars("loss/err")[0].value
    kls = sum(acc.Scalars(t)[0].value for t in ("loss/kl_l", "loss/kl_f"))
    assert acc.Scalars("loss/elbo")[0].value == pytest.approx(err - kls, rel=1e-5)
    assert float(m.history_[0]) == pytest.approx(err - kls, rel=1e-5)


def test_errors_are_the_notes_types_and_ours():
    """The notes raise AssertionError (asserts on x and s, NaN KL) and RuntimeError('nan loss')."""
    from torchnmf.compat.spfa import InputError, InputTypeError, NonFiniteInputError

    x = torch.poisson(torch.full((6, 5), 2.0))
    nan_x = x.clone()
    nan_x[0, 0] = float("nan")
    for cls, call in ((SFA, lambda m, x: m.fit(x, n_epochs=1)),
                      (SPFA, lambda m, x: m.fit(x, torch.ones(6, 1), n_epochs=1))):
        with pytest.raises(NonFiniteInputError) as info:
            call(cls(n=6, p=5, k=2), nan_x)
        assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
        with pytest.raises(InputTypeError) as info:
            call(cls(n=6, p=5, k=2), x.numpy())
        assert isinstance(info.value, TypeError) and isinstance(info.value, AssertionError)
    for bad in (torch.ones(6), torch.zeros(6, 1), -torch.ones(6, 1), torch.full((6, 1), float("nan"))):
        with pytest.raises(InputError, match="s must") as info:
            SPFA(n=6, p=5, k=2).fit(x, bad, n_epochs=1)
        assert isinstance(info.value, ValueError) and isinstance(info.value, AssertionError)
    with pytest.raises(InputTypeError, match="s must") as info:
        SPFA(n=6, p=5, k=2).fit(x, torch.ones(6, 1).numpy(), n_epochs=1)
    assert isinstance(info.value, AssertionError)
    # divergence: the notes' RuntimeError('nan loss') or their NaN-KL assert
    torch.manual_seed(0)
    for make in (lambda: SFA(n=6, p=5, k=2).fit(x * 1e3, n_epochs=50, lr=1e3),
                 lambda: SPFA(n=6, p=5, k=2).fit(x * 100, torch.ones(6, 1), n_epochs=50, lr=10)):
        with pytest.raises(NonFiniteLossError) as info:
            make()
        assert isinstance(info.value, RuntimeError) and isinstance(info.value, AssertionError)
    m = SpikeSlab(4, 2)
    with torch.no_grad():
        m.mean[0, 0] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        m()


# -- issue 22.10: complex input is refused, not cut to its real part ----------------------------
def test_complex_input_is_refused_by_name():
    x = torch.ones(6, 4, dtype=torch.complex64)
    with pytest.raises(TypeError, match="x must hold real numbers, got dtype torch.complex64"):
        SFA(6, 4, 2).fit(x, n_epochs=1)
    with pytest.raises(TypeError, match="x must hold real numbers"):
        SPFA(6, 4, 2).fit(x, torch.ones(6, 1), n_epochs=1)
    with pytest.raises(TypeError, match="s must hold real numbers"):
        SPFA(6, 4, 2).fit(torch.ones(6, 4), torch.ones(6, 1, dtype=torch.complex64), n_epochs=1)
    with pytest.raises(TypeError, match="init l must hold real numbers"):
        SFA(6, 4, 2).fit(torch.ones(6, 4), init=(torch.ones(6, 2, dtype=torch.complex64), torch.ones(4, 2)),
                         n_epochs=1)
    with pytest.raises(ValueError, match="init f contains NaN"):
        SFA(6, 4, 2).fit(torch.ones(6, 4), init=(torch.ones(6, 2), torch.full((4, 2), float("nan"))), n_epochs=1)


def test_size_errors_use_the_model_s_argument_names():
    # issue 22.10: SPFA(0, 4, 2) said "p must be a positive integer" (the name inside SpikeSlab)
    for cls in (SFA, SPFA):
        for args, name in (((0, 4, 2), "n"), ((6, 0, 2), "p"), ((6, 4, 0), "k")):
            with pytest.raises(ValueError, match=rf"^{name} must be a positive integer, got 0"):
                cls(*args)
