"""AnnData at the edge: read a factorization's input from an AnnData, write its results back.

The only module of torchnmf (with :mod:`torchnmf.tl`) that touches :mod:`anndata`, and only
lazily: layers, trainers and estimators see matrices and tensors. The estimators call
:func:`estimator_input` when given an AnnData; :mod:`torchnmf.tl` and the command line call
:func:`select` and :func:`write_results`.

Where the results go (the keys of :func:`scanpy.tl.pca`, with ``key`` for ``'pca'``):

==========================  =====================================================================
``obsm['X_<key>']``         sample loadings (usages), ``(n_obs, K)``
``varm['<key>']``           feature loadings, ``(n_vars, K)``; zeros for features not used
``obs['<key>_1']`` ...      one column per component (1-based), for ``color=`` in scanpy plots
``uns['<key>']``            parameters, objective history, convergence, top features
==========================  =====================================================================
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from .streaming import RowBatch, SparseRows

__all__ = ["is_anndata", "require_anndata", "read_anndata", "Selection", "select", "estimator_input",
           "check_integer_counts", "check_key", "written_keys", "write_results", "top_features", "backed_rows",
           "BackedRows"]


def is_anndata(obj) -> bool:
    """Whether ``obj`` is an :class:`anndata.AnnData` (decided without importing anndata)."""
    return type(obj).__module__.split(".")[0] == "anndata" and hasattr(obj, "obs") and hasattr(obj, "var")


def require_anndata():
    """Import :mod:`anndata`, or raise ``ImportError`` saying how to install it."""
    try:
        import anndata
    except ImportError:
        raise ImportError("AnnData input needs the anndata package: pip install anndata "
                          "(or pip install 'torchnmf[io]')") from None
    return anndata


def read_anndata(source, backed: Optional[str] = None):
    """``source`` if it is an AnnData, else the ``.h5ad`` file at that path (``backed='r'`` keeps it on disk).

    Raises
    ------
    ImportError
        anndata is not installed.
    TypeError
        ``source`` is neither an AnnData nor a path.
    """
    if is_anndata(source):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"adata must be an anndata.AnnData or the path of an .h5ad file, got {type(source).__name__}")
    anndata = require_anndata()
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such .h5ad file: {path}")
    return anndata.read_h5ad(path, backed=backed)


def _layers(adata) -> str:
    names = list(adata.layers.keys())
    return ", ".join(map(repr, names)) if names else "none"


def _feature_mask(adata, use_highly_variable: Optional[bool]) -> Optional[np.ndarray]:
    """Boolean mask of the features to use (``None``: all), as :func:`scanpy.tl.pca` chooses them."""
    has = "highly_variable" in adata.var.columns
    if use_highly_variable is None:
        use_highly_variable = has
    if not isinstance(use_highly_variable, (bool, np.bool_)):
        raise TypeError(f"use_highly_variable must be None, True or False, got {use_highly_variable!r}")
    if not use_highly_variable:
        return None
    if not has:
        raise ValueError("use_highly_variable=True but adata.var has no 'highly_variable' column; flag genes "
                         "first (scanpy.pp.highly_variable_genes) or pass use_highly_variable=False")
    mask = np.asarray(adata.var["highly_variable"], dtype=bool)
    if not mask.any():
        raise ValueError("adata.var['highly_variable'] flags no gene; pass use_highly_variable=False to use them all")
    return mask


def _unique(names, axis: str) -> np.ndarray:
    """``names`` as an object array of str, made unique (warning) as anndata's ``*_names_make_unique`` does."""
    import pandas as pd

    index = pd.Index(np.asarray(names).astype(str))
    if not index.is_unique:
        from anndata.utils import make_index_unique

        warnings.warn(f"{axis} names are not unique; torchnmf uses them made unique as anndata's "
                      f"{axis}_names_make_unique() would (the AnnData itself is not changed)", UserWarning,
                      stacklevel=3)
        index = make_index_unique(index)
    return np.asarray(index, dtype=object)


def _in_memory(M):
    """A backed dataset (h5py / anndata sparse dataset) or a dask array read into memory."""
    import scipy.sparse as sp

    if sp.issparse(M) or isinstance(M, np.ndarray):
        return M
    if hasattr(M, "to_memory"):  # anndata's backed sparse dataset
        return M.to_memory()
    if hasattr(M, "compute"):  # dask
        return M.compute()
    return np.asarray(M[()] if hasattr(M, "shape") and hasattr(M, "dtype") and hasattr(M, "attrs") else M)


