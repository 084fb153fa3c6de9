"""Scaling of data-parallel and streaming fits: time per epoch and peak memory.

CPU section (always): the same sparse count matrix fitted by 1 and by 2 processes (gloo on
this machine, rows sharded, statistics summed with all_reduce), each process with
``cores / processes`` threads:

* ``fit_nmf``         full-batch KL multiplicative updates, one epoch = one iteration;
* ``fit_gamma_cavi``  Gamma-Poisson CAVI, one epoch = one sweep;
* ``fit_nmf_online``  online MU over streamed row batches (DataLoader), one epoch = one pass.

The matrix is written once to disk and memory-mapped by every process
(:class:`torchnmf.streaming.SparseRows`), so each reads only its own rows. Peak memory is
the peak resident set of each process over the three fits (``ru_maxrss``), which includes
the torch runtime; the growth is over the process's resident set before it read its rows.
Every process gets ``--threads`` threads (default 1), so the speed-up compares processes,
not threads.

GPU section (only when cuda is available, or forced with ``--gpu-device``): one GPU,
sparse KL MU at 10^7 and 10^8 nonzeros (``--gpu-nnz``) and dense Euclidean MU with as
many entries, reporting ms per iteration, peak GPU memory, the achieved fraction of the
measured copy bandwidth (sparse: a bandwidth-bound model of the bytes moved) and of the
measured fp32 GEMM throughput (dense: 4·N·C·R flops per iteration).

Usage::

    python benchmarks/scaling.py                       # ~1 min: 10000 x 1000, 2e5 nonzeros, rank 16
    python benchmarks/scaling.py --rows 200000 --cols 5000 --density 0.01 --epochs 5   # 1e7 nonzeros
    python benchmarks/scaling.py --skip-cpu            # GPU section only
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torchnmf import distributed as tdist  # noqa: E402
from torchnmf.nmf import NMF  # noqa: E402
from torchnmf.parallel import fit_gamma_cavi, fit_nmf, fit_nmf_online  # noqa: E402
from torchnmf.poisson import GammaPoisson  # noqa: E402
from torchnmf.streaming import SparseRows, save_csr  # noqa: E402


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # pragma: no cover - not Linux
        return _rss_mb()


def _counts(rows: int, cols: int, density: float, seed: int = 0):
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    X = sp.random(rows, cols, density=density, format="csr", random_state=seed,
                  data_rvs=lambda k: rng.poisson(2.0, k) + 1.0)
    return X.astype(np.float32)


def _worker(rank, world, port, args, path, out):
    torch.set_num_threads(args.threads)
    if world > 1:
        tdist.init("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=600)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # torch's lazy imports, before the baseline
    tdist.barrier()
    base = _current_rss_mb()
    source = SparseRows(path, dtype=torch.float32)  # memory-mapped: a process reads only its rows
    shard = source.shard(rank, world)
    rows, Vl = shard.batch(np.arange(shard.rows.start, shard.rows.stop))
    n_rows, n_cols = source.shape
    g = torch.Generator().manual_seed(0)
    W0 = torch.rand(n_cols, args.rank, generator=g) + 0.1
    H0 = torch.rand(n_rows, args.rank, generator=g) + 0.1
    res = {"nnz_local": int(Vl._nnz())}

    model = NMF(W=W0, H=H0[shard.rows.start:shard.rows.stop])
    fit_nmf(model, Vl, beta=1, tol=0, max_iter=1)  # warm-up (allocations, caches)
    tdist.barrier()
    t = time.perf_counter()
    fit_nmf(model, Vl, beta=1, tol=0, max_iter=args.epochs)
    res["fit_nmf"] = (time.perf_counter() - t) / args.epochs

    layer = GammaPoisson(n_rows, n_cols, args.rank, generator=torch.Generator().manual_seed(1))
    fit_gamma_cavi(layer, Vl, max_iter=1, tol=0)
    tdist.barrier()
    t = time.perf_counter()
    fit_gamma_cavi(layer, Vl, max_iter=args.epochs, tol=0)
    res["fit_gamma_cavi"] = (time.perf_counter() - t) / args.epochs

    model = NMF(W=W0)
    tdist.barrier()
    t = time.perf_counter()
    fit_nmf_online(model, source, batch_size=args.batch_size, epochs=1, inner_iter=5)
    res["fit_nmf_online"] = time.perf_counter() - t

    res["peak_mb"] = _rss_mb()
    res["data_mb"] = _rss_mb() - base
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


def cpu_section(args) -> None:
    print(f"\n## CPU, gloo: {args.rows} x {args.cols}, density {args.density:g} "
          f"(~{args.rows * args.cols * args.density:.3g} nonzeros), rank {args.rank}, float32, "
          f"{args.threads} thread(s) per process, {os.cpu_count()} cores")
    results = {}
    with tempfile.TemporaryDirectory() as out:
        path = save_csr(_counts(args.rows, args.cols, args.density), os.path.join(out, "counts.csr"))
        for world in args.procs:
            port = tdist.find_free_port()
            mp.start_processes(_worker, args=(world, port, args, path, out), nprocs=world, start_method="spawn")
            results[world] = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]
    print("| fit | processes | s / epoch | speed-up |")
    print("|---|---|---|---|")
    for name in ("fit_nmf", "fit_gamma_cavi", "fit_nmf_online"):
        t1 = max(r[name] for r in results[args.procs[0]])
        for world in args.procs:
            t = max(r[name] for r in results[world])  # the slowest process sets the pace
            print(f"| {name} | {world} | {t:.3f} | {t1 / t:.2f} |")
    print("\n| processes | nonzeros / process | peak RSS / process (MB) | growth over the runtime (MB) |")
    print("|---|---|---|---|")
    for world in args.procs:
        nnz = max(r["nnz_local"] for r in results[world])
        peak = max(r["peak_mb"] for r in results[world])
        data = max(r["data_mb"] for r in results[world])
        print(f"| {world} | {nnz} | {peak:.0f} | {data:.0f} |")


def _timed(fn, reps: int, device: str) -> float:
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def gpu_section(args) -> None:
    from torchnmf.updates import mu_update

    dev = args.gpu_device
    name = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu"
    print(f"\n## one device: {name}, float32, rank {args.gpu_rank}")
    # measured ceilings: device-to-device copy bandwidth and fp32 GEMM throughput
    buf = torch.empty(args.copy_mb * 2**20 // 4, device=dev)
    copy_s = _timed(lambda: buf.clone(), 5, dev)
    bandwidth = 2 * buf.numel() * 4 / copy_s  # read + write
    del buf
    n = args.gemm_n
    A = torch.rand(n, n, device=dev)
    gemm_s = _timed(lambda: A @ A, 5, dev)
    gemm = 2 * n ** 3 / gemm_s
    del A
    print(f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s, fp32 GEMM {gemm / 1e12:.1f} TFLOP/s "
          f"(TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'})")
    print("| problem | nnz / entries | ms / iteration | peak memory (GB) | achieved | fraction of ceiling |")
    print("|---|---|---|---|---|---|")
    R = args.gpu_rank
    for nnz in args.gpu_nnz:
        nnz = int(nnz)
        cols = args.gpu_cols
        rows = max(1, nnz // (cols // 100))  # density 1%
        g = torch.Generator(device=dev).manual_seed(0)  # built and coalesced on the device: fast at 1e8
        idx = torch.stack([torch.randint(rows, (nnz,), generator=g, device=dev),
                           torch.randint(cols, (nnz,), generator=g, device=dev)])
        vals = torch.poisson(torch.full((nnz,), 2.0, device=dev), generator=g) + 1
        V = torch.sparse_coo_tensor(idx, vals, (rows, cols), check_invariants=False).coalesce()
        del idx, vals
        Vt = V.t().coalesce()
        nnz = V._nnz()
        W = torch.rand(cols, R, device=dev)
        H = torch.rand(rows, R, device=dev)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        cache_v, cache_t = {}, {}

        def sparse_iter():
            nonlocal H, W
            H = mu_update(V, W, H, 1.0, cache=cache_v)
            W = mu_update(Vt, H, W, 1.0, cache=cache_t)

        t = _timed(sparse_iter, args.reps, dev)
        peak = torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else float("nan")
        # per nonzero and factor update: gather two factor rows for the reconstruction, one for
        # the sparse product, plus indices and value: a bandwidth-bound lower estimate of traffic
        bytes_moved = 2 * nnz * (3 * R * 4 + 2 * 8 + 2 * 4)
        print(f"| sparse KL MU {rows}x{cols} | {nnz:.3g} | {t * 1e3:.1f} | {peak:.2f} | "
              f"{bytes_moved / t / 1e9:.0f} GB/s (model) | {bytes_moved / t / bandwidth:.2f} of copy bandwidth |")
        del V, Vt, W, H, cache_v, cache_t
        # dense Euclidean MU with as many entries: GEMM-bound
        rows_d = max(1, nnz // cols)
        Vd = torch.rand(rows_d, cols, device=dev)
        Wd = torch.rand(cols, R, device=dev)
        Hd = torch.rand(rows_d, R, device=dev)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def dense_iter():
            nonlocal Hd, Wd
            Hd = mu_update(Vd, Wd, Hd, 2.0)
            Wd = mu_update(Vd.t(), Hd, Wd, 2.0)

        t = _timed(dense_iter, args.reps, dev)
        peak = torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else float("nan")
        flops = 4 * rows_d * cols * R + 4 * (rows_d + cols) * R * R
        print(f"| dense Euclidean MU {rows_d}x{cols} | {rows_d * cols:.3g} | {t * 1e3:.1f} | {peak:.2f} | "
              f"{flops / t / 1e12:.2f} TFLOP/s | {flops / t / gemm:.2f} of GEMM |")
        del Vd, Wd, Hd


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10000)
    ap.add_argument("--cols", type=int, default=1000)
    ap.add_argument("--density", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--gpu-device", default="cuda" if torch.cuda.is_available() else None,
                    help="run the GPU section on this device (default: cuda when available, else skipped)")
    ap.add_argument("--gpu-nnz", type=float, nargs="+", default=[1e7, 1e8])
    ap.add_argument("--gpu-cols", type=int, default=10000)
    ap.add_argument("--gpu-rank", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--copy-mb", type=int, default=1024)
    ap.add_argument("--gemm-n", type=int, default=8192)
    args = ap.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {platform.platform()}, python {platform.python_version()}, "
          f"load average {load:.1f} on {os.cpu_count()} cores at start")
    if not args.skip_cpu:
        cpu_section(args)
    if args.gpu_device:
        gpu_section(args)
    else:
        print("\n(no cuda device: GPU section skipped)")


if __name__ == "__main__":
    main()
