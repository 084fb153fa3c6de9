"""Stream the rows of a sparse matrix too large for device memory, in batches.

:class:`SparseRows` is a :class:`torch.utils.data.Dataset` over the rows of a matrix held
as CSR arrays in host memory (scipy.sparse, torch sparse, numpy) or memory-mapped from disk
(a directory written by :func:`save_csr`, an uncompressed scipy ``.npz``, a dense ``.npy``,
or a Matrix Market ``.mtx`` converted once by :func:`mtx_to_csr`). It fetches whole
batches at once (``__getitems__``), so :func:`row_loader` 's
:class:`~torch.utils.data.DataLoader` copies only the batch's nonzeros out of the
memory map and never densifies the matrix.

Each batch is a :class:`RowBatch`: the global indices of its rows and the rows themselves
as a torch sparse CSR (or COO, or dense) tensor of shape ``(batch_size, n_cols)``.
"""
from __future__ import annotations

import gzip
import json
import os
import struct
import warnings
import zipfile
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .data import _native, check_option, check_rank
from .distributed import get_rank, get_world_size, shard_range
from ._csr import csr_tensor, to_csr

__all__ = ["RowBatch", "SparseRows", "EpochSampler", "row_loader", "collate_rows", "save_csr", "mtx_to_csr"]

_CHUNK = 1 << 22  # entries checked or rewritten at a time: bounds host memory on huge files


class RowBatch(NamedTuple):
    """A batch of rows of a large matrix.

    Attributes
    ----------
    rows : LongTensor, shape (batch_size,)
        Global indices of the rows, in the order of ``X``'s rows.
    X : Tensor, shape (batch_size, n_cols)
        Sparse CSR (default), sparse COO or dense.
    """

    rows: Tensor
    X: Tensor

    def to(self, device=None, dtype: Optional[torch.dtype] = None, non_blocking: bool = False) -> "RowBatch":
        """The batch on ``device`` (and the values in ``dtype``)."""
        return RowBatch(self.rows.to(device, non_blocking=non_blocking),
                        self.X.to(device=device, dtype=dtype, non_blocking=non_blocking))


def collate_rows(batch) -> RowBatch:
    """``collate_fn`` for :class:`SparseRows`: a :class:`RowBatch` passes through, a list is stacked."""
    if isinstance(batch, RowBatch):
        return batch
    batch = list(batch)
    if not batch or not all(isinstance(b, RowBatch) for b in batch):
        raise TypeError("collate_rows expects RowBatch items from a SparseRows dataset")
    rows = torch.cat([b.rows for b in batch])
    X = torch.cat([b.X.to_dense() if b.X.layout != torch.strided else b.X for b in batch])
    layout = batch[0].X.layout
    if layout == torch.sparse_csr:
        X = to_csr(X)
    elif layout == torch.sparse_coo:
        X = X.to_sparse_coo()
    return RowBatch(rows, X)


# -- on-disk formats -------------------------------------------------------------
def _scipy_dtype(X: Tensor) -> Tensor:
    """``X`` with half-precision values as float32: numpy has no bfloat16 and scipy.sparse no float16."""
    return X.float() if X.dtype in (torch.float16, torch.bfloat16) else X


def save_csr(X, directory: Union[str, os.PathLike]) -> str:
    """Write a matrix as CSR arrays that :class:`SparseRows` memory-maps.

    Parameters
    ----------
    X : scipy.sparse matrix, torch sparse or dense tensor, or numpy array, shape (n_rows, n_cols)
    directory : str or os.PathLike
        Created if missing; receives ``data.npy``, ``indices.npy``, ``indptr.npy`` and ``meta.json``.

    Returns
    -------
    str
        ``directory``.
    """
    import scipy.sparse as sp

    if isinstance(X, Tensor):
        X = _scipy_dtype(X.detach().cpu())
        if X.layout == torch.strided:
            X = sp.csr_matrix(X.numpy())
        else:
            X = to_csr(X)
            X = sp.csr_matrix((X.values().numpy(), X.col_indices().numpy(), X.crow_indices().numpy()),
                              shape=tuple(X.shape))
    elif not sp.issparse(X):
        A = _native(np.asarray(X))
        X = sp.csr_matrix(A.astype(np.float32) if A.dtype == np.float16 else A)  # scipy has no float16
    X = sp.csr_matrix(X)  # a new object: sorting below never touches the caller's matrix
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D, got shape {X.shape}")
    if not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    for name in ("data", "indices", "indptr"):
        np.save(os.path.join(directory, f"{name}.npy"), getattr(X, name))
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"shape": list(X.shape), "canonical": True}, f)
    return directory