class Selection:
    """The matrix a fit reads from an AnnData, with what is needed to write results back.

    Attributes
    ----------
    matrix : ndarray or scipy.sparse matrix, shape (n_obs, n_used)
        The layer's values (a view or a copy: never write to it).
    feature_mask : ndarray of bool, shape (n_vars,), or None
        The features used (``None``: all).
    feature_names : ndarray of str, shape (n_used,)
        Their names (made unique when they were not).
    layer : str or None
        ``None`` for ``X``.
    shape : (int, int)
    """

    _torchnmf_adata = True  # what estimators look for (they never import this module eagerly)

    def __init__(self, matrix, feature_mask, feature_names, layer, source: str):
        self.matrix = matrix
        self.feature_mask = feature_mask
        self.feature_names = feature_names
        self.layer = layer
        self.source = source
        self.shape = tuple(matrix.shape)

    def tensor(self) -> torch.Tensor:
        """The matrix as a CPU tensor (sparse COO for sparse input), float32/float64 kept, else float64."""
        from .data import as_tensor

        floating = np.dtype(self.matrix.dtype) in (np.float32, np.float64)
        return as_tensor(self.matrix, "X", dtype=None if floating else torch.float64, float_only=False)

    def __repr__(self) -> str:
        return f"Selection({self.source}, shape={self.shape})"


def _layer_matrix(adata, layer: Optional[str]):
    if layer is None:
        M = adata.X
        if M is None:
            raise ValueError(f"adata.X is empty; pass layer= one of the layers ({_layers(adata)})")
        return M, "adata.X"
    if not isinstance(layer, str):
        raise TypeError(f"layer must be None (adata.X) or the name of a layer, got {layer!r}")
    if layer not in adata.layers:
        raw = layer == "raw" and adata.raw is not None
        hint = "; adata.raw is not a layer: use adata.raw.to_adata()" if raw else ""
        raise ValueError(f"adata has no layer {layer!r}; layers: {_layers(adata)} (layer=None reads adata.X){hint}")
    return adata.layers[layer], f"adata.layers[{layer!r}]"


def select(adata, layer: Optional[str] = None, use_highly_variable: Optional[bool] = None, *,
           features: Optional[Sequence[str]] = None, load: bool = True) -> Selection:
    """The matrix to factorize: ``X`` or a layer, restricted to the highly variable genes.

    Parameters
    ----------
    adata : anndata.AnnData
        Not modified.
    layer : str, optional
        A key of ``adata.layers``; default ``adata.X``.
    use_highly_variable : bool, optional
        Keep the genes flagged in ``adata.var['highly_variable']``; default: when that column
        exists (as :func:`scanpy.tl.pca`).
    features : sequence of str, optional
        Take exactly these features, in this order (a fitted model's ``feature_names_in_``),
        instead of ``use_highly_variable``.
    load : bool, default True
        Read a backed matrix into memory (else ``matrix`` is the backed dataset, all features).

    Returns
    -------
    Selection

    Raises
    ------
    ValueError
        Missing layer (the message lists the layers), no highly variable gene, features
        missing from ``adata``.
    """
    M, source = _layer_matrix(adata, layer)
    names = _unique(adata.var_names, "var")
    if features is not None:
        features = np.asarray(features).astype(str)
        pos = {n: i for i, n in enumerate(names)}
        missing = [f for f in features if f not in pos]
        if missing:
            raise ValueError(f"adata lacks {len(missing)} of the {len(features)} features the model was fitted on "
                             f"(e.g. {', '.join(map(repr, missing[:3]))}); subset or reorder it to those features")
        idx = np.array([pos[f] for f in features], dtype=np.int64)
        mask = np.zeros(len(names), dtype=bool)
        mask[idx] = True
        in_order = bool(np.all(np.diff(idx) > 0))
    else:
        mask = _feature_mask(adata, use_highly_variable)
        idx, in_order = (None, True) if mask is None else (np.flatnonzero(mask), True)
    if not load:
        return Selection(M, mask, names if mask is None else names[mask], layer, source)
    M = _in_memory(M)
    if idx is not None:
        M = M[:, idx]
    if hasattr(M, "tocsr") and getattr(M, "format", "csr") not in ("csr", "csc", "coo"):
        M = M.tocsr()
    if not in_order:
        mask = None  # features were reordered: the mask no longer describes the columns
    return Selection(M, mask, names[idx] if idx is not None else names, layer, source)


