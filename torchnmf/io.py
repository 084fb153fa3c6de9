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
                                     when labelled; see :func:`read_matrix` for the rules)
``.txt`` (also ``.gz``)              numbers separated by white space (``numpy.savetxt``), no names
``.mtx`` (also ``.gz``)              Matrix Market; ``matrix.mtx`` is read as 10x writes it
a directory                          10x layout: ``matrix.mtx(.gz)`` (features x barcodes),
                                     ``features.tsv(.gz)`` or ``genes.tsv(.gz)``,
                                     ``barcodes.tsv(.gz)``; read as barcodes x features
                                     (repeated gene symbols made unique, with a warning)
``.h5ad``                            AnnData (needs :mod:`anndata`): ``X``, a layer, or ``raw``
===================================  ==========================================================

:func:`round_counts` accepts counts stored as floats (within ``1e-6`` of an integer) and names
the first entry that is not a count; :func:`atomic_write` writes a file so that a reader sees the
old or the new content, never half of it; :func:`atomic_write_all` does it for several files at
once, replacing none unless all were written.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import io as _io
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import IO, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["Matrix", "ReadError", "read_matrix", "round_counts", "first_entry", "atomic_write",
           "atomic_write_all", "remove_stale", "available_memory", "FORMATS", "MISSING", "MAX_EMPTY"]

FORMATS = (".npy", ".npz", ".mtx", ".mtx.gz", ".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz", ".h5ad",
           "10x directory")
_EXTS = (".npy", ".npz", ".mtx", ".csv", ".tsv", ".txt", ".h5ad")


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


# Sizes a header claims are checked before anything is allocated: a few bytes claiming
# 300,000,000 rows must not cost gigabytes.
MAX_EMPTY = 2 ** 24
"""A sparse file's rows plus columns may exceed 16 times its entries by at most this many (16.7
million; a 10x whitelist has 6.8 million barcodes): more would be mostly empty rows a header
claims but the file does not hold."""
_GZIP_RATIO = 1032  # deflate never expands more than this: bounds the content of a .gz file


def available_memory() -> Optional[int]:
    """Bytes of memory available to a new allocation (``MemAvailable``), ``None`` when unknown.

    Returns
    -------
    int or None
    """
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not on this platform
        return None


def _content_bytes(path: str) -> int:
    """An upper bound of the bytes the file's content can hold (its size, or deflate's limit for .gz)."""
    size = os.path.getsize(path)
    return size * _GZIP_RATIO if path.lower().endswith(".gz") else size


def _check_claim(path: str, what: str, need: int, entries: Optional[Tuple[int, int, int]] = None) -> None:
    """Refuse a header claim the file cannot hold or this machine cannot read, before allocating.

    ``need`` is the bytes reading it takes; ``entries`` = (rows, cols, nnz) of a sparse claim.
    """
    if entries is not None:
        rows, cols, nnz = entries
        if rows + cols > 16 * nnz + MAX_EMPTY:
            raise ReadError(f"{path}: the header claims {what}: at least {rows - min(rows, nnz)} empty rows and "
                            f"{cols - min(cols, nnz)} empty columns, more than a file of data holds (rows + columns "
                            f"<= 16 x entries + {MAX_EMPTY}); the header is probably damaged")
    avail = available_memory()
    if avail is not None and need > avail:
        raise ReadError(f"{path}: the header claims {what}, about {need / 2**30:.1f} GiB to read; this machine "
                        f"has {avail / 2**30:.1f} GiB available")


