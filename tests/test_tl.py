"""torchnmf.tl: scanpy-style functions that write their results into an AnnData (issue 21, item 2)."""
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

anndata = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")

import torchnmf.tl as ntl  # noqa: E402
from torchnmf.estimators import BetaNMF, GammaPoissonFactorization  # noqa: E402

from test_anndata_io import make_adata, same, snapshot  # noqa: E402

QUIET = dict(max_iter=15, tol=0, device="cpu")


def test_nmf_writes_the_keys_of_sc_tl_pca():
    adata = make_adata(n=30, d=12)
    hvg = adata.var["highly_variable"].to_numpy()
    assert ntl.nmf(adata, 3, layer="counts", **QUIET) is None
    est = BetaNMF(3, random_state=0, **QUIET)
    U = est.fit_transform(adata.layers["counts"][:, hvg])
    np.testing.assert_array_equal(adata.obsm["X_nmf"], U)
    W = adata.varm["nmf"]
    assert W.shape == (12, 3) and not W[~hvg].any()
    np.testing.assert_array_equal(W[hvg], est.components_.T)
    for k in range(3):
        np.testing.assert_array_equal(adata.obs[f"nmf_{k + 1}"].to_numpy(), U[:, k])
    uns = adata.uns["nmf"]
    assert uns["objective"] == "beta-divergence" and uns["n_iter"] == 15 and uns["converged"] is False
    assert uns["history"].shape == (len(est.history_),) and np.isfinite(uns["history"]).all()
    assert uns["params"]["layer"] == "counts" and uns["params"]["use_highly_variable"] is True
    assert uns["params"]["n_components"] == 3 and uns["params"]["beta_loss"] == "kullback-leibler"
    top = uns["top_features"]
    assert list(top.columns) == ["nmf_1", "nmf_2", "nmf_3"] and len(top) == int(hvg.sum())
    assert top["nmf_1"][0] == adata.var_names[hvg][np.argmax(est.components_[0])]
    assert set(top["nmf_2"]) <= set(adata.var_names[hvg])


def test_results_survive_an_h5ad_round_trip(tmp_path):
    adata = make_adata(n=20, d=8)
    ntl.nmf(adata, 2, layer="counts", **QUIET)
    ntl.gamma_poisson(adata, 2, layer="counts", key_added="gp", **QUIET)
    ntl.deep_poisson(adata, (3, 2), layer="counts", key_added="deep", max_iter=5, tol=0, device="cpu")
    adata.write_h5ad(tmp_path / "r.h5ad")
    back = anndata.read_h5ad(tmp_path / "r.h5ad")
    np.testing.assert_array_equal(back.obsm["X_gp_sd"], adata.obsm["X_gp_sd"])
    pd.testing.assert_frame_equal(back.uns["deep"]["top_features_level2"], adata.uns["deep"]["top_features_level2"])
    assert back.uns["nmf"]["params"]["model"] == "BetaNMF"


def test_copy_returns_a_copy_and_leaves_adata_alone():
    adata = make_adata()
    before = snapshot(adata)
    out = ntl.nmf(adata, 2, layer="counts", copy=True, **QUIET)
    same(before, snapshot(adata))
    assert "X_nmf" not in adata.obsm and "nmf" not in adata.uns and "nmf_1" not in adata.obs
    assert out.obsm["X_nmf"].shape == (adata.n_obs, 2) and out is not adata


def test_existing_results_are_kept_unless_overwrite():
    adata = make_adata()
    ntl.nmf(adata, 3, layer="counts", **QUIET)
    first = adata.obsm["X_nmf"].copy()
    with pytest.raises(ValueError, match=r"already holds results under key_added='nmf'.*overwrite=True"):
        ntl.nmf(adata, 2, layer="counts", random_state=1, **QUIET)
    np.testing.assert_array_equal(adata.obsm["X_nmf"], first)
    ntl.nmf(adata, 2, layer="counts", overwrite=True, random_state=1, **QUIET)
    assert adata.obsm["X_nmf"].shape[1] == 2 and "nmf_3" not in adata.obs.columns  # stale column removed
    # results of another kind under the key: their extra entries go too
    ntl.gamma_poisson(adata, 2, layer="counts", key_added="nmf", overwrite=True, **QUIET)
    assert "X_nmf_sd" in adata.obsm
    ntl.nmf(adata, 2, layer="counts", overwrite=True, **QUIET)
    assert "X_nmf_sd" not in adata.obsm and "nmf_sd" not in adata.varm
    # something else under the key (another tool's entry) is refused too
    adata.uns["pnmf"] = {"from": "elsewhere"}
    with pytest.raises(ValueError, match=r"uns\['pnmf'\]"):
        ntl.pnmf(adata, 2, layer="counts", **QUIET)


