"""Scanpy-style functions: factorize an :class:`anndata.AnnData` and write the results into it.

Named ``tl`` after scanpy's ``sc.tl`` ("tools": functions that compute on an AnnData and
write their results into it), so ``import torchnmf.tl as ntl; ntl.nmf(adata)`` reads as
``sc.tl.pca(adata)`` does, and scanpy users know where the results go.

Each function selects the matrix (``layer=``, default ``X``; the highly variable genes when
``var['highly_variable']`` exists, unless ``use_highly_variable=False``), fits, and only
after the fit succeeded writes, as :func:`scanpy.tl.pca` does for ``key='pca'``:

=================================  ===============================================================
``obsm['X_<key>']``                usages (sample loadings), ``(n_obs, K)``
``varm['<key>']``                  gene loadings, ``(n_vars, K)``; zeros for genes not used
``obs['<key>_1']`` ... ``_K``      one column per component (``obs_columns=False``: none)
``uns['<key>']``                   ``params``, ``objective``, ``history``, ``converged``,
                                   ``n_iter``, ``components``, ``top_features`` (DataFrame:
                                   rank x component), model extras
=================================  ===============================================================

so that ``scanpy.pl.embedding(adata, basis='<key>')`` and
``scanpy.pl.umap(adata, color='<key>_1')`` work. ``copy=True`` returns a copy with the
results (``adata`` untouched); else they are written into ``adata`` and ``None`` is returned.
Results already under ``key_added`` are kept unless ``overwrite=True`` (which also removes
every entry the earlier results had written). Nothing else in ``adata`` changes: gene names
that are not unique are made unique (with a warning) only for the copy the fit uses.
``anndata`` is needed only here and in :mod:`torchnmf.anndata_io`.

:func:`consensus` runs cNMF's study (:class:`~torchnmf.consensus.ConsensusNMF`) and writes the
programs of one rank the same way, with the k-selection table in ``uns['<key>']``.
"""
from .consensus import consensus
from .deep import deep_poisson
from .factorize import gamma_poisson, nmf, pnmf

__all__ = ["nmf", "gamma_poisson", "pnmf", "deep_poisson", "consensus"]
