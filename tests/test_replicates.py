"""fit_replicates: R restarts as one batch equal R separate NMF.fit runs (each with its own stop)."""
import os
import time
import warnings

import pytest
import scipy.sparse as sp
import torch
import torch.multiprocessing as mp

from torchnmf import NMF
from torchnmf._csr import to_csr
from torchnmf.distributed import find_free_port, init
from torchnmf.engine import ConvergenceWarning
from torchnmf.history import History
from torchnmf.init import initialize
from torchnmf import replicates as rep
from torchnmf.replicates import ReplicateFit, fit_replicates, init_replicates, replicate_generator

F64 = torch.float64
N, F, K, R = 30, 16, 3, 4


def _data(dtype=F64):
    g = torch.Generator().manual_seed(1)
    X = torch.poisson(torch.rand(N, K, generator=g, dtype=F64) @ torch.rand(K, F, generator=g, dtype=F64) * 4,
                      generator=g)
    return X.to(dtype)


def _as(X, kind):
    if kind == "dense":
        return X
    if kind == "csr":
        return to_csr(X)
    if kind == "coo":
        return X.to_sparse()
    return sp.csr_matrix(X.numpy())


def _separate(X, W0, H0, **kw):
    """Each replicate as its own NMF.fit: factors, n_iter, last measured divergence."""
    out = []
    for r in range(W0.shape[0]):
        m, h = NMF(W=W0[r], H=H0[r]), History()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            n = m.fit(X, history=h, **kw)
        out.append((m.W.detach(), m.H.detach(), n, h.values[-1]))
    return out


def _close(a, b, rtol=1e-8):
    return float((a - b).abs().max()) <= rtol * float(b.abs().max())


