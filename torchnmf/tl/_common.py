"""What every :mod:`torchnmf.tl` function does around its fit: read, check, fit, then write."""
from __future__ import annotations

import gc
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import numpy as np

from ..anndata_io import (Selection, check_integer_counts, check_key, read_anndata, select, top_features,
                          write_results)

__all__ = ["Result", "run", "plain_params"]


@dataclass
class Result:
    """A fitted factorization of the selected matrix, ready to be written back.

    ``usages`` (n_obs, K) and ``loadings`` (n_used, K) go to ``obsm['X_<key>']`` and
    ``varm['<key>']``; ``obsm``/``varm`` hold further arrays by suffix; ``uns`` further entries
    of ``uns['<key>']``; ``history`` the objective per record, named ``objective``.
    """

    usages: np.ndarray
    loadings: np.ndarray
    history: Any
    objective: str
    converged: bool
    n_iter: int
    params: Dict[str, Any]
    obsm: Dict[str, np.ndarray] = field(default_factory=dict)
    varm: Dict[str, np.ndarray] = field(default_factory=dict)
    uns: Dict[str, Any] = field(default_factory=dict)


def plain_params(params: Dict[str, Any]) -> Dict[str, Any]:
    """The parameters an .h5ad can store: numbers, strings and bools kept, ``None`` left out, others as text."""
    out = {}
    for k, v in params.items():
        if v is None:
            continue
        if isinstance(v, (bool, np.bool_, str)):
            out[k] = v if isinstance(v, str) else bool(v)
        elif isinstance(v, numbers.Number):
            out[k] = v.item() if hasattr(v, "item") else v
        elif isinstance(v, (tuple, list)) and all(isinstance(x, numbers.Number) for x in v):
            out[k] = np.asarray(v)
        else:
            out[k] = getattr(v, "__name__", None) or str(v)
    return out


def _stream_file(path: str, dtype, sel: Selection, stream: Callable) -> Result:
    """``stream(source, sel)`` with the rows of the file's ``X`` read through h5py alone (no AnnData open)."""
    import h5py

    from ..anndata_io import BackedRows

    columns = None if sel.feature_mask is None else np.flatnonzero(sel.feature_mask)
    with h5py.File(path, "r") as f:
        return stream(BackedRows(f["X"], columns, dtype=dtype), sel)


def run(adata, fit: Callable[[Selection], Result], *, model: str, layer: Optional[str],
        use_highly_variable: Optional[bool], key_added: str, copy: bool, overwrite: bool, counts: bool,
        n_top_features: int, obs_columns: bool, stream: Optional[Callable] = None, batch_size: int = 1024):
    """Select the matrix, check it, ``fit`` it, and only then write the results (see :mod:`torchnmf.tl`).

    A backed AnnData (or a path) whose ``X`` is factorized goes to ``stream(source, selection)``
    instead, with ``source`` a :class:`~torchnmf.anndata_io.BackedRows` reading row blocks
    from the file; without ``stream`` the function needs the matrix in memory.
    Returns the AnnData written to when ``copy`` (or when ``adata`` was a path), else ``None``.
    """
    from ..data import check_rank

    n_top = check_rank(n_top_features, "n_top_features")
    from_path = not hasattr(adata, "obs")
    adata = read_anndata(adata, backed="r" if from_path and stream is not None and layer is None else None)
    streamed = getattr(adata, "isbacked", False) and layer is None
    if streamed and stream is None:
        raise ValueError(f"adata is backed (X on disk) and {model} fits in memory: pass adata.to_memory() "
                         "(torchnmf.tl.nmf and torchnmf.tl.gamma_poisson stream a backed X by row blocks)")
    if streamed and copy and not from_path:
        raise ValueError("copy=True would read the backed X into memory: leave copy=False, the results are "
                         "written into the AnnData object (in memory, beside the X on disk)")
    check_key(adata, key_added, overwrite)  # before any work: refuse early
    if streamed:
        from ..anndata_io import backed_rows

        source, sel = backed_rows(adata, None, use_highly_variable)
        if counts:
            first = source.batch(range(min(source.shape[0], check_rank(batch_size, "batch_size")))).X
            head = Selection(first.values().numpy(), None, None, None, "adata.X (its first rows)")
            check_integer_counts(head, adata, model, escape=", or allow_noninteger=True for a quasi-likelihood fit")
        if from_path:  # anndata holds obs (a name per cell: ~80 MiB at 300k cells) even backed: not during the fit
            path, dtype = adata.filename, source.dtype
            sel.matrix = None  # anndata's backed X refers back to the AnnData
            adata.file.close()
            adata = source = None
            gc.collect()
            res = _stream_file(path, dtype, sel, stream)
            adata = read_anndata(path, backed="r")  # to write the results into
        else:
            res = stream(source, sel)
    else:
        sel = select(adata, layer, use_highly_variable)
        if counts:
            check_integer_counts(sel, adata, model, escape=", or allow_noninteger=True for a quasi-likelihood fit")
        res = fit(sel)  # raises before anything is written: a failed fit leaves adata as it was
    K = res.usages.shape[1]
    columns = [f"{key_added}_{k + 1}" for k in range(K)]
    uns = {
        "params": plain_params({**res.params, "model": model, "layer": layer if layer is not None else "X",
                                "use_highly_variable": sel.feature_mask is not None}),
        "objective": res.objective,
        "history": np.asarray(res.history.values if hasattr(res.history, "values") else res.history,
                              dtype=np.float64),
        "converged": bool(res.converged),
        "n_iter": int(res.n_iter),
        "components": np.asarray(columns, dtype=object),
        "top_features": top_features(np.asarray(res.loadings), sel.feature_names, n_top, columns),
        **res.uns,
    }
    if from_path:
        target = adata
    elif copy:  # a new object: an in-memory one for a backed file (its X read whole)
        target = adata.to_memory() if adata.isbacked else adata.copy()
    else:
        target = adata
    write_results(target, key_added, res.usages, res.loadings, uns, sel.feature_mask, obsm=res.obsm,
                  varm=res.varm, obs_columns=obs_columns, overwrite=overwrite)
    return target if copy or from_path else None
