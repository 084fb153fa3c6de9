"""Seconds per SVI epoch (NaturalGradient, row mini-batches) beside one CAVI sweep, same data.

Gamma-Poisson, K=20, a sparse random count matrix; one process. "SVI (no cache)" recomputes
digamma/log of q(α) at every local iteration, as before issue 16; "SVI" computes them once
per batch (``GammaPoisson.alpha_fixed``). Target (issue 16): an epoch <= 2x a sweep.

    python benchmarks/svi_cpu.py                          # 640 x 30000, ~4.7e5 nonzeros
    python benchmarks/svi_cpu.py --local-iters 1 2 10 --clock cpu
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from torchnmf.poisson import GammaPoisson
from torchnmf.trainer import CAVI, NaturalGradient


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=640)
    ap.add_argument("--cols", type=int, default=30000)
    ap.add_argument("--rank", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--local-iters", type=int, nargs="+", default=[10])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args(argv)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    rate = torch.rand(args.rows, 5, generator=g) @ torch.rand(5, args.cols, generator=g) * 0.02
    X = torch.poisson(rate, generator=g)
    print(f"X {args.rows}x{args.cols}, {int((X > 0).sum())} nonzeros, K={args.rank}, batches of {args.batch} rows, "
          f"{args.threads} thread(s), {args.clock} clock, float32")

    layer = GammaPoisson(args.rows, args.cols, rank=args.rank)
    cavi = CAVI(layer)
    data = layer.prepare(X.to_sparse_csr())
    cavi.step(lambda: data)
    t0 = clock()
    for _ in range(3):
        cavi.step(lambda: data)
    sweep = (clock() - t0) / 3

    header = f"{'method':16} {'local iters':>11} {'s/epoch':>9} {'x CAVI sweep':>12}"
    print(f"CAVI sweep: {sweep:.3f} s")
    print(header)
    print("-" * len(header))
    real = GammaPoisson.alpha_fixed
    for iters in args.local_iters:
        for name, cached in (("SVI (no cache)", False), ("SVI", True)):
            GammaPoisson.alpha_fixed = real if cached else (lambda self: contextlib.nullcontext())
            try:
                svi = NaturalGradient(GammaPoisson(args.rows, args.cols, rank=args.rank), local_iters=iters)
                perm = torch.randperm(args.rows, generator=torch.Generator().manual_seed(1))
                t0 = clock()
                for s in range(0, args.rows, args.batch):
                    rows = perm[s:s + args.batch]
                    svi.step(lambda: (X[rows], rows))
                epoch = clock() - t0
            finally:
                GammaPoisson.alpha_fixed = real
            print(f"{name:16} {iters:11d} {epoch:9.3f} {epoch / sweep:12.1f}", flush=True)


if __name__ == "__main__":
    main()
