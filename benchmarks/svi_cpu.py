"""Seconds per SVI epoch (NaturalGradient, row mini-batches) beside one CAVI sweep, same data.

Gamma-Poisson, K=20, a sparse random count matrix, float32, one process; CPU seconds at
1 thread by default; repetitions interleaved (CAVI sweep, then one epoch of each variant),
the minimum of each reported. Target (issue 16): an epoch <= 2x a sweep.

Variants (each trains its own layer from the same start):

* ``before``: the code before issue 16, emulated: digamma/log and the column factors of
  q(α) recomputed at every local iteration (``GammaPoisson.alpha_fixed`` off),
  ``torch.digamma`` for float32, the ELBO estimate at every step;
* ``ELBO every step``: ``NaturalGradient`` as constructed by default (``elbo_every=1``);
* ``ELBO once/epoch``: the estimate only at the epoch's last step, as
  :func:`torchnmf.parallel.fit_gamma_svi` does.

Batches are made before timing (like the CAVI sweep's prepared data): ``--batches
prepared`` (CountMatrix, default), ``csr`` (converted at each step, as a streamed fit) or
``dense`` (``X[rows]``, converted and checked at each step).

    python benchmarks/svi_cpu.py                          # 640 x 30000, ~4.7e5 nonzeros
    python benchmarks/svi_cpu.py --local-iters 1 10 --batches csr
    python benchmarks/svi_cpu.py --elbo-epochs 10 --local-iters 1 2 3 5 10   # full ELBO per epoch
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch

import torchnmf.poisson.gamma as gamma_module
from torchnmf.poisson import GammaPoisson
from torchnmf.trainer import CAVI, NaturalGradient


@contextlib.contextmanager
def _before():
    """The pre-issue-16 step: no q(α) caches within a step, torch's float32 digamma."""
    fixed, digamma = GammaPoisson.alpha_fixed, gamma_module.digamma_positive
    GammaPoisson.alpha_fixed = lambda self: contextlib.nullcontext()
    gamma_module.digamma_positive = torch.digamma
    try:
        yield
    finally:
        GammaPoisson.alpha_fixed, gamma_module.digamma_positive = fixed, digamma


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=640)
    ap.add_argument("--cols", type=int, default=30000)
    ap.add_argument("--rank", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--local-iters", type=int, nargs="+", default=[10])
    ap.add_argument("--batches", choices=("prepared", "csr", "dense"), default="prepared")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    ap.add_argument("--elbo-epochs", type=int, default=0,
                    help="instead: the full-data ELBO after each of this many epochs, per local_iters")
    args = ap.parse_args(argv)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    rate = torch.rand(args.rows, 5, generator=g) @ torch.rand(5, args.cols, generator=g) * 0.02
    X = torch.poisson(rate, generator=g)
    print(f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"X {args.rows}x{args.cols}, {int((X > 0).sum())} nonzeros, K={args.rank}, batches of {args.batch} rows "
          f"({args.batches}), {args.threads} thread(s), {args.clock} clock, float32")

    def layer():
        return GammaPoisson(args.rows, args.cols, rank=args.rank, generator=torch.Generator().manual_seed(2))

    full = layer().prepare(X.to_sparse_csr())
    perm = torch.randperm(args.rows, generator=torch.Generator().manual_seed(1))
    batches = []
    for s in range(0, args.rows, args.batch):
        rows = perm[s:s + args.batch]
        if args.batches == "prepared":
            Xb = layer().prepare(X[rows], rows)
        elif args.batches == "csr":
            Xb = X[rows].to_sparse_csr()
        else:
            Xb = X[rows]
        batches.append((Xb, rows))

    def epoch(trainer, measure):
        for i, (Xb, rows) in enumerate(batches):
            last = i == len(batches) - 1
            trainer.step(lambda: (Xb, rows), elbo=True if measure == "every" else last)

    if args.elbo_epochs:
        print("full-data ELBO after each epoch/sweep (CPU seconds of all the epochs first)")
        for iters in args.local_iters:
            m = layer()
            svi = NaturalGradient(m, local_iters=iters)
            values, spent = [], 0.0
            for _ in range(args.elbo_epochs):
                t0 = clock()
                epoch(svi, "once")
                spent += clock() - t0
                values.append(float(m.elbo(full).total))
            print(f"SVI local_iters={iters:<3d} {spent:6.2f} s  " + " ".join(f"{v:.7g}" for v in values), flush=True)
        m = layer()
        cavi = CAVI(m)
        print("CAVI sweeps                   " + " ".join(f"{float(cavi.step(lambda: full).total):.7g}"
                                               for _ in range(args.elbo_epochs)))
        return

    cavi = CAVI(layer())
    cavi.step(lambda: full)
    variants = []
    for iters in args.local_iters:
        for name, measure, ctx in (("before", "every", _before), ("ELBO every step", "every", contextlib.nullcontext),
                                   ("ELBO once/epoch", "once", contextlib.nullcontext)):
            m = layer()
            variants.append((name, iters, measure, ctx, m, NaturalGradient(m, local_iters=iters)))
    sweep = float("inf")
    best = [float("inf")] * len(variants)
    for _ in range(args.repeats):
        t0 = clock()
        cavi.step(lambda: full)
        sweep = min(sweep, clock() - t0)
        for j, (name, iters, measure, ctx, m, svi) in enumerate(variants):
            with ctx():
                t0 = clock()
                epoch(svi, measure)
                best[j] = min(best[j], clock() - t0)
    header = f"{'SVI epoch':16} {'local iters':>11} {'s/epoch':>9} {'x CAVI sweep':>12} {'full ELBO after':>16}"
    print(f"CAVI sweep: {sweep:.3f} s (ELBO after {args.repeats + 1} sweeps {float(cavi.step(lambda: full).total):.7g})")
    print(header)
    print("-" * len(header))
    for (name, iters, measure, ctx, m, svi), t in zip(variants, best):
        print(f"{name:16} {iters:11d} {t:9.3f} {t / sweep:12.1f} {float(m.elbo(full).total):16.7g}", flush=True)


if __name__ == "__main__":
    main()
