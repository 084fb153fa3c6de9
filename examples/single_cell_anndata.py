"""Gene programs of simulated single-cell counts, from AnnData to AnnData with torchnmf.tl.

The script simulates what a single-cell RNA-seq experiment hands over in an
:class:`anndata.AnnData`: cells of a few types, each type expressing its own gene program, half
of the cells also running a shared "activity" program, library sizes that vary from cell to
cell, and overdispersed (negative binomial) counts. As scanpy's preprocessing would, it keeps
the raw counts in ``layers['counts']``, puts log-normalized values in ``X`` and flags highly
variable genes in ``var['highly_variable']``.

Then, in scanpy's style, it runs :func:`torchnmf.tl.nmf` (on the log-normalized ``X``),
:func:`torchnmf.tl.gamma_poisson` and :func:`torchnmf.tl.deep_poisson` (on the counts), which
write usages to ``obsm['X_<key>']``, gene loadings to ``varm['<key>']`` and the rest to
``uns['<key>']``. It prints how well each recovers the true programs (Pearson correlation of
the gene loadings with the true programs, after matching) and the cell types (the most used
matched program), and the top genes of each Gamma-Poisson program. With ``--out`` it saves the
AnnData with all results (``single_cell.h5ad``) and, with matplotlib, the cells in the space of
two programs (``single_cell_programs.png``). Last, it writes the counts as the ``X`` of an
``.h5ad``, opens it backed and fits Gamma-Poisson by SVI from row blocks read from the file.

Run::

    python examples/single_cell_anndata.py               # 3000 cells x 2000 genes
    python examples/single_cell_anndata.py --quick       # 500 cells x 300 genes (CI)
"""
import argparse
import os
import tempfile
import warnings

import numpy as np
import scipy.sparse as sp


def simulate(n_cells: int, n_genes: int, n_types: int, seed: int = 0):
    """An AnnData of simulated counts and the true programs (genes x programs) and cell types."""
    import anndata
    import pandas as pd

    rng = np.random.default_rng(seed)
    K = n_types + 1  # one program per type, one shared activity program
    base = rng.lognormal(0.0, 1.0, n_genes)
    spectra = np.tile(base[:, None], (1, K))
    markers = rng.permutation(n_genes)[: K * 25].reshape(K, 25)
    for k in range(K):
        spectra[markers[k], k] *= rng.uniform(5, 20, 25)  # each program's marker genes
    spectra /= spectra.sum(0, keepdims=True)
    types = rng.integers(0, n_types, n_cells)
    usage = np.zeros((n_cells, K))
    usage[np.arange(n_cells), types] = 1.0
    active = rng.random(n_cells) < 0.5
    share = rng.uniform(0.2, 0.5, n_cells) * active
    usage[:, :n_types] *= (1 - share)[:, None]
    usage[:, n_types] = share
    library = rng.lognormal(np.log(1500), 0.4, n_cells)
    rate = library[:, None] * (usage @ spectra.T)
    counts = rng.poisson(rng.gamma(10.0, rate / 10.0)).astype(np.float32)  # negative binomial, dispersion 0.1
    # what scanpy's preprocessing leaves: counts kept, X log-normalized, highly variable genes flagged
    norm = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    mean, var = norm.mean(0), norm.var(0)
    dispersion = var / np.maximum(mean, 1e-12)
    hvg = dispersion >= np.quantile(dispersion, 0.5)
    adata = anndata.AnnData(
        X=sp.csr_matrix(norm.astype(np.float32)),
        obs=pd.DataFrame({"cell_type": pd.Categorical([f"type{t}" for t in types])},
                         index=[f"cell{i}" for i in range(n_cells)]),
        var=pd.DataFrame({"highly_variable": hvg}, index=[f"gene{j}" for j in range(n_genes)]),
    )
    adata.layers["counts"] = sp.csr_matrix(counts)
    return adata, spectra, types


