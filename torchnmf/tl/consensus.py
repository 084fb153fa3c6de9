"""``torchnmf.tl.consensus``: cNMF's consensus study on an AnnData, one rank written back."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from ._common import Result, run

__all__ = ["consensus"]


def consensus(adata, ranks: Union[int, Sequence[int]] = (5, 6, 7, 8, 9, 10), *, k: Optional[int] = None,
              n_replicates: int = 100, n_top_genes: Optional[int] = 2000, layer: Optional[str] = None,
              use_highly_variable: Optional[bool] = None, key_added: str = "consensus", copy: bool = False,
              overwrite: bool = False, n_top_features: int = 20, obs_columns: bool = True, random_state=0,
              **kwargs):
    """Consensus NMF with rank selection (:class:`~torchnmf.consensus.ConsensusNMF`, cNMF's algorithm).

    Fits ``n_replicates`` restarts at every rank of ``ranks`` (one tensor program per rank),
    clusters their components into consensus programs, scores each rank (stability, error,
    cophenetic correlation) and writes the programs of rank ``k`` (default: the most stable) as
    :func:`torchnmf.tl.nmf` writes its factors (see :mod:`torchnmf.tl`), with the whole
    k-selection table in ``uns['<key>']['k_selection']``.

    Parameters
    ----------
    adata : anndata.AnnData or path of an .h5ad file
        Cells x genes (counts, or a matrix already prepared with ``prepare=False``); not
        modified unless ``copy=False`` (then only the result keys are added).
    ranks : int or sequence of int, default (5, ..., 10)
        The ranks studied (each at least 2).
    k : int, optional
        The rank whose programs are written; default the rank of highest stability.
    n_replicates : int, default 100
        Restarts per rank.
    n_top_genes : int or None, default 2000
        cNMF's preparation keeps this many over-dispersed genes of the selected ones (``None``:
        all); ConsensusNMF's ``n_top_features``. Genes it drops get zero loadings.
    layer : str, optional
        Layer to factorize (default ``X``).
    use_highly_variable : bool, optional
        Restrict to ``var['highly_variable']`` first (default: when the column exists).
    key_added : str, default 'consensus'
    copy, overwrite : bool, default False
        As in :func:`torchnmf.tl.nmf`.
    n_top_features : int, default 20
        Genes listed per program in ``uns['<key>']['top_features']``.
    obs_columns : bool, default True
        Also write each program's usages as ``obs['<key>_1']`` ...
    random_state : int, default 0
    **kwargs
        Further :class:`~torchnmf.consensus.ConsensusNMF` parameters (``beta_loss``,
        ``density_threshold``, ``local_neighborhood_size``, ``max_iter``, ``tol``, ``device``...).

    Returns
    -------
    anndata.AnnData or None
        With ``copy=True`` the copy, else ``None``. Written: ``obsm['X_<key>']`` (n_obs, k),
        ``varm['<key>']`` (n_vars, k; each program sums to 1 over the genes it kept),
        ``obs['<key>_j']``, and ``uns['<key>']`` with ``params``, ``k``, ``k_selection``
        (``k``, ``stability``, ``error``, ``cophenetic``, ``kept`` per rank), ``objective``
        ('consensus error') and its ``history`` (the error of each rank, in rank order),
        ``components`` and ``top_features``.
    """
    from ..consensus import ConsensusNMF

    est = ConsensusNMF(ranks, n_replicates=n_replicates, n_top_features=n_top_genes, random_state=random_state,
                       **kwargs)

    def fit(sel):
        est.fit(sel.matrix, feature_names=np.asarray(sel.feature_names, dtype=str))
        table = est.k_selection_
        cols = {name: np.asarray(table[name]) for name in ("k", "stability", "error", "cophenetic", "kept")}
        if k is None:
            chosen = int(cols["k"][int(np.argmax(cols["stability"]))])
        elif k not in est.ranks_:
            raise ValueError(f"k={k!r} is not among the ranks fitted ({', '.join(map(str, est.ranks_))})")
        else:
            chosen = int(k)
        loadings = np.zeros((sel.shape[1], chosen))
        loadings[np.asarray(est.features_)] = np.asarray(est.components_[chosen]).T
        params = {name: value for name, value in est.get_params().items() if name != "ranks"}
        params["ranks"] = tuple(int(r) for r in est.ranks_)
        converged = int(est.results_[chosen].n_converged) == int(est.n_replicates)
        return Result(np.asarray(est.usages_[chosen]), loadings, cols["error"], "consensus error", converged,
                      0, params, uns={"k": chosen, "k_selection": cols})

    return run(adata, fit, model="ConsensusNMF", layer=layer, use_highly_variable=use_highly_variable,
               key_added=key_added, copy=copy, overwrite=overwrite, counts=False, n_top_features=n_top_features,
               obs_columns=obs_columns)
