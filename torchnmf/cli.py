"""Command line: ``torchnmf fit`` factorizes a matrix file, ``torchnmf plot`` draws the result.

::

    torchnmf fit [INPUT] --model {nmf,gamma-poisson,pnmf} --rank K [--beta B] [--max-iter N]
                 [--tol T] [--init METHOD] [--device D] [--seed S] [--quiet] [--debug] -o OUT
    torchnmf plot OUT [--top N] [--debug]

``INPUT`` is a ``.npy``, ``.npz`` (a dense array, or a matrix saved by
:func:`scipy.sparse.save_npz`), ``.mtx`` (Matrix Market), ``.csv`` (numbers, an optional
header line) or ``.h5ad`` (AnnData, if :mod:`anndata` is installed) file of shape
``(n_samples, n_features)``. Without ``INPUT`` the fit runs on scikit-learn's bundled digits
(1797 x 64 counts). ``fit`` writes ``OUT.npz`` (factors ``W`` (n_features, K), ``H``
(n_samples, K) and the objective ``history``) and ``OUT.json`` (a summary); ``plot`` writes
``OUT.png`` (objective history and the top components).

Bad input (unreadable or unknown files, negative values, wrong flags) prints one line
``torchnmf: error: ...`` and exits with status 2; ``--debug`` shows the traceback instead.
The input file is only ever read.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

__all__ = ["main", "read_matrix", "MODELS", "FORMATS", "CLIError"]

MODELS = ("nmf", "gamma-poisson", "pnmf")
FORMATS = (".npy", ".npz", ".mtx", ".csv", ".h5ad")


class CLIError(Exception):
    """A user mistake: reported as one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise CLIError(f"{message} (see '{self.prog} --help')")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="torchnmf", description="Non-negative and Poisson matrix factorization.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    sub.required = True
    f = sub.add_parser("fit", help="factorize a matrix file (default: scikit-learn's digits)",
                       description="Factorize INPUT (n_samples x n_features) and write OUT.npz and OUT.json.")
    f.add_argument("input", nargs="?", default=None, metavar="INPUT",
                   help=f"matrix file ({', '.join(FORMATS)}); default: scikit-learn's digits, 1797x64")
    f.add_argument("--model", choices=MODELS, default="nmf", help="model (default: nmf)")
    f.add_argument("--rank", "-k", type=int, required=True, help="number of components K")
    f.add_argument("--beta", type=float, default=1.0, help="beta of the divergence for --model nmf (default: 1, KL)")
    f.add_argument("--max-iter", type=int, default=200, help="maximum iterations (default: 200)")
    f.add_argument("--tol", type=float, default=1e-6, help="relative tolerance for stopping (default: 1e-6)")
    f.add_argument("--init", default=None, choices=("random", "nndsvd", "nndsvda", "nndsvdar", "k-means"),
                   help="initialisation for nmf and pnmf (default: automatic)")
    f.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1'...")
    f.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    f.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output prefix: writes OUT.npz and OUT.json")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.add_argument("--debug", action="store_true", help="show tracebacks")
    pl = sub.add_parser("plot", help="plot the objective history and top components of a fit",
                        description="Read OUT.npz/OUT.json written by 'torchnmf fit' and save OUT.png.")
    pl.add_argument("output", metavar="OUT", help="the prefix given to 'torchnmf fit -o'")
    pl.add_argument("--top", type=int, default=16, help="how many components to draw (default: 16)")
    pl.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _prefix(out: str) -> str:
    for ext in (".npz", ".json", ".png"):
        if out.endswith(ext):
            return out[: -len(ext)]
    return out


