"""Time per epoch of log-normal Poisson factorization with GP factor priors (SVGP, LCGP, MGGP).

One epoch is a pass over all spots in mini-batches: ELBO of the batch (data term scaled to
the full data, the prior's KL), backward, Adam step. Data: counts simulated from smooth
factors on a square grid.

Usage::

    python benchmarks/spatial_cpu.py            # quick: 2k and 5k spots (< 2 minutes)
    python benchmarks/spatial_cpu.py --full     # 10k and 50k spots
    python benchmarks/spatial_cpu.py --spots 20000 --device cuda
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from torchnmf.poisson.lognormal import Counts, IndependentNormal, LogNormalPoisson
from torchnmf.poisson.spatial import LCGP, SVGP


def simulate(n_spots: int, n_features: int, n_components: int, generator: torch.Generator):
    side = int(math.ceil(math.sqrt(n_spots)))
    xy = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    coords = (xy[:n_spots].double() / side)
    centres = torch.rand(n_components, 2, generator=generator, dtype=torch.float64)
    F = -((coords[None] - centres[:, None]) ** 2).sum(-1) / 0.05  # (K, N), smooth bumps
    W = torch.rand(n_features, n_components, generator=generator, dtype=torch.float64) * 3
    X = torch.poisson(W @ F.exp(), generator=generator)
    return X, coords


def make_prior(kind: str, coords, groups, n_components: int, args, dtype, device):
    if kind == "independent":
        return IndependentNormal(n_components, coords.shape[0], dtype=dtype, device=device)
    common = dict(lengthscale=0.1, dtype=dtype, device=device, random_state=0)
    if kind.startswith("mggp"):
        common.update(groups=groups, multigroup=True)
    if kind.endswith("svgp"):
        return SVGP(coords, n_components, num_inducing=args.inducing, **common)
    return LCGP(coords, n_components, n_neighbors=args.neighbors, **common)


def time_epoch(layer, C: Counts, batch: int, epochs: int, generator) -> float:
    opt = torch.optim.Adam(layer.parameters(), lr=0.01)
    N = layer.n_samples
    times = []
    for epoch in range(epochs + 1):  # the first two batches warm up allocators and caches
        perm = torch.randperm(N, generator=generator).to(C.device)
        if epoch == 0:
            perm = perm[: 2 * batch]
        if C.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for idx in perm.split(batch):
            opt.zero_grad()
            loss = -layer.elbo(C.select(idx), idx, check=False).total
            loss.backward()
            opt.step()
        if C.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="10k and 50k spots")
    p.add_argument("--spots", type=int, nargs="*", help="numbers of spots (overrides --full)")
    p.add_argument("--features", type=int, default=100)
    p.add_argument("--components", type=int, default=5)
    p.add_argument("--inducing", type=int, default=500, help="SVGP inducing points")
    p.add_argument("--neighbors", type=int, default=8, help="LCGP neighbours K")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=1, help="timed epochs (the best is reported)")
    p.add_argument("--priors", nargs="*", default=["independent", "svgp", "lcgp", "mggp-svgp", "mggp-lcgp"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spots = args.spots or ([10_000, 50_000] if args.full else [2_000, 5_000])
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    print(f"device={device}, dtype={args.dtype}, threads={torch.get_num_threads()}, features={args.features}, "
          f"K={args.components}, M={args.inducing}, neighbours={args.neighbors}, batch={args.batch}")
    print(f"{'spots':>7} {'prior':>12} {'setup s':>8} {'epoch s':>8} {'ms/batch':>9}")
    for n in spots:
        X, coords = simulate(n, args.features, args.components, g)
        groups = (coords[:, 0] > 0.5).long()  # two groups: left and right halves
        C = Counts(X.to(dtype)).to(device)
        coords = coords.to(dtype)
        for kind in args.priors:
            t0 = time.perf_counter()
            prior = make_prior(kind, coords, groups, args.components, args, dtype, device)
            layer = LogNormalPoisson(args.features, n, args.components, factors=prior, dtype=dtype, device=device)
            setup = time.perf_counter() - t0
            epoch = time_epoch(layer, C, args.batch, args.epochs, g)
            n_batches = math.ceil(n / args.batch)
            print(f"{n:>7} {kind:>12} {setup:>8.2f} {epoch:>8.2f} {1000 * epoch / n_batches:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