def check_integer_counts(sel: Selection, adata, model: str, escape: str = "") -> None:
    """Raise ``ValueError`` naming a layer of raw counts when ``sel`` holds non-integer values.

    Parameters
    ----------
    sel : Selection
    adata : anndata.AnnData
        For the names of its layers.
    model : str
        The model that needs counts, for the message.
    escape : str, optional
        A further way out (``"or allow_noninteger=True ..."``) appended to the message.
    """
    M = sel.matrix
    vals = np.asarray(M.data if hasattr(M, "nnz") else M).ravel()
    if vals.dtype.kind in "iub" or not vals.size:
        return
    bad = np.flatnonzero(vals != np.round(vals))
    if not bad.size:
        return
    counts = [n for n in adata.layers.keys() if "count" in str(n).lower() and n != sel.layer]
    if counts:
        fix = f"pass layer={counts[0]!r}"
    elif len(adata.layers):
        fix = f"pass the layer of raw counts (layers: {_layers(adata)})"
    else:
        fix = ("keep the raw counts in a layer before normalizing (adata.layers['counts'] = adata.X.copy()) "
               "and pass layer='counts'")
    raise ValueError(f"{model} models counts, but {sel.source} holds non-integer values (e.g. {vals[bad[0]]:.6g}): "
                     f"it looks normalized or log-transformed; {fix}{escape}")


def estimator_input(estimator, X, layer: Optional[str] = None, use_highly_variable: Optional[bool] = None, *,
                    reset: bool, counts: bool = False) -> Selection:
    """What a torchnmf estimator's ``fit`` (``reset=True``) or ``transform`` reads from an AnnData.

    A fitted estimator with ``feature_names_in_`` takes those features by name (in the fitted
    order), whatever ``use_highly_variable`` says; otherwise the features are chosen as in
    :func:`select`. ``counts=True`` refuses non-integer values, naming a layer of raw counts.
    ``X`` may also be the path of an ``.h5ad`` file.

    Returns
    -------
    Selection
        The estimator's :meth:`~torchnmf.estimators._base.TorchFactorization._check_X` takes
        it like a matrix and keeps its ``feature_names`` as ``feature_names_in_``.
    """
    adata = read_anndata(X)
    names = None if reset else getattr(estimator, "feature_names_in_", None)
    sel = select(adata, layer, use_highly_variable, features=names)
    if counts:
        check_integer_counts(sel, adata, type(estimator).__name__,
                             escape=", or allow_noninteger=True for a quasi-likelihood fit")
    return sel


# -- writing results back --------------------------------------------------------------------
def written_keys(adata, key: str) -> Dict[str, list]:
    """The entries of ``adata`` that results under ``key`` occupy (those recorded, else the standard ones)."""
    record = adata.uns.get(key, {})
    recorded = record.get("written") if isinstance(record, Mapping) else None
    if recorded is not None:
        return {where: [str(k) for k in np.atleast_1d(recorded.get(where, []))] for where in ("obsm", "varm", "obs")}
    return {"obsm": [f"X_{key}"], "varm": [key], "obs": [c for c in adata.obs.columns if _is_column(c, key)]}


def _is_column(name, key: str) -> bool:
    prefix = f"{key}_"
    return isinstance(name, str) and name.startswith(prefix) and name[len(prefix):].isdigit()


def check_key(adata, key: str, overwrite: bool = False) -> None:
    """Refuse (``ValueError``) to write over earlier results under ``key`` unless ``overwrite``.

    Parameters
    ----------
    adata : anndata.AnnData
    key : str
        ``key_added`` of a :mod:`torchnmf.tl` function.
    overwrite : bool, default False
    """
    if not isinstance(key, str) or not key:
        raise TypeError(f"key_added must be a non-empty string, got {key!r}")
    if overwrite:
        return
    found = [f"uns[{key!r}]"] if key in adata.uns else []
    for where, keys in written_keys(adata, key).items():
        store = getattr(adata, where)
        found += [f"{where}[{k!r}]" for k in keys if k in (store.columns if where == "obs" else store)]
    if found:
        raise ValueError(f"adata already holds results under key_added={key!r} ({', '.join(found[:4])}); pass "
                         f"overwrite=True to replace them, or another key_added")