def _check_mtx_header(path: str) -> None:
    """Check a Matrix Market header's sizes against the file and the machine (before scipy allocates)."""
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        banner = fh.readline(1024).decode("ascii", "replace").split()
        if len(banner) < 5 or banner[0].lower() != "%%matrixmarket":
            return  # not a header to check: scipy's message says what is wrong
        fmt, field, symmetry = (t.lower() for t in banner[2:5])
        line = fh.readline(1024)
        while line and (line.startswith(b"%") or not line.strip()):
            line = fh.readline(1024)
    try:
        sizes = [int(t) for t in line.split()]
    except ValueError:
        return
    budget = _content_bytes(path)
    if fmt == "coordinate" and len(sizes) == 3:
        rows, cols, nnz = sizes
        if min(sizes) < 0:
            raise ReadError(f"{path}: the header claims negative sizes {rows} {cols} {nnz}")
        if nnz > rows * cols:
            raise ReadError(f"{path}: the header claims {nnz} entries in a {rows} x {cols} matrix")
        per_entry = 4 if field == "pattern" else 6  # "i j\n" or "i j v\n" at the least
        what = f"{rows} x {cols} with {nnz} entries"
        if nnz * per_entry > budget:
            raise ReadError(f"{path}: the header claims {what}, but the file holds at most "
                            f"{budget // per_entry} ({os.path.getsize(path)} bytes)")
        # COO arrays, CSR and its transpose, each with its row pointers
        _check_claim(path, what, 40 * nnz + 16 * (rows + cols + 2), (rows, cols, nnz))
    elif fmt == "array" and len(sizes) == 2:
        rows, cols = sizes
        if min(sizes) < 0:
            raise ReadError(f"{path}: the header claims negative sizes {rows} {cols}")
        values = rows * (rows + 1) // 2 if symmetry != "general" else rows * cols
        what = f"a dense {rows} x {cols} matrix"
        if values * 2 > budget:  # "v\n" at the least
            raise ReadError(f"{path}: the header claims {what}, but the file holds at most "
                            f"{budget // 2} values ({os.path.getsize(path)} bytes)")
        _check_claim(path, what, 16 * rows * cols)


def _npy_header(fh) -> Optional[Tuple[tuple, np.dtype]]:
    """``(shape, dtype)`` from a .npy header at the file position, ``None`` if it is not one."""
    from numpy.lib import format as npf

    try:
        version = npf.read_magic(fh)
        read = npf.read_array_header_1_0 if version == (1, 0) else npf.read_array_header_2_0
        shape, _, dtype = read(fh)
    except Exception:  # not a header to check: np.load's message says what is wrong
        return None
    return tuple(shape), dtype


def _check_npy_header(path: str) -> None:
    """Check a .npy header's shape against the file's size and the machine."""
    with open(path, "rb") as fh:
        header = _npy_header(fh)
        offset = fh.tell()
    if header is None or header[1].hasobject:  # np.load refuses pickled objects itself
        return
    shape, dtype = header
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    what = f"shape {shape} of {dtype}"
    held = os.path.getsize(path) - offset
    if need > held:
        raise ReadError(f"{path}: the header claims {what} ({need} bytes), but the file holds {held} bytes of data")
    _check_claim(path, what, need)


def _check_npz_headers(path: str) -> None:
    """Check each array's header in a .npz against its size in the archive, and a sparse shape."""
    import zipfile

    shapes, total = {}, 0
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as fh:
                header = _npy_header(fh)
                offset = fh.tell()
            if header is None or header[1].hasobject:
                continue
            shape, dtype = header
            name = info.filename[:-4]
            need = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if need > info.file_size - offset:
                raise ReadError(f"{path}: array {name!r} claims shape {shape} of {dtype} ({need} bytes), but the "
                                f"archive holds {info.file_size - offset} bytes of it")
            shapes[name], total = shape, total + need
    if {"shape", "format"} <= set(shapes) and ("data" in shapes):  # scipy.sparse.save_npz
        with np.load(path, allow_pickle=False) as z:
            claim = [int(v) for v in np.asarray(z["shape"]).ravel()]
        nnz = int(np.prod(shapes["data"], dtype=object))
        if len(claim) == 2:  # CSR/COO row pointers are allocated from the claimed shape
            _check_claim(path, f"{claim[0]} x {claim[1]} with {nnz} entries", 16 * (sum(claim) + 2) + 40 * nnz,
                         (claim[0], claim[1], nnz))
    else:
        _check_claim(path, f"arrays of {total} bytes", total)


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
        content that is not a 2-D real matrix, non-numeric cells (the first one named by its
        line in the file, row and column), an unknown ``layer``, a missing optional reader
        (pandas, anndata), or a header (``.mtx``, ``.npy``, sparse ``.npz``) claiming sizes
        the file cannot hold or this machine's available memory cannot read (checked before
        anything is allocated; a ``MemoryError`` while reading also becomes this error).

    Notes
    -----
    In ``.csv``/``.tsv`` files the first line is a header when its first cell is empty or a
    cell after the first is not a number. The first column holds row labels when the header
    says so (an empty first cell, or one name fewer than the data rows have cells, as R writes
    it) or when every cell of the column is text; a column mixing text and numbers is an
    error naming its first text cell, never labels guessed from one cell. Empty cells and the
    tokens in :data:`MISSING` (``NA``, ``NaN``, ``NULL``...) read as NaN. Duplicate column
    names are kept as they are, with one warning.
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
                _check_npy_header(path)
                M = Matrix(np.load(path, allow_pickle=False))
            elif ext == ".npz":
                M = _read_npz(path)
            elif ext == ".mtx":
                M = _read_mtx(path)
            elif ext in (".csv", ".tsv"):
                M = _read_table(path, "\t" if ext == ".tsv" else ",")
            elif ext == ".txt":
                M = _read_txt(path)
            else:
                M = _read_h5ad(path, layer)
        except ReadError:
            raise
        except MemoryError as err:
            msg = str(err).splitlines()[0] if str(err) else "out of memory"
            raise ReadError(f"cannot read {path}: it does not fit in this machine's memory ({msg})") from err
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

    _check_npz_headers(path)
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
    _check_mtx_header(path)
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
    except ReadError:
        raise
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
        cols = _unique_names(cols, feats)
    if barcodes is not None:
        rows = _names(line[0] for line in _read_lines(barcodes))
        if len(rows) != X.shape[0]:
            raise ReadError(f"{barcodes} lists {len(rows)} barcodes but {mtx} has {X.shape[0]}")
    return Matrix(X, rows, cols, source=directory)


