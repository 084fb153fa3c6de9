"""Reading matrix files with their row and column names, count checks, and atomic writes.

:func:`read_matrix` reads what people have on disk into a :class:`Matrix` of shape
``(n_samples, n_features)`` with optional names:

===================================  ==========================================================
``.npy``                             a dense 2-D array
``.npz``                             a dense array (``X`` or the only array, with optional
                                     ``row_names`` / ``col_names``) or a
                                     :func:`scipy.sparse.save_npz` matrix
``.csv``, ``.tsv`` (also ``.gz``)    numbers with an optional header line (column names) and an
                                     optional first column of row labels (needs :mod:`pandas`
                                     when labelled)
``.mtx`` (also ``.gz``)              Matrix Market; ``matrix.mtx`` is read as 10x writes it
a directory                          10x layout: ``matrix.mtx(.gz)`` (features x barcodes),
                                     ``features.tsv(.gz)`` or ``genes.tsv(.gz)``,
                                     ``barcodes.tsv(.gz)``; read as barcodes x features
``.h5ad``                            AnnData (needs :mod:`anndata`): ``X``, a layer, or ``raw``
===================================  ==========================================================

:func:`round_counts` accepts counts stored as floats (within ``1e-6`` of an integer) and names
the first entry that is not a count; :func:`atomic_write` writes a file so that a reader sees the
old or the new content, never half of it.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import io as _io
import os
import tempfile
from dataclasses import dataclass, field
from typing import IO, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["Matrix", "ReadError", "read_matrix", "round_counts", "first_entry", "atomic_write", "FORMATS"]

FORMATS = (".npy", ".npz", ".mtx", ".mtx.gz", ".csv", ".csv.gz", ".tsv", ".tsv.gz", ".h5ad", "10x directory")
_EXTS = (".npy", ".npz", ".mtx", ".csv", ".tsv", ".h5ad")


class ReadError(ValueError):
    """A file that cannot be read as a matrix; the message names the file."""


@dataclass
class Matrix:
    """A matrix read from a file, with optional names.

    Attributes
    ----------
    X : ndarray or scipy.sparse.csr_matrix, shape (n_samples, n_features)
    row_names : ndarray of str, shape (n_samples,), or None
    col_names : ndarray of str, shape (n_features,), or None
    source : str
        The path it was read from (and the part of it, e.g. ``'layer counts'``).
    alternatives : list of str
        Other matrices in the same file (AnnData layers and ``'raw'``), for hints.
    """

    X: object
    row_names: Optional[np.ndarray] = None
    col_names: Optional[np.ndarray] = None
    source: str = ""
    alternatives: List[str] = field(default_factory=list)

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(int(s) for s in self.X.shape)

    def transposed(self) -> "Matrix":
        """The same matrix with rows and columns (and their names) swapped."""
        import scipy.sparse as sp

        X = self.X.T.tocsr() if sp.issparse(self.X) else np.ascontiguousarray(self.X.T)
        return Matrix(X, self.col_names, self.row_names, self.source, list(self.alternatives))


def _strip_gz(path: str) -> Tuple[str, bool]:
    low = path.lower()
    return (path[:-3], True) if low.endswith(".gz") else (path, False)


def _ext(path: str) -> str:
    base, _ = _strip_gz(path)
    return os.path.splitext(base)[1].lower()


def _open_text(path: str) -> IO[str]:
    if path.lower().endswith(".gz"):
        return _io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, "r", encoding="utf-8", newline="")


def _names(values) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=str)


def read_matrix(path: Union[str, os.PathLike], *, layer: Optional[str] = None, transpose: bool = False) -> Matrix:
    """Read a matrix file (or a 10x directory) with its row and column names.

    Parameters
    ----------
    path : str or path-like
        A file of a format in :data:`FORMATS`, or a directory in the 10x layout.
    layer : str, optional
        For ``.h5ad`` only: the AnnData layer to read instead of ``X``, or ``'raw'`` for
        ``adata.raw.X`` (with ``adata.raw.var_names``).
    transpose : bool, default False
        Swap rows and columns after reading (for files stored features x samples).

    Returns
    -------
    Matrix
        ``X`` of shape ``(n_samples, n_features)``, numpy (dense files) or scipy CSR (sparse
        files), with the names the file holds (``None`` otherwise).

    Raises
    ------
    ValueError
        Missing, unreadable or unknown files, a directory that is not in the 10x layout,
        content that is not a 2-D real matrix, non-numeric cells (the first one named), an
        unknown ``layer``, or a missing optional reader (pandas, anndata).
    """
    path = os.fspath(path)
    if layer is not None and _ext(path) != ".h5ad":
        raise ReadError(f"layer={layer!r} applies to .h5ad files only, not {path}")
    if os.path.isdir(path):
        M = _read_10x(path)
    else:
        ext = _ext(path)
        if ext not in _EXTS:
            raise ReadError(f"unknown input format {ext or '(none)'!r} of {path}; use one of {', '.join(FORMATS)}")
        if not os.path.exists(path):
            raise ReadError(f"cannot read {path}: no such file")
        if not os.path.isfile(path):
            raise ReadError(f"cannot read {path}: not a regular file")
        try:
            if ext == ".npy":
                M = Matrix(np.load(path, allow_pickle=False))
            elif ext == ".npz":
                M = _read_npz(path)
            elif ext == ".mtx":
                M = _read_mtx(path)
            elif ext in (".csv", ".tsv"):
                M = _read_table(path, "\t" if ext == ".tsv" else ",")
            else:
                M = _read_h5ad(path, layer)
        except ReadError:
            raise
        except Exception as err:  # any reader failure becomes one clear line
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ReadError(f"cannot read {path}: {msg}") from err
    M.source = M.source or path
    X = M.X
    if getattr(X, "ndim", 0) != 2:
        raise ReadError(f"{path} must hold a 2-D matrix, got shape {getattr(X, 'shape', '?')}")
    if X.dtype.kind not in "iuf":
        raise ReadError(f"{path} must hold real numbers, got dtype {X.dtype}")
    if 0 in X.shape:
        raise ReadError(f"{path} holds an empty matrix of shape {tuple(X.shape)}")
    for names, n, what in ((M.row_names, X.shape[0], "row"), (M.col_names, X.shape[1], "column")):
        if names is not None and len(names) != n:
            raise ReadError(f"{path} has {len(names)} {what} names for {n} {what}s")
    return M.transposed() if transpose else M


def _read_npz(path: str) -> Matrix:
    import scipy.sparse as sp

    with np.load(path, allow_pickle=False) as z:
        keys = set(z.keys())
        rows = _names(z["row_names"]) if "row_names" in keys else None
        cols = _names(z["col_names"]) if "col_names" in keys else None
        data = keys - {"row_names", "col_names"}
        if {"data", "indices", "indptr", "shape", "format"} <= keys or {"row", "col", "data", "shape", "format"} <= keys:
            X = None
        elif "X" in data:
            X = z["X"]
        elif len(data) == 1:
            X = z[data.pop()]
        else:
            raise ReadError(f"{path} holds arrays {sorted(keys)}; name the matrix 'X' or save a single array")
    if X is None:
        X = sp.load_npz(path).tocsr()
    return Matrix(X, rows, cols)


def _read_mtx(path: str, tenx: Optional[bool] = None) -> Matrix:
    import scipy.io
    import scipy.sparse as sp

    base = os.path.basename(_strip_gz(path)[0])
    if tenx is None and base == "matrix.mtx":
        return _read_10x(os.path.dirname(os.path.abspath(path)), mtx=path)
    if path.lower().endswith(".gz"):
        with gzip.open(path, "rb") as fh:
            X = scipy.io.mmread(fh)
    else:
        X = scipy.io.mmread(path)
    return Matrix(sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X))


def _find(directory: str, names: Sequence[str]) -> Optional[str]:
    for name in names:
        for candidate in (name, name + ".gz"):
            p = os.path.join(directory, candidate)
            if os.path.isfile(p):
                return p
    return None


def _read_lines(path: str) -> List[List[str]]:
    with _open_text(path) as fh:
        return [row for row in csv.reader(fh, delimiter="\t") if row]


def _read_10x(directory: str, mtx: Optional[str] = None) -> Matrix:
    mtx = mtx or _find(directory, ["matrix.mtx"])
    if mtx is None:
        ext = os.path.splitext(directory.rstrip(os.sep))[1].lower()
        what = f"a directory, not a {ext} file" if ext in _EXTS else "a directory without matrix.mtx(.gz) (the 10x layout)"
        raise ReadError(f"cannot read {directory}: it is {what}")
    try:
        M = _read_mtx(mtx, tenx=False)
    except Exception as err:
        raise ReadError(f"cannot read {mtx}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    X = M.X.T  # 10x stores features x barcodes
    X = X.tocsr() if hasattr(X, "tocsr") else np.ascontiguousarray(X)
    feats = _find(directory, ["features.tsv", "genes.tsv"])
    barcodes = _find(directory, ["barcodes.tsv"])
    cols = rows = None
    if feats is not None:
        lines = _read_lines(feats)
        # columns: id, name[, type]; names are what people look for (ids may be duplicates-free, names not)
        cols = _names(line[1] if len(line) > 1 else line[0] for line in lines)
        if len(cols) != X.shape[1]:
            raise ReadError(f"{feats} lists {len(cols)} features but {mtx} has {X.shape[1]}")
    if barcodes is not None:
        rows = _names(line[0] for line in _read_lines(barcodes))
        if len(rows) != X.shape[0]:
            raise ReadError(f"{barcodes} lists {len(rows)} barcodes but {mtx} has {X.shape[0]}")
    return Matrix(X, rows, cols, source=directory)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _read_table(path: str, sep: str) -> Matrix:
    with _open_text(path) as fh:
        reader = csv.reader(fh, delimiter=sep)
        first = next(reader, None)
        second = next(reader, None)
    if not first:
        raise ReadError(f"{path} is empty")
    # A header line: an empty corner cell (pandas/R with row labels) or a non-number after it.
    header = first[0].strip() == "" or any(not _is_number(v) for v in first[1:] if v.strip()) \
        or (len(first) == 1 and not _is_number(first[0]))
    body = second if header else first
    index = body is not None and (not _is_number(body[0]) and body[0].strip() != ""
                                  or (header and (first[0].strip() == "" or len(first) == len(body) - 1)))
    try:
        import pandas as pd
    except ImportError:
        if header or index:
            raise ReadError(f"reading {path} with its labels needs pandas: pip install pandas") from None
        return Matrix(np.loadtxt(path, delimiter=sep, ndmin=2))
    df = pd.read_csv(path, sep=sep, header=0 if header else None, index_col=0 if index else None)
    if header and not index and len(df.columns) == len(first) - 1:  # R's header one short: pandas took an index
        index = True
    bad = [c for c in df.columns if df[c].dtype.kind not in "iufb"]
    if bad:
        # name the first cell that is not a number, in file order
        first_bad = None
        for j, c in enumerate(df.columns):
            if c not in bad:
                continue
            num = pd.to_numeric(df[c], errors="coerce")
            wrong = np.flatnonzero(num.isna().to_numpy() & df[c].notna().to_numpy())
            if len(wrong) and (first_bad is None or wrong[0] < first_bad[0]):
                first_bad = (int(wrong[0]), j, df[c].iloc[wrong[0]])
        i, j, v = first_bad
        line = i + 1 + int(header)
        where = f"row {i}" + (f" ({df.index[i]})" if index else "") + f", column {j}" + (f" ({df.columns[j]})" if header else "")
        raise ReadError(f"{path} line {line}: {v!r} at {where} is not a number")
    X = df.to_numpy(dtype=np.float64)
    rows = _names(df.index) if index else None
    cols = _names(df.columns) if header else None
    return Matrix(X, rows, cols)


def _read_h5ad(path: str, layer: Optional[str]) -> Matrix:
    try:
        import anndata
    except ImportError:
        raise ReadError("reading .h5ad needs anndata: pip install anndata") from None
    import scipy.sparse as sp

    adata = anndata.read_h5ad(path)
    alternatives = list(adata.layers.keys()) + (["raw"] if adata.raw is not None else [])
    cols = _names(adata.var_names)
    if layer is None:
        X, source = adata.X, path
    elif layer == "raw":
        if adata.raw is None:
            raise ReadError(f"{path} has no raw matrix; layers: {', '.join(alternatives) or 'none'}")
        X, cols, source = adata.raw.X, _names(adata.raw.var_names), f"{path} (raw)"
    elif layer in adata.layers:
        X, source = adata.layers[layer], f"{path} (layer {layer})"
    else:
        raise ReadError(f"{path} has no layer {layer!r}; layers: {', '.join(alternatives) or 'none'}")
    if X is None:
        raise ReadError(f"{path} has no X matrix; layers: {', '.join(alternatives) or 'none'}")
    X = sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
    return Matrix(X, _names(adata.obs_names), cols, source=source, alternatives=alternatives)


# -- counts ------------------------------------------------------------------------------
def first_entry(X, mask) -> Tuple[int, int, float]:
    """``(row, column, value)`` of the first entry (row-major) where ``mask`` is true.

    Parameters
    ----------
    X : ndarray or scipy.sparse matrix, shape (n, m)
    mask : ndarray of bool
        Same shape as ``X`` (dense), or as ``X.data`` of a CSR ``X`` with sorted indices.

    Returns
    -------
    (int, int, float)
    """
    import scipy.sparse as sp

    if sp.issparse(X):
        if X.has_sorted_indices:  # data is then in row-major order
            k = int(np.argmax(mask))
        else:
            order = np.lexsort((X.indices, np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))))
            k = int(order[mask[order]][0])
        row = int(np.searchsorted(X.indptr, k, side="right") - 1)
        return row, int(X.indices[k]), float(X.data[k])
    i, j = np.unravel_index(int(np.argmax(mask)), X.shape)
    return int(i), int(j), float(X[i, j])


def _describe(X, mask, row_names, col_names) -> str:
    i, j, v = first_entry(X, mask)
    rn = f" ({row_names[i]})" if row_names is not None else ""
    cn = f" ({col_names[j]})" if col_names is not None else ""
    return f"row {i}{rn}, column {j}{cn}: {v!r}"


def round_counts(X, *, tol: float = 1e-6, force: bool = False, row_names=None, col_names=None,
                 name: str = "X") -> Tuple[object, int]:
    """Round counts stored as floats; refuse values that are not counts.

    Parameters
    ----------
    X : ndarray or scipy.sparse matrix, shape (n_samples, n_features)
        Non-negative values. Never modified.
    tol : float, default 1e-6
        Values within ``tol`` of an integer (or within a few float64 ulps, for large
        values) count as that integer: float noise of a saved count.
    force : bool, default False
        Round every value to the nearest integer whatever its distance.
    row_names, col_names : sequence of str, optional
        Names used in the error message.
    name : str
        What ``X`` is called in the error message (e.g. the file name).

    Returns
    -------
    X : ndarray or scipy.sparse CSR matrix, shape (n_samples, n_features)
        ``X`` itself when nothing was rounded, else a rounded copy.
    n_rounded : int
        How many values changed.

    Raises
    ------
    ValueError
        A value farther than ``tol`` from every integer (without ``force``); the message
        names its row, column and value.
    """
    import scipy.sparse as sp

    if sp.issparse(X):
        X = X.tocsr()
        if not X.has_sorted_indices:
            X = X.sorted_indices()
        vals = X.data
    else:
        vals = np.asarray(X)
    if vals.dtype.kind in "iu":
        return X, 0
    if vals.dtype.kind != "f":
        raise ReadError(f"{name} must hold real numbers, got dtype {vals.dtype}")
    bad = ~np.isfinite(vals)
    if bad.any():
        raise ReadError(f"{name} holds NaN or infinity, which are not counts, first at "
                        f"{_describe(X, bad, row_names, col_names)}")
    bad = vals < 0
    if bad.any():
        raise ReadError(f"{name} holds negative values, which are not counts, first at "
                        f"{_describe(X, bad, row_names, col_names)}")
    import torch

    from .data import _not_counts_message, count_rule

    # the library's rule (data.count_rule), checked in float64 unless float32 (float16,
    # longdouble and big-endian arrays included)
    t = torch.from_numpy(np.ascontiguousarray(vals, dtype=np.float32 if vals.dtype == np.float32 else np.float64))
    r, changed, bad = count_rule(t, tol)
    if not force and bool(bad.any()):
        i, j, v = first_entry(X, bad.numpy())
        rn = f" ({row_names[i]})" if row_names is not None else ""
        cn = f" ({col_names[j]})" if col_names is not None else ""
        raise ReadError(_not_counts_message(name, f"row {i}{rn}, column {j}{cn}", v))
    changed = changed.numpy()
    n_changed = int(np.count_nonzero(changed))
    if not n_changed:
        return X, 0
    r = r.numpy().astype(vals.dtype)
    if sp.issparse(X):
        out = X.copy()
        out.data = r
        out.eliminate_zeros()
        return out, n_changed
    return r, n_changed


# -- writing -----------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: Union[str, os.PathLike], mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success rename it to ``path``.

    A reader (or a killed writer) sees the previous file or the complete new one, never a
    partial one. On an exception the temporary file is removed and ``path`` is untouched.

    Parameters
    ----------
    path : str or path-like
        The destination; its directory must exist.
    mode : {'wb', 'w'}
        Binary or text (UTF-8).

    Yields
    ------
    file object
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # as a plain open() would create it
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
