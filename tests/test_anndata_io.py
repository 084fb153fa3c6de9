"""AnnData in the estimators (torchnmf.anndata_io at the edge): layers, highly variable genes, names."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from torchnmf.estimators import BetaNMF, GammaPoissonFactorization, PNMF, SpatialPNMF

anndata = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_adata(n=30, d=10, hvg=True, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.gamma(1.0, 2.0, size=(n, 1)) * rng.gamma(1.0, 1.0, size=(1, d))).astype(np.float32)
    adata = anndata.AnnData(X=sp.csr_matrix(np.log1p(counts)),
                            obs=pd.DataFrame(index=[f"cell{i}" for i in range(n)]),
                            var=pd.DataFrame(index=[f"gene{j}" for j in range(d)]))
    adata.layers["counts"] = sp.csr_matrix(counts)
    if hvg:
        adata.var["highly_variable"] = np.arange(d) % 3 != 0
    return adata


def snapshot(adata):
    """Everything a fit must leave alone, as plain values."""
    return (adata.X.toarray().copy(), {k: v.toarray().copy() for k, v in adata.layers.items()},
            adata.var.copy(), adata.obs.copy(), list(adata.var_names), list(adata.obs_names), dict(adata.uns),
            list(adata.obsm.keys()), list(adata.varm.keys()))


def same(a, b):
    assert np.array_equal(a[0], b[0])
    assert a[1].keys() == b[1].keys() and all(np.array_equal(a[1][k], b[1][k]) for k in a[1])
    pd.testing.assert_frame_equal(a[2], b[2])
    pd.testing.assert_frame_equal(a[3], b[3])
    assert a[4:] == b[4:]


ESTIMATORS = [
    lambda: BetaNMF(3, max_iter=30, tol=0, random_state=0, device="cpu"),
    lambda: GammaPoissonFactorization(3, max_iter=10, tol=0, random_state=0, device="cpu"),
    lambda: PNMF(3, max_iter=10, tol=0, random_state=0),
    lambda: SpatialPNMF(2, spatial=False, max_iter=5, tol=0, random_state=0),
]


@pytest.mark.parametrize("make", ESTIMATORS)
def test_estimators_fit_a_layer_of_the_highly_variable_genes(make):
    adata = make_adata()
    before = snapshot(adata)
    hvg = adata.var["highly_variable"].to_numpy()
    est = make()
    U = est.fit_transform(adata, layer="counts")
    ref = make()
    U_ref = ref.fit_transform(adata.layers["counts"][:, hvg])
    np.testing.assert_array_equal(U, U_ref)
    np.testing.assert_array_equal(est.components_, ref.components_)
    assert list(est.feature_names_in_) == list(adata.var_names[hvg]) and est.n_features_in_ == int(hvg.sum())
    assert list(est.get_feature_names_out())[0].endswith("0")
    # transform takes the fitted genes by name, whatever their order and the other genes
    shuffled = adata[:, adata.var_names[::-1]].copy()
    np.testing.assert_allclose(est.transform(shuffled, layer="counts"), est.transform(adata, layer="counts"),
                               rtol=1e-5, atol=1e-6)
    same(before, snapshot(adata))


def test_use_highly_variable_choices():
    adata = make_adata()
    est = BetaNMF(2, max_iter=5, tol=0, device="cpu")
    est.fit(adata, layer="counts", use_highly_variable=False)
    assert est.n_features_in_ == adata.n_vars
    est.fit(adata, layer="counts")
    assert est.n_features_in_ == int(adata.var["highly_variable"].sum())
    plain = make_adata(hvg=False)
    est.fit(plain, layer="counts")  # no flag: all genes, as scanpy.tl.pca
    assert est.n_features_in_ == plain.n_vars
    with pytest.raises(ValueError, match="no 'highly_variable' column"):
        est.fit(plain, layer="counts", use_highly_variable=True)
    plain.var["highly_variable"] = False
    with pytest.raises(ValueError, match="flags no gene"):
        est.fit(plain, layer="counts")
    with pytest.raises(TypeError, match="use_highly_variable must be"):
        est.fit(adata, use_highly_variable="yes")


def test_bare_adata_reads_X_and_names_survive_default_call():
    adata = make_adata(hvg=False)
    est = BetaNMF(2, max_iter=5, tol=0, device="cpu").fit(adata)
    assert list(est.feature_names_in_) == list(adata.var_names)
    np.testing.assert_array_equal(BetaNMF(2, max_iter=5, tol=0, device="cpu").fit(adata.X).components_,
                                  est.components_)


def test_missing_layer_names_the_layers():
    adata = make_adata()
    with pytest.raises(ValueError, match=r"no layer 'raw_counts'; layers: 'counts'"):
        BetaNMF(2).fit(adata, layer="raw_counts")
    with pytest.raises(TypeError, match="apply to AnnData input only"):
        BetaNMF(2).fit(adata.layers["counts"], layer="counts")


def test_count_model_on_normalized_X_names_the_counts_layer():
    adata = make_adata()
    with pytest.raises(ValueError, match=r"adata.X holds non-integer values .*pass layer='counts'"):
        GammaPoissonFactorization(2, device="cpu").fit(adata)
    del adata.layers["counts"]
    with pytest.raises(ValueError, match=r"adata.layers\['counts'\] = adata.X.copy\(\)"):
        GammaPoissonFactorization(2, device="cpu").fit(adata)
    GammaPoissonFactorization(2, max_iter=2, tol=0, allow_noninteger=True, device="cpu").fit(adata)


def test_transform_refuses_an_adata_without_the_fitted_genes():
    adata = make_adata()
    est = BetaNMF(2, max_iter=5, tol=0, device="cpu").fit(adata, layer="counts")
    with pytest.raises(ValueError, match="lacks 1 of the 6 features"):
        est.transform(adata[:, [n for n in adata.var_names if n != "gene1"]], layer="counts")


def test_duplicate_gene_names_warn_and_are_made_unique_on_the_copy_only():
    adata = make_adata(hvg=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.var_names = ["g"] * 5 + ["h"] * 5
    with pytest.warns(UserWarning, match="var names are not unique"):
        est = BetaNMF(2, max_iter=5, tol=0, device="cpu").fit(adata, layer="counts")
    assert len(set(est.feature_names_in_)) == 10 and list(est.feature_names_in_[:2]) == ["g", "g-1"]
    assert list(adata.var_names) == ["g"] * 5 + ["h"] * 5


def test_dense_integer_and_backed_inputs(tmp_path):
    adata = make_adata(hvg=False)
    adata.layers["dense"] = adata.layers["counts"].toarray().astype(np.int64)
    est = GammaPoissonFactorization(2, max_iter=5, tol=0, random_state=0, device="cpu")
    U = est.fit_transform(adata, layer="dense")
    assert est.module_.dtype.is_floating_point and str(est.module_.dtype) == "torch.float64"  # ints -> float64
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    U_path = GammaPoissonFactorization(2, max_iter=5, tol=0, random_state=0, device="cpu").fit_transform(
        str(path), layer="dense")
    np.testing.assert_array_equal(U, U_path)
    backed = anndata.read_h5ad(path, backed="r")
    U_backed = GammaPoissonFactorization(2, max_iter=5, tol=0, random_state=0, device="cpu").fit_transform(
        backed, layer="dense")
    np.testing.assert_array_equal(U, U_backed)
    backed.file.close()


def test_spatial_coordinates_default_to_obsm_spatial():
    adata = make_adata(hvg=False)
    adata.obsm["spatial"] = np.random.default_rng(1).uniform(size=(adata.n_obs, 2))
    kw = dict(n_components=2, num_inducing=5, max_iter=3, tol=0, random_state=0)
    a = SpatialPNMF(**kw).fit(adata, layer="counts")
    b = SpatialPNMF(**kw).fit(adata.layers["counts"], coordinates=adata.obsm["spatial"])
    np.testing.assert_array_equal(a.components_, b.components_)
    assert a.transform(adata[:4], layer="counts").shape == (4, 2)


def test_missing_anndata_gives_an_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "anndata", None)  # import anndata now raises ImportError
    with pytest.raises(ImportError, match="pip install anndata"):
        BetaNMF(2).fit(str(tmp_path / "x.h5ad"))


def test_core_does_not_import_anndata():
    code = ("import sys, numpy as np; import torchnmf, torchnmf.estimators as e; "
            "e.BetaNMF(2, max_iter=3, tol=0, device='cpu').fit(np.ones((5, 4)) + np.eye(5, 4)); "
            "assert 'anndata' not in sys.modules, 'anndata imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 0, res.stderr[-2000:]