def _open_mtx(path: str):
    return gzip.open(path, "rt") if path.endswith(".gz") else open(path, "rt")


def _mtx_header(f):
    banner = f.readline().split()
    if len(banner) < 5 or banner[0].lower() != "%%matrixmarket" or banner[1].lower() != "matrix":
        raise ValueError("not a Matrix Market file: the first line must be '%%MatrixMarket matrix ...'")
    fmt, field, symmetry = (b.lower() for b in banner[2:5])
    line = f.readline()
    while line.startswith("%") or not line.strip():
        if not line:
            raise ValueError("Matrix Market file ends before its size line")
        line = f.readline()
    return fmt, field, symmetry, [int(x) for x in line.split()]


def _mtx_chunks(f, field: str, chunk_lines: int):
    ncol = 2 if field == "pattern" else 3
    while True:
        lines = [line for _, line in zip(range(chunk_lines), f)]
        if not lines:
            return
        arr = np.loadtxt(lines, ndmin=2, comments="%", dtype=np.float64)
        if arr.size == 0:
            continue
        if arr.shape[1] < ncol:
            raise ValueError(f"Matrix Market entries must have {ncol} columns for field {field!r}")
        r, c = arr[:, 0].astype(np.int64) - 1, arr[:, 1].astype(np.int64) - 1
        v = np.ones(len(r)) if field == "pattern" else arr[:, 2]
        yield r, c, v


def mtx_to_csr(path: Union[str, os.PathLike], directory: Union[str, os.PathLike, None] = None,
               chunk_lines: int = 1 << 20) -> str:
    """Convert a Matrix Market coordinate file to memory-mappable CSR arrays, in two passes.

    Host memory stays at ``O(n_rows + chunk_lines)``: pass one counts the entries of each
    row, pass two writes them into memory-mapped arrays; columns are then sorted per row.

    Parameters
    ----------
    path : str or os.PathLike
        ``.mtx`` or ``.mtx.gz``; field real, integer or pattern; general or symmetric.
    directory : str or os.PathLike, optional
        Output directory (see :func:`save_csr`); default ``path + '.csr'``.
    chunk_lines : int, default 2**20
        Lines parsed at a time.

    Returns
    -------
    str
        The output directory.
    """
    path = os.fspath(path)
    directory = os.fspath(directory) if directory is not None else path + ".csr"
    chunk_lines = check_rank(chunk_lines, "chunk_lines")
    with _open_mtx(path) as f:
        fmt, field, symmetry, size = _mtx_header(f)
        if field not in ("real", "integer", "pattern"):
            raise TypeError(f"{path}: Matrix Market field {field!r} is not supported (real, integer or pattern)")
        if symmetry not in ("general", "symmetric"):
            raise ValueError(f"{path}: symmetry {symmetry!r} is not supported (general or symmetric)")
        if fmt != "coordinate":
            import scipy.io

            return save_csr(scipy.io.mmread(path), directory)
        n_rows, n_cols, _ = size
        counts = np.zeros(n_rows, dtype=np.int64)
        for r, c, v in _mtx_chunks(f, field, chunk_lines):
            if len(r) and (r.min() < 0 or r.max() >= n_rows or c.min() < 0 or c.max() >= n_cols):
                raise ValueError(f"{path}: an entry lies outside the declared shape {n_rows} x {n_cols}")
            counts += np.bincount(r, minlength=n_rows)
            if symmetry == "symmetric":
                off = r != c
                counts += np.bincount(c[off], minlength=n_rows)
    os.makedirs(directory, exist_ok=True)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    total = int(indptr[-1])
    open_memmap = np.lib.format.open_memmap
    indices = open_memmap(os.path.join(directory, "indices.npy"), "w+", np.int64, (total,))
    data = open_memmap(os.path.join(directory, "data.npy"), "w+", np.float64, (total,))
    fill = indptr[:-1].copy()
    with _open_mtx(path) as f:
        _mtx_header(f)
        for r, c, v in _mtx_chunks(f, field, chunk_lines):
            if symmetry == "symmetric":
                off = r != c
                r, c, v = np.concatenate([r, c[off]]), np.concatenate([c, r[off]]), np.concatenate([v, v[off]])
            order = np.argsort(r, kind="stable")
            r, c, v = r[order], c[order], v[order]
            uniq, first, cnt = np.unique(r, return_index=True, return_counts=True)
            within = np.arange(len(r)) - np.repeat(first, cnt)
            pos = fill[r] + within
            indices[pos], data[pos] = c, v
            fill[uniq] += cnt
    canonical = _sort_rows(indptr, indices, data)
    np.save(os.path.join(directory, "indptr.npy"), indptr)
    indices.flush()
    data.flush()
    del indices, data
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"shape": [n_rows, n_cols], "canonical": bool(canonical)}, f)
    return directory