MISSING = frozenset({"", "NA", "N/A", "n/a", "NaN", "nan", "-nan", "-NaN", "NULL", "null", "None",
                     "#N/A", "<NA>"})
"""Table cells read as missing values (NaN), as pandas reads them; ``torchnmf fit`` refuses NaN."""


def _unique_names(names: np.ndarray, source: str) -> np.ndarray:
    """Names made unique as scanpy's ``var_names_make_unique`` does (``TBCE``, ``TBCE-1``, ...), with a warning.

    Gene symbols repeat in 10x feature lists (a symbol for several Ensembl ids): kept as they are,
    a name would point at two columns, in the summary's top features and in any lookup by name.
    """
    values, counts = np.unique(names, return_counts=True)
    repeated = values[counts > 1]
    if not len(repeated):
        return names
    seen = set(names.tolist())
    out, n = names.tolist(), {}  # a list: the suffixes may not fit the array's fixed-width strings
    for j, name in enumerate(names.tolist()):
        if name in n:
            k = n[name]
            while f"{name}-{k}" in seen:
                k += 1
            out[j] = f"{name}-{k}"
            seen.add(out[j])
            n[name] = k + 1
        else:
            n[name] = 1
    shown = ", ".join(repr(str(v)) for v in repeated[:3]) + (", ..." if len(repeated) > 3 else "")
    warnings.warn(f"{source}: {len(repeated)} feature name{'s' if len(repeated) != 1 else ''} appear more than once "
                  f"({shown}); the repeats were renamed NAME-1, NAME-2, ... in file order (as scanpy's "
                  "var_names_make_unique), so every column has its own name", UserWarning, stacklevel=_caller_level())
    return _names(out)


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside torchnmf (as the engine's, without importing torch)."""
    frame, level = sys._getframe(2), 2
    while frame.f_back is not None and frame.f_globals.get("__name__", "").split(".")[0] == "torchnmf":
        frame, level = frame.f_back, level + 1
    return level


def _is_number(s: str) -> bool:
    s = s.strip()
    if s in MISSING or "_" in s:  # missing is not a name; float() takes 1_000, pandas does not
        return s in MISSING
    try:
        float(s)
        return True
    except ValueError:
        return False


def _first_rows(path: str, sep: str) -> Tuple[Optional[List[str]], Optional[List[str]], int]:
    """The first two non-blank rows and the number of physical lines up to the first one."""
    with _open_text(path) as fh:
        reader = csv.reader(fh, delimiter=sep)
        first = next((row for row in reader if row), None)
        lines = reader.line_num
        second = next((row for row in reader if row), None)
    return first, second, lines


def _read_txt(path: str) -> Matrix:
    """Numbers separated by white space, one row a line (``numpy.savetxt``'s default), no names."""
    try:
        X = np.loadtxt(path, ndmin=2, dtype=np.float64)
    except ValueError as err:
        raise ReadError(f"cannot read {path}: {str(err).splitlines()[0]} (a .txt file holds numbers separated by "
                        "white space; for names use .csv or .tsv with a header line)") from None
    if X.size == 0:
        raise ReadError(f"{path} is empty")
    return Matrix(X)


def _check_ragged(path: str, sep: str, header: bool, n: int) -> None:
    """Refuse a data line with fewer than ``n`` fields, naming it (pandas pads it with NaN)."""
    with _open_text(path) as fh:
        reader = csv.reader(fh, delimiter=sep)
        skip = int(header)
        for record in reader:
            if not record:
                continue
            if skip:
                skip -= 1
                continue
            if len(record) < n:
                fields = f"{len(record)} field{'s' if len(record) != 1 else ''}"
                raise ReadError(f"{path} line {reader.line_num} has {fields} where the lines before have {n}: a "
                                "ragged line (a missing value is an empty field between separators, or NA)")


def _line_of(path: str, sep: str, row: int, header: bool) -> int:
    """The 1-based file line of data row ``row`` (0-based; blank lines skipped as pandas does)."""
    with _open_text(path) as fh:
        reader = csv.reader(fh, delimiter=sep)
        k = -1 - int(header)
        for record in reader:
            if record:
                k += 1
                if k == row:
                    return reader.line_num
    return row + 1 + int(header)  # pragma: no cover - the row was read from this file


def _read_table(path: str, sep: str) -> Matrix:
    first, second, head_lines = _first_rows(path, sep)
    if not first:
        raise ReadError(f"{path} is empty")
    # A header line: words after the first cell and no number anywhere, or an empty corner cell
    # (pandas/R with row labels) before words or pandas' default names 0, 1, ... A line of
    # numbers with a word (a typo such as 1O) or an empty first cell is data, so the word or
    # the missing value is reported below; the first cell alone never decides.
    numbers = [_is_number(v) and v.strip() not in MISSING for v in first]
    words = [not _is_number(v) for v in first]
    if first[0].strip() == "":
        header = any(words[1:]) or [v.strip() for v in first[1:]] == [str(k) for k in range(len(first) - 1)]
    else:
        header = not any(numbers) and (len(first) == 1 or any(words[1:]))
    body = second if header else first
    if body is None:
        raise ReadError(f"{path} has a header line but no data")
    try:
        import pandas as pd
    except ImportError:
        if header:
            raise ReadError(f"reading {path} with its header needs pandas: pip install pandas") from None
        try:
            return Matrix(np.loadtxt(path, delimiter=sep, ndmin=2))
        except ValueError as err:
            raise ReadError(f"cannot read {path}: {err} (row labels need pandas: pip install pandas)") from None
    n = len(body)
    if header and len(first) not in (n, n - 1):
        raise ReadError(f"{path}: the header line has {len(first)} names for {n} columns")
    # Column 0 raw (it may be labels, verbatim); the others with the missing-cell tokens as NaN.
    df = pd.read_csv(path, sep=sep, header=None, skiprows=head_lines if header else 0, dtype={0: object},
                     keep_default_na=False, na_values={j: sorted(MISSING) for j in range(1, n)},
                     skip_blank_lines=True)
    if df.shape[1] != n:  # pragma: no cover - pandas infers the width from the first data row
        raise ReadError(f"{path}: rows of {n} and {df.shape[1]} fields")
    raw0 = df[0]
    col0 = raw0.astype(str).str.strip()
    missing0 = col0.isin(MISSING).to_numpy()
    num0 = pd.to_numeric(col0.where(~col0.isin(MISSING)), errors="coerce").to_numpy(dtype=np.float64)
    text0 = np.isnan(num0) & ~missing0
    # Row labels: said so by the header (an empty corner cell, or R's header one name short),
    # or the whole first column is text; never decided from one cell.
    labels = header and (len(first) == n - 1 or first[0].strip() == "") \
        or (bool(text0.any()) and not (~np.isnan(num0)).any())
    names = None if not header else (first[1:] if labels and len(first) == n else first)
    if labels:
        rows = raw0.astype(str).to_numpy()
        data = df.iloc[:, 1:]
    else:
        rows = None
        data = df  # ours: column 0 becomes its numbers (raw0 keeps the text for the message)
        data[0] = np.where(missing0, np.nan, num0)
    # the first cell (in file order) that is not a number
    bad = None
    for j, kind in enumerate(d.kind for d in data.dtypes):
        if j == 0 and not labels:
            wrong = text0
        elif kind in "iufb":
            continue
        else:
            c = data.iloc[:, j]
            wrong = (pd.to_numeric(c, errors="coerce").isna() & c.notna()).to_numpy()
        hits = np.flatnonzero(wrong)
        if len(hits) and (bad is None or hits[0] < bad[0]):
            bad = (int(hits[0]), j)
    if bad is not None:
        i, j = bad
        value = raw0.iloc[i] if j == 0 and not labels else df.iloc[i, j + int(labels)]
        where = f"row {i}" + (f" ({rows[i]})" if labels else "") + f", column {j}" \
            + (f" ({names[j]})" if names is not None else "")
        hint = ""
        if j == 0 and not labels and (~np.isnan(num0)).any():
            hint = ("; the first column mixes text and numbers: for row labels, "
                    + ("leave the header's first cell empty" if header else "add a header line with an empty first cell"))
        raise ReadError(f"{path} line {_line_of(path, sep, i, header)}: {value!r} at {where} is not a number{hint}")
    X = data.to_numpy(dtype=np.float64)
    if np.isnan(X).any():  # pandas fills a short (ragged) line with NaN: name the line instead
        _check_ragged(path, sep, header, n)
    cols = None
    if names is not None:
        cols = _names(v.strip() for v in names)
        seen, dups = set(), []
        for v in cols:
            if v in seen and v not in dups:
                dups.append(v)
            seen.add(v)
        if dups:  # kept as they are (never renamed): say so once
            shown = ", ".join(repr(str(v)) for v in dups[:5]) + (", ..." if len(dups) > 5 else "")
            warnings.warn(f"{path} has duplicate column names ({shown}); they are kept as they are",
                          UserWarning, stacklevel=3)
    return Matrix(X, _names(rows) if labels else None, cols)


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


def _temporary(path: str) -> Tuple[int, str]:
    """A new temporary file beside ``path``, named ``.NAME.<pid>.<random>.tmp`` (see :func:`remove_stale`)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # as a plain open() would create it
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # someone else's process, or no way to tell: keep its file
        return True
    return True


def remove_stale(path: Union[str, os.PathLike]) -> List[str]:
    """Delete the temporary files that killed writes of ``path`` left beside it.

    :func:`atomic_write` and :func:`atomic_write_all` name their temporary files
    ``.NAME.<pid>.<random>.tmp``; those of processes that no longer run, of this process (an
    interrupted earlier write) and of older versions (``.NAME.<random>.tmp``) are deleted,
    those of another running process are kept. Each write calls this first, so leftovers
    never pile up.

    Parameters
    ----------
    path : str or path-like
        The destination file whose leftovers to delete.

    Returns
    -------
    list of str
        The paths deleted.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}."
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:  # no directory yet: nothing left behind
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        middle = name[len(prefix):-len(".tmp")]
        pid, _, rest = middle.partition(".")
        if rest and pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another process's write in progress (ours are done: one write at a time)
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, name))
            removed.append(os.path.join(directory, name))
    return removed