def test_a_failed_fit_leaves_adata_untouched(monkeypatch):
    adata = make_adata()
    before = snapshot(adata)
    with pytest.raises(ValueError, match="n_components=50 is larger"):
        ntl.nmf(adata, 50, layer="counts", **QUIET)
    same(before, snapshot(adata))

    def boom(self, *args, **kwargs):
        raise FloatingPointError("the ELBO became nan")

    monkeypatch.setattr(GammaPoissonFactorization, "fit_transform", boom)
    with pytest.raises(FloatingPointError):
        ntl.gamma_poisson(adata, 2, layer="counts", **QUIET)
    same(before, snapshot(adata))


def test_bad_input_messages():
    adata = make_adata()
    before = snapshot(adata)
    with pytest.raises(ValueError, match=r"no layer 'raw'; layers: 'counts'"):
        ntl.nmf(adata, 2, layer="raw")
    for f in (ntl.gamma_poisson, ntl.pnmf, ntl.deep_poisson):
        with pytest.raises(ValueError, match=r"adata.X holds non-integer values.*layer='counts'"):
            f(adata, **({"ranks": (2,)} if f is ntl.deep_poisson else {"n_components": 2}))
    with pytest.raises(TypeError, match="adata must be an anndata.AnnData or the path"):
        ntl.nmf(adata.X, 2)
    with pytest.raises(TypeError, match="key_added must be a non-empty string"):
        ntl.nmf(adata, 2, key_added="")
    with pytest.raises(TypeError, match="ranks must be a non-empty sequence"):
        ntl.deep_poisson(adata, ranks=5, layer="counts")
    same(before, snapshot(adata))