def _row_blocks(indptr: np.ndarray, budget: int = _CHUNK) -> Iterator[tuple]:
    """Consecutive row ranges holding about ``budget`` entries each."""
    n = len(indptr) - 1
    a = 0
    while a < n:
        b = int(np.searchsorted(indptr, indptr[a] + budget, side="right")) - 1
        b = min(max(b, a + 1), n)
        yield a, b
        a = b


def _sort_rows(indptr, indices, data) -> bool:
    """Sort columns within each row in place; return whether no (row, col) repeats."""
    canonical = True
    for a, b in _row_blocks(indptr):
        lo, hi = int(indptr[a]), int(indptr[b])
        if hi == lo:
            continue
        rowid = np.repeat(np.arange(a, b), np.diff(indptr[a:b + 1]))
        cols = np.asarray(indices[lo:hi])
        order = np.lexsort((cols, rowid))
        cols = cols[order]
        indices[lo:hi] = cols
        data[lo:hi] = np.asarray(data[lo:hi])[order]
        if canonical and bool(((np.diff(cols) == 0) & (np.diff(rowid) == 0)).any()):
            canonical = False
    return canonical


def _npz_member(path: str, name: str):
    """Memory-map member ``name`` of an uncompressed ``.npz``; ``None`` when it is compressed."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:  # pragma: no cover - npy format 3 (unicode field names)
            return None
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


# -- the dataset -----------------------------------------------------------------
class SparseRows(Dataset):
    """Rows of a (possibly huge) matrix as a :class:`~torch.utils.data.Dataset`.

    Parameters
    ----------
    source : scipy.sparse matrix, torch tensor (sparse or dense), numpy array or path
        A path may be a directory written by :func:`save_csr`, a scipy ``.npz`` (members
        stored uncompressed are memory-mapped, compressed ones are read into host memory),
        a dense ``.npy`` (memory-mapped) or a ``.mtx``/``.mtx.gz`` (converted once by
        :func:`mtx_to_csr` into ``cache``).
    layout : {'csr', 'coo', 'dense'}, default 'csr'
        Layout of each batch's ``X``.
    dtype : torch.dtype, optional
        Batch values' dtype; default float64 for float64 data, else the default dtype.
    rows : range, optional
        The global rows this dataset covers (default all); see :meth:`shard`.
    check : bool, default True
        Check the arrays are a valid CSR matrix of finite non-negative values (one pass
        over the data, in chunks), raising ``ValueError`` before any batch is made.
    cache : str, optional
        Output directory of the ``.mtx`` conversion (default ``source + '.csr'``; reused
        when newer than the file).

    Attributes
    ----------
    shape : tuple of int
        ``(n_rows, n_cols)`` of the whole matrix.
    rows : range
        Global rows covered; ``len(dataset) == len(rows)`` and item ``i`` is row ``rows[i]``.
    nnz : int
        Stored entries of the whole matrix.

    Examples
    --------
    >>> import scipy.sparse as sp
    >>> ds = SparseRows(sp.random(100, 20, density=0.1, format="csr", random_state=0))
    >>> batch = ds.__getitems__([3, 4, 5])
    >>> batch.rows.tolist(), tuple(batch.X.shape), batch.X.layout
    ([3, 4, 5], (3, 20), torch.sparse_csr)
    """

    def __init__(self, source, *, layout: str = "csr", dtype: Optional[torch.dtype] = None,
                 rows: Optional[range] = None, check: bool = True, cache: Optional[str] = None):
        self.layout = check_option(layout, ("csr", "coo", "dense"), "layout")
        self._path: Optional[str] = None
        self._memory = None  # in-memory arrays, pickled to DataLoader workers
        if isinstance(source, (str, os.PathLike)):
            self._path = self._resolve(os.fspath(source), cache)
            arrays = self._open()
        else:
            arrays = self._memory = self._from_memory(source)
        self._dense = "dense" in arrays
        self.shape = tuple(int(s) for s in arrays["shape"])
        if len(self.shape) != 2:
            raise ValueError(f"source must be a 2-D matrix, got shape {self.shape}")
        self._arrays = arrays
        if dtype is None:
            src = _native(np.empty(0, arrays["dense" if self._dense else "data"].dtype)).dtype  # '>f8' too
            dtype = torch.float64 if src == np.float64 else torch.get_default_dtype()
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.dtype = dtype
        if rows is None:
            rows = range(self.shape[0])
        if not isinstance(rows, range) or rows.step != 1 or rows.start < 0 or rows.stop > self.shape[0]:
            raise ValueError(f"rows must be a range with step 1 inside [0, {self.shape[0]}), got {rows!r}")
        self.rows = rows
        if check:
            self._check()

    # -- sources ---------------------------------------------------------------
    @staticmethod
    def _resolve(path: str, cache: Optional[str]) -> str:
        if not os.path.exists(path):
            raise FileNotFoundError(f"source {path!r} does not exist")
        if path.endswith((".mtx", ".mtx.gz")):
            out = cache or path + ".csr"
            stamp = os.path.join(out, "meta.json")
            if not os.path.exists(stamp) or os.path.getmtime(stamp) < os.path.getmtime(path):
                mtx_to_csr(path, out)
            return out
        if os.path.isdir(path) or path.endswith((".npz", ".npy")):
            return path
        raise ValueError(f"source {path!r}: expected a directory from save_csr, a .npz, .npy or .mtx file")

    def _open(self) -> dict:
        path = self._path
        if os.path.isdir(path):
            meta_file = os.path.join(path, "meta.json")
            if not os.path.exists(meta_file):
                raise ValueError(f"source {path!r} is a directory without meta.json (write it with save_csr)")
            with open(meta_file) as f:
                meta = json.load(f)
            out = {k: np.load(os.path.join(path, f"{k}.npy"), mmap_mode="r") for k in ("data", "indices", "indptr")}
            out["shape"] = tuple(meta["shape"])
            out["canonical"] = bool(meta.get("canonical", False))
            return out
        if path.endswith(".npy"):
            dense = np.load(path, mmap_mode="r")
            return {"dense": dense, "shape": dense.shape}
        with np.load(path, allow_pickle=False) as z:  # scipy.sparse.save_npz layout
            if "format" not in z.files:
                raise ValueError(f"source {path!r} is not a scipy.sparse .npz (no 'format' member)")
            fmt = z["format"].item()
            fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
            shape = tuple(int(s) for s in z["shape"])
        if fmt == "csr":
            members = {k: _npz_member(path, k) for k in ("data", "indices", "indptr")}
            if all(m is not None for m in members.values()):
                members.update(shape=shape, canonical=False)
                return members
            warnings.warn(f"{path} is compressed: its arrays are read into host memory. Save it with "
                          "scipy.sparse.save_npz(..., compressed=False) or save_csr to memory-map it.",
                          stacklevel=3)
        import scipy.sparse as sp

        return self._from_memory(sp.load_npz(path))

    @staticmethod
    def _from_memory(X) -> dict:
        if hasattr(X, "tocsr") and hasattr(X, "nnz"):  # scipy.sparse: never modified, copied only if needed
            C = X.tocsr()
            if C is X and not C.has_canonical_format:
                C = C.copy()
            if not C.has_canonical_format:
                C.sum_duplicates()
            return {"data": C.data, "indices": C.indices, "indptr": C.indptr, "shape": C.shape, "canonical": True}
        if isinstance(X, Tensor):
            X = _scipy_dtype(X.detach().cpu())
            if X.layout == torch.strided:
                return {"dense": X.numpy(), "shape": tuple(X.shape)}
            if X.dim() != 2:
                raise ValueError(f"source must be a 2-D matrix, got shape {tuple(X.shape)}")
            C = to_csr(X) if X.layout != torch.sparse_csr else X
            canonical = X.layout == torch.sparse_coo and X.is_coalesced()
            return {"data": C.values().numpy(), "indices": C.col_indices().numpy(),
                    "indptr": C.crow_indices().numpy(), "shape": tuple(C.shape), "canonical": canonical}
        if isinstance(X, np.ndarray):
            return {"dense": X, "shape": X.shape}
        raise TypeError(f"source must be a scipy.sparse matrix, tensor, numpy array or path, "
                        f"got {type(X).__name__}")

    def __getstate__(self):
        state = dict(self.__dict__)
        if self._path is not None:  # reopen the memory maps in the worker instead of copying them
            state["_arrays"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._arrays is None:
            self._arrays = self._open()

    @staticmethod
    def _check_values(values: np.ndarray) -> None:
        if not np.isfinite(values).all():
            raise ValueError("source contains NaN or infinity")
        if values.size and (values < 0).any():
            raise ValueError(f"source must be non-negative, got minimum {values.min():.4g}")

    def _check(self) -> None:
        a = self._arrays
        values = a["dense" if self._dense else "data"]
        if values.dtype.kind not in "iuf":
            raise TypeError(f"source must hold real numbers, got dtype {values.dtype}")
        if self._dense:
            step = max(1, _CHUNK // max(1, self.shape[1]))  # rows per chunk
            for lo in range(0, self.shape[0], step):
                self._check_values(np.asarray(values[lo:lo + step]))
            return
        indptr, indices = a["indptr"], a["indices"]
        n_rows, n_cols = self.shape
        if (indptr.shape != (n_rows + 1,) or indptr[0] != 0 or indptr[-1] != len(values)
                or len(indices) != len(values)):
            raise ValueError(f"source is not a valid CSR matrix of shape {self.shape}: indptr has "
                             f"{len(indptr)} entries ending at {indptr[-1] if len(indptr) else None}, "
                             f"data {len(values)}, indices {len(indices)}")
        if (np.diff(indptr) < 0).any():
            raise ValueError("source is not a valid CSR matrix: indptr decreases")
        for lo in range(0, len(values), _CHUNK):
            self._check_values(np.asarray(values[lo:lo + _CHUNK]))
            i = np.asarray(indices[lo:lo + _CHUNK])
            if len(i) and (i.min() < 0 or i.max() >= n_cols):
                raise ValueError(f"source has a column index outside [0, {n_cols})")

    # -- access ----------------------------------------------------------------
    @property
    def nnz(self) -> int:
        a = self._arrays
        return int(np.count_nonzero(a["dense"])) if self._dense else int(a["indptr"][-1])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> RowBatch:
        return self.__getitems__([i])

    def __getitems__(self, indices: Sequence[int]) -> RowBatch:
        """The batch of items ``indices`` (positions in :attr:`rows`), fetched at once."""
        pos = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self.rows)
        if pos.size and (pos.min() < -n or pos.max() >= n):
            raise IndexError(f"row position out of range for a dataset of {n} rows")
        pos = np.where(pos < 0, pos + n, pos)
        return self.batch(pos + self.rows.start)

    def batch(self, rows) -> RowBatch:
        """The given global rows (any order, repeats allowed) as a :class:`RowBatch`."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"row index out of range for a matrix of {self.shape[0]} rows")
        B, n_cols = len(rows), self.shape[1]
        a = self._arrays
        if self._dense:
            dense = torch.from_numpy(np.array(a["dense"][rows], dtype=np.float64 if self.dtype == torch.float64
                                              else np.float32)).to(self.dtype)
            X = dense if self.layout == "dense" else (to_csr(dense) if self.layout == "csr"
                                                        else dense.to_sparse_coo())
            return RowBatch(torch.from_numpy(rows), X)
        indptr = a["indptr"]
        starts = np.asarray(indptr[rows], dtype=np.int64)
        lens = np.asarray(indptr[rows + 1], dtype=np.int64) - starts
        crow = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(lens, out=crow[1:])
        if B and bool((np.diff(rows) == 1).all()):  # a contiguous block: one slice of the map
            sl = slice(int(starts[0]), int(starts[0] + crow[-1]))
            cols, vals = np.array(a["indices"][sl]), np.array(a["data"][sl])  # copies: never share the source
        else:
            take = np.repeat(starts - crow[:-1], lens) + np.arange(crow[-1])
            cols, vals = np.asarray(a["indices"][take]), np.asarray(a["data"][take])
        cols = torch.from_numpy(cols.astype(np.int64, copy=False))
        vals = torch.from_numpy(_native(vals)).to(self.dtype)  # a big-endian or longdouble file too
        row_of = torch.repeat_interleave(torch.arange(B), torch.from_numpy(lens))
        if not a.get("canonical", False):  # sort columns within rows, summing repeats
            X = torch.sparse_coo_tensor(torch.stack([row_of, cols]), vals, (B, n_cols),
                                        check_invariants=False).coalesce()
            if self.layout == "coo":
                return RowBatch(torch.from_numpy(rows), X)
            return RowBatch(torch.from_numpy(rows), X.to_dense() if self.layout == "dense" else to_csr(X))
        if self.layout == "csr":
            X = csr_tensor(torch.from_numpy(crow), cols, vals, (B, n_cols))
        elif self.layout == "coo":
            X = torch.sparse_coo_tensor(torch.stack([row_of, cols]), vals, (B, n_cols), is_coalesced=True,
                                        check_invariants=False)
        else:
            X = torch.zeros(B, n_cols, dtype=self.dtype)
            X[row_of, cols] = vals
        return RowBatch(torch.from_numpy(rows), X)

    def shard(self, rank: Optional[int] = None, world_size: Optional[int] = None) -> "SparseRows":
        """A view over this process's contiguous share of :attr:`rows` (see :func:`~torchnmf.distributed.shard_range`)."""
        part = shard_range(len(self.rows), rank, world_size)
        view = object.__new__(SparseRows)
        view.__dict__.update(self.__dict__)
        view.rows = range(self.rows.start + part.start, self.rows.start + part.stop)
        return view

    def __repr__(self) -> str:
        where = self._path or "memory"
        return (f"SparseRows(shape={self.shape}, rows={self.rows.start}..{self.rows.stop}, "
                f"layout={self.layout!r}, source={where!r})")


