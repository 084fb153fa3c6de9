"""Command line: ``torchnmf fit`` factorizes a matrix file, ``torchnmf plot`` draws the result.

::

    torchnmf fit [INPUT] --model {nmf,gamma-poisson,pnmf} --rank K [--beta B] [--max-iter N]
                 [--tol T] [--init METHOD] [--transpose] [--layer NAME] [--[no-]use-highly-variable] [--round]
                 [--device D] [--seed S] [--quiet] [--debug] -o OUT
    torchnmf plot OUT [--image-shape H W] [--top N] [--components K] [--debug]
    torchnmf consensus FILE --ranks K [K ...] -o OUTDIR ...   (see torchnmf.consensus.cli)
    torchnmf --version

``INPUT`` is read by :func:`torchnmf.io.read_matrix`: ``.npy``, ``.npz``, ``.mtx(.gz)``,
``.csv``/``.tsv`` (optionally gzipped, with a header line of column names and a first column
of row names, read with pandas), ``.h5ad`` (AnnData: ``X``, ``--layer NAME`` or
``--layer raw``) or a directory in the 10x layout (``matrix.mtx``, ``features.tsv``,
``barcodes.tsv``, gzipped or not), of shape ``(n_samples, n_features)`` (``--transpose`` for
files stored the other way). Without ``INPUT`` the fit runs on scikit-learn's bundled digits
(1797 x 64 counts).

``fit`` writes ``OUT.npz`` (factors ``W`` (n_features, K), ``H`` (n_samples, K), the objective
``history`` and, when the input had them, ``row_names`` and ``col_names``) and ``OUT.json`` (a
summary, with each component's top features by name), both with the same ``fit_id``. Both are
written to temporary files in the same directory and renamed once both are whole, so a failed
write or a killed run leaves the previous pair intact (a kill between the two renames leaves
a pair whose ``fit_id`` differ, which :func:`read_fit` and ``plot`` refuse); temporary files
that killed runs left are deleted by the next. ``-o DIR/`` writes ``DIR/NAME.npz`` with
``NAME`` the input's name. An ``.h5ad`` input also gives ``OUT.h5ad`` (written with the pair,
same ``fit_id``): the input's AnnData with the results added as :mod:`torchnmf.tl` adds them,
fitted on the genes flagged highly variable when the input flags them (``--use-highly-variable``).
``plot`` writes ``OUT.png``: the objective history and the components, as images with
``--image-shape H W`` (digits: 8 x 8 by default) or as bars of their ``--top`` features.

The count models (``gamma-poisson``, ``pnmf``) accept counts saved as floats: values within
``1e-6`` of an integer are rounded (the number rounded is reported); ``--round`` rounds every
value. Bad input (unreadable or unknown files, negative or non-count values, NaN, wrong flags,
a rank above ``min(n_samples, n_features)``) prints one line ``torchnmf: error: ...`` naming
the file (and the first offending entry) and exits with status 2, as does running out of
memory; any other failure prints one line and exits with status 1. ``--debug`` shows the
traceback instead. The input file is only ever read.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import uuid
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import __version__
from . import io as tio  # numpy only at import: help and argument errors need no torch (issue 23.6)

__all__ = ["main", "read_matrix", "read_fit", "MODELS", "FORMATS", "CLIError"]

MODELS = ("nmf", "gamma-poisson", "pnmf")
FORMATS = tio.FORMATS
TOP_FEATURES = 10  # top features per component listed in OUT.json


class CLIError(Exception):
    """A user mistake: reported as one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise CLIError(f"{message} (see '{self.prog} --help')")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="torchnmf", description="Non-negative and Poisson matrix factorization.")
    p.add_argument("--version", action="version", version=f"torchnmf {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    sub.required = True
    f = sub.add_parser("fit", help="factorize a matrix file (default: scikit-learn's digits)",
                       description="Factorize INPUT (n_samples x n_features) and write OUT.npz and OUT.json.")
    f.add_argument("input", nargs="?", default=None, metavar="INPUT",
                   help=f"matrix file ({', '.join(FORMATS)}); default: scikit-learn's digits, 1797x64")
    f.add_argument("--model", choices=MODELS, default="nmf", help="model (default: nmf)")
    f.add_argument("--rank", "-k", type=int, required=True,
                   help="number of components K, at most min(n_samples, n_features)")
    f.add_argument("--beta", type=float, default=1.0, help="beta of the divergence for --model nmf (default: 1, KL)")
    f.add_argument("--max-iter", type=int, default=None,
                   help="maximum iterations (default: the model's, 2000 nmf, 1000 gamma-poisson, 500 pnmf)")
    f.add_argument("--tol", type=float, default=None,
                   help="stop when the objective changes by at most this, relative to its value, per iteration "
                        "(default: the model's, 1e-5 nmf and pnmf, 1e-6 gamma-poisson; 0 runs --max-iter)")
    f.add_argument("--init", default=None, choices=("random", "nndsvd", "nndsvda", "nndsvdar", "k-means"),
                   help="initialisation for nmf and pnmf (default: automatic)")
    f.add_argument("--transpose", action="store_true",
                   help="the file is stored features x samples: swap rows and columns after reading")
    f.add_argument("--layer", default=None, metavar="NAME",
                   help="for .h5ad: the layer to factorize instead of X, or 'raw' for adata.raw.X")
    f.add_argument("--use-highly-variable", action=argparse.BooleanOptionalAction, default=None,
                   help="for .h5ad: fit only the genes flagged in var['highly_variable'] (default: when that "
                        "column exists, as scanpy's sc.tl.pca)")
    f.add_argument("--round", action="store_true",
                   help="round every value to the nearest integer (default: only values within 1e-6 of one, "
                        "for the count models)")
    f.add_argument("--device", default="auto",
                   help="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1'... (default: auto)")
    f.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    f.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output prefix: writes OUT.npz and OUT.json (a directory: DIR/INPUT-NAME.*)")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.add_argument("--debug", action="store_true", help="show tracebacks")
    pl = sub.add_parser("plot", help="plot the objective history and the components of a fit",
                        description="Read OUT.npz/OUT.json written by 'torchnmf fit' and save OUT.png.")
    pl.add_argument("output", metavar="OUT", help="the prefix given to 'torchnmf fit -o'")
    pl.add_argument("--image-shape", type=int, nargs=2, default=None, metavar=("H", "W"),
                    help="draw each component as an H x W image (H * W = n_features; digits: 8 8)")
    pl.add_argument("--top", type=int, default=10, help="features per bar chart (default: 10)")
    pl.add_argument("--components", type=int, default=16, help="how many components to draw (default: 16)")
    pl.add_argument("--debug", action="store_true", help="show tracebacks")
    from .consensus.cli import add_parser as add_consensus  # its own module (issue 20)

    add_consensus(sub)
    return p


def _prefix(out: str) -> str:
    for ext in (".npz", ".json", ".png"):
        if out.endswith(ext):
            return out[: -len(ext)]
    return out


def _fit_prefix(out: str, input_path: Optional[str]) -> str:
    """``OUT`` without extension; a directory (existing, or ending in a separator) gets the input's name."""
    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        if input_path is None:
            stem = "digits"
        else:
            base = os.path.basename(os.path.normpath(input_path))
            for ext in (".gz", ".npy", ".npz", ".mtx", ".csv", ".tsv", ".h5ad"):
                if base.lower().endswith(ext):
                    base = base[: -len(ext)]
            stem = base or "torchnmf"
        return os.path.join(out, stem)
    prefix = _prefix(out)
    if not os.path.basename(prefix):
        raise CLIError(f"-o {out}: give a file name prefix such as {out}result")
    return prefix


def read_matrix(path: str):
    """Read a matrix file; returns a numpy array or a scipy.sparse CSR matrix.

    The names are dropped: see :func:`torchnmf.io.read_matrix` for them.

    Raises
    ------
    CLIError
        Missing or unreadable file, unknown extension, or content that is not a 2-D numeric matrix.
    """
    try:
        return tio.read_matrix(path).X
    except ValueError as err:
        raise CLIError(str(err)) from err


def _load_default():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise CLIError("no INPUT given and scikit-learn (for the default digits data) is not installed") from None
    return load_digits().data, "sklearn.datasets.load_digits"


def _finite_or_none(x: float):
    """JSON has no NaN: ``None`` for a value that was never measured."""
    return float(x) if math.isfinite(x) else None


def _estimator(args):
    common = dict(n_components=args.rank, random_state=args.seed, device=args.device, verbose=not args.quiet)
    if args.max_iter is not None:  # otherwise the estimator's own default (docs/choosing.rst)
        common["max_iter"] = args.max_iter
    if args.tol is not None:  # otherwise the estimator's own default
        common["tol"] = args.tol
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


def _memory_bytes() -> Optional[int]:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not on this platform
        return None


def _check_input(M: "tio.Matrix", args, source: str):
    """Refuse NaN, negative and (for the count models) non-count values, naming the first one."""
    import scipy.sparse as sp

    X = M.X.tocsr() if sp.issparse(M.X) else M.X
    if sp.issparse(X) and not X.has_sorted_indices:
        X = X.sorted_indices()
    vals = X.data if sp.issparse(X) else X
    where = dict(row_names=M.row_names, col_names=M.col_names)
    if vals.dtype.kind == "f":
        bad = ~np.isfinite(vals)
        if bad.any():
            raise CLIError(f"{source} contains NaN or infinity, first at {tio._describe(X, bad, **where)}")
    bad = vals < 0
    if bad.any():
        raise CLIError(f"{source} has negative values (non-negative data is required), first at "
                       f"{tio._describe(X, bad, **where)}")
    n_rounded = 0
    if args.model != "nmf" or args.round:
        try:
            X, n_rounded = tio.round_counts(X, force=args.round, name=source, **where)
        except ValueError as err:
            hint = "; use --round to round them or --model nmf for non-count data"
            counts = [a for a in M.alternatives if a in ("counts", "raw")]
            if counts:
                hint += f" (the file also has {' and '.join(repr(a) for a in counts)}: try --layer {counts[0]})"
            raise CLIError(f"--model {args.model} needs counts: {err}{hint}") from None
    return X, n_rounded


def _top_features(W: np.ndarray, H: np.ndarray, names) -> list:
    """Per component (by contribution): its share, its top features by specificity and by raw loading."""
    from .plotting import component_order, top_features

    weight = W.sum(0) * H.sum(0)
    total = float(weight.sum()) or 1.0
    out = []
    for k in component_order(W, H):
        idx = top_features(W, k, TOP_FEATURES, "specificity")
        raw = top_features(W, k, TOP_FEATURES, "loading")
        out.append({
            "component": int(k),
            "share": round(float(weight[k]) / total, 6),
            "top_features": [str(names[j]) if names is not None else int(j) for j in idx],
            "weights": [float(f"{W[j, k]:.6g}") for j in idx],
            "top_features_by_loading": [str(names[j]) if names is not None else int(j) for j in raw],
        })
    return out


#: where each model's results go in OUT.h5ad (obsm['X_<key>'], varm['<key>'], uns['<key>'])
ANNDATA_KEYS = {"nmf": "nmf", "gamma-poisson": "gamma_poisson", "pnmf": "pnmf"}


def _read_anndata(args):
    """``(Matrix, adata, feature_mask)`` of an .h5ad input: ``X`` or ``--layer``, restricted to the
    highly variable genes as ``--use-highly-variable`` (default: when flagged) says."""
    from . import anndata_io

    try:
        adata = anndata_io.read_anndata(args.input)
    except ImportError as err:
        raise CLIError(f"reading {args.input} needs anndata: pip install anndata") from err
    except FileNotFoundError as err:
        raise CLIError(str(err)) from err
    try:
        sel = anndata_io.select(adata, args.layer, args.use_highly_variable)
    except (ValueError, TypeError) as err:
        flags = str(err).replace("use_highly_variable=", "--use-highly-variable / --no-use-highly-variable, was ")
        raise CLIError(f"{args.input}: {flags.replace('pass layer=', 'use --layer')}") from err
    source = args.input + (f" (layer {args.layer})" if args.layer else "")
    if sel.feature_mask is not None:
        source += f" ({int(sel.feature_mask.sum())} highly variable genes)"
    M = tio.Matrix(sel.matrix, np.asarray(adata.obs_names, dtype=str), np.asarray(sel.feature_names, dtype=str),
                   source)
    return M, adata, sel.feature_mask


def _add_results(adata, args, W, H, feature_mask, summary, history) -> None:
    """The fit written into ``adata`` as :mod:`torchnmf.tl` writes it (results of an earlier run
    under the same key, carried in from the input file, are replaced)."""
    from .anndata_io import top_features, write_results
    from .tl._common import plain_params

    key = ANNDATA_KEYS[args.model]
    columns = [f"{key}_{k + 1}" for k in range(W.shape[1])]
    params = {k: summary[k] for k in ("model", "rank", "beta", "max_iter", "tol", "n_iter")}
    params.update(seed=args.seed, layer=args.layer or "X", use_highly_variable=feature_mask is not None,
                  fit_id=summary["fit_id"], command="torchnmf fit")
    names = np.asarray(adata.var_names, dtype=str)
    uns = {"params": plain_params(params), "objective": summary["objective"], "history": history,
           "converged": bool(summary["converged"]), "n_iter": int(summary["n_iter"]),
           "components": np.asarray(columns, dtype=object),
           "top_features": top_features(W, names if feature_mask is None else names[feature_mask], TOP_FEATURES,
                                        columns)}
    write_results(adata, key, H, W, uns, feature_mask, overwrite=True)


def _write_h5ad(adata, prefix: str, fh) -> None:
    """anndata writes to a path: write beside ``prefix`` and copy into ``fh`` (the atomic write's file)."""
    import shutil

    part = prefix + ".h5ad.part"
    tio.remove_stale(part)  # one a killed run left behind
    fd, tmp = tio._temporary(part)
    os.close(fd)
    try:
        adata.write_h5ad(tmp)
        with open(tmp, "rb") as src:
            shutil.copyfileobj(src, fh)
    finally:
        os.unlink(tmp)


def _fit(args) -> int:
    import torch

    from .engine import ConvergenceWarning  # here, not at import: help needs no torch

    if args.rank <= 0:
        raise CLIError(f"--rank must be a positive integer, got {args.rank}")
    if args.max_iter is not None and args.max_iter <= 0:
        raise CLIError(f"--max-iter must be a positive integer, got {args.max_iter}")
    if args.tol is not None and (not math.isfinite(args.tol) or args.tol < 0):
        raise CLIError(f"--tol must be >= 0, got {args.tol}")
    if args.model != "nmf" and args.beta != 1.0:
        raise CLIError(f"--beta applies to --model nmf only (the {args.model} model has a Poisson likelihood)")
    h5ad = args.input is not None and args.input.lower().endswith(".h5ad")
    if args.layer is not None and not h5ad:
        raise CLIError("--layer applies to .h5ad input only")
    if args.use_highly_variable is not None and not h5ad:
        raise CLIError("--use-highly-variable applies to .h5ad input only")
    prefix = _fit_prefix(args.output, args.input)
    image_shape = None
    adata = feature_mask = None
    if args.input is not None:
        src = os.path.abspath(args.input)
        for ext in (".npz", ".json", ".png", ".h5ad"):
            if os.path.abspath(prefix + ext) == src:
                raise CLIError(f"output {prefix + ext} would overwrite the input; choose another -o")
        try:
            if h5ad and args.layer != "raw" and not args.transpose:
                M, adata, feature_mask = _read_anndata(args)
            else:  # raw (its own genes) or transposed: factors only, no OUT.h5ad
                if args.use_highly_variable:
                    raise CLIError("--use-highly-variable cannot be used with --layer raw or --transpose")
                M = tio.read_matrix(args.input, layer=args.layer, transpose=args.transpose)
        except ValueError as err:
            raise CLIError(str(err)) from err
        source = M.source
    else:
        X, source = _load_default()
        M = tio.Matrix(X, None, None, source)
        image_shape = [8, 8]
        if args.transpose:
            M, image_shape = M.transposed(), None
    import scipy.sparse as sp

    X, n_rounded = _check_input(M, args, source)
    n_samples, n_features = X.shape
    if args.rank > min(X.shape):
        raise CLIError(f"--rank {args.rank} is larger than min(n_samples, n_features) = {min(X.shape)} "
                       f"of {source} ({n_samples} x {n_features})")
    need = 8 * 4 * args.rank * (n_samples + n_features)  # float64 factors, their updates and statistics
    avail = _memory_bytes()
    if avail is not None and need > avail:
        raise CLIError(f"--rank {args.rank} needs about {need / 2**30:.1f} GiB for the factors of "
                       f"{n_samples} x {n_features}; this machine has {avail / 2**30:.1f} GiB")
    try:
        from .estimators._base import resolve_device

        device = resolve_device(args.device)
    except ValueError as err:  # the library's advice is in Python syntax (device='auto'): say it as flags
        advice = ("cuda is not available here; use --device auto (cuda when available) or --device cpu"
                  if "not available" in str(err) else "not a device with data; use auto, cpu or cuda (e.g. cuda:0)")
        raise CLIError(f"--device {args.device}: {advice}") from None
    try:  # a device torch knows by name may still be missing here (mps off macOS, cuda:7 on one GPU)
        torch.empty(1, device=device)
    except Exception as err:
        raise CLIError(f"--device {args.device} is not usable here ({_one_line(err)}); use --device cpu "
                       "or --device auto") from None
    est = _estimator(args)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            H = est.fit_transform(X.astype(np.float64))
    except (ValueError, TypeError, FloatingPointError) as err:
        raise CLIError(f"{source}: {str(err).splitlines()[0]}") from err
    # one line for a fit that did not converge, printed once the outputs are written; other warnings as they were
    unconverged = [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, ConvergenceWarning)]
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    seconds = time.perf_counter() - t0
    W, H = _factors(est, H)
    history = np.asarray(est.history_.values, dtype=np.float64)
    if not (np.isfinite(W).all() and np.isfinite(H).all()):
        raise CLIError(f"{source}: the fit produced NaN or infinite factors; try another --init or --model")
    arrays = dict(W=W, H=H, history=history, history_steps=np.asarray(est.history_.steps, dtype=np.int64),
                  history_changes=np.asarray(est.history_.changes, dtype=np.float64))
    if M.row_names is not None:
        arrays["row_names"] = np.asarray(M.row_names, dtype=str)
    if M.col_names is not None:
        arrays["col_names"] = np.asarray(M.col_names, dtype=str)
    n_iter = int(getattr(est, "n_iter_", len(history)))
    fit_id = uuid.uuid4().hex
    summary = {
        "fit_id": fit_id,
        "model": args.model,
        "estimator": type(est).__name__,
        "input": source,
        "shape": [int(n_samples), int(n_features)],
        "transposed": bool(args.transpose),
        "nnz": int(X.nnz if sp.issparse(X) else np.count_nonzero(X)),
        "rounded": int(n_rounded),
        "rank": int(args.rank),
        "beta": args.beta if args.model == "nmf" else None,
        "objective": est.history_.name,
        "maximize": bool(est.history_.maximize),
        "final_objective": float(history[-1]) if len(history) else None,
        "n_iter": n_iter,
        "max_iter": int(est.max_iter),
        "tol": float(est.tol),
        "converged": bool(est.history_.converged_),
        "last_relative_change": _finite_or_none(est.history_.changes[-1] if len(history) else float("nan")),
        "seconds": round(seconds, 4),
        "device": _device_of(est, args.device),
        "torch": torch.__version__,
        "torchnmf": __version__,
        "files": {"factors": prefix + ".npz", "summary": prefix + ".json"},
        "factor_shapes": {"W": list(W.shape), "H": list(H.shape)},
        "row_names": M.row_names is not None,
        "col_names": M.col_names is not None,
        "image_shape": image_shape,
        "feature_ranking": "specificity",  # of "top_features"; see torchnmf.plotting.feature_scores
        "components": _top_features(W, H, M.col_names),
    }
    # Both files are written to temporary files beside them and renamed only once both are
    # whole: a failed write (disk full) or a killed run leaves the previous pair. The fit_id in
    # both lets readers refuse a pair a kill between the two renames could leave mixed.
    arrays["fit_id"] = np.asarray(fit_id)
    files = [(prefix + ".npz", "wb", lambda fh: np.savez_compressed(fh, **arrays))]
    if adata is not None:  # the input's AnnData with the results where scanpy looks (docs/single_cell)
        summary["files"]["anndata"] = prefix + ".h5ad"
        _add_results(adata, args, W, H, feature_mask, summary, history)
        files.append((prefix + ".h5ad", "wb", lambda fh: _write_h5ad(adata, prefix, fh)))
    files.append((prefix + ".json", "w", lambda fh: json.dump(summary, fh, indent=2)))  # last: the summary
    names = ", ".join(f for f, _, _ in files)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        tio.atomic_write_all(files)
    except OSError as err:
        raise CLIError(f"cannot write {names}: {err.strerror or err}") from err
    final = summary["final_objective"]
    rounded = f", {n_rounded} value{'s' if n_rounded != 1 else ''} rounded to counts" if n_rounded else ""
    print(f"{args.model}: {n_samples}x{n_features}, rank {args.rank}, {n_iter} iteration{'s' if n_iter != 1 else ''}, "
          f"{summary['objective']} {final:.6g}, {seconds:.2f} s{rounded} -> {names}")
    for message in unconverged[:1]:
        print(f"torchnmf fit: warning: {message}", file=sys.stderr)
    return 0


