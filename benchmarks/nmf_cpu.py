"""CPU speed of NMF.fit and of a BetaMu loop beside scikit-learn's NMF(solver='mu').

Same data, same initial factors, one process, 2 threads for both libraries; prints
ms/iteration, the ratio to scikit-learn (and, for BetaMu, to NMF.fit) and the final
divergence of each. "NMF.fit halves" is ``NMF.fit`` before :mod:`torchnmf.row_pass` (two
half-updates per iteration, each reading V). "BetaMu loop" is the trainer as shipped (closed-form gradient parts for
NMF layers), "BetaMu generic" the autograd path (``closed_form=False``).

    python benchmarks/nmf_cpu.py                 # 2000x1000, rank 20, 200 iterations
    python benchmarks/nmf_cpu.py --iters 50      # fewer iterations
    python benchmarks/nmf_cpu.py --rows 500 --cols 300 --iters 20   # a quick look
    python benchmarks/nmf_cpu.py --betas 0 1 2 --clock cpu --repeat 3   # loaded machine: CPU seconds
    python benchmarks/nmf_cpu.py --chain-only    # the introduction's 3-layer chain

The chain section times ``BetaMu`` on ``nn.Sequential(NMF((1024, 10), 4), NMF(W=(24, 10)),
NMF(W=(64, 24)))(None)`` before (left-to-right products, autograd gradient parts) and after
(planned contractions, closed form), beside the sum of the three layers' own ``NMF.fit``.
"""
from __future__ import annotations

import os
import sys

if "--passive-omp" in sys.argv:  # must precede torch's import: OpenMP reads it at start-up
    # On a shared, oversubscribed machine spinning OpenMP workers lose their time slices
    # and a 2 ms matmul can take 25 ms; passive waiting makes timings comparable again.
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse
import contextlib
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


@contextlib.contextmanager
def two_halves():
    """``NMF.fit`` as before :mod:`torchnmf.row_pass`: each iteration as two half-updates."""
    from torchnmf import row_pass

    supports = row_pass.supports
    row_pass.supports = lambda *a, **k: False
    try:
        yield
    finally:
        row_pass.supports = supports


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--cols", type=int, default=1000)
    ap.add_argument("--rank", type=int, default=20)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--betas", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--no-betamu", action="store_true", help="skip the (slower, generic) BetaMu loop")
    ap.add_argument("--no-halves", action="store_true",
                    help="skip 'NMF.fit halves' (the two-half-update iteration before torchnmf.row_pass)")
    ap.add_argument("--passive-omp", action="store_true",
                    help="set OMP_WAIT_POLICY=PASSIVE for torch (shared/oversubscribed machines)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="interleaved repetitions of each run; the fastest is reported (for noisy machines)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall seconds, or CPU seconds of the process (steadier on a loaded machine; "
                         "with several threads it sums them, so compare rows of one run only)")
    ap.add_argument("--chain-only", action="store_true", help="only the introduction's chain section")
    ap.add_argument("--bare", action="store_true",
                    help="beta=2: also time bare loops of the iteration's two products in numpy and torch")
    ap.add_argument("--no-chain", action="store_true", help="skip the chain section")
    args = ap.parse_args(argv)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

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
          f"{args.threads} threads, torch {torch.__version__}, {args.clock} clock, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}")
    header = (f"{'dtype':8} {'beta':>4} {'method':14} {'ms/iter':>9} {'vs sklearn':>10} {'vs NMF.fit':>10} "
              f"{'final divergence':>18}")
    if not args.chain_only:
        print(header)
        print("-" * len(header))
    for dtype in () if args.chain_only else (np.float32, np.float64):
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
                        t0 = clock()
                        Wsk = est.fit_transform(X, W=W0.astype(dtype), H=H0.astype(dtype))
                        t_sk = clock() - t0
                keep("sklearn mu", t_sk, divergence(X, Wsk, est.components_.T, beta))

                V = torch.from_numpy(X)
                m = NMF(W=torch.from_numpy(H0.T.astype(dtype)).contiguous(), H=torch.from_numpy(W0.astype(dtype)))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 runs to max_iter
                    t0 = clock()
                    m.fit(V, beta=beta, tol=0, max_iter=args.iters)
                    keep("NMF.fit", clock() - t0, divergence(X, m.H.detach(), m.W.detach(), beta))

                if not args.no_halves:  # before torchnmf.row_pass: two half-updates, V read per half
                    m = NMF(W=torch.from_numpy(H0.T.astype(dtype)).contiguous(), H=torch.from_numpy(W0.astype(dtype)))
                    with warnings.catch_warnings(), two_halves():
                        warnings.simplefilter("ignore")
                        t0 = clock()
                        m.fit(V, beta=beta, tol=0, max_iter=args.iters)
                        keep("NMF.fit halves", clock() - t0, divergence(X, m.H.detach(), m.W.detach(), beta))

                for name, closed in (("BetaMu loop", True), ("BetaMu generic", False)):
                    if args.no_betamu:
                        break
                    m = NMF(W=torch.from_numpy(H0.T.astype(dtype)).contiguous(), H=torch.from_numpy(W0.astype(dtype)))
                    # scikit-learn's order: H (its W) first, then W
                    trainer = BetaMu([m.H, m.W], beta=beta, closed_form=closed)

                    def closure():
                        return V, m()

                    t0 = clock()
                    for _ in range(args.iters):
                        trainer.step(closure)
                    keep(name, clock() - t0, divergence(X, m.H.detach(), m.W.detach(), beta))
            t_sk, t_fit = best["sklearn mu"][0], best["NMF.fit"][0]
            for name, (t, div) in best.items():
                ms = 1000 * t / args.iters
                vs_fit = f"{t / t_fit:10.2f}" if name.startswith("BetaMu") else f"{'':10}"
                print(f"{np.dtype(dtype).name:8} {beta:>4g} {name:14} {ms:9.2f} {t / t_sk:10.2f} {vs_fit} "
                      f"{div:18.8g}", flush=True)
    if args.bare:
        bare_section(args, clock, X64, W0, H0)
    if not args.no_chain:
        chain_section(args, clock)


