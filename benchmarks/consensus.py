"""Consensus NMF side by side with the ``cnmf`` package (Kotliar et al. 2019) on the same data.

Two count matrices:

- ``reuters``: the 395 x 4,258 Reuters word counts shipped in the ``lda`` package;
- ``sim``: a simulated single-cell-like matrix with known programs, as the cNMF paper
  simulates: ``--identity`` cell-type programs (each cell has one) and ``--activity``
  programs (used by a third of the cells, at 10-70% of their counts), Poisson counts.

Both tools prepare the counts themselves (cNMF's ``prepare``, our
:func:`torchnmf.consensus.prepare.prepare`, ``--genes`` over-dispersed features); the script
checks the two prepared matrices are the same (same features, values to 1e-10), so both
factorize one matrix. Same ranks, replicates, density threshold and thread count
(``--threads``: ``torch.set_num_threads`` for ours, OMP/OpenBLAS/MKL variables for cNMF, run
in its own process from its own environment). Frobenius loss: cNMF then fits each replicate
with scikit-learn's coordinate descent (its choice), ours with batched coordinate descent
(``--solver cd``, the default) or batched multiplicative updates (``--solver mu``).

Printed per data set and rank: stability (silhouette) of both, our error and cNMF's
``prediction_error`` / 2 (cNMF's is the sum of squares, ours half of it), the matched
(Hungarian) Pearson correlation of the consensus components (min and median over programs), our
consensus code's stability on cNMF's own replicates (a check of the clustering step), and for
``sim`` at the true rank the recovery of the planted programs by each tool (matched Pearson
correlation against the true programs in the prepared space, min over programs). Wall times:
cNMF's prepare + factorize + combine + k-selection statistics + consensus (its consensus also
re-estimates spectra in TPM units and z-scores, which ours does not; its factorize time is
shown alone too) against our ``ConsensusNMF.fit``.

cNMF is looked for in ``--cnmf-python`` (default ``/tmp/cnmf-venv/bin/python``, made with
``python -m venv /tmp/cnmf-venv && /tmp/cnmf-venv/bin/pip install cnmf``); without it the
script prints a message and our side alone.

Default run (a few minutes on one core): reuters ranks 5-8 and sim 3000 x 1000 ranks 5-8
with 20 replicates. The issue's setting: ``--replicates 100 --ranks 5 6 7 8 9 10``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

CNMF_WORKER = r'''
import json, os, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np, pandas as pd, anndata
from cnmf import cNMF
from cnmf.cnmf import load_df_from_npz
a = json.loads(sys.argv[1])
z = np.load(a["data"], allow_pickle=False)
X = z["X"].astype(np.float64)
ad = anndata.AnnData(X=X, obs=pd.DataFrame(index=[f"s{i}" for i in range(X.shape[0])]),
                     var=pd.DataFrame(index=[str(n) for n in z["names"]]))
counts = os.path.join(a["out"], "counts.h5ad")
ad.write_h5ad(counts)
t0 = time.perf_counter()
obj = cNMF(output_dir=a["out"], name="bench")
obj.prepare(counts_fn=counts, components=a["ranks"], n_iter=a["replicates"], seed=a["seed"],
            num_highvar_genes=a["genes"], beta_loss=a["beta_loss"], max_NMF_iter=1000)
t1 = time.perf_counter()
obj.factorize(worker_i=0, total_workers=1)
t2 = time.perf_counter()
obj.combine()
import scanpy as sc
norm = sc.read(obj.paths["normalized_counts"])
stats = [obj.consensus(k, skip_density_and_return_after_stats=True, show_clustering=False,
                       close_clustergram_fig=True, norm_counts=norm).stats for k in a["ranks"]]
dt = str(a["density_threshold"]).replace(".", "_")
res = {}
for k in a["ranks"]:
    obj.consensus(k, density_threshold=a["density_threshold"], show_clustering=False, close_clustergram_fig=True)
    res[f"spectra_{k}"] = load_df_from_npz(obj.paths["consensus_spectra"] % (k, dt)).values
    res[f"merged_{k}"] = load_df_from_npz(obj.paths["merged_spectra"] % k).values
t3 = time.perf_counter()
genes = open(obj.paths["nmf_genes_list"]).read().split("\n")
res.update(genes=np.array(genes), norm=np.asarray(norm.X.todense() if hasattr(norm.X, "todense") else norm.X),
           silhouette=np.array([float(s["silhouette"]) for s in stats]),
           error=np.array([float(s["prediction_error"]) for s in stats]),
           seconds=np.array([t3 - t0, t2 - t1]))
np.savez(os.path.join(a["out"], "result.npz"), **res)
'''


def simulate(n_cells: int, n_genes: int, n_identity: int, n_activity: int, seed: int = 0):
    """Counts with planted programs: returns (counts (cells, genes), programs (k, genes) summing to 1)."""
    rng = np.random.default_rng(seed)
    base = rng.lognormal(0, 1.5, n_genes)  # gene means, heavy-tailed as in scRNA-seq
    programs = []
    for _ in range(n_identity + n_activity):
        p = base.copy()
        de = rng.random(n_genes) < 0.05  # 5% of genes differentially expressed per program
        p[de] *= rng.lognormal(1.0, 0.5, de.sum())
        programs.append(p / p.sum())
    P = np.array(programs)
    U = np.zeros((n_cells, len(P)))
    U[np.arange(n_cells), rng.integers(0, n_identity, n_cells)] = 1.0
    active = rng.random(n_cells) < 1 / 3
    which = n_identity + rng.integers(0, n_activity, n_cells)
    frac = rng.uniform(0.1, 0.7, n_cells)
    U[active] *= (1 - frac[active])[:, None]
    U[np.flatnonzero(active), which[active]] = frac[active]
    lib = rng.lognormal(np.log(3000), 0.3, n_cells)
    return rng.poisson(lib[:, None] * (U @ P)).astype(np.int64), P


def matched_corr(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Pearson correlations of the rows of A and B matched by the Hungarian algorithm."""
    from scipy.optimize import linear_sum_assignment

    C = np.corrcoef(np.vstack([A, B]))[: len(A), len(A):]
    r, c = linear_sum_assignment(-C)
    return C[r, c]