def _plot_prefix(out: str) -> str:
    if os.path.isdir(out):
        fits = sorted(f[:-5] for f in os.listdir(out)
                      if f.endswith(".json") and os.path.isfile(os.path.join(out, f[:-5] + ".npz")))
        if len(fits) != 1:
            found = f"fits {', '.join(fits)}" if fits else "no fit"
            raise CLIError(f"{out} is a directory with {found}; give the prefix, e.g. {os.path.join(out, 'NAME')}")
        return os.path.join(out, fits[0])
    return _prefix(out)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_fit(out: str) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """Read the ``OUT.npz`` / ``OUT.json`` pair ``torchnmf fit -o OUT`` wrote, checked.

    Parameters
    ----------
    out : str
        The prefix given to ``torchnmf fit -o`` (``.npz``/``.json`` may be given too).

    Returns
    -------
    fit : dict of ndarray
        ``W`` (n_features, K), ``H`` (n_samples, K), ``history`` (n_records,) and, when
        written, ``history_steps``, ``history_changes``, ``row_names`` (n_samples,),
        ``col_names`` (n_features,) and ``fit_id``.
    summary : dict
        The content of ``OUT.json``.

    Raises
    ------
    ValueError
        A missing or unreadable file, a JSON file that is not a summary, factors that are not
        2-D, have no component, disagree in shape or hold NaN or negative values, or a pair
        from two different fits (their ``fit_id`` differ: a run killed between the renames of
        the two files); the message names the file.
    """
    prefix = _prefix(out)
    npz, js = prefix + ".npz", prefix + ".json"
    for path in (npz, js):
        if not os.path.isfile(path):
            raise ValueError(f"cannot read {path}: no such file (run 'torchnmf fit -o {prefix}' first)")
    fit = {}
    try:
        z = np.load(npz, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with z:
            for key in z.files:
                fit[key] = z[key]
    except Exception as err:  # zipfile, zlib, numpy format errors: one line naming the file
        raise ValueError(f"cannot read {npz}: {_one_line(err)}") from err
    try:
        with open(js, encoding="utf-8") as fh:
            summary = json.load(fh)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {js}: {_one_line(err)}") from err
    if not isinstance(summary, dict):
        raise ValueError(f"{js} is not a torchnmf fit summary (a JSON object), it holds a {type(summary).__name__}")
    missing = [k for k in ("W", "H", "history") if k not in fit]
    if missing:
        raise ValueError(f"{npz} is not a torchnmf fit: no {', '.join(missing)}")
    ids = (str(fit["fit_id"]) if "fit_id" in fit else None, summary.get("fit_id"))
    if ids[0] != ids[1]:
        raise ValueError(f"{npz} and {js} are from different fits (fit_id {ids[0]} and {ids[1]}; a run was "
                         f"probably killed while writing them): run 'torchnmf fit -o {prefix}' again")
    W, H, history = fit["W"], fit["H"], fit["history"]
    for name, A in (("W", W), ("H", H)):
        if A.ndim != 2 or A.dtype.kind not in "iuf":
            raise ValueError(f"{npz}: {name} must be a 2-D array of numbers, got shape {A.shape} of {A.dtype}")
        if A.shape[1] == 0 or A.shape[0] == 0:
            raise ValueError(f"{npz}: {name} of shape {A.shape} holds no component")
        if not np.isfinite(A).all():
            raise ValueError(f"{npz}: {name} holds NaN or infinite values")
        if (A < 0).any():
            raise ValueError(f"{npz}: {name} holds negative values")
    if W.shape[1] != H.shape[1]:
        raise ValueError(f"{npz}: W {W.shape} and H {H.shape} have different numbers of components")
    if history.ndim != 1 or history.dtype.kind not in "iuf":
        raise ValueError(f"{npz}: history must be a 1-D array of numbers, got shape {history.shape} of {history.dtype}")
    for name, n in (("history_steps", len(history)), ("history_changes", len(history)),
                    ("row_names", H.shape[0]), ("col_names", W.shape[0])):
        if name in fit and (fit[name].ndim != 1 or len(fit[name]) != n):
            raise ValueError(f"{npz}: {name} of shape {fit[name].shape} does not match {n} entries")
    tol = summary.get("tol")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0):
        raise ValueError(f"{js}: tol must be a number >= 0 or null, got {tol!r}")
    return fit, summary