def top_features(loadings: np.ndarray, names: np.ndarray, n: int, columns: Sequence[str]):
    """The ``n`` features of largest loading per component, as a DataFrame (rank x component)."""
    import pandas as pd

    n = min(int(n), loadings.shape[0])
    order = np.argsort(-loadings, axis=0, kind="stable")[:n]
    return pd.DataFrame({c: np.asarray(names, dtype=object)[order[:, k]].astype(str)
                         for k, c in enumerate(columns)})


def _numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _full(values: np.ndarray, mask: Optional[np.ndarray], n_vars: int) -> np.ndarray:
    """Rows of ``values`` for the used features placed among ``n_vars`` rows, zeros elsewhere."""
    if mask is None:
        if values.shape[0] != n_vars:
            raise ValueError(f"loadings have {values.shape[0]} rows, adata has {n_vars} features; pass feature_mask")
        return values
    out = np.zeros((n_vars,) + values.shape[1:], dtype=values.dtype)
    out[np.asarray(mask, dtype=bool)] = values
    return out


def write_results(adata, key: str, usages, loadings, uns: Optional[Mapping[str, Any]] = None,
                  feature_mask: Optional[np.ndarray] = None, *, obsm: Optional[Mapping[str, Any]] = None,
                  varm: Optional[Mapping[str, Any]] = None, obs_columns: bool = True,
                  overwrite: bool = False) -> None:
    """Write a factorization into ``adata`` where scanpy looks for an embedding.

    Parameters
    ----------
    adata : anndata.AnnData
        Written in place (only the entries listed below).
    key : str
        Results go to ``obsm['X_<key>']``, ``varm['<key>']``, ``uns['<key>']`` and, with
        ``obs_columns``, ``obs['<key>_1']`` ... ``obs['<key>_K']``.
    usages : array, shape (n_obs, K)
        Sample loadings.
    loadings : array, shape (n_used, K)
        Feature loadings of the used features (all ``n_vars`` when ``feature_mask`` is None).
    uns : mapping, optional
        Stored as ``uns['<key>']`` (with ``'written'``: the keys written, for a later overwrite).
    feature_mask : array of bool, shape (n_vars,), optional
        The features used; the others get zero loadings.
    obsm, varm : mapping of suffix to array, optional
        Further per-sample ``(n_obs, ...)`` / per-used-feature arrays, written as
        ``obsm['X_<key>_<suffix>']`` and ``varm['<key>_<suffix>']`` (e.g. ``'sd'``).
    obs_columns : bool, default True
        Also write each component's usages as an ``obs`` column, so ``color='<key>_1'`` works.
    overwrite : bool, default False
        Replace earlier results under ``key`` (removing all the entries they had written);
        otherwise refuse with ``ValueError``.
    """
    check_key(adata, key, overwrite)
    U = _numpy(usages)
    W = _numpy(loadings)
    n_obs, n_vars = adata.shape
    if U.ndim != 2 or U.shape[0] != n_obs:
        raise ValueError(f"usages must have shape ({n_obs}, K), got {U.shape}")
    if W.ndim != 2 or W.shape[1] != U.shape[1]:
        raise ValueError(f"loadings must have shape (n_features, {U.shape[1]}), got {W.shape}")
    new_obsm = {f"X_{key}": U}
    new_varm = {key: _full(W, feature_mask, n_vars)}
    for suffix, a in (obsm or {}).items():
        new_obsm[f"X_{key}_{suffix}"] = _numpy(a)
    for suffix, a in (varm or {}).items():
        new_varm[f"{key}_{suffix}"] = _full(_numpy(a), feature_mask, n_vars)
    columns = [f"{key}_{k + 1}" for k in range(U.shape[1])] if obs_columns else []
    record = dict(uns or {})
    record["written"] = {"obsm": list(new_obsm), "varm": list(new_varm), "obs": columns}
    # everything is built: now change adata (removing what earlier results under key had written)
    if overwrite:
        old = written_keys(adata, key)
        for where in ("obsm", "varm"):
            for k in old[where]:
                getattr(adata, where).pop(k, None)
        stale = [c for c in old["obs"] if c in adata.obs.columns]
        if stale:
            adata.obs.drop(columns=stale, inplace=True)
    for k, a in new_obsm.items():
        adata.obsm[k] = a
    for k, a in new_varm.items():
        adata.varm[k] = a
    for k, c in enumerate(columns):
        adata.obs[c] = U[:, k]
    adata.uns[key] = record


