"""R restarts of NMF: one batch (fit_replicates) vs R sequential NMF.fit calls vs R scikit-learn fits.

Same data, same initial factors for the three (replicate r starts from
``init_replicates(X, k, [r], seed)``), same max_iter and tol; one process. Prints the wall time of
all R fits, the time per replicate-iteration, the ratio to the first method, and the mean final
divergence. scikit-learn's rule checks every 10 iterations against the first error
(``stop_rule='sklearn'`` for torchnmf), so with ``--tol 0`` (the default) all three do exactly
``max_iter`` iterations per replicate; with a tolerance the batch and NMF.fit use the relative
rule and stop per replicate, and the iterations done are shown.

    python benchmarks/replicates.py                       # 2000x500, rank 8, R=20, dense and sparse
    python benchmarks/replicates.py --betas 2 1 --iters 100 --density 0.05
    python benchmarks/replicates.py --rows 500 --cols 200 --reps 5 --iters 20   # a quick look
    python benchmarks/replicates.py --clock cpu --threads 1     # loaded machine: CPU seconds
    python benchmarks/replicates.py --methods batch-cd sklearn-cd batch --betas 2   # coordinate descent

Timings on a shared machine are noisy: use ``--clock cpu`` and ``--repeat`` there.
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import scipy.sparse as sp
import torch

from torchnmf import NMF
from torchnmf.replicates import fit_replicates, init_replicates


def _clock(kind):
    return time.process_time if kind == "cpu" else time.perf_counter


def data(rows, cols, rank, density, seed=0):
    """Counts from a rank-``rank`` Poisson model; zeros outside a random ``density`` mask (sparse)."""
    g = np.random.default_rng(seed)
    L = g.gamma(0.5, 1.0, (rows, rank)) @ g.gamma(0.5, 1.0, (rank, cols))
    X = g.poisson(L * 2.0).astype(np.float64)
    if density < 1:
        X *= g.random((rows, cols)) < density
    return X


def run_batch(X, k, R, W0, H0, beta, iters, tol, dtype, check_every):
    rule = "sklearn" if tol > 0 else "relative"
    fit = fit_replicates(X, k, R, beta=beta, tol=tol, max_iter=iters, W0=W0, H0=H0, dtype=dtype,
                         check_every=check_every, stop_rule=rule)
    return fit.loss.tolist(), fit.n_iter.tolist()


def run_batch_cd(X, k, R, W0, H0, beta, iters, tol, dtype, check_every):
    """fit_replicates(solver='cd'): scikit-learn's coordinate descent, batched (beta = 2 only)."""
    fit = fit_replicates(X, k, R, tol=tol, max_iter=iters, W0=W0, H0=H0, dtype=dtype, solver="cd")
    return fit.loss.tolist(), fit.n_iter.tolist()


def run_sklearn_cd(X, k, R, W0, H0, beta, iters, tol, dtype, check_every):
    """scikit-learn's coordinate descent, replicate by replicate (beta = 2 only, no shuffling)."""
    return run_sklearn(X, k, R, W0, H0, 2, iters, tol, dtype, check_every, solver="cd")


def run_sequential(X, k, R, W0, H0, beta, iters, tol, dtype, check_every):
    from torchnmf.history import History

    losses, n_iter = [], []
    Xt = torch.as_tensor(X, dtype=dtype) if not sp.issparse(X) else X
    for r in range(R):
        m, h = NMF(W=W0[r].to(dtype), H=H0[r].to(dtype)), History()
        n_iter.append(m.fit(Xt, beta=beta, tol=tol, max_iter=iters, check_every=check_every, history=h,
                            stop_rule="sklearn" if tol > 0 else "relative"))
        losses.append(h.values[-1])
    return losses, n_iter


def run_sklearn(X, k, R, W0, H0, beta, iters, tol, dtype, check_every, solver="mu"):
    from sklearn.decomposition import non_negative_factorization

    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    Xs = X.astype(np_dtype)
    losses, n_iter = [], []
    for r in range(R):
        W_sk = np.ascontiguousarray(H0[r].numpy().astype(np_dtype))
        H_sk = np.ascontiguousarray(W0[r].numpy().T.astype(np_dtype))
        W, H, n = non_negative_factorization(Xs, W=W_sk, H=H_sk, n_components=k, init="custom", solver=solver,
                                             beta_loss=beta, tol=tol, max_iter=iters,
                                             **({"shuffle": False} if solver == "cd" else {}))
        n_iter.append(n)
        losses.append(_divergence(Xs, W, H, beta))
    return losses, n_iter


def _divergence(X, W, H, beta):
    from sklearn.decomposition._nmf import _beta_divergence

    return float(_beta_divergence(X, W, H, beta))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--cols", type=int, default=500)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--tol", type=float, default=0.0)
    p.add_argument("--betas", type=float, nargs="+", default=[2.0, 1.0])
    p.add_argument("--density", type=float, default=0.1, help="non-zero share of the sparse input")
    p.add_argument("--inputs", nargs="+", default=["dense", "sparse"], choices=["dense", "sparse"])
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--repeat", type=int, default=1, help="best of this many runs")
    p.add_argument("--methods", nargs="+", default=["batch", "NMF.fit", "sklearn"],
                   choices=["batch", "NMF.fit", "sklearn", "batch-cd", "sklearn-cd"],
                   help="batch-cd / sklearn-cd: coordinate descent (beta 2 only; its own stop rule, "
                        "violation against the first iteration's)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(a.threads)
    except ImportError:  # pragma: no cover
        pass
    dtype = getattr(torch, a.dtype)
    clock = _clock(a.clock)
    runners = {"batch": run_batch, "NMF.fit": run_sequential, "sklearn": run_sklearn, "batch-cd": run_batch_cd,
               "sklearn-cd": run_sklearn_cd}
    print(f"{a.rows}x{a.cols}, rank {a.rank}, R={a.reps}, max_iter={a.iters}, tol={a.tol:g}, {a.dtype}, "
          f"{a.threads} thread(s), {a.clock} clock, best of {a.repeat}")
    print(f"{'input':7s} {'beta':>4s} {'method':9s} {'seconds':>8s} {'ms/rep-iter':>11s} {'vs first':>8s} "
          f"{'iters (min-max)':>15s} {'mean divergence':>16s}")
    for kind in a.inputs:
        X = data(a.rows, a.cols, a.rank, a.density if kind == "sparse" else 1.0)
        Xin = sp.csr_matrix(X) if kind == "sparse" else X
        W0, H0 = init_replicates(torch.as_tensor(X), a.rank, range(a.reps), seed=0, dtype=torch.float64)
        for beta in a.betas:
            check_every = 1 if beta == 2 else 10
            base = None
            for name in a.methods:
                if name.endswith("-cd") and beta != 2:
                    continue
                best = float("inf")
                for _ in range(a.repeat):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        t0 = clock()
                        losses, n_iter = runners[name](Xin, a.rank, a.reps, W0, H0, beta, a.iters, a.tol, dtype,
                                                       check_every)
                        best = min(best, clock() - t0)
                base = best if base is None else base  # ratios against the first method run
                ratio = best / base if base else float("nan")
                print(f"{kind:7s} {beta:4g} {name:9s} {best:8.2f} {1e3 * best / sum(n_iter):11.3f} {ratio:8.2f} "
                      f"{f'{min(n_iter)}-{max(n_iter)}':>15s} {np.mean(losses):16.6g}", flush=True)


if __name__ == "__main__":
    main()
