"""Cost growth on sparse counts: seconds per iteration of three nonzero-only fits vs nnz and rank.

For each number of nonzeros (``--nnz``) a random count matrix of density ``--density`` (1%) and
aspect 2:5 is drawn (10^7 nonzeros: 20000 x 50000, the matrix of issue 16), values
``1 + Poisson(2)``, float32, in CSR layout; for each rank (``--ranks``) the script times

* ``NMF.fit``   — ``NMF.fit(V, beta=1)`` on the CSR tensor, one iteration (H then W update, the
  divergence measured at every iteration, ``check_every=1``, where the default measures every
  10th): the CPU time between the fit's first and last records over their number, so the
  per-fit set-up (input checks, the transpose) is left out;
* ``CAVI``      — one ``CAVI`` sweep of ``GammaPoisson`` on data prepared once (``prepare``);
* ``PNMF ELBO`` — the sparse ELBO of ``LogNormalPoisson`` (its default ``'lower-bound'`` mode),
  value and gradient (one backward pass), on ``Counts`` made once.

Times are CPU seconds (``time.process_time``) at one thread (``--threads``), the least of
``--reps`` repetitions of at least ``--min-time`` seconds each, so a busy machine perturbs them
less than wall time. ``nmf/cavi`` is the ratio of the ``NMF.fit`` and ``CAVI`` columns (issue
16's target: <= 1). Cells whose ``nnz * rank`` exceeds ``--max-work`` are skipped (printed as
``-``). ``--before REV`` adds a column ``NMF@REV``: ``NMF.fit`` with the sparse update of git
revision ``REV`` patched in (the same fit otherwise), timed in the same process.

The second table gives, per method and rank, the exponent ``a`` of ``time ~ nnz^a`` fitted by
least squares on log-log (``n`` points); the dense ``O((N + C) R)`` work per iteration is constant
relative to nnz here since the density is fixed, so ``a`` should be near 1.

Usage::

    python benchmarks/growth.py                                  # 1e5 and 1e6 nonzeros (~5 min)
    python benchmarks/growth.py --nnz 1e5 1e6 1e7 --ranks 10 50 200 --max-work 5e8
    python benchmarks/growth.py --nnz 1e6 1e7 --ranks 20 --methods NMF.fit CAVI --before c772cb8
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torchnmf.history import History  # noqa: E402
from torchnmf.nmf import NMF  # noqa: E402
from torchnmf.poisson import Counts, GammaPoisson, LogNormalPoisson  # noqa: E402
from torchnmf.trainer import CAVI  # noqa: E402

METHODS = ("NMF.fit", "CAVI", "PNMF ELBO")


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def counts(nnz: float, density: float, seed: int = 0):
    """A random CSR count matrix of about ``nnz`` nonzeros, density ``density``, aspect 2:5."""
    cells = nnz / density
    N = max(2, round(math.sqrt(cells * 2 / 5)))
    C = max(2, round(cells / N))
    g = torch.Generator().manual_seed(seed)
    flat = torch.unique(torch.randint(0, N * C, (int(nnz),), generator=g))
    vals = 1.0 + torch.poisson(torch.full((flat.numel(),), 2.0), generator=g)
    V = torch.sparse_coo_tensor(torch.stack([flat // C, flat % C]), vals, (N, C), check_invariants=False).coalesce()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return V.to_sparse_csr()


def best(run, min_time: float, reps: int, per: int = 1) -> float:
    """Least CPU seconds per unit over ``reps`` repetitions of ``run(k)`` (k units each, >= min_time)."""
    t0 = time.process_time()
    run(1)
    once = max(time.process_time() - t0, 1e-6)
    k = max(1, math.ceil(min_time / once))
    # a calibration run long enough counts as a repetition (large cells are slow)
    out, reps = (once, reps - 1) if k == 1 else (math.inf, reps)
    for _ in range(reps):
        t0 = time.process_time()
        run(k)
        out = min(out, (time.process_time() - t0) / k)
    return out / per


class _Stamps(History):
    """A history that also notes the CPU time of each record (one per iteration of ``NMF.fit``)."""

    def __init__(self):
        super().__init__()
        self.stamps = []

    def append(self, record) -> bool:
        self.stamps.append(time.process_time())
        return super().append(record)


def time_nmf(V, R: int, min_time: float, reps: int) -> float:
    N, C = V.shape
    torch.manual_seed(0)
    m = NMF(W=(C, R), H=(N, R))

    def fit(iters):
        h = _Stamps()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tol=0: no convergence warning either way
            m.fit(V, beta=1, tol=0, max_iter=iters, history=h, check_every=1)
        return h.stamps

    # with check_every=1 the fit records the divergence at every iteration (measured at its
    # start): the CPU time between consecutive records is one iteration, set-up left out
    stamps = fit(3)
    once = max(min(b - a for a, b in zip(stamps, stamps[1:])), 1e-4)
    k = min(500, max(2, math.ceil(min_time / once) + 1))
    out = math.inf
    for _ in range(reps):
        stamps = fit(k)
        out = min(out, (stamps[-1] - stamps[0]) / (len(stamps) - 1))
    return out


def sparse_update_at(rev: str):
    """``torchnmf.updates._sparse_update`` as it was at git revision ``rev`` (a before/after column)."""
    import subprocess
    import types

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    for where in (root, os.getcwd()):  # the script's checkout, else the current one (an export)
        got = subprocess.run(["git", "show", f"{rev}:torchnmf/updates.py"], cwd=where,
                             capture_output=True, text=True)
        if got.returncode == 0:
            break
    else:
        raise SystemExit(f"--before {rev}: git show failed: {got.stderr.strip()}")
    src = got.stdout
    mod = types.ModuleType(f"torchnmf._updates_at_{rev}")
    mod.__package__ = "torchnmf"
    exec(compile(src, f"{rev}:torchnmf/updates.py", "exec"), mod.__dict__)
    return mod._sparse_update


def time_nmf_before(V, R: int, min_time: float, reps: int, update) -> float:
    """:func:`time_nmf` with the sparse update of another revision patched in."""
    import torchnmf.updates as updates

    now = updates._sparse_update
    updates._sparse_update = update
    try:
        return time_nmf(V, R, min_time, reps)
    finally:
        updates._sparse_update = now


def time_cavi(V, R: int, min_time: float, reps: int) -> float:
    N, C = V.shape
    layer = GammaPoisson(N, C, R, generator=torch.Generator().manual_seed(0))
    data = layer.prepare(V)
    trainer = CAVI(layer)

    def run(k):
        for _ in range(k):
            trainer.step(lambda: data)

    return best(run, min_time, reps)


def time_pnmf(V, R: int, min_time: float, reps: int) -> float:
    D, N = V.shape
    torch.manual_seed(0)
    layer = LogNormalPoisson(D, N, R)
    X = Counts(V)
    params = [p for p in layer.parameters() if p.requires_grad]

    def run(k):
        for _ in range(k):
            for p in params:
                p.grad = None
            (-layer.elbo(X, check=False).total).backward()

    return best(run, min_time, reps)


def slope(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sxx if sxx > 0 else float("nan")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nnz", type=float, nargs="+", default=[1e5, 1e6])
    ap.add_argument("--ranks", type=int, nargs="+", default=[10, 50, 200])
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=1.0, help="CPU seconds per repetition at least")
    ap.add_argument("--max-work", type=float, default=5e8, help="skip cells with nnz * rank above this")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--before", metavar="REV", default=None,
                    help="also time NMF.fit with the sparse update of git revision REV (column 'NMF@REV')")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    timers = {"NMF.fit": time_nmf, "CAVI": time_cavi, "PNMF ELBO": time_pnmf}
    methods = list(args.methods)
    if args.before:
        old = sparse_update_at(args.before)
        name = f"NMF@{args.before[:7]}"
        timers[name] = lambda V, R, t, n: time_nmf_before(V, R, t, n, old)
        methods.insert(0, name)
    args.methods = methods
    print(f"# torch {torch.__version__}, {args.threads} thread(s), float32, CPU seconds (process_time), "
          f"min of {args.reps}; load average at start: {load()}")
    head = f"{'nnz':>10} {'shape':>13} {'rank':>5} " + " ".join(f"{m:>11}" for m in args.methods)
    if "NMF.fit" in args.methods and "CAVI" in args.methods:
        head += f" {'nmf/cavi':>9}"
    if args.before:
        head += f" {'speed-up':>9}"
    print(head)
    print("-" * len(head))
    results = {}  # (method, rank) -> [(nnz, seconds)]
    for target in args.nnz:
        V = counts(target, args.density)
        nnz = V.values().numel()
        for R in args.ranks:
            row = {}
            for m in args.methods:
                if target * R > args.max_work:
                    continue
                row[m] = timers[m](V, R, args.min_time, args.reps)
                results.setdefault((m, R), []).append((nnz, row[m]))
            cells = " ".join(f"{row[m]:>11.4f}" if m in row else f"{'-':>11}" for m in args.methods)
            line = f"{nnz:>10d} {V.shape[0]:>6d}x{V.shape[1]:<6d} {R:>5d} {cells}"
            if "NMF.fit" in row and "CAVI" in row:
                line += f" {row['NMF.fit'] / row['CAVI']:>9.2f}"
            if args.before and "NMF.fit" in row and methods[0] in row:
                line += f" {row[methods[0]] / row['NMF.fit']:>8.1f}x"
            print(line, flush=True)
        del V
    print(f"\n# time ~ nnz^a (least squares on log-log); load average at end: {load()}")
    head = f"{'method':<11} " + " ".join(f"{'a@R=' + str(R):>10}" for R in args.ranks)
    print(head)
    print("-" * len(head))
    for m in args.methods:
        cells = []
        for R in args.ranks:
            pts = results.get((m, R), [])
            cells.append(f"{slope(*zip(*pts)):>6.2f} ({len(pts)})" if len(pts) >= 2 else f"{'-':>10}")
        print(f"{m:<11} " + " ".join(f"{c:>10}" for c in cells))


if __name__ == "__main__":
    main()