# -- matrices larger than memory: row blocks straight from the .h5ad file ----------------------
def _csr_group(adata, layer: Optional[str]):
    """The h5py group of a backed AnnData's CSR ``X`` (layers are in memory even when backed)."""
    if layer is not None:
        raise ValueError(f"layer={layer!r}: anndata reads layers into memory even for a backed file; only X "
                         "stays on disk, so only X is streamed")
    file = getattr(adata.file, "_file", None)
    group = None if file is None else file.get("X")
    if group is None or not hasattr(group, "attrs") or group.attrs.get("encoding-type") != "csr_matrix":
        kind = None if group is None else group.attrs.get("encoding-type", type(group).__name__)
        raise ValueError(f"streaming needs a backed X stored as a CSR matrix, got {kind!r}; write the file with a "
                         "scipy.sparse.csr_matrix X (adata.X = scipy.sparse.csr_matrix(adata.X))")
    return group


def backed_rows(adata, layer: Optional[str] = None, use_highly_variable: Optional[bool] = None, *,
                dtype: Optional[torch.dtype] = None):
    """A row source over a backed AnnData's ``X`` for the streaming fits, and what it selects.

    Parameters
    ----------
    adata : anndata.AnnData
        Opened with ``anndata.read_h5ad(path, backed='r')`` (or ``'r+'``), ``X`` a CSR matrix.
    layer : None
        Only ``X`` stays on disk in a backed AnnData (anndata loads layers into memory).
    use_highly_variable : bool, optional
        As in :func:`select`; the columns are dropped block by block.
    dtype : torch.dtype, optional
        Of the batches' values.

    Returns
    -------
    (BackedRows, Selection)
        The source, and a :class:`Selection` whose ``matrix`` is the backed dataset (for the
        feature mask and names).
    """
    group = _csr_group(adata, layer)
    sel = select(adata, None, use_highly_variable, load=False)
    columns = None if sel.feature_mask is None else np.flatnonzero(sel.feature_mask)
    return BackedRows(group, columns, dtype=dtype), sel


def _uncached(group, name: str):
    """``group[name]`` opened with no chunk cache: blocks are read once, in order (HDF5 2 caches 8 MiB per dataset)."""
    import h5py

    dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    dapl.set_chunk_cache(0, 0, 1.0)
    return h5py.Dataset(h5py.h5d.open(group.id, name.encode(), dapl=dapl))