@contextlib.contextmanager
def atomic_write(path: Union[str, os.PathLike], mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success rename it to ``path``.

    A reader (or a killed writer) sees the previous file or the complete new one, never a
    partial one. On an exception the temporary file is removed and ``path`` is untouched.
    Temporary files that killed writes of ``path`` left are deleted first (:func:`remove_stale`).

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
    remove_stale(path)
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_all(files: Sequence[Tuple[Union[str, os.PathLike], str, Callable[[IO], object]]]) -> None:
    """Write several files, each to a temporary file first; rename them only once all are written.

    A failure while writing any of them (disk full, an exception of a writer) leaves every
    destination as it was and no temporary file behind. Only a kill between the renames (a
    moment, after every byte is on disk) can leave some files new and others old: give the
    files a common identifier to detect that, as ``torchnmf fit`` does.

    Parameters
    ----------
    files : sequence of (path, mode, write)
        The destination (its directory must exist), ``'wb'`` or ``'w'`` (UTF-8), and a
        function that writes the content to the file object it is given. Renamed in this order.
    """
    temps: List[Tuple[str, str]] = []
    try:
        for path, mode, write in files:
            path = os.fspath(path)
            remove_stale(path)
            fd, tmp = _temporary(path)
            temps.append((tmp, path))
            with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