def test_duplicate_names_warn_and_the_callers_names_stay():
    adata = make_adata(n=20, d=8, hvg=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.var_names = ["a", "a", "b", "b", "c", "c", "d", "d"]
        adata.obs_names = ["x"] * 20
    with pytest.warns(UserWarning, match="var names are not unique"):
        ntl.nmf(adata, 2, layer="counts", **QUIET)
    assert list(adata.var_names[:2]) == ["a", "a"] and list(adata.obs_names[:2]) == ["x", "x"]
    assert set(adata.uns["nmf"]["top_features"]["nmf_1"]) <= {"a", "a-1", "b", "b-1", "c", "c-1", "d", "d-1"}
    assert adata.obsm["X_nmf"].shape == (20, 2)


def test_gamma_poisson_writes_posterior_standard_deviations():
    adata = make_adata()
    hvg = adata.var["highly_variable"].to_numpy()
    out = ntl.gamma_poisson(adata, 2, layer="counts", copy=True, **QUIET)
    est = GammaPoissonFactorization(2, random_state=0, **QUIET).fit(adata.layers["counts"][:, hvg])
    with torch.no_grad():
        np.testing.assert_allclose(out.obsm["X_gamma_poisson_sd"], est.module_.q_U().stddev.numpy(), rtol=1e-6)
        np.testing.assert_allclose(out.varm["gamma_poisson_sd"][hvg], est.module_.q_alpha().stddev.numpy(), rtol=1e-6)
    assert not out.varm["gamma_poisson_sd"][~hvg].any() and (out.obsm["X_gamma_poisson_sd"] > 0).all()
    assert out.uns["gamma_poisson"]["objective"] == "elbo" and np.isfinite(out.uns["gamma_poisson"]["elbo"])


def test_pnmf_writes_the_fits_own_posterior():
    adata = make_adata(hvg=False)
    out = ntl.pnmf(adata, 2, layer="counts", copy=True, max_iter=10, tol=0)
    U, sd = out.obsm["X_pnmf"], out.obsm["X_pnmf_log_sd"]
    assert U.shape == sd.shape == (adata.n_obs, 2) and (U > 0).all() and (sd > 0).all()
    assert out.uns["pnmf"]["n_iter"] == 10 and out.varm["pnmf"].shape == (adata.n_vars, 2)


def test_deep_poisson_levels_factor_the_same_rates():
    adata = make_adata(n=40, d=15, hvg=False)
    out = ntl.deep_poisson(adata, (4, 2), layer="counts", copy=True, max_iter=30, tol=0, device="cpu")
    fine = out.obsm["X_deep_poisson"] @ out.varm["deep_poisson"].T
    coarse = out.obsm["X_deep_poisson_level2"] @ out.varm["deep_poisson_level2"].T
    np.testing.assert_allclose(fine, coarse, rtol=1e-10)
    assert out.uns["deep_poisson"]["mixing_level2"].shape == (4, 2)
    assert [c for c in out.obs.columns if c.startswith("deep_poisson_")] == [f"deep_poisson_{k}" for k in range(1, 5)]
    elbo = out.uns["deep_poisson"]["history"]
    assert len(elbo) == 30 and (np.diff(elbo) >= -1e-9 * np.abs(elbo[1:])).all()  # CAVI never lowers it
    with pytest.raises(ValueError, match=r"ranks=\(50, 2\)"):
        ntl.deep_poisson(adata, (50, 2), layer="counts")
    with pytest.raises(ValueError, match="init"):
        ntl.deep_poisson(adata, (4, 2), layer="counts", init="kmeans")
    rand = ntl.deep_poisson(adata, (4,), layer="counts", copy=True, init="random", max_iter=3, tol=0, device="cpu")
    assert rand.obsm["X_deep_poisson"].shape == (40, 4) and "X_deep_poisson_level2" not in rand.obsm


def test_a_path_is_read_and_the_result_returned(tmp_path):
    adata = make_adata(n=20, d=8)
    adata.write_h5ad(tmp_path / "in.h5ad")
    out = ntl.nmf(str(tmp_path / "in.h5ad"), 2, layer="counts", **QUIET)
    assert out.obsm["X_nmf"].shape == (20, 2)
    backed = anndata.read_h5ad(tmp_path / "in.h5ad", backed="r")
    out = ntl.nmf(backed, 2, layer="counts", copy=True, **QUIET)  # a layer: in memory; the copy too
    assert not out.isbacked and "X_nmf" not in backed.obsm
    np.testing.assert_array_equal(out.obsm["X_nmf"], ntl.nmf(adata, 2, layer="counts", copy=True, **QUIET).obsm["X_nmf"])
    backed.file.close()


# -- backed files: row blocks from disk (item 4) ---------------------------------------------
def write_backed(tmp_path, adata, name="b.h5ad"):
    adata.X = adata.layers["counts"].copy()
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


def test_backed_rows_read_blocks_of_the_file(tmp_path):
    from torchnmf.anndata_io import backed_rows

    adata = make_adata(n=25, d=9)
    backed = anndata.read_h5ad(write_backed(tmp_path, adata), backed="r")
    source, sel = backed_rows(backed)
    hvg = adata.var["highly_variable"].to_numpy()
    M = adata.layers["counts"][:, hvg].toarray()
    assert source.shape == (25, int(hvg.sum())) and list(sel.feature_names) == list(adata.var_names[hvg])
    for rows in ([0, 1, 2, 3], [5, 6, 20, 21, 3], [24]):
        batch = source.batch(rows)
        assert batch.X.layout == torch.sparse_csr and batch.rows.tolist() == rows
        np.testing.assert_array_equal(batch.X.to_dense().numpy(), M[rows])
    with pytest.raises(ValueError, match="only X stays on disk"):
        backed_rows(backed, layer="counts")
    backed.file.close()


def _raw_csr_file(path, data, indices, indptr, shape):
    import h5py

    with h5py.File(path, "w") as f:
        g = f.create_group("X")
        g.attrs["encoding-type"], g.attrs["shape"] = "csr_matrix", shape
        g.create_dataset("data", data=data, chunks=(min(3, len(data)),))
        g.create_dataset("indices", data=indices, chunks=(min(3, len(data)),))
        g.create_dataset("indptr", data=indptr)
    return h5py.File(path, "r")


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("value_dtype", [np.float32, np.float64, np.int64])
def test_backed_rows_equal_scipy_for_any_file_layout(tmp_path, index_dtype, value_dtype):
    from torchnmf.anndata_io import BackedRows

    # row 0 unsorted, row 2 empty, row 3 a repeated column (summed), rows 1 and 4 canonical
    indptr = np.array([0, 3, 5, 5, 8, 10])
    indices = np.array([4, 0, 2, 1, 3, 2, 2, 0, 0, 4], dtype=index_dtype)
    data = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], dtype=value_dtype)
    f = _raw_csr_file(tmp_path / "x.h5", data, indices, indptr, (5, 5))
    M = sp.csr_matrix((data.astype(np.float64), indices, indptr), shape=(5, 5)).toarray()
    for columns in (None, np.array([0, 2, 3])):
        source = BackedRows(f["X"], columns, dtype=torch.float32)
        keep = slice(None) if columns is None else columns
        for rows in ([0, 1, 2, 3, 4], [1, 2], [4, 0, 3], [2], []):
            X = source.batch(rows).X
            assert X.layout == torch.sparse_csr and X.dtype == torch.float32
            assert X.col_indices().dtype == X.crow_indices().dtype == torch.int32  # the kernels' index type
            cols = X.col_indices().numpy()
            for r in range(len(rows)):  # canonical: columns strictly increase within each row
                lo, hi = X.crow_indices()[r:r + 2].tolist()
                assert (np.diff(cols[lo:hi]) > 0).all()
            np.testing.assert_array_equal(X.to_dense().numpy(), M[np.array(rows, dtype=int)][:, keep])
    f.close()


