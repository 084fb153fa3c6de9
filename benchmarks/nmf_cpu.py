"""CPU speed of NMF.fit and of a BetaMu loop beside scikit-learn's NMF(solver='mu').

Same data, same initial factors, one process, 2 threads for both libraries; prints
ms/iteration, the ratio to scikit-learn and the final divergence of each.

    python benchmarks/nmf_cpu.py                 # 2000x1000, rank 20, 200 iterations
    python benchmarks/nmf_cpu.py --iters 50      # fewer iterations
    python benchmarks/nmf_cpu.py --rows 500 --cols 300 --iters 20   # a quick look
"""
from __future__ import annotations

import os
import sys

if "--passive-omp" in sys.argv:  # must precede torch's import: OpenMP reads it at start-up
    # On a shared, oversubscribed machine spinning OpenMP workers lose their time slices
    # and a 2 ms matmul can take 25 ms; passive waiting makes timings comparable again.
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse
import time
import warnings

import numpy as np
import torch

from torchnmf import NMF
from torchnmf.metrics import beta_div
from torchnmf.trainer import BetaMu


def divergence(V, H, W, beta):
    """Final divergence in float64 (same floor as the updates for beta < 2)."""
    pred = torch.as_tensor(H, dtype=torch.float64) @ torch.as_tensor(W, dtype=torch.float64).T
    if beta < 2:
        pred = pred.clamp_min(float(np.finfo(np.float32).eps))
    return float(beta_div(pred, torch.as_tensor(V, dtype=torch.float64), beta))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--cols", type=int, default=1000)
    ap.add_argument("--rank", type=int, default=20)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--betas", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--no-betamu", action="store_true", help="skip the (slower, generic) BetaMu loop")
    ap.add_argument("--passive-omp", action="store_true",
                    help="set OMP_WAIT_POLICY=PASSIVE for torch (shared/oversubscribed machines)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="interleaved repetitions of each run; the fastest is reported (for noisy machines)")
    args = ap.parse_args(argv)

    from sklearn.decomposition import NMF as SkNMF
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    rng = np.random.RandomState(0)
    # a non-negative matrix with low-rank structure plus noise
    X64 = rng.rand(args.rows, args.rank) @ rng.rand(args.rank, args.cols) + 0.1 * rng.rand(args.rows, args.cols)
    scale = np.sqrt(X64.mean() / args.rank)
    W0 = scale * rng.rand(args.rows, args.rank)   # sklearn's W (samples x rank) = our H
    H0 = scale * rng.rand(args.rank, args.cols)   # sklearn's H (rank x features) = our W^T

    print(f"V {args.rows}x{args.cols}, rank {args.rank}, {args.iters} iterations, "
          f"{args.threads} threads, torch {torch.__version__}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}")
    header = f"{'dtype':8} {'beta':>4} {'method':14} {'ms/iter':>9} {'vs sklearn':>10} {'final divergence':>18}"
    print(header)
    print("-" * len(header))
    for dtype in (np.float32, np.float64):
        X = X64.astype(dtype)
        for beta in args.betas:
            best = {}

            def keep(name, t, div):
                if name not in best or t < best[name][0]:
                    best[name] = (t, div)

            for _ in range(args.repeat):
                with threadpool_limits(limits=args.threads):
                    est = SkNMF(n_components=args.rank, solver="mu", init="custom", tol=0,
                                max_iter=args.iters, beta_loss=beta)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        t0 = time.perf_counter()
                        Wsk = est.fit_transform(X, W=W0.astype(dtype), H=H0.astype(dtype))
                        t_sk = time.perf_counter() - t0
                keep("sklearn mu", t_sk, divergence(X, Wsk, est.components_.T, beta))

                V = torch.from_numpy(X)
                m = NMF(W=torch.from_numpy(H0.T.astype(dtype)).contiguous(), H=torch.from_numpy(W0.astype(dtype)))
                t0 = time.perf_counter()
                m.fit(V, beta=beta, tol=0, max_iter=args.iters)
                keep("NMF.fit", time.perf_counter() - t0, divergence(X, m.H.detach(), m.W.detach(), beta))

                if not args.no_betamu:
                    m = NMF(W=torch.from_numpy(H0.T.astype(dtype)).contiguous(), H=torch.from_numpy(W0.astype(dtype)))
                    # scikit-learn's order: H (its W) first, then W
                    trainer = BetaMu([m.H, m.W], beta=beta)

                    def closure():
                        return V, m()

                    t0 = time.perf_counter()
                    for _ in range(args.iters):
                        trainer.step(closure)
                    keep("BetaMu loop", time.perf_counter() - t0, divergence(X, m.H.detach(), m.W.detach(), beta))
            t_sk = best["sklearn mu"][0]
            for name, (t, div) in best.items():
                ms = 1000 * t / args.iters
                print(f"{np.dtype(dtype).name:8} {beta:>4g} {name:14} {ms:9.2f} {t / t_sk:10.2f} {div:18.8g}", flush=True)


if __name__ == "__main__":
    main()
