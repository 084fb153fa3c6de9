"""ms per iteration (ELBO forward + backward) of LogNormalPoisson on sparse counts vs a dense implementation.

The dense implementation of the same bound is written here: it forms the ``(E, D, N)`` rates.
Memory is measured as the bytes autograd saves for the backward pass (what an iteration keeps
alive), through :func:`torch.autograd.graph.saved_tensors_hooks`.

Usage::

    python benchmarks/pnmf_cpu.py            # 2500 x 1000, quick (< 2 min)
    python benchmarks/pnmf_cpu.py --full     # 5000 x 2000, 2% nonzeros, K=10, E=3 (the issue's setting)
"""
from __future__ import annotations

import argparse
import time

import torch

from torchnmf.poisson import Counts, LogNormalPoisson


def dense_elbo(layer: LogNormalPoisson, X: torch.Tensor, lg: torch.Tensor) -> torch.Tensor:
    """The layer's bound computed densely, every (d, n) entry and draw materialised."""
    W = layer.W
    mu, var = layer.factors.marginals()
    if layer.mode == "lower-bound":
        log_rate = torch.log(W @ torch.exp(mu))
        rate = W @ torch.exp(mu + var / 2)
        data = (X * log_rate - rate).sum()
    else:
        F = layer.factors.rsample(None, layer.E)
        rates = torch.einsum("dk,ekn->edn", W, torch.exp(F))
        log_term = (X * torch.log(rates)).sum((1, 2)).mean()
        if layer.mode == "expanded":
            rate_term = (W @ torch.exp(mu + var / 2)).sum()
        else:
            rate_term = rates.sum((1, 2)).mean()
        data = log_term - rate_term
    return data - lg - layer.factors.kl()


def measure(fn, params, reps):
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = -fn()
    loss.backward()
    peak = saved[0]
    t0 = time.perf_counter()
    for _ in range(reps):
        for p in params:
            p.grad = None
        (-fn()).backward()
    return (time.perf_counter() - t0) / reps * 1e3, peak / 2**20, float(loss)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="5000 x 2000 (the issue's size)")
    ap.add_argument("--D", type=int, default=None)
    ap.add_argument("--N", type=int, default=None)
    ap.add_argument("--density", type=float, default=0.02)
    ap.add_argument("--K", type=int, default=10)
    ap.add_argument("--E", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    D = args.D or (5000 if args.full else 2500)
    N = args.N or (2000 if args.full else 1000)
    g = torch.Generator().manual_seed(0)
    nnz = int(D * N * args.density)
    flat = torch.randperm(D * N, generator=g)[:nnz]
    vals = 1.0 + torch.poisson(torch.full((nnz,), 2.0), generator=g)
    Xs = torch.sparse_coo_tensor(torch.stack([flat // N, flat % N]), vals, (D, N)).coalesce()
    Xd = Xs.to_dense()
    C = Counts(Xs)
    print(f"D={D} N={N} nnz={nnz} ({args.density:.1%}) K={args.K} E={args.E} threads={torch.get_num_threads()}")
    print(f"{'mode':<12} {'sparse ms':>10} {'dense ms':>10} {'speed-up':>9} {'sparse MB':>10} {'dense MB':>10} {'|diff|':>9}")
    for mode in ("lower-bound", "expanded", "simple"):
        torch.manual_seed(0)
        layer = LogNormalPoisson(D, N, args.K, mode=mode, E=args.E)
        params = list(layer.parameters())
        torch.manual_seed(1)
        ts, ms, vs = measure(lambda: layer.elbo(C, check=False).total, params, args.reps)
        torch.manual_seed(1)
        td, md, vd = measure(lambda: dense_elbo(layer, Xd, C.lgamma), params, max(1, args.reps // 2))
        # the simple mode's control variates change the estimate (not its mean): compare the others exactly
        diff = abs(vs - vd) / abs(vd)
        print(f"{mode:<12} {ts:>10.1f} {td:>10.1f} {td / ts:>8.1f}x {ms:>10.1f} {md:>10.1f} {diff:>9.1e}")


if __name__ == "__main__":
    main()