class EpochSampler(Sampler):
    """Batches of item positions, reshuffled per epoch from ``seed + epoch`` alone.

    Because the order depends only on ``(seed, epoch)``, a job resumed from a checkpoint at
    epoch ``e`` (after :meth:`set_epoch`) sees exactly the batches it would have seen.

    Parameters
    ----------
    n : int
        Number of items.
    batch_size : int
    shuffle : bool, default True
    seed : int, default 0
    drop_last : bool, default False
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        self.n = int(n)
        self.batch_size = check_rank(batch_size, "batch_size")
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` at the next iteration."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[list]:
        # the order as one tensor (8 bytes a row), made into a list a batch at a time: a list of
        # every row's int held ~36 bytes a row for the whole epoch (11 MiB for 300k rows)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)) \
            if self.shuffle else None
        for lo in range(0, self.n, self.batch_size):
            hi = min(self.n, lo + self.batch_size)
            chunk = order[lo:hi].tolist() if order is not None else list(range(lo, hi))
            if self.drop_last and len(chunk) < self.batch_size:
                return
            yield chunk

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)


def row_loader(source, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
               shard: bool = False, layout: str = "csr", dtype: Optional[torch.dtype] = None,
               num_workers: int = 0, pin_memory: bool = False, **dataset_kwargs) -> DataLoader:
    """A :class:`~torch.utils.data.DataLoader` of :class:`RowBatch` over the rows of ``source``.

    Parameters
    ----------
    source : SparseRows or anything :class:`SparseRows` accepts
    batch_size : int
        Rows per batch.
    shuffle : bool, default False
        Reshuffle every epoch (call ``loader.batch_sampler.set_epoch(epoch)``) from ``seed``.
    seed : int, default 0
    drop_last : bool, default False
    shard : bool, default False
        Only this process's contiguous share of the rows (for data-parallel fits).
    layout, dtype
        Passed to :class:`SparseRows` when ``source`` is not one already.
    num_workers : int, default 0
        Worker processes; memory-mapped sources are reopened, not copied, in each.
    pin_memory : bool, default False
        Page-locked batches, for faster copies to a GPU.
    **dataset_kwargs
        Other :class:`SparseRows` arguments (``check``, ``cache``).

    Returns
    -------
    DataLoader
        Yields :class:`RowBatch`; ``loader.dataset`` is the :class:`SparseRows`.
    """
    ds = source if isinstance(source, SparseRows) else SparseRows(source, layout=layout, dtype=dtype,
                                                                  **dataset_kwargs)
    if shard:
        ds = ds.shard(get_rank(), get_world_size())
    sampler = EpochSampler(len(ds), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(ds, batch_sampler=sampler, collate_fn=collate_rows, num_workers=num_workers,
                      pin_memory=pin_memory)