class BackedRows(SparseRows):
    """Rows of a CSR matrix inside an open ``.h5ad`` (HDF5) file, read one block at a time.

    A :class:`~torchnmf.streaming.SparseRows` whose arrays stay in the file: a batch of
    consecutive rows is one read of their row pointers and one of their nonzeros (scattered
    rows: reads per run of consecutive rows, so stream in order: ``shuffle=False``). Nothing
    per row is held in memory, not even the row pointers. ``columns`` keeps those columns
    only (the highly variable genes), dropped block by block.

    A block is read straight into the arrays of the CSR batch it becomes (no chunk cache,
    no concatenated or widened copies): column indices and row pointers are int32 where
    they fit, as torchnmf's sparse kernels use them, so a block holds its nonzeros' values
    and one 4-byte index each.

    Parameters
    ----------
    group : h5py.Group
        A CSR matrix as anndata writes it (``data``, ``indices``, ``indptr``, ``shape`` attribute).
    columns : array of int, optional
        Increasing column indices to keep.
    dtype : torch.dtype, optional
        Of the batches' values (default: float64 for float64 data, else the default dtype).
    """

    def __init__(self, group, columns: Optional[np.ndarray] = None, dtype: Optional[torch.dtype] = None):
        n_rows, n_cols = (int(s) for s in group.attrs["shape"])
        data, indices = _uncached(group, "data"), _uncached(group, "indices")
        self.layout, self._path, self._memory, self._dense = "csr", None, None, False
        indptr = _uncached(group, "indptr")  # read per block too: nothing per row stays in memory
        if indptr.dtype.kind not in "iu" or indices.dtype.kind not in "iu":
            raise TypeError(f"X's indptr and indices must be integers, got {indptr.dtype} and {indices.dtype}")
        self._arrays = {"data": data, "indices": indices, "shape": (n_rows, n_cols), "canonical": False,
                        "indptr": indptr}
        if np.dtype(data.dtype).kind not in "iuf":
            raise TypeError(f"X must hold real numbers, got dtype {data.dtype}")
        self._remap = None
        width = n_cols
        if columns is not None:
            columns = np.asarray(columns, dtype=np.int64)
            self._remap = np.full(n_cols, -1, dtype=np.int32 if n_cols < 2 ** 31 else np.int64)
            self._remap[columns] = np.arange(len(columns))
            width = len(columns)
        self.shape = (n_rows, width)
        self.dtype = dtype or (torch.float64 if np.dtype(data.dtype) == np.float64 else torch.get_default_dtype())
        self.rows = range(n_rows)

    def __getstate__(self):
        raise TypeError("BackedRows reads an open HDF5 file and cannot be sent to DataLoader workers; "
                        "use num_workers=0")

    def batch(self, rows):
        """The given global rows as a :class:`~torchnmf.streaming.RowBatch` (CSR, kept columns only)."""
        from ._csr import csr_tensor, is_canonical

        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        a = self._arrays
        (n_rows, n_cols), indptr = a["shape"], a["indptr"]
        if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
            raise IndexError(f"row index out of range for a matrix of {n_rows} rows")
        runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1) if rows.size else []
        ptrs = [np.asarray(indptr[int(run[0]):int(run[-1]) + 2], dtype=np.int64) for run in runs]  # one read a run
        lens = np.concatenate([np.diff(p) for p in ptrs]) if ptrs else np.zeros(0, np.int64)
        nnz = int(lens.sum())
        idx = np.int32 if max(nnz, n_cols) < 2 ** 31 else np.int64
        crow = np.zeros(len(rows) + 1, dtype=idx)
        np.cumsum(lens, out=crow[1:])
        # read every run straight into the batch's arrays (in the file's types; narrowed or cast after)
        c = np.empty(nnz, dtype=a["indices"].dtype)
        v = np.empty(nnz, dtype=a["data"].dtype)
        at = 0
        for p in ptrs:
            lo, hi = int(p[0]), int(p[-1])
            if hi > lo:
                a["indices"].read_direct(c, np.s_[lo:hi], np.s_[at:at + hi - lo])
                a["data"].read_direct(v, np.s_[lo:hi], np.s_[at:at + hi - lo])
            at += hi - lo
        where = f"rows {rows.min()}..{rows.max()}" if rows.size else "no rows"
        lo, hi = (v.min(), v.max()) if nnz else (0, 0)  # NaN propagates: no flag arrays over the block
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"X holds NaN or infinity in {where}")
        if lo < 0:
            raise ValueError(f"X holds negative values in {where}")
        if nnz and (c.min() < 0 or c.max() >= n_cols):
            raise ValueError(f"X holds a column index outside [0, {n_cols}) in {where}")
        c = c.astype(idx, copy=False)
        np_dtype = np.float64 if self.dtype == torch.float64 else np.float32
        v = v.astype(np_dtype, copy=False)
        if self._remap is not None:
            c = self._remap[c]
            keep = c >= 0
            kept = np.zeros(nnz + 1, dtype=idx)
            np.cumsum(keep, out=kept[1:])
            crow = kept[crow]  # kept nonzeros before each row start
            c, v = c[keep], v[keep]
            del keep, kept
        if not is_canonical(torch.from_numpy(crow), torch.from_numpy(c)):  # sorted columns within rows, repeats summed, as SparseRows does
            import scipy.sparse as sp

            M = sp.csr_matrix((v, c, crow), shape=(len(rows), self.shape[1]))
            M.sum_duplicates()
            crow, c, v = M.indptr.astype(idx, copy=False), M.indices.astype(idx, copy=False), M.data
        X = csr_tensor(torch.from_numpy(crow), torch.from_numpy(c), torch.from_numpy(v), (len(rows), self.shape[1]))
        return RowBatch(torch.from_numpy(rows), X)

    def __repr__(self) -> str:
        return f"BackedRows(shape={self.shape}, rows={self.rows.start}..{self.rows.stop})"