# tolerances at which the four replicates stop at different iterations (asserted below)
@pytest.mark.parametrize("beta,tol", [(2, 2e-4), (1, 1e-4)])
@pytest.mark.parametrize("kind", ["dense", "csr", "coo", "scipy"])
def test_batch_equals_separate_fits(beta, tol, kind):
    X = _data()
    W0, H0 = init_replicates(X, K, range(R), seed=5)
    Xin = _as(X, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = fit_replicates(Xin, K, R, beta=beta, tol=tol, max_iter=400, W0=W0, H0=H0)
    ref = _separate(_as(X, "coo") if kind == "scipy" else Xin, W0, H0, beta=beta, tol=tol, max_iter=400)
    assert isinstance(fit, ReplicateFit) and fit.rank == K
    assert fit.W.shape == (R, F, K) and fit.H.shape == (R, N, K)
    assert fit.n_iter.dtype == torch.int64 and fit.converged.dtype == torch.bool and fit.loss.dtype == F64
    assert fit.n_iter.tolist() == [n for _, _, n, _ in ref]
    assert len(set(fit.n_iter.tolist())) > 1  # the replicates stopped at different iterations
    assert bool(fit.converged.any())
    for r, (W, H, n, loss) in enumerate(ref):
        assert _close(fit.W[r], W) and _close(fit.H[r], H)
        assert abs(float(fit.loss[r]) - loss) <= 1e-8 * loss


@pytest.mark.parametrize("beta", [0.5, 1.5, 3])
def test_other_betas_equal_separate_fits(beta):
    X = _data() + 0.1
    W0, H0 = init_replicates(X, K, range(3), seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = fit_replicates(X, K, 3, beta=beta, tol=1e-4, max_iter=300, W0=W0, H0=H0, alpha=0.1, l1_ratio=0.5)
    ref = _separate(X, W0, H0, beta=beta, tol=1e-4, max_iter=300, alpha=0.1, l1_ratio=0.5)
    assert fit.n_iter.tolist() == [n for _, _, n, _ in ref]
    for r, (W, H, _, _) in enumerate(ref):
        assert _close(fit.W[r], W) and _close(fit.H[r], H)


@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_tiles_equal_one_tile(kind):
    """beta=1 in small tiles (dense: replicates x rows; sparse: replicates x non-zeros) equals one tile."""
    X = _as(_data(), kind)
    kw = dict(beta=1, tol=0, max_iter=25, check_every=5, random_state=3)
    whole = fit_replicates(X, K, R, **kw)
    nnz = int((_data() != 0).sum())
    blocks = (F * N * 2, F * 7, 1) if kind == "dense" else (nnz * 2, nnz * 3, 1)  # 2 or 3 replicates a chunk; 1 row
    for block in blocks:
        tiled = fit_replicates(X, K, R, block_elems=block, **kw)
        assert _close(tiled.W, whole.W, 1e-12) and _close(tiled.H, whole.H, 1e-12)
        assert torch.allclose(tiled.loss, whole.loss, rtol=1e-12)


def test_several_ranks_equal_per_rank_calls():
    X = _data()
    kw = dict(beta=1, tol=1e-4, max_iter=200, random_state=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fits = fit_replicates(X, [2, 4, 3], 3, **kw)
        singles = [fit_replicates(X, k, 3, **kw) for k in (2, 4, 3)]
    assert [f.rank for f in fits] == [2, 4, 3]
    for f, s in zip(fits, singles):
        assert f.n_iter.tolist() == s.n_iter.tolist()
        assert _close(f.W, s.W) and _close(f.H, s.H)


def test_stopped_replicates_leave_the_batch(monkeypatch):
    """Each half-update works on the columns of the replicates still running, no more."""
    X = _data()
    widths = []
    real = rep._Batch.update

    def update(self, side, W, H, groups, measure):
        widths.append((W.shape[1], H.shape[1], sum(len(g.ids) * g.k for g in groups)))
        return real(self, side, W, H, groups, measure)

    monkeypatch.setattr(rep._Batch, "update", update)
    fit = fit_replicates(X, [2, 3], 3, beta=2, tol=2e-4, max_iter=400, random_state=5)
    n_iter = sorted(n for f in fit for n in f.n_iter.tolist())
    assert len(set(n_iter)) > 2
    assert all(w == h == c for w, h, c in widths)
    running = [c for _, _, c in widths]
    assert running[0] == 3 * (2 + 3) and running == sorted(running, reverse=True)
    # the last half-updates work for the replicate that ran longest only
    last = next(k for f in fit for k, n in zip([f.rank] * 3, f.n_iter.tolist()) if n == n_iter[-1])
    assert running[-1] == last
    # one H half-update per iteration of the longest replicate (and its final measure), one W per iteration
    assert len(widths) == 2 * n_iter[-1] + 1


def test_max_columns_batches_equal_one_batch():
    X = _data()
    kw = dict(beta=2, tol=1e-4, max_iter=100, random_state=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        one = fit_replicates(X, [2, 3], 3, **kw)
        parts = fit_replicates(X, [2, 3], 3, max_columns=5, **kw)  # parts of 2+2, 2+3, 3, 3 columns
    for a, b in zip(parts, one):
        assert a.n_iter.tolist() == b.n_iter.tolist()
        assert _close(a.W, b.W, 1e-10) and _close(a.H, b.H, 1e-10)
    assert rep._columns_split([(2, 0), (2, 1), (2, 2), (3, 0)], 5) == [[(2, 0), (2, 1)], [(2, 2), (3, 0)]]
    assert rep._columns_split([(4, 0)], 3) == [[(4, 0)]]


def test_seeding_does_not_depend_on_the_number_of_replicates():
    X = _data()
    W3, H3 = init_replicates(X, K, range(3), seed=7)
    W5, H5 = init_replicates(X, K, range(5), seed=7)
    assert torch.equal(W3, W5[:3]) and torch.equal(H3, H5[:3])
    assert not torch.equal(W5[3], W5[4])  # replicates differ
    a = fit_replicates(X, K, 3, tol=0, max_iter=5, random_state=7)
    b = fit_replicates(X, K, 5, tol=0, max_iter=5, random_state=7)
    # the fits start there (equal up to the summation order of wider products)
    assert _close(a.W, b.W[:3], 1e-12) and _close(a.H, b.H[:3], 1e-12)
    c = fit_replicates(X, K, 3, tol=0, max_iter=5, random_state=8)
    assert not torch.allclose(a.W, c.W)


def test_init_is_initialize_random_with_the_replicate_generator():
    X = _data()
    W, H = init_replicates(X, K, [2], seed=9)
    W1, H1 = initialize(X, K, method="random", random_state=replicate_generator(9, K, 2))
    assert torch.equal(W[0], W1) and torch.equal(H[0], H1)


def test_inputs_not_modified():
    X = _data()
    W0, H0 = init_replicates(X, K, range(2), seed=1)
    copies = [t.clone() for t in (X, W0, H0)]
    Xs = to_csr(X)
    vals = Xs.values().clone()
    fit = fit_replicates(X, K, 2, beta=1, tol=0, max_iter=12, W0=W0, H0=H0)
    fit_replicates(Xs, K, 2, beta=2, tol=0, max_iter=12, W0=W0, H0=H0)
    fit_replicates(Xs, K, 2, solver="cd", tol=0, max_iter=12, W0=W0, H0=H0)
    fit_replicates(X, K, 2, solver="cd", tol=0, max_iter=12, W0=W0, H0=H0)
    for a, b in zip((X, W0, H0), copies):
        assert torch.equal(a, b)
    assert torch.equal(Xs.values(), vals)
    assert fit.W.data_ptr() != W0.data_ptr()
    # starts that require grad: no autograd graph through the iterations, the starts untouched
    W0g = W0.clone().requires_grad_()
    fit = fit_replicates(X, K, 2, beta=1, tol=0, max_iter=3, W0=W0g, H0=H0)
    assert not fit.W.requires_grad and not fit.H.requires_grad and W0g.grad is None
    assert torch.equal(W0g.detach(), W0)


@pytest.mark.parametrize("beta", [1, 2])
def test_float32(beta):
    X = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        f32 = fit_replicates(X.float(), K, 3, beta=beta, tol=1e-4, random_state=0)
    assert f32.W.dtype == torch.float32 and f32.H.dtype == torch.float32
    assert bool(torch.isfinite(f32.W).all()) and bool(torch.isfinite(f32.loss).all())
    start = fit_replicates(X.float(), K, 3, beta=beta, tol=0, max_iter=1, random_state=0).loss
    assert bool((f32.loss < start).all())
    # a few iterations follow the float64 fit from the same start
    a = fit_replicates(X.float(), K, 3, beta=beta, tol=0, max_iter=20, random_state=0)
    b = fit_replicates(X, K, 3, beta=beta, tol=0, max_iter=20, random_state=0)
    assert _close(a.W.double(), b.W, 1e-3) and torch.allclose(a.loss, b.loss, rtol=1e-5)
    # dtype= converts: float32 from float64 input
    assert fit_replicates(X, K, 2, tol=0, max_iter=2, dtype=torch.float32).W.dtype == torch.float32


def test_convergence_warning_once_with_count():
    X = _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = fit_replicates(X, [2, 3], 3, beta=1, tol=1e-9, max_iter=20, random_state=0)
    msgs = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(msgs) == 1 and "6 of 6 replicates" in msgs[0]
    assert not any(bool(f.converged.any()) for f in fit)
    assert all(f.n_iter.tolist() == [20] * 3 for f in fit)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        fit_replicates(X, 2, 2, tol=0, max_iter=3, random_state=0)  # tol=0: no warning


def test_nonfinite_objective_names_the_replicate(monkeypatch):
    X = _data()
    real = rep._Batch.update

    def update(self, side, W, H, groups, measure):
        B, loss = real(self, side, W, H, groups, measure)
        if measure:
            loss = loss.clone()
            loss[1] = float("nan")
        return B, loss

    monkeypatch.setattr(rep._Batch, "update", update)
    with pytest.raises(FloatingPointError, match="replicate 1 at rank 3"):
        fit_replicates(X, K, 3, random_state=0)


def test_progress_bar_shows_active_replicates(capsys):
    pytest.importorskip("tqdm")
    fit_replicates(_data(), K, 3, tol=0, max_iter=4, verbose=True, random_state=0)
    assert "active" in capsys.readouterr().err


@pytest.mark.parametrize("call,exc,match", [
    (lambda X: fit_replicates(X, 0), ValueError, "rank"),
    (lambda X: fit_replicates(X, N + 1), ValueError, "rank"),
    (lambda X: fit_replicates(X, F + 1), ValueError, "rank"),
    (lambda X: fit_replicates(X, [2, 0]), ValueError, "rank"),
    (lambda X: fit_replicates(X, []), ValueError, "rank"),
    (lambda X: fit_replicates(X, [2, 3, 2]), ValueError, "rank holds 2 more than once"),
    (lambda X: fit_replicates(X, 2.5), TypeError, "rank"),
    (lambda X: fit_replicates(X, 2, 0), ValueError, "n_replicates"),
    (lambda X: fit_replicates(X, 2, 1.5), TypeError, "n_replicates"),
    (lambda X: fit_replicates(-X, 2), ValueError, "X must be non-negative"),
    (lambda X: fit_replicates(X * float("nan"), 2), ValueError, "X contains NaN"),
    (lambda X: fit_replicates(X[:0], 2), ValueError, "X is empty"),
    (lambda X: fit_replicates(X[0], 2), ValueError, "X must have 2"),
    (lambda X: fit_replicates(X, 2, 3, W0=torch.rand(3, F, 3, dtype=F64)), ValueError, "W0 has shape"),
    (lambda X: fit_replicates(X, 2, W0=torch.rand(3, F, 2, dtype=F64)), ValueError, "pass n_replicates=3"),
    (lambda X: fit_replicates(X, 2, 3, H0=torch.rand(2, N, 2, dtype=F64)), ValueError, "H0 has shape"),
    (lambda X: fit_replicates(X, 2, 2, W0=-torch.rand(2, F, 2, dtype=F64)), ValueError, "W0 must be non-negative"),
    (lambda X: fit_replicates(X, [2, 3], 2, W0=torch.rand(2, F, 2, dtype=F64)), ValueError, "single rank"),
    (lambda X: fit_replicates(X, 2, beta=float("nan")), ValueError, "beta"),
    (lambda X: fit_replicates(X, 2, beta=0), ValueError, "strictly positive"),
    (lambda X: fit_replicates(X, 2, tol=-1), ValueError, "tol"),
    (lambda X: fit_replicates(X, 2, max_iter=0), ValueError, "max_iter"),
    (lambda X: fit_replicates(X, 2, check_every=0), ValueError, "check_every"),
    (lambda X: fit_replicates(X, 2, init="nndsvd"), ValueError, "init"),
    (lambda X: fit_replicates(X, 2, alpha=-1), ValueError, "alpha"),
    (lambda X: fit_replicates(X, 2, l1_ratio=2), ValueError, "l1_ratio"),
    (lambda X: fit_replicates(X, 2, dtype=torch.int64), TypeError, "dtype"),
    (lambda X: fit_replicates(X, 2, random_state=-1), ValueError, "random_state"),
    (lambda X: fit_replicates(X, 2, max_columns=0), ValueError, "max_columns"),
    (lambda X: fit_replicates(X, 2, block_elems=0), ValueError, "block_elems"),
    (lambda X: fit_replicates(X, 2, stop_rule="x"), ValueError, "stop_rule"),
    (lambda X: fit_replicates(X, 2, solver="hals"), ValueError, "solver"),
    (lambda X: fit_replicates(X, 2, beta=1, solver="cd"), ValueError, "solver='cd'.*beta=2"),
    (lambda X: fit_replicates(X, 2, solver="cd", check_every=5), ValueError, "check_every"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(_data())


# -- coordinate descent (solver='cd') ----------------------------------------------------------
def _sklearn_cd(X, W0, H0, **kw):
    """Each replicate by scikit-learn's NMF(solver='cd', shuffle=False) from the same factors.

    scikit-learn's X ≈ W H is ours X ≈ H Wᵀ: its W is our H, its H our Wᵀ.
    """
    from sklearn.decomposition import NMF as SkNMF

    out = []
    for r in range(W0.shape[0]):
        m = SkNMF(W0.shape[2], solver="cd", beta_loss="frobenius", init="custom", shuffle=False, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Hs = m.fit_transform(X.numpy(), W=H0[r].numpy().copy(), H=W0[r].T.numpy().copy())
        out.append((torch.from_numpy(m.components_.T.copy()), torch.from_numpy(Hs), m.n_iter_))
    return out


@pytest.mark.parametrize("kind", ["dense", "csr", "coo", "scipy"])
def test_cd_equals_sklearn(kind):
    """Replicate r of the batch is scikit-learn's coordinate descent from its factors, stop included."""
    pytest.importorskip("sklearn")
    X = _data()
    W0, H0 = init_replicates(X, K, range(R), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = fit_replicates(_as(X, kind), K, R, solver="cd", tol=1e-4, max_iter=300, W0=W0, H0=H0)
    ref = _sklearn_cd(X, W0, H0, tol=1e-4, max_iter=300)
    assert fit.n_iter.tolist() == [n for _, _, n in ref]
    assert len(set(fit.n_iter.tolist())) > 1  # the replicates stopped at different iterations
    assert fit.converged.tolist() == [n < 300 for _, _, n in ref]
    for r, (W, H, _) in enumerate(ref):
        assert _close(fit.W[r], W) and _close(fit.H[r], H)
        loss = 0.5 * float(((X - H @ W.T) ** 2).sum())
        assert abs(float(fit.loss[r]) - loss) <= 1e-10 * loss


def test_cd_penalty_equals_sklearn():
    """alpha, l1_ratio: our unscaled l1, l2 are scikit-learn's alpha_W = alpha / n_features, alpha_H = alpha / n_samples."""
    pytest.importorskip("sklearn")
    X = _data()
    W0, H0 = init_replicates(X, K, range(3), seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = fit_replicates(X, K, 3, solver="cd", tol=1e-5, max_iter=500, W0=W0, H0=H0, alpha=2.0, l1_ratio=0.3)
    ref = _sklearn_cd(X, W0, H0, tol=1e-5, max_iter=500, alpha_W=2.0 / F, alpha_H=2.0 / N, l1_ratio=0.3)
    assert fit.n_iter.tolist() == [n for _, _, n in ref]
    for r, (W, H, _) in enumerate(ref):
        assert _close(fit.W[r], W) and _close(fit.H[r], H)


def test_cd_zero_component_equals_sklearn():
    """A component that is all zeros has a zero Hessian: scikit-learn leaves the other factor's column as it is."""
    pytest.importorskip("sklearn")
    X = _data()
    W0, H0 = init_replicates(X, K, range(2), seed=4)
    W0[1, :, 0] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = fit_replicates(X, K, 2, solver="cd", tol=1e-4, max_iter=50, W0=W0, H0=H0)
    ref = _sklearn_cd(X, W0, H0, tol=1e-4, max_iter=50)
    assert fit.n_iter.tolist() == [n for _, _, n in ref]
    for r, (W, H, _) in enumerate(ref):
        assert _close(fit.W[r], W) and _close(fit.H[r], H)


def test_cd_objective_never_increases():
    """HALS is monotone for the Frobenius loss: the objective after i iterations never rises with i."""
    X = _data()
    W0, H0 = init_replicates(X, K, range(R), seed=3)
    losses = torch.stack([fit_replicates(X, K, R, solver="cd", tol=0, max_iter=i, W0=W0, H0=H0).loss
                          for i in range(1, 16)])  # (iterations, R)
    assert bool((losses[1:] <= losses[:-1] * (1 + 1e-12)).all())
    assert bool((losses[-1] < losses[0]).all())


def test_cd_several_ranks_equal_per_rank_calls():
    X = to_csr(_data())
    kw = dict(solver="cd", tol=1e-4, max_iter=200, random_state=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fits = fit_replicates(X, [2, 4, 3], 3, **kw)
        singles = [fit_replicates(X, k, 3, **kw) for k in (2, 4, 3)]
    for f, s in zip(fits, singles):
        assert f.n_iter.tolist() == s.n_iter.tolist()
        assert _close(f.W, s.W, 1e-12) and _close(f.H, s.H, 1e-12)


def test_cd_float32_close_to_float64():
    X = _data()
    kw = dict(solver="cd", tol=0, max_iter=30, random_state=2)
    f64 = fit_replicates(X, K, R, **kw)
    f32 = fit_replicates(X.float(), K, R, **kw)
    assert f32.W.dtype == torch.float32
    assert torch.allclose(f32.loss, f64.loss, rtol=1e-4)


# -- two gloo processes ------------------------------------------------------------------------
def _entry(rank, world, port, out):
    torch.set_num_threads(1)
    try:
        init("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=30.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            result = {"fits": fit_replicates(_data(), [2, 3], 3, beta=1, tol=1e-4, max_iter=100, random_state=4),
                      "cd": fit_replicates(_data(), [2, 3], 3, solver="cd", tol=1e-4, max_iter=100, random_state=4),
                      "none": fit_replicates(_data(), 2, 3, tol=0, max_iter=3).W}  # random_state=None: one seed
        if rank == 1:  # a non-finite objective on one process: both raise, neither hangs
            real = rep._Batch.update

            def update(self, side, W, H, groups, measure):
                B, loss = real(self, side, W, H, groups, measure)
                return B, (loss * float("nan") if measure else loss)
            rep._Batch.update = update
        try:
            fit_replicates(_data(), 2, 4, tol=0, max_iter=3, random_state=0)
            result["nan"] = "no error"
        except FloatingPointError as err:
            result["nan"] = str(err)
    except BaseException as err:
        result = {"error": f"{type(err).__name__}: {err}"}
    path = os.path.join(out, f"rank{rank}.pt")
    torch.save(result, path + ".tmp")
    os.replace(path + ".tmp", path)
    os._exit(0)


def test_two_processes_equal_one(tmp_path):
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # torch's lazy imports, once, before forking
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(_entry, args=(2, find_free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method=method)
    deadline = time.time() + 90
    while time.time() < deadline and not all((tmp_path / f"rank{r}.pt").exists() for r in range(2)):
        if not any(p.is_alive() for p in ctx.processes):
            break
        time.sleep(0.05)
    time.sleep(0.2)
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
        p.join()
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r in res:
        assert "error" not in r, r.get("error")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        one = fit_replicates(_data(), [2, 3], 3, beta=1, tol=1e-4, max_iter=100, random_state=4)
        one_cd = fit_replicates(_data(), [2, 3], 3, solver="cd", tol=1e-4, max_iter=100, random_state=4)
    for r in res:
        for f, g in zip(r["fits"] + r["cd"], one + one_cd):
            assert f.n_iter.tolist() == g.n_iter.tolist()
            assert f.converged.tolist() == g.converged.tolist()
            assert _close(f.W, g.W, 1e-10) and _close(f.H, g.H, 1e-10)
            assert torch.allclose(f.loss, g.loss, rtol=1e-10)
    assert torch.equal(res[0]["none"], res[1]["none"])
    assert "another process" in res[0]["nan"]
    assert "replicate 1 at rank 2" in res[1]["nan"]  # rank 1 fits replicates 1 and 3