def recovery(adata, key: str, spectra: np.ndarray, types: np.ndarray):
    """Mean matched correlation of gene loadings with the true programs, and cell-type accuracy."""
    from scipy.optimize import linear_sum_assignment

    W = adata.varm[key]
    used = W.any(1)
    K = spectra.shape[1]
    corr = np.corrcoef(W[used].T, spectra[used].T)[: W.shape[1], W.shape[1]:]  # found x true
    found, true = linear_sum_assignment(-np.nan_to_num(corr))
    r = corr[found, true].mean()
    n_types = K - 1
    type_cols = [f for f, t in zip(found, true) if t < n_types]
    type_of = {f: t for f, t in zip(found, true)}
    U = adata.obsm[f"X_{key}"][:, type_cols]
    predicted = np.array([type_of[type_cols[i]] for i in U.argmax(1)])
    return r, float((predicted == types).mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small, fast setting for CI")
    p.add_argument("--out", default=None, help="directory for single_cell.h5ad and the figure")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        import anndata
    except ImportError:
        raise SystemExit("this example needs anndata: pip install anndata") from None
    import torchnmf.tl as ntl

    n_cells, n_genes, sweeps = (500, 300, 150) if args.quick else (3000, 2000, 500)
    n_types = 4
    K = n_types + 1
    adata, spectra, types = simulate(n_cells, n_genes, n_types)
    print(f"simulated {adata.n_obs} cells x {adata.n_vars} genes, {n_types} cell types + 1 activity program; "
          f"{int(adata.var['highly_variable'].sum())} highly variable genes")
    with warnings.catch_warnings():
        # the quick setting stops at max_iter on purpose
        warnings.filterwarnings("ignore", message=".*reached max_iter.*")
        ntl.nmf(adata, K, device=args.device, max_iter=sweeps)  # X: log-normalized
        ntl.gamma_poisson(adata, K, layer="counts", device=args.device, max_iter=sweeps, key_added="gp")
        # level 1: the K programs; level 2: n_types "meta-programs" (each type's program with its
        # share of activity). Cell usages at level 1 lie in the span of the level-2 ones, so a
        # level 2 narrower than the number of types would blur them.
        ntl.deep_poisson(adata, ranks=(K, n_types), layer="counts", device=args.device, max_iter=sweeps,
                         key_added="deep")
    print(adata)
    # the same counts as the X of an .h5ad opened backed: streamed from disk by row blocks (SVI)
    with tempfile.TemporaryDirectory() as tmp:
        on_disk = adata.copy()
        on_disk.X = on_disk.layers["counts"]
        path = os.path.join(tmp, "counts.h5ad")
        on_disk.write_h5ad(path)
        backed = anndata.read_h5ad(path, backed="r")
        ntl.gamma_poisson(backed, K, device=args.device, batch_size=100, epochs=10 if args.quick else 20)
        streamed = recovery(backed, "gamma_poisson", spectra, types)
        backed.file.close()
    print()
    print("| method                          | input       | program r | cell-type accuracy | converged |")
    print("|---------------------------------|-------------|-----------|--------------------|-----------|")
    for key, name, what in (("nmf", "tl.nmf (KL)", "X (log)"), ("gp", "tl.gamma_poisson", "counts"),
                            ("deep", "tl.deep_poisson (level 1)", "counts"), (None, "tl.gamma_poisson (backed)",
                                                                              "X on disk")):
        r, acc = recovery(adata, key, spectra, types) if key else streamed
        done = str(adata.uns[key]["converged"]) if key else "(SVI)"
        print(f"| {name:31s} | {what:11s} | {r:9.3f} | {acc:18.3f} | {done:9s} |")
    print()
    top = adata.uns["gp"]["top_features"]
    for col in top.columns:
        print(f"{col}: {' '.join(top[col][:8])}")
    sd = adata.obsm["X_gp_sd"] / np.maximum(adata.obsm["X_gp"], 1e-12)
    print(f"median posterior coefficient of variation of the Gamma-Poisson usages: {np.median(sd):.3f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "single_cell.h5ad")
        adata.write_h5ad(path)
        print(f"wrote {path}")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        U = adata.obsm["X_gp"]
        fig, ax = plt.subplots(figsize=(5, 4))
        for t in np.unique(types):
            ax.scatter(U[types == t, 0], U[types == t, 1], s=4, label=f"type{t}")
        ax.set_xlabel("gp_1")
        ax.set_ylabel("gp_2")
        ax.legend(markerscale=3, fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "single_cell_programs.png"), dpi=100)
        print(f"wrote {os.path.join(args.out, 'single_cell_programs.png')}")


if __name__ == "__main__":
    main()