@pytest.mark.parametrize("bad, message", [
    (dict(data=np.array([1.0, -2.0])), "negative values in rows 0..1"),
    (dict(data=np.array([1.0, np.nan])), "NaN or infinity in rows 0..1"),
    (dict(indices=np.array([0, 7])), r"column index outside \[0, 3\)"),
])
def test_backed_rows_refuse_bad_blocks_by_rows(tmp_path, bad, message):
    from torchnmf.anndata_io import BackedRows

    parts = dict(data=np.array([1.0, 2.0]), indices=np.array([0, 1]), indptr=np.array([0, 1, 2]), shape=(2, 3))
    parts.update(bad)
    f = _raw_csr_file(tmp_path / "bad.h5", **parts)
    with pytest.raises(ValueError, match=message):
        BackedRows(f["X"]).batch([0, 1])
    f.close()


def test_backed_x_is_streamed_by_blocks_and_written_into_the_object(tmp_path, monkeypatch):
    from torchnmf.anndata_io import BackedRows
    from torchnmf.streaming import SparseRows
    from torchnmf.tl import _backed

    adata = make_adata(n=60, d=12)
    path = write_backed(tmp_path, adata)
    backed = anndata.read_h5ad(path, backed="r")
    sizes = []
    batch = BackedRows.batch
    monkeypatch.setattr(BackedRows, "batch", lambda self, rows: sizes.append(len(rows)) or batch(self, rows))
    assert ntl.nmf(backed, 2, batch_size=16, epochs=2, max_iter=10, device="cpu") is None
    assert sizes and max(sizes) <= 16  # never more than a block of rows at once
    assert backed.isbacked and backed.obsm["X_nmf"].shape == (60, 2) and backed.varm["nmf"].shape == (12, 2)
    assert backed.uns["nmf"]["params"]["fit"] == "fit_nmf_online" and len(backed.uns["nmf"]["history"]) == 2
    # the same fit on the matrix in memory
    hvg = adata.var["highly_variable"].to_numpy()
    ref = _backed.nmf_online(SparseRows(adata.layers["counts"][:, hvg].tocsr()), None,
                             BetaNMF(2, max_iter=10, device="cpu"), batch_size=16, epochs=2, seed=0)
    np.testing.assert_allclose(backed.obsm["X_nmf"], ref.usages, rtol=1e-5)
    np.testing.assert_allclose(backed.varm["nmf"][hvg], ref.loadings, rtol=1e-5)
    ntl.gamma_poisson(backed, 2, batch_size=16, epochs=2, device="cpu", key_added="gp")
    assert backed.obsm["X_gp"].shape == backed.obsm["X_gp_sd"].shape == (60, 2)
    assert np.isfinite(backed.uns["gp"]["history"]).all() and backed.uns["gp"]["params"]["fit"] == "fit_gamma_svi"
    # a path is opened backed and returned with the results
    out = ntl.gamma_poisson(str(path), 2, batch_size=32, epochs=1, device="cpu")
    assert out.isbacked and out.obsm["X_gamma_poisson"].shape == (60, 2)
    out.file.close()
    backed.file.close()