def run_cnmf(python: str, X, names, args, ranks):
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(os.path.join(tmp, "data.npz"), X=X, names=np.asarray(names, dtype=str))
        cfg = dict(data=os.path.join(tmp, "data.npz"), out=tmp, ranks=ranks, replicates=args.replicates,
                   seed=args.seed, genes=args.genes, beta_loss="frobenius", density_threshold=args.density_threshold)
        threads = str(args.threads)
        env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
                   NUMBA_NUM_THREADS=threads, PYTHONPATH="")
        res = subprocess.run([python, "-c", CNMF_WORKER, json.dumps(cfg)], env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError("cnmf failed:\n" + res.stderr[-3000:])
        with np.load(os.path.join(tmp, "result.npz"), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


def run_ours(X, names, args, ranks):
    import torch

    from torchnmf.consensus import ConsensusNMF

    torch.set_num_threads(args.threads)
    est = ConsensusNMF(ranks, args.replicates, beta_loss="frobenius", n_top_features=args.genes, prepare=True,
                       density_threshold=args.density_threshold, max_iter=args.max_iter, tol=args.tol,
                       solver=args.solver,
                       random_state=args.seed, device=args.device)
    t0 = time.perf_counter()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X, feature_names=names)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return est, time.perf_counter() - t0


def compare(label, X, names, args, truth=None):
    from torchnmf.consensus.cluster import cluster_components
    from torchnmf.consensus.prepare import prepare

    ranks = list(args.ranks)
    for _ in range(10):  # drop samples left without counts by the selection (both tools refuse them)
        from torchnmf.consensus.prepare import _tpm, fano_selection

        keep, _ = fano_selection(_tpm(X.astype(np.float64)), args.genes)
        empty = X[:, keep].sum(1) == 0
        if not empty.any():
            break
        X = X[~empty]
    print(f"\n## {label}: {X.shape[0]} x {X.shape[1]} counts, --genes {args.genes}, ranks {ranks}, "
          f"{args.replicates} replicates, {args.threads} thread(s), device {args.device}, solver {args.solver}")
    est, ours_s = run_ours(X, names, args, ranks)
    theirs = None
    if os.path.exists(args.cnmf_python):
        theirs = run_cnmf(args.cnmf_python, X, names, args, ranks)
        prep = prepare(X, args.genes, feature_names=names)
        same_genes = sorted(theirs["genes"].tolist()) == sorted(np.asarray(prep.feature_names).tolist())
        order = np.argsort(np.asarray(prep.feature_names))
        their_order = np.argsort(theirs["genes"])
        same_values = same_genes and np.allclose(np.asarray(theirs["norm"])[:, their_order],
                                                 (prep.X.toarray() if hasattr(prep.X, "toarray") else prep.X)[:, order],
                                                 rtol=1e-10, atol=1e-12)
        print(f"prepared matrices: same features {same_genes}, same values {same_values}")
    else:
        print(f"cnmf not found at {args.cnmf_python}: make it with 'python -m venv /tmp/cnmf-venv && "
              f"/tmp/cnmf-venv/bin/pip install cnmf'; ours alone")
    print()
    print("| k | stability ours | stability cNMF | our clustering of cNMF's replicates | error ours | error cNMF / 2 "
          "| matched corr min / median | kept ours |")
    print("|---|---|---|---|---|---|---|---|")
    ks = est.k_selection_
    for i, k in enumerate(ranks):
        row = [k, f"{ks['stability'][i]:.3f}"]
        if theirs is not None:
            # their spectra are over their gene order: align to ours by name
            idx = {g: j for j, g in enumerate(theirs["genes"])}
            cols = [idx[str(g)] for g in est.feature_names_]
            corr = matched_corr(est.components_[k], theirs[f"spectra_{k}"][:, cols])
            merged = theirs[f"merged_{k}"]  # (R*k, genes), replicate by replicate
            W = merged.reshape(args.replicates, k, -1).transpose(0, 2, 1)
            again = cluster_components(W, density_threshold=2.0).stability
            row += [f"{theirs['silhouette'][i]:.3f}", f"{again:.3f}", f"{ks['error'][i]:.5g}",
                    f"{theirs['error'][i] / 2:.5g}",
                    f"{corr.min():.3f} / {np.median(corr):.3f}"]
        else:
            row += ["-", "-", f"{ks['error'][i]:.5g}", "-", "-"]
        row.append(int(ks["kept"][i]))
        print("| " + " | ".join(str(v) for v in row) + " |")
    best_ours = ranks[int(np.argmax(ks["stability"]))]
    line = f"\nbest rank by stability: ours {best_ours}"
    if theirs is not None:
        line += f", cNMF {ranks[int(np.argmax(theirs['silhouette']))]}"
    print(line)
    if truth is not None:
        k_true = len(truth)
        if k_true in ranks:
            scale = est._preparation.scale
            T = truth[:, est.features_] / scale  # the planted programs in the prepared space
            rec = f"recovery of the {k_true} planted programs (min matched corr): ours " \
                  f"{matched_corr(est.components_[k_true], T).min():.3f}"
            if theirs is not None:
                idx = {g: j for j, g in enumerate(theirs["genes"])}
                cols = [idx[str(g)] for g in est.feature_names_]
                rec += f", cNMF {matched_corr(theirs[f'spectra_{k_true}'][:, cols], T).min():.3f}"
            print(rec)
    times = f"wall time: ours {ours_s:.1f} s"
    if theirs is not None:
        total, fact = theirs["seconds"]
        times += f", cNMF {total:.1f} s (factorize alone {fact:.1f} s); ratio {total / ours_s:.1f}x"
    print(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=["reuters", "sim"], choices=("reuters", "sim"))
    p.add_argument("--ranks", type=int, nargs="+", default=[5, 6, 7, 8])
    p.add_argument("--replicates", type=int, default=20)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--density-threshold", type=float, default=0.5)
    p.add_argument("--cells", type=int, default=3000, help="sim: cells")
    p.add_argument("--sim-genes", type=int, default=1000, help="sim: genes")
    p.add_argument("--identity", type=int, default=4, help="sim: identity programs")
    p.add_argument("--activity", type=int, default=2, help="sim: activity programs")
    p.add_argument("--tol", type=float, default=None,
                   help="ours: stop rule (default: 1e-4 with cd, as cNMF; 1e-6 with mu)")
    p.add_argument("--solver", default="cd", choices=("cd", "mu"), help="ours: replicate solver (default: cd)")
    p.add_argument("--max-iter", type=int, default=1000, help="ours: iteration limit (cNMF: 1000)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cnmf-python", default="/tmp/cnmf-venv/bin/python")
    args = p.parse_args(argv)
    for name in args.data:
        if name == "reuters":
            try:
                import lda.datasets
            except ImportError:
                print("reuters: the lda package is not installed (pip install lda); skipped")
                continue
            X = np.asarray(lda.datasets.load_reuters(), dtype=np.int64)
            names = list(lda.datasets.load_reuters_vocab())
            keep = X.sum(0) > 0
            compare("reuters (lda package)", X[:, keep], [n for n, k in zip(names, keep) if k], args)
        else:
            X, P = simulate(args.cells, args.sim_genes, args.identity, args.activity, args.seed)
            keep = X.sum(0) > 0
            compare(f"sim ({args.identity} identity + {args.activity} activity programs)", X[:, keep],
                    [f"g{j}" for j in np.flatnonzero(keep)], args, truth=P[:, keep])
    sys.stdout.flush()


if __name__ == "__main__":
    main()