def read_matrix(path: str):
    """Read a matrix file by extension; returns a numpy array or a scipy.sparse CSR matrix.

    Raises
    ------
    CLIError
        Missing or unreadable file, unknown extension, or content that is not a 2-D numeric matrix.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise CLIError(f"unknown input format {ext or '(none)'!r} of {path}; use one of {', '.join(FORMATS)}")
    if not os.path.isfile(path):
        raise CLIError(f"cannot read {path}: no such file")
    try:
        if ext == ".npy":
            X = np.load(path, allow_pickle=False)
        elif ext == ".npz":
            import scipy.sparse as sp

            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if {"data", "indices", "indptr", "shape", "format"} <= set(keys) or {"row", "col", "data", "shape", "format"} <= set(keys):
                    X = sp.load_npz(path).tocsr()
                elif "X" in keys:
                    X = z["X"]
                elif len(keys) == 1:
                    X = z[keys[0]]
                else:
                    raise CLIError(f"{path} holds arrays {keys}; name the matrix 'X' or save a single array")
        elif ext == ".mtx":
            import scipy.io
            import scipy.sparse as sp

            X = scipy.io.mmread(path)
            X = sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
        elif ext == ".csv":
            X = _read_csv(path)
        else:  # .h5ad
            try:
                import anndata
            except ImportError:
                raise CLIError("reading .h5ad needs anndata: pip install anndata") from None
            X = anndata.read_h5ad(path).X
            import scipy.sparse as sp

            X = sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
    except CLIError:
        raise
    except Exception as err:  # any reader failure is a user-facing one-line error
        raise CLIError(f"cannot read {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    if getattr(X, "ndim", 0) != 2:
        raise CLIError(f"{path} must hold a 2-D matrix, got shape {getattr(X, 'shape', '?')}")
    if X.dtype.kind not in "iuf":
        raise CLIError(f"{path} must hold real numbers, got dtype {X.dtype}")
    if 0 in X.shape:
        raise CLIError(f"{path} holds an empty matrix of shape {X.shape}")
    return X


def _read_csv(path: str) -> np.ndarray:
    with open(path, "r", encoding="utf-8") as fh:
        first = fh.readline()
    skip = 0
    try:
        [float(v) for v in first.strip().split(",") if v.strip()]
    except ValueError:
        skip = 1  # a header line
    X = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2)
    return X


def _load_default():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise CLIError("no INPUT given and scikit-learn (for the default digits data) is not installed") from None
    return load_digits().data, "sklearn.datasets.load_digits"


def _estimator(args):
    common = dict(n_components=args.rank, max_iter=args.max_iter, tol=args.tol, random_state=args.seed,
                  device=args.device, verbose=not args.quiet)
    if args.model == "nmf":
        from .estimators.nmf import BetaNMF

        # every iteration measured, so the plotted history has one point per iteration
        return BetaNMF(beta_loss=args.beta, init=args.init, check_every=1, **common)
    if args.model == "gamma-poisson":
        from .estimators.gamma import GammaPoissonFactorization as GammaPoisson

        return GammaPoisson(**common)
    from .estimators.pnmf import PNMF

    kw = dict(common)
    if args.init is not None:
        kw["init"] = args.init
    return PNMF(**kw)


def _factors(est, H):
    """(W (n_features, K), H (n_samples, K)) of a fitted estimator."""
    W = np.asarray(est.components_).T
    return W, np.asarray(H)


def _device_of(est, default: str) -> str:
    module = getattr(est, "module_", None) or getattr(est, "layer_", None)
    try:
        return str(next(module.parameters()).device)
    except (AttributeError, StopIteration):
        return str(default)


def _fit(args) -> int:
    import torch

    if args.rank <= 0:
        raise CLIError(f"--rank must be a positive integer, got {args.rank}")
    if args.max_iter <= 0:
        raise CLIError(f"--max-iter must be a positive integer, got {args.max_iter}")
    if not math.isfinite(args.tol) or args.tol < 0:
        raise CLIError(f"--tol must be >= 0, got {args.tol}")
    if args.model != "nmf" and args.beta != 1.0:
        raise CLIError(f"--beta applies to --model nmf only (the {args.model} model has a Poisson likelihood)")
    prefix = _prefix(args.output)
    if args.input is not None:
        src = os.path.abspath(args.input)
        for ext in (".npz", ".json", ".png"):
            if os.path.abspath(prefix + ext) == src:
                raise CLIError(f"output {prefix + ext} would overwrite the input; choose another -o")
        X, source = read_matrix(args.input), args.input
    else:
        X, source = _load_default()
    import scipy.sparse as sp

    if (X.data if sp.issparse(X) else X).min(initial=0) < 0:
        raise CLIError(f"{source} has negative values; non-negative data is required")
    if args.model != "nmf":
        vals = X.data if sp.issparse(X) else X
        if not np.all(vals == np.round(vals)):
            raise CLIError(f"--model {args.model} needs integer counts and {source} has non-integer values; use --model nmf")
    try:
        from .estimators._base import resolve_device

        resolve_device(args.device)
    except ValueError as err:
        raise CLIError(f"--device: {err}") from None
    if args.rank > min(X.shape) and args.init not in (None, "random"):
        raise CLIError(f"--rank {args.rank} is larger than min(n_samples, n_features) = {min(X.shape)} for --init {args.init}")
    est = _estimator(args)
    t0 = time.perf_counter()
    try:
        H = est.fit_transform(X.astype(np.float64))
    except (ValueError, TypeError, FloatingPointError) as err:
        raise CLIError(str(err).splitlines()[0]) from err
    seconds = time.perf_counter() - t0
    W, H = _factors(est, H)
    history = np.asarray(est.history_.values, dtype=np.float64)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        np.savez_compressed(prefix + ".npz", W=W, H=H, history=history)
    except OSError as err:
        raise CLIError(f"cannot write {prefix}.npz: {err.strerror or err}") from err
    summary = {
        "model": args.model,
        "estimator": type(est).__name__,
        "input": source,
        "shape": [int(s) for s in X.shape],
        "nnz": int(X.nnz if sp.issparse(X) else np.count_nonzero(X)),
        "rank": int(args.rank),
        "beta": args.beta if args.model == "nmf" else None,
        "objective": est.history_.name,
        "maximize": bool(est.history_.maximize),
        "final_objective": float(history[-1]) if len(history) else None,
        "n_iter": int(getattr(est, "n_iter_", len(history))),
        "seconds": round(seconds, 4),
        "device": _device_of(est, args.device),
        "torch": torch.__version__,
        "files": {"factors": prefix + ".npz", "summary": prefix + ".json"},
        "factor_shapes": {"W": list(W.shape), "H": list(H.shape)},
    }
    try:
        with open(prefix + ".json", "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
    except OSError as err:
        raise CLIError(f"cannot write {prefix}.json: {err.strerror or err}") from err
    final = summary["final_objective"]
    print(f"{args.model}: {X.shape[0]}x{X.shape[1]}, rank {args.rank}, {summary['n_iter']} iterations, "
          f"{summary['objective']} {final:.6g}, {seconds:.2f} s -> {prefix}.npz, {prefix}.json")
    return 0


def _plot(args) -> int:
    prefix = _prefix(args.output)
    if args.top <= 0:
        raise CLIError(f"--top must be a positive integer, got {args.top}")
    for ext in (".npz", ".json"):
        if not os.path.isfile(prefix + ext):
            raise CLIError(f"cannot read {prefix + ext}: no such file (run 'torchnmf fit -o {prefix}' first)")
    try:
        with np.load(prefix + ".npz", allow_pickle=False) as z:
            W, H, history = z["W"], z["H"], z["history"]
        with open(prefix + ".json", encoding="utf-8") as fh:
            summary = json.load(fh)
    except Exception as err:
        raise CLIError(f"cannot read the fit at {prefix}: {err}") from err
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CLIError("plotting needs matplotlib: pip install matplotlib") from None
    # The most used components first: by their total contribution sum(H) * sum(W).
    order = np.argsort(-(H.sum(0) * W.sum(0)))[: args.top]
    n = len(order)
    side = int(round(math.sqrt(W.shape[0])))
    as_images = side * side == W.shape[0]
    cols = min(n, 8)
    rows = int(math.ceil(n / cols))
    fig = plt.figure(figsize=(2 + 1.6 * cols, 3.2 + 1.7 * rows))
    grid = fig.add_gridspec(rows + 2, cols)
    ax = fig.add_subplot(grid[:2, :])
    ax.plot(np.arange(1, len(history) + 1), history)
    if len(history) and history.min() > 0 and not summary.get("maximize"):
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(summary.get("objective", "objective"))
    ax.set_title(f"{summary.get('model')} on {os.path.basename(str(summary.get('input')))} "
                 f"{tuple(summary.get('shape', ()))}, rank {summary.get('rank')}")
    for i, k in enumerate(order):
        a = fig.add_subplot(grid[2 + i // cols, i % cols])
        if as_images:
            a.imshow(W[:, k].reshape(side, side), cmap="gray_r")
            a.set_xticks([])
            a.set_yticks([])
        else:
            top = np.argsort(-W[:, k])[:10]
            a.barh(range(len(top)), W[top, k][::-1])
            a.set_yticks(range(len(top)))
            a.set_yticklabels([str(j) for j in top[::-1]], fontsize=6)
            a.tick_params(axis="x", labelsize=6)
        a.set_title(f"component {k}", fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(prefix + ".png", dpi=100)
    except OSError as err:
        raise CLIError(f"cannot write {prefix}.png: {err.strerror or err}") from err
    finally:
        plt.close(fig)
    print(f"wrote {prefix}.png")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``torchnmf`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = _parser().parse_args(argv)
        return _fit(args) if args.command == "fit" else _plot(args)
    except CLIError as err:
        if debug:
            raise
        print(f"torchnmf: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("torchnmf: interrupted", file=sys.stderr)
        return 130
    except SystemExit as err:  # --help exits 0 through argparse
        return int(err.code or 0)


def _console() -> None:  # pragma: no cover - thin wrapper
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