def bare_section(args, clock, X64, W0, H0):
    """beta=2: the two products of an iteration and nothing else, in numpy (OpenBLAS) and torch (MKL)."""
    from sklearn.decomposition._nmf import _fit_multiplicative_update
    from threadpoolctl import threadpool_limits

    print(f"\nbeta=2, bare loops of the iteration's two products, {args.iters} iterations, ms/iter")
    print(f"{'dtype':8} {'sklearn mu':>10} {'numpy loop':>10} {'torch loop':>10}")
    for dtype in (np.float32, np.float64):
        X, H, W = X64.astype(dtype), W0.astype(dtype), H0.T.astype(dtype)  # V ≈ H Wᵀ
        Vt, Ht, Wt = (torch.from_numpy(a) for a in (X, H, W))

        def sk():
            _fit_multiplicative_update(X, H.copy(), W.T.copy(), beta_loss=2, max_iter=args.iters, tol=0,
                                       l1_reg_W=0, l1_reg_H=0, l2_reg_W=0, l2_reg_H=0, update_H=True,
                                       verbose=0)

        def numpy_loop():
            h, w = H.copy(), W.copy()
            for _ in range(args.iters):
                h *= (X @ w) / (h @ (w.T @ w))
                w *= (h.T @ X).T / (w @ (h.T @ h))

        def torch_loop():
            h, w = Ht.clone(), Wt.clone()
            for _ in range(args.iters):
                h = h * (Vt @ w) / (h @ (w.t() @ w))
                w = w * (Vt.t() @ h) / (w @ (h.t() @ h))

        best = {}
        for _ in range(args.repeat):
            for name, f in (("sk", sk), ("np", numpy_loop), ("torch", torch_loop)):
                with threadpool_limits(limits=args.threads):
                    t0 = clock()
                    f()
                    best[name] = min(best.get(name, float("inf")), clock() - t0)
        ms = {k: 1000 * v / args.iters for k, v in best.items()}
        print(f"{np.dtype(dtype).name:8} {ms['sk']:10.2f} {ms['np']:10.2f} {ms['torch']:10.2f}", flush=True)


def chain_section(args, clock):
    """BetaMu on the introduction's 3-layer chain, before/after, beside its layers' NMF.fit."""
    from torch import nn

    from torchnmf import _matchain

    iters = max(args.iters, 100)
    print(f"\nintroduction chain: V 1024x64 = H (1024x4) W1ᵀ (4x10) W2ᵀ (10x24) W3ᵀ (24x64), "
          f"{iters} iterations, ms/iter")
    header = (f"{'dtype':8} {'beta':>4} {'layers NMF.fit':>14} {'before':>9} {'after':>9} {'after/fit':>9} "
              f"{'before/after':>12} {'max rel diff':>12}")
    print(header)
    print("-" * len(header))
    for dtype in (torch.float32, torch.float64):
        for beta in args.betas:
            g = torch.Generator().manual_seed(0)

            def model():
                torch.manual_seed(0)
                return nn.Sequential(NMF((1024, 10), rank=4), NMF(W=(24, 10)), NMF(W=(64, 24))).to(dtype)

            V = (torch.rand(1024, 64, generator=g, dtype=torch.float64) + 0.1).to(dtype)
            times, finals = {}, {}
            for _ in range(args.repeat):
                for name, planned in (("before", False), ("after", True)):
                    m = model()
                    trainer = BetaMu(m.parameters(), beta=beta, closed_form=planned)
                    ctx = _matchain.disabled() if not planned else contextlib.nullcontext()

                    def closure():
                        return V, m(None)

                    with ctx:
                        t0 = clock()
                        for _ in range(iters):
                            trainer.step(closure)
                        t = clock() - t0
                        finals[name] = m(None).detach().double()
                    times[name] = min(t, times.get(name, float("inf")))
                # each layer's own NMF.fit at its shapes (V_k ≈ H_k W_kᵀ)
                fit = 0.0
                for (n, c, r) in ((1024, 10, 4), (1024, 24, 10), (1024, 64, 24)):
                    gg = torch.Generator().manual_seed(1)
                    Vk = torch.rand(n, c, generator=gg, dtype=dtype) + 0.1
                    layer = NMF(W=torch.rand(c, r, generator=gg, dtype=dtype), H=torch.rand(n, r, generator=gg, dtype=dtype))
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        t0 = clock()
                        layer.fit(Vk, beta=beta, tol=0, max_iter=iters)
                        fit += clock() - t0
                times["fit"] = min(fit, times.get("fit", float("inf")))
            ms = {k: 1000 * v / iters for k, v in times.items()}
            diff = float((finals["after"] - finals["before"]).abs().max() / finals["before"].abs().max())
            print(f"{str(dtype).replace('torch.', ''):8} {beta:>4g} {ms['fit']:14.3f} {ms['before']:9.3f} "
                  f"{ms['after']:9.3f} {ms['after'] / ms['fit']:9.2f} {ms['before'] / ms['after']:12.2f} "
                  f"{diff:12.1e}", flush=True)


if __name__ == "__main__":
    main()