def test_a_path_is_fitted_without_its_anndata_in_memory(tmp_path, monkeypatch):
    # anndata loads obs (a name per cell) even backed: a path's fit reads X alone, the same results
    import gc

    from torchnmf.tl import _backed

    adata = make_adata(n=60, d=12)
    path = write_backed(tmp_path, adata)
    backed = anndata.read_h5ad(path, backed="r")
    ntl.nmf(backed, 2, batch_size=16, epochs=2, max_iter=10, device="cpu")
    usages, loadings = backed.obsm["X_nmf"], backed.varm["nmf"]
    backed.file.close()
    del adata, backed
    gc.collect()
    alive = []
    fit = _backed.nmf_online
    monkeypatch.setattr(_backed, "nmf_online", lambda *a, **k: alive.append(
        sum(type(o) is anndata.AnnData for o in gc.get_objects())) or fit(*a, **k))
    out = ntl.nmf(str(path), 2, batch_size=16, epochs=2, max_iter=10, device="cpu", key_added="p")
    assert alive == [0]
    assert out.isbacked and out.obsm["X_p"].shape == (60, 2) and out.uns["p"]["params"]["fit"] == "fit_nmf_online"
    np.testing.assert_array_equal(out.obsm["X_p"], usages)  # as the fit of the opened file
    np.testing.assert_array_equal(out.varm["p"], loadings)
    out.file.close()


def test_backed_refusals_and_layers(tmp_path):
    adata = make_adata(n=30, d=10)
    adata.layers["lognorm"] = adata.X.copy()
    path = write_backed(tmp_path, adata)
    backed = anndata.read_h5ad(path, backed="r")
    with pytest.raises(ValueError, match="fits in memory: pass adata.to_memory"):
        ntl.pnmf(backed, 2)
    with pytest.raises(ValueError, match="copy=True would read the backed X"):
        ntl.nmf(backed, 2, copy=True)
    assert "X_nmf" not in backed.obsm
    # a layer is in memory already (anndata loads layers even when backed): an ordinary fit
    ntl.nmf(backed, 2, layer="lognorm", **QUIET)
    assert backed.uns["nmf"]["params"]["layer"] == "lognorm" and backed.isbacked
    backed.file.close()
    adata.X = adata.layers["lognorm"]
    adata.write_h5ad(tmp_path / "log.h5ad")
    backed = anndata.read_h5ad(tmp_path / "log.h5ad", backed="r")
    with pytest.raises(ValueError, match=r"adata.X \(its first rows\) holds non-integer values.*layer='counts'"):
        ntl.gamma_poisson(backed, 2)
    backed.file.close()


def test_backed_svi_starts_from_an_nmf_of_the_first_block(tmp_path):
    from torchnmf.anndata_io import backed_rows
    from torchnmf.tl._backed import _first_block_nmf

    adata = make_adata(n=40, d=12, hvg=False)
    backed = anndata.read_h5ad(write_backed(tmp_path, adata), backed="r")
    source, _ = backed_rows(backed)
    H, W = _first_block_nmf(source, 2, 16, 50, torch.device("cpu"), torch.float64, 0)
    assert H.shape == (16, 2) and W.shape == (12, 2)
    np.testing.assert_allclose(H.sum(0).numpy(), W.sum(0).numpy(), rtol=1e-10)  # balanced per component
    ntl.gamma_poisson(backed, 2, batch_size=16, epochs=1, device="cpu", key_added="a")
    ntl.gamma_poisson(backed, 2, batch_size=16, epochs=1, device="cpu", key_added="b", init="random")
    assert backed.uns["a"]["params"]["init"] == "nmf" and backed.uns["b"]["params"]["init"] == "random"
    assert not np.allclose(backed.varm["a"], backed.varm["b"])
    backed.file.close()


def _programs_adata(n=60, d=24, k=3, seed=0):
    rng = np.random.default_rng(seed)
    W = np.zeros((k, d))
    for j in range(k):
        W[j, j * (d // k):(j + 1) * (d // k)] = rng.gamma(2.0, 1.0, d // k)
    U = rng.gamma(0.5, 4.0, (n, k))
    counts = rng.poisson(U @ W + 0.05).astype(np.float32)
    counts[counts.sum(1) == 0, 0] = 1
    adata = anndata.AnnData(X=sp.csr_matrix(counts), obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]),
                            var=pd.DataFrame(index=[f"g{j}" for j in range(d)]))
    adata.var["highly_variable"] = np.arange(d) != d - 1  # one gene left out
    return adata


