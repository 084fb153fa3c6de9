"""OpenMP wait policy on a shared machine: the same NMF.fit with torch's default (spinning)
OpenMP threads and with ``OMP_WAIT_POLICY=PASSIVE``, on a quiet machine and beside busy
processes (one per core, pure Python loops: the load of other users' jobs).

Each fit runs in its own fresh interpreter (the policy is read when OpenMP starts) and is
timed there, imports excluded. Prints one table; nothing is asserted.

    python benchmarks/omp_wait.py [--size 2000 500] [--rank 20] [--iters 100] [--repeat 3]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import time

CHILD = r"""
import sys, time, torch
from torchnmf import NMF
n, m, k, iters = map(int, sys.argv[1:5])
g = torch.Generator().manual_seed(0)
V = torch.rand(n, m, generator=g, dtype=torch.float64)
net = NMF((n, m), rank=k).double()
t = time.perf_counter()
net.fit(V, beta=1, tol=0, max_iter=iters)
print(time.perf_counter() - t)
"""


def _spin(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


def _torch_job(stop_at: float) -> None:
    """Another user's torch job: matrix products on every core, default (spinning) OpenMP threads."""
    import torch

    a = torch.rand(600, 600)
    while time.time() < stop_at:
        a = torch.tanh(a @ a)


def _fit_seconds(policy: str | None, args) -> float:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", CHILD, *map(str, (*args.size, args.rank, args.iters))],
                         env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=2, default=(2000, 500))
    p.add_argument("--rank", type=int, default=20)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy processes under load")
    args = p.parse_args(argv)
    rows = []
    for load in ("quiet", "busy", "torch"):
        procs = []
        if load != "quiet":
            stop_at = time.time() + 3600
            job = _spin if load == "busy" else _torch_job
            n = args.busy if load == "busy" else 1
            procs = [mp.get_context("spawn").Process(target=job, args=(stop_at,), daemon=True) for _ in range(n)]
            for q in procs:
                q.start()
        try:
            for policy in (None, "PASSIVE"):
                best = min(_fit_seconds(policy, args) for _ in range(args.repeat))
                rows.append((load, policy or "default (active)", best))
        finally:
            for q in procs:
                q.terminate()
    print(f"NMF.fit beta=1, {args.size[0]}x{args.size[1]} rank {args.rank}, {args.iters} iterations, "
          f"{os.cpu_count()} cores, best of {args.repeat}; busy = {args.busy} spinning Python processes, "
          f"torch = one other torch job (products on every core, default OpenMP policy)")
    print(f"{'machine':8s} {'OMP_WAIT_POLICY':18s} {'seconds':>8s} {'ms/iter':>8s}")
    for load, policy, s in rows:
        print(f"{load:8s} {policy:18s} {s:8.2f} {1e3 * s / args.iters:8.2f}")


if __name__ == "__main__":
    main()
