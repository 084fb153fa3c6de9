"""Peak memory and time per epoch: a backed .h5ad streamed from disk vs the same fit in memory.

Writes a generated sparse count matrix (``--rows`` x ``--cols``, ``--density`` nonzeros, CSR,
float32) to an ``.h5ad`` once, then fits it in a fresh process per case:

* ``backed``: ``anndata.read_h5ad(path, backed='r')``; the rows come from the file in blocks
  of ``--batch-size`` (:class:`torchnmf.anndata_io.BackedRows`);
* ``h5py``: the same blocks with no AnnData opened (``BackedRows`` over ``h5py.File(path)['X']``),
  as :mod:`torchnmf.tl` now fits a path: anndata loads ``obs`` (a name per cell) even backed;
* ``memory``: ``anndata.read_h5ad(path)`` (the matrix in memory), the same fit over
  :class:`torchnmf.streaming.SparseRows` of it.

Fits: Gamma-Poisson SVI (:func:`torchnmf.parallel.fit_gamma_svi`) and online NMF
(:func:`torchnmf.parallel.fit_nmf_online`, KL), rank ``--rank``, rows in file order. Each case
reports the memory opening the file took ("open": the AnnData's obs and var, or the whole
matrix for ``memory``), then the peak resident memory of the fit above the memory after
opening (imports done, a warm-up fit run on a small file of two blocks read the same way, the
peak then reset through ``/proc/self/clear_refs``; Linux only; the row source, the model and
the fit), the size of one row block as the fit holds it (its CSR arrays: values, column
indices, row pointers, in the types the source gives) and of the factors, their ratio, and
the seconds per epoch (wall, median of the epochs). "in use": the same streamed case run
again with ``MALLOC_MMAP_THRESHOLD_=131072``, where glibc gives every freed array of 128 KiB
or more back at once, so fresh arrays show as resident (glibc otherwise reuses memory freed
before the fit, e.g. by opening an AnnData, without growing; that run is slower). Issue 21's
target: backed peak <= 1.5 x (block + factors), backed time per epoch <= 2 x memory's.

    python benchmarks/anndata_backed.py                               # 300000 x 2000, 5% nonzeros
    python benchmarks/anndata_backed.py --rows 50000 --epochs 2       # smaller
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time


def rss_mib(field: str = "VmRSS") -> float:
    """Resident memory of this process now (``VmRSS``) or at its peak (``VmHWM``), from Linux /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Start the peak (``VmHWM``) afresh from the current resident memory (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def generate(path: str, rows: int, cols: int, density: float, seed: int = 0) -> int:
    """Write a CSR count matrix of Poisson-Gamma rows to ``path`` in chunks; return its nonzeros."""
    import anndata
    import numpy as np
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    chunks, nnz = [], 0
    for lo in range(0, rows, 50_000):
        n = min(50_000, rows - lo)
        M = sp.random(n, cols, density=density, format="csr", dtype=np.float32, random_state=rng)
        M.data = (1 + rng.poisson(2.0, M.nnz)).astype(np.float32)
        chunks.append(M)
        nnz += M.nnz
    anndata.AnnData(X=sp.vstack(chunks, format="csr")).write_h5ad(path)
    return nnz


def case(path: str, warm_path: str, mode: str, fit: str, rank: int, batch_size: int, epochs: int, queue) -> None:
    """One fit in this (fresh) process; puts its figures on ``queue``."""
    import numpy as np
    import torch

    import anndata
    from torchnmf.anndata_io import backed_rows
    from torchnmf.history import History
    from torchnmf.nmf import NMF
    from torchnmf.parallel import fit_gamma_svi, fit_nmf_online
    from torchnmf.poisson import GammaPoisson
    from torchnmf.streaming import SparseRows

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))

    def run_fit(source, epochs, history):
        N, C = source.shape
        g = torch.Generator().manual_seed(0)
        if fit == "gamma_svi":
            layer = GammaPoisson(N, C, rank, generator=g, dtype=torch.float32)
            fit_gamma_svi(layer, source, batch_size=batch_size, epochs=epochs, shuffle=False, history=history)
            return sum(p.numel() * p.element_size() for p in layer.parameters())
        W = torch.rand(C, rank, generator=g, dtype=torch.float32)
        fit_nmf_online(NMF(W=W, rank=rank), source, batch_size=batch_size, epochs=epochs, beta=1, shuffle=False,
                       history=history)
        return W.numel() * 4 + batch_size * rank * 4  # W and one block's activations

    # warm up on a little matrix read the way this case reads (lazy imports, kernels, HDF5's first
    # reads, allocator), then measure from here
    import gc

    import h5py

    from torchnmf.anndata_io import BackedRows

    small = None
    if mode == "memory":
        run_fit(SparseRows(anndata.read_h5ad(warm_path).X, dtype=torch.float32), 1, History())
    elif mode == "backed":
        small = anndata.read_h5ad(warm_path, backed="r")
        run_fit(backed_rows(small, use_highly_variable=False, dtype=torch.float32)[0], 1, History())
        small.file.close()
    else:
        with h5py.File(warm_path, "r") as small:
            run_fit(BackedRows(small["X"], dtype=torch.float32), 1, History())
    del small
    gc.collect()
    # opening the file is the user's (an AnnData's obs and var, or the whole matrix in memory): its
    # memory is reported apart; the fit's peak counts from here, the row source included
    start = rss_mib()
    if mode == "backed":
        adata = anndata.read_h5ad(path, backed="r")
    elif mode == "h5py":
        adata = h5py.File(path, "r")
    else:
        adata = anndata.read_h5ad(path)
    gc.collect()
    reset_peak()
    base = rss_mib()
    opened = base - start
    if mode == "backed":
        source, _ = backed_rows(adata, use_highly_variable=False, dtype=torch.float32)
    elif mode == "h5py":
        source = BackedRows(adata["X"], dtype=torch.float32)
    else:
        source = SparseRows(adata.X, dtype=torch.float32, check=False)
    N, C = source.shape
    history = History(name=fit)
    t0 = time.perf_counter()
    factors = run_fit(source, epochs, history)
    total = time.perf_counter() - t0
    times = [0.0] + history.times
    per_epoch = statistics.median(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else total
    peak = rss_mib("VmHWM")
    indptr = np.asarray(source._arrays["indptr"]) if mode != "memory" else np.asarray(adata.X.indptr)
    block_nnz = max(int(indptr[min(lo + batch_size, N)] - indptr[lo]) for lo in range(0, N, batch_size))
    # one block as the fit holds it: its values, a column index each, row pointers (their types
    # from a batch of this source: int32 indices from BackedRows, int64 from SparseRows)
    X = source.batch(range(min(N, batch_size))).X
    block = block_nnz * (X.values().element_size() + X.col_indices().element_size()) + \
        (batch_size + 1) * X.crow_indices().element_size()
    queue.put(dict(mode=mode, fit=fit, peak=peak - base, block=block / 2 ** 20, factors=factors / 2 ** 20,
                   per_epoch=per_epoch, opened=opened))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--cols", type=int, default=2000)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--fits", nargs="+", default=["gamma_svi", "nmf_online"], choices=["gamma_svi", "nmf_online"])
    p.add_argument("--dir", default=None, help="where the .h5ad goes (default: a temporary directory)")
    p.add_argument("--modes", nargs="+", default=["backed", "h5py"], choices=["backed", "h5py"],
                   help="streamed cases beside the in-memory one")
    p.add_argument("--no-live", dest="live", action="store_false",
                   help="skip the second run of the streamed cases that measures the memory in use")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "counts.h5ad")
        t0 = time.perf_counter()
        nnz = generate(path, args.rows, args.cols, args.density)
        warm = os.path.join(tmp, "warm.h5ad")  # the warm-up's: two blocks of the same width and density
        generate(warm, 2 * args.batch_size, args.cols, args.density, seed=1)
        print(f"{args.rows} x {args.cols}, {nnz} nonzeros ({nnz / args.rows / args.cols:.1%}), file "
              f"{os.path.getsize(path) / 2 ** 20:.0f} MiB, written in {time.perf_counter() - t0:.0f} s; rank "
              f"{args.rank}, blocks of {args.batch_size} rows, {args.epochs} epochs, "
              f"{os.environ.get('BENCH_THREADS', '1')} thread(s)")
        print()
        print("| fit        | X      | open (MiB) | peak of the fit (MiB) | in use (MiB)    | block (MiB) "
              "| factors (MiB) | peak / (block + factors) | s / epoch | vs memory |")
        print("|------------|--------|------------|-----------------------|-----------------|-------------"
              "|---------------|--------------------------|-----------|-----------|")
        ctx = mp.get_context("spawn")

        def run(mode, fit, live=False):
            # live: glibc returns every freed array above 128 KiB at once (a static mmap threshold, read
            # at the child's start), so its resident peak is the peak of memory in use; slower
            env = os.environ.copy()
            if live:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
            try:
                q = ctx.Queue()
                proc = ctx.Process(target=case, args=(path, warm, mode, fit, args.rank, args.batch_size, args.epochs,
                                                      q))
                proc.start()
                out = q.get()
                proc.join()
                return out
            finally:
                os.environ.clear()
                os.environ.update(env)

        for fit in args.fits:
            rows = {mode: run(mode, fit) for mode in ("memory", *args.modes)}
            live = {mode: run(mode, fit, live=True)["peak"] for mode in args.modes} if args.live else {}
            for mode in ("memory", *args.modes):
                r = rows[mode]
                ratio = r["peak"] / (r["block"] + r["factors"])
                speed = r["per_epoch"] / rows["memory"]["per_epoch"]
                used = f"{live[mode]:.1f} ({live[mode] / (r['block'] + r['factors']):.2f}x)" if mode in live else "-"
                print(f"| {fit:10s} | {mode:6s} | {r['opened']:10.1f} | {r['peak']:21.1f} | {used:>15s} | "
                      f"{r['block']:11.1f} | {r['factors']:13.1f} | {ratio:24.2f} | {r['per_epoch']:9.2f} | "
                      f"{speed:9.2f} |")


if __name__ == "__main__":
    main()