def test_consensus_writes_the_most_stable_rank_as_consensus_nmf_finds_it():
    from torchnmf.consensus import ConsensusNMF

    adata = _programs_adata()
    before = adata.X.toarray().copy()
    opts = dict(n_replicates=6, n_top_genes=20, max_iter=300, random_state=0, device="cpu")
    assert ntl.consensus(adata, (2, 3, 4), **opts) is None
    hv = adata.var["highly_variable"].to_numpy()
    est = ConsensusNMF((2, 3, 4), n_replicates=6, n_top_features=20, max_iter=300, random_state=0, device="cpu")
    est.fit(adata.X[:, hv], feature_names=np.asarray(adata.var_names[hv]))
    table = est.k_selection_
    best = int(table["k"][int(np.argmax(table["stability"]))])
    uns = adata.uns["consensus"]
    assert uns["k"] == best and list(uns["k_selection"]["k"]) == [2, 3, 4]
    np.testing.assert_allclose(uns["k_selection"]["stability"], table["stability"])
    np.testing.assert_allclose(adata.obsm["X_consensus"], est.usages_[best])
    W = adata.varm["consensus"]
    assert W.shape == (24, best) and not W[~hv].any()
    kept = np.flatnonzero(hv)[est.features_]
    np.testing.assert_allclose(W[kept], est.components_[best].T)
    dropped = np.setdiff1d(np.arange(24), kept)
    assert not W[dropped].any()  # genes not selected, or not over-dispersed: zero loadings
    np.testing.assert_array_equal(adata.X.toarray(), before)
    # a chosen rank; a rank not fitted is refused and leaves adata as it was
    out = ntl.consensus(adata, (2, 3), k=2, copy=True, overwrite=True, **opts)
    assert out.uns["consensus"]["k"] == 2 and out.obsm["X_consensus"].shape == (60, 2)
    assert adata.uns["consensus"]["k"] == best  # copy=True: adata keeps its results
    with pytest.raises(ValueError, match=r"k=5 is not among the ranks fitted \(2, 3\)"):
        ntl.consensus(adata, (2, 3), k=5, key_added="other", **opts)
    assert "other" not in adata.uns and "X_other" not in adata.obsm


def test_streamed_usages_stop_per_block_and_warn_once_for_unfinished_blocks(tmp_path):
    """The usages of a streamed NMF follow the estimator's stop rule per block, one warning for blocks at max_iter."""
    from torchnmf.engine import ConvergenceWarning
    from torchnmf.nmf import NMF
    from torchnmf.streaming import SparseRows
    from torchnmf.tl import _backed

    adata = make_adata(n=60, d=12)
    X = adata.layers["counts"].tocsr()
    source = SparseRows(X)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        short = _backed.nmf_online(source, None, BetaNMF(2, max_iter=3, tol=1e-4, device="cpu"), batch_size=16,
                                   epochs=1, seed=0)
    msgs = [str(m.message) for m in w if issubclass(m.category, ConvergenceWarning)]
    assert msgs == ["nmf: the usages of 4 of 4 blocks reached max_iter=3 before tol=0.0001; raise max_iter for "
                    "converged usages"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = _backed.nmf_online(source, None, BetaNMF(2, max_iter=5000, tol=1e-4, device="cpu"), batch_size=16,
                                 epochs=1, seed=0)
    # each block's usages are NMF.transform's with the same start and stop rule
    model = NMF(W=torch.as_tensor(res.loadings), rank=2)
    V = torch.as_tensor(X[16:32].toarray())
    H0 = torch.full((16, 2), (float(V.sum()) / V.numel() / 2) ** 0.5, dtype=V.dtype)
    ref = model.transform(V, beta=1, tol=1e-4, max_iter=5000, H=H0)
    np.testing.assert_allclose(res.usages[16:32], ref.numpy(), rtol=1e-6, atol=1e-9)
    assert short.usages.shape == res.usages.shape == (60, 2) and np.isfinite(res.usages).all()
