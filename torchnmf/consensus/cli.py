"""``torchnmf consensus``: a cNMF study of a matrix file from the command line.

::

    torchnmf consensus FILE --ranks 5 6 7 8 [--replicates 100] [--genes 2000 | --no-prepare]
                       [--beta-loss {frobenius,kullback-leibler}] [--density-threshold 0.5]
                       [--local-neighborhood-size 0.3] [--max-iter 1000] [--tol TOL]
                       [--solver {auto,cd,mu}]
                       [--device auto] [--seed 0] [--transpose] [--layer NAME] [--top 30]
                       [--overwrite] [--quiet] [--debug] -o OUTDIR

``FILE`` is anything ``torchnmf fit`` reads (:func:`torchnmf.io.read_matrix`). Writes

- ``OUTDIR/k{K}.npz`` per rank: ``components`` (K, features), ``usages`` (samples, K),
  ``feature_names``, ``sample_names``, the scores and the clustering; written as soon as the
  rank is done, it is also the checkpoint: a run started again with the same settings and
  data loads it instead of recomputing the rank (other settings are refused, or recomputed
  with ``--overwrite``);
- ``OUTDIR/k{K}.json`` per rank: each program's top features by name;
- ``OUTDIR/k_selection.json`` (keys ``ranks``, ``stability``, ``error``, ``cophenetic``,
  ``kept``) and ``OUTDIR/k_selection.png``, once every rank is done.

Every file is written to a temporary name and renamed. All input and settings are checked
before anything is written; a mistake prints one line ``torchnmf: error: ...`` (exit 2).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from typing import List

import numpy as np

from .. import io as tio

__all__ = ["add_parser", "run", "TOP_FEATURES"]

TOP_FEATURES = 30  # features per program listed in k{K}.json


def add_parser(sub) -> None:
    """Add the ``consensus`` subcommand to ``torchnmf``'s subparsers ``sub``."""
    c = sub.add_parser("consensus", help="consensus NMF over several ranks, as cNMF (stable programs, k-selection)",
                       description="Fit --replicates NMFs at each of --ranks, cluster them into consensus "
                                   "programs and score the ranks (cNMF, Kotliar et al. 2019).")
    c.add_argument("input", metavar="FILE", help=f"matrix file, samples x features ({', '.join(tio.FORMATS)})")
    c.add_argument("--ranks", type=int, nargs="+", required=True, metavar="K", help="ranks to study, each >= 2")
    c.add_argument("--replicates", type=int, default=100, help="random restarts per rank, >= 2 (default: 100)")
    prep = c.add_mutually_exclusive_group()
    prep.add_argument("--genes", type=int, default=None, metavar="N",
                      help="keep the N most over-dispersed features and scale them to unit variance "
                           "(default: 2000 for count input)")
    prep.add_argument("--no-prepare", action="store_true",
                      help="factorize the matrix as it is (already prepared)")
    c.add_argument("--beta-loss", choices=("frobenius", "kullback-leibler"), default="frobenius",
                   help="divergence (default: frobenius, as cNMF)")
    c.add_argument("--density-threshold", type=float, default=0.5,
                   help="drop replicate components with local density at or above this (default: 0.5; 2 keeps all)")
    c.add_argument("--local-neighborhood-size", type=float, default=0.3,
                   help="neighbours for the local density, as a fraction of --replicates (default: 0.3)")
    c.add_argument("--max-iter", type=int, default=1000, help="iteration limit of each fit (default: 1000)")
    c.add_argument("--tol", type=float, default=None,
                   help="stop rule of each fit (default: 1e-4 with coordinate descent, as cNMF; 1e-6 with "
                        "multiplicative updates)")
    c.add_argument("--solver", choices=("auto", "cd", "mu"), default="auto",
                   help="replicate solver: coordinate descent (frobenius only) or multiplicative updates "
                        "(default: auto, cd for frobenius, as cNMF)")
    c.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1'... (default: auto)")
    c.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    c.add_argument("--transpose", action="store_true", help="the file is stored features x samples")
    c.add_argument("--layer", default=None, metavar="NAME", help="for .h5ad: a layer instead of X, or 'raw'")
    c.add_argument("--top", type=int, default=TOP_FEATURES, help=f"features per program in k{{K}}.json "
                                                                  f"(default: {TOP_FEATURES})")
    c.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output directory")
    c.add_argument("--overwrite", action="store_true",
                   help="recompute ranks saved in OUTDIR with other settings instead of refusing")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--debug", action="store_true", help="show tracebacks")


