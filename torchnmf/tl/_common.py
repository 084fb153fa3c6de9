"""What every :mod:`torchnmf.tl` function does around its fit: read, check, fit, then write."""
from __future__ import annotations

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


def run(adata, fit: Callable[[Selection], Result], *, model: str, layer: Optional[str],
        use_highly_variable: Optional[bool], key_added: str, copy: bool, overwrite: bool, counts: bool,
        n_top_features: int, obs_columns: bool):
    """Select the matrix, check it, ``fit`` it, and only then write the results (see :mod:`torchnmf.tl`).

    Returns the AnnData written to when ``copy`` (or when ``adata`` was a path), else ``None``.
    """
    from ..data import check_rank

    n_top = check_rank(n_top_features, "n_top_features")
    from_path = not hasattr(adata, "obs")
    adata = read_anndata(adata)
    if getattr(adata, "isbacked", False) and not copy and not from_path:
        raise ValueError("adata is backed (opened with backed=...): torchnmf.tl reads it into memory; pass "
                         "adata.to_memory(), or copy=True for an in-memory copy with the results")
    check_key(adata, key_added, overwrite)  # before any work: refuse early
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
    if from_path or copy:  # a new object: an in-memory one for a backed file
        target = adata.to_memory() if adata.isbacked else (adata if from_path else adata.copy())
    else:
        target = adata
    write_results(target, key_added, res.usages, res.loadings, uns, sel.feature_mask, obsm=res.obsm,
                  varm=res.varm, obs_columns=obs_columns, overwrite=overwrite)
    return target if copy or from_path else None