def _plot(args) -> int:
    prefix = _plot_prefix(args.output)
    if args.top <= 0:
        raise CLIError(f"--top must be a positive integer, got {args.top}")
    if args.components <= 0:
        raise CLIError(f"--components must be a positive integer, got {args.components}")
    try:
        fit, summary = read_fit(prefix)
    except ValueError as err:
        raise CLIError(str(err)) from err
    W, H, history = fit["W"], fit["H"], fit["history"]
    z_steps, z_changes, names = fit.get("history_steps"), fit.get("history_changes"), fit.get("col_names")
    from .plotting import check_image_shape, component_order, plot_components, plot_objective

    shape = args.image_shape if args.image_shape is not None else summary.get("image_shape")
    try:
        shape = check_image_shape(shape, W.shape[0])
    except (ValueError, TypeError) as err:
        where = "--image-shape" if args.image_shape is not None else f"{prefix}.json"
        raise CLIError(f"{where}: {err}") from None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CLIError("plotting needs matplotlib: pip install matplotlib") from None
    order = component_order(W, H)[: args.components]
    n = len(order)
    cols = min(n, 8 if shape else 4)
    rows = int(math.ceil(n / cols))
    cell_h = 1.7 if shape else 0.22 * min(args.top, W.shape[0]) + 0.9
    cell_w = 1.7 if shape else 3.0
    fig = plt.figure(figsize=(max(6.0, 0.6 + cell_w * cols), 3.0 + cell_h * rows))
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[3.0 / cell_h] + [1.0] * rows)
    ax = fig.add_subplot(grid[0, :])
    steps = z_steps if z_steps is not None and len(z_steps) == len(history) else np.arange(len(history))
    plot_objective(ax, steps, history, name=summary.get("objective", "objective"), changes=z_changes,
                   tol=summary.get("tol"), maximize=bool(summary.get("maximize")))
    ax.set_xlabel("iteration")
    ax.set_ylabel(summary.get("objective", "objective"))
    size = summary.get("shape")
    size = tuple(size) if isinstance(size, list) else (size if size is not None else ())
    ax.set_title(f"{summary.get('model')} on {os.path.basename(os.path.normpath(str(summary.get('input'))))} "
                 f"{size}, rank {summary.get('rank')}"
                 + ("" if summary.get("converged", True) else " (max_iter reached before tol)"))
    axes = [fig.add_subplot(grid[1 + i // cols, i % cols]) for i in range(n)]
    plot_components(W, image_shape=shape, names=names, top=args.top, order=order, max_components=n, axes=axes)
    fig.tight_layout()
    try:
        with tio.atomic_write(prefix + ".png", "wb") as fh:
            fig.savefig(fh, format="png", dpi=100)
    except OSError as err:
        raise CLIError(f"cannot write {prefix}.png: {err.strerror or err}") from err
    finally:
        plt.close(fig)
    print(f"wrote {prefix}.png")
    return 0


def _passive_openmp() -> None:
    """Let idle OpenMP threads sleep unless the user chose: on a machine shared with other jobs,
    torch's spinning threads slowed fits several-fold (``benchmarks/omp_wait.py``). OpenMP reads
    the variable when torch starts, so this only acts before torch is imported."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _parse(argv: List[str]) -> argparse.Namespace:
    """Parse ``argv``; a flag the subcommand does not know points at that subcommand's help."""
    args, extra = _parser().parse_known_args(argv)
    if extra:
        raise CLIError(f"unrecognized arguments: {' '.join(extra)} (see 'torchnmf {args.command} --help')")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``torchnmf`` console script; returns the exit status.

    Arguments are parsed, and help and argument errors answered, before torch or scikit-learn
    is imported. Unless ``OMP_WAIT_POLICY`` is set (or torch is already imported), it is set to
    ``PASSIVE`` for the run.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        _passive_openmp()
        args = _parse(argv)
        if args.command == "consensus":
            from .consensus.cli import run as consensus

            return consensus(args, CLIError)
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
    except MemoryError as err:  # an input or rank too large for this machine, found late
        if debug:
            raise
        print(f"torchnmf: error: out of memory ({_one_line(err)}); try a smaller input or --rank", file=sys.stderr)
        return 2
    except Exception as err:  # never a traceback without --debug: one line, exit status 1
        if debug:
            raise
        print(f"torchnmf: error: {type(err).__name__}: {_one_line(err)} (--debug shows the traceback)",
              file=sys.stderr)
        return 1


def _console() -> None:  # pragma: no cover - thin wrapper
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