def _check_args(args, error) -> None:
    bad = [k for k in args.ranks if k < 2]
    if bad:
        raise error(f"--ranks must be at least 2, got {bad[0]}")
    if len(set(args.ranks)) != len(args.ranks):
        raise error(f"--ranks has repeated values: {args.ranks}")
    if args.replicates < 2:
        raise error(f"--replicates must be at least 2 (a consensus needs several fits), got {args.replicates}")
    if args.genes is not None and args.genes < 1:
        raise error(f"--genes must be a positive integer, got {args.genes}")
    if not (math.isfinite(args.density_threshold) and args.density_threshold > 0):
        raise error(f"--density-threshold must be positive (2 keeps every component), got {args.density_threshold}")
    if not (0 < args.local_neighborhood_size <= 1):
        raise error(f"--local-neighborhood-size must be in (0, 1], got {args.local_neighborhood_size}")
    if args.max_iter < 1:
        raise error(f"--max-iter must be a positive integer, got {args.max_iter}")
    if args.tol is not None and not (math.isfinite(args.tol) and args.tol >= 0):
        raise error(f"--tol must be >= 0, got {args.tol}")
    if args.top < 1:
        raise error(f"--top must be a positive integer, got {args.top}")
    if args.layer is not None and not args.input.lower().endswith(".h5ad"):
        raise error("--layer applies to .h5ad input only")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise error(f"-o {args.output} exists and is not a directory")


def _programs(res, feature_names, top: int) -> dict:
    share = res.usages.sum(0)
    share = share / (share.sum() or 1.0)
    programs = []
    for i, row in enumerate(res.clustering.consensus):
        idx = np.argsort(-row, kind="stable")[:top]
        programs.append({"program": i, "usage_share": round(float(share[i]), 6),
                         "top_features": [str(feature_names[j]) for j in idx],
                         "weights": [float(f"{row[j]:.6g}") for j in idx]})
    return {"k": res.clustering.k, "stability": _num(res.stability), "error": _num(res.error),
            "cophenetic": _num(res.cophenetic), "kept": res.kept, "programs": programs}


def _num(x: float):
    return float(x) if math.isfinite(x) else None  # JSON has no NaN


def _write_json(path: str, obj, error) -> None:
    try:
        with tio.atomic_write(path, "w") as fh:
            json.dump(obj, fh, indent=2)
    except OSError as err:
        raise error(f"cannot write {path}: {err.strerror or err}") from err


def run(args, error=ValueError) -> int:
    """Run ``torchnmf consensus`` from parsed ``args``; ``error`` is the exception type for user mistakes.

    Returns
    -------
    int
        The exit status (0).
    """
    from .checkpoint import fingerprint, load_rank, save_rank
    from .estimator import ConsensusNMF, k_selection_table

    _check_args(args, error)
    try:
        M = tio.read_matrix(args.input, layer=args.layer, transpose=args.transpose)
    except ValueError as err:
        raise error(str(err)) from err
    prepare = False if args.no_prepare else (True if args.genes is not None else "auto")
    est = ConsensusNMF(args.ranks, args.replicates, beta_loss=args.beta_loss,
                       n_top_features=2000 if args.genes is None else args.genes, prepare=prepare,
                       density_threshold=args.density_threshold, local_neighborhood_size=args.local_neighborhood_size,
                       max_iter=args.max_iter, tol=args.tol, solver=args.solver, random_state=args.seed,
                       device=args.device, verbose=not args.quiet)
    try:
        params = est._validate()
        prep = est._prepare(M.X, M.col_names, M.row_names)
    except (ValueError, TypeError) as err:
        msg = str(err)
        for name, flag in (("n_top_features", "--genes"), ("local_neighborhood_size", "--local-neighborhood-size"),
                           ("n_replicates", "--replicates")):
            msg = msg.replace(name, flag)
        raise error(f"{M.source}: {msg}") from err
    top = min(prep.X.shape)
    bad = [k for k in params["ranks"] if k > top]
    if bad:
        raise error(f"--ranks {bad[0]} is larger than min(n_samples, n_features) = {top} of the "
                    f"{'prepared ' if prep.prepared else ''}matrix {prep.X.shape[0]} x {prep.X.shape[1]}")
    fp_params = dict(replicates=params["n_replicates"], beta=params["beta"], prepared=prep.prepared,
                     genes=est.n_top_features if prep.prepared else None, density_threshold=params["density_threshold"],
                     local_neighborhood_size=params["local_neighborhood_size"], max_iter=params["max_iter"],
                     tol=params["tol"], seed=params["seed"], dtype=str(params["dtype"]), solver=params["solver"])
    fp = fingerprint(fp_params, prep.X)
    out = args.output
    path = {k: os.path.join(out, f"k{k}.npz") for k in params["ranks"]}
    done = {}
    for k in params["ranks"]:  # every checkpoint checked before anything is fitted or written
        try:
            res = load_rank(path[k], k, fp)
        except ValueError as err:
            if not args.overwrite:
                raise error(str(err)) from None
            res = None
        if res is not None:
            done[k] = res
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise error(f"cannot create {out}: {err.strerror or err}") from err
    if done and not args.quiet:
        print(f"resuming: ranks {sorted(done)} loaded from {out}")

    def on_rank(res) -> None:
        try:
            save_rank(path[res.clustering.k], res, prep.feature_names, prep.sample_names, fp)
        except OSError as err:
            raise error(f"cannot write {path[res.clustering.k]}: {err.strerror or err}") from err
        _write_json(os.path.join(out, f"k{res.clustering.k}.json"), _programs(res, prep.feature_names, args.top), error)

    from ..engine import ConvergenceWarning

    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            results = est._fit_ranks(prep, params, done, on_rank=on_rank)
    except (ValueError, FloatingPointError) as err:
        raise error(str(err).replace("density_threshold=", "--density-threshold ")) from err
    # ranks that did not converge: one line each after the table, as 'torchnmf fit' does; others as they were
    unconverged = [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, ConvergenceWarning)]
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    for k in done:  # a run killed between a rank's .npz and .json: write the missing .json
        jpath = os.path.join(out, f"k{k}.json")
        if not os.path.exists(jpath):
            _write_json(jpath, _programs(done[k], prep.feature_names, args.top), error)
    table = k_selection_table(results.values())
    ranks: List[int] = [int(k) for k in table["k"]]
    summary = {"ranks": ranks, "stability": [_num(v) for v in table["stability"]],
               "error": [_num(v) for v in table["error"]], "cophenetic": [_num(v) for v in table["cophenetic"]],
               "kept": [int(v) for v in table["kept"]], "replicates": params["n_replicates"],
               "beta_loss": args.beta_loss, "solver": params["solver"], "tol": params["tol"], "input": M.source, "shape": list(M.shape),
               "prepared_shape": list(prep.X.shape), "prepared": prep.prepared}
    _write_json(os.path.join(out, "k_selection.json"), summary, error)
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plot import plot_k_selection

    fig = plot_k_selection(table)
    png = os.path.join(out, "k_selection.png")
    try:
        with tio.atomic_write(png, "wb") as fh:
            fig.savefig(fh, format="png", dpi=100)
    except OSError as err:
        raise error(f"cannot write {png}: {err.strerror or err}") from err
    finally:
        plt.close(fig)
    seconds = time.perf_counter() - t0
    print(f"consensus: {prep.X.shape[0]}x{prep.X.shape[1]}, ranks {ranks}, {params['n_replicates']} replicates, "
          f"{seconds:.1f} s -> {out}")
    for k, s, e, kept in zip(ranks, summary["stability"], summary["error"], summary["kept"]):
        print(f"  k={k}: stability {s if s is None else round(s, 4)}, error {e:.6g}, kept {kept}")
    for message in unconverged:
        print(f"torchnmf consensus: warning: {message.replace('raise max_iter', 'raise --max-iter')}",
              file=sys.stderr)
    return 0
