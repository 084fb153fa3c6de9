"""Consensus NMF (issue 20, items 2-4): cNMF's preparation, consensus and k-selection; CLI."""
import json
import os
import pickle
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

pytest.importorskip("sklearn")

from torchnmf.consensus import ConsensusNMF  # noqa: E402
from torchnmf.consensus import estimator as est_mod  # noqa: E402
from torchnmf.consensus.cluster import cluster_components, local_density  # noqa: E402
from torchnmf.consensus.cophenetic import cophenetic_correlation  # noqa: E402
from torchnmf.consensus.prepare import fano_selection, prepare  # noqa: E402
from torchnmf.engine import ConvergenceWarning  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::torchnmf.engine.ConvergenceWarning")
FAST = dict(max_iter=300, tol=1e-5, random_state=0)


# -- reference: cNMF's get_highvar_genes + get_norm_counts, written slowly -------------------------
def _quantile(v, q):
    v = np.sort(v[~np.isnan(v)])
    return np.quantile(v, q)  # pandas' default (linear) interpolation


def cnmf_highvar_reference(X, numgenes):
    """cNMF's get_highvar_genes(numgenes=...) one feature at a time (ddof 0 variance)."""
    n, m = X.shape
    mean = np.array([sum(X[i, j] for i in range(n)) / n for j in range(m)])
    var = np.array([sum((X[i, j] - mean[j]) ** 2 for i in range(n)) / n for j in range(m)])
    fano = np.array([var[j] / mean[j] if mean[j] > 0 else np.nan for j in range(m)])
    top = sorted(range(m), key=lambda j: -mean[j])[:20]
    A = min(np.sqrt(var[j]) / mean[j] for j in top if mean[j] > 0)
    w_mean_low, w_mean_high = _quantile(mean, 0.1), _quantile(mean, 0.9)
    w_fano_low, w_fano_high = _quantile(fano, 0.1), _quantile(fano, 0.9)
    box = [j for j in range(m) if not np.isnan(fano[j]) and w_fano_low < fano[j] < w_fano_high
           and w_mean_low < mean[j] < w_mean_high]
    B2 = np.median([fano[j] for j in box])
    ratio = [fano[j] / (A ** 2 * mean[j] + B2) if not np.isnan(fano[j]) else -np.inf for j in range(m)]
    return sorted(sorted(range(m), key=lambda j: -ratio[j])[:numgenes])


def cnmf_prepare_reference(counts, numgenes):
    tpm = counts / counts.sum(1, keepdims=True) * 1e6
    keep = cnmf_highvar_reference(tpm, numgenes)
    sub = counts[:, keep]
    return keep, sub / sub.std(axis=0, ddof=1)


def _counts(seed=0, n=60, m=40):
    rng = np.random.default_rng(seed)
    mu = rng.gamma(0.5, 4, size=m) * rng.gamma(2, 0.5, size=(n, 1))
    X = rng.poisson(mu * rng.gamma(rng.uniform(0.3, 5, size=m), 1 / rng.uniform(0.3, 5, size=m)))
    X[:, 3] = 0  # a feature with zero mean
    X[:, 0] += 1  # no empty rows
    return X


def test_fano_selection_matches_cnmf_reference():
    X = _counts()
    keep, _ = fano_selection(X.astype(float), 15)
    assert keep.tolist() == cnmf_highvar_reference(X.astype(float), 15)
    keep_sp, _ = fano_selection(sp.csr_matrix(X.astype(float)), 15)
    assert keep_sp.tolist() == keep.tolist()


def test_prepare_matches_cnmf_reference_dense_and_sparse(monkeypatch):
    X = _counts(1)
    ref_keep, ref_X = cnmf_prepare_reference(X.astype(float), 12)
    p = prepare(X, 12)
    assert p.prepared and p.features.tolist() == ref_keep
    np.testing.assert_allclose(p.X, ref_X, rtol=1e-12)
    X0 = X.copy()
    S = sp.csr_matrix(X)
    for cls in (sp.csr_matrix, sp.csc_matrix, sp.coo_matrix):  # the full matrix is never densified
        monkeypatch.setattr(cls, "toarray", lambda self, *a, **k: pytest.fail("densified"), raising=False)
        monkeypatch.setattr(cls, "todense", lambda self, *a, **k: pytest.fail("densified"), raising=False)
    ps = prepare(S, 12)
    monkeypatch.undo()
    assert sp.issparse(ps.X) and ps.features.tolist() == ref_keep
    np.testing.assert_allclose(ps.X.toarray(), ref_X, rtol=1e-12)
    np.testing.assert_array_equal(X, X0)  # input untouched


def test_prepare_keeps_all_features_when_fewer_and_skips_when_asked():
    X = _counts(2, m=10)
    p = prepare(X, 2000)
    assert p.features.tolist() == list(range(10))
    np.testing.assert_allclose(p.X.std(0, ddof=1)[p.X.std(0) > 0], 1.0)
    q = prepare(X, None)
    assert not q.prepared and np.array_equal(q.X, X)


def test_prepare_refuses_rows_left_empty_and_names_them():
    X = _counts(3)
    X[[4, 7], :] = 0
    names = [f"cell{i}" for i in range(X.shape[0])]
    with pytest.raises(ValueError, match=r"samples have no counts in the 5 selected.*'cell4', 'cell7'.*n_top_features"):
        prepare(X, 5, sample_names=names)


# -- simulation with planted programs --------------------------------------------------------------
def _planted(seed=0, n=150, m=40, k=4, outlier_rows=0):
    rng = np.random.default_rng(seed)
    W = np.zeros((m, k))
    for j in range(k):  # each program has its own block of features, plus some sharing
        W[j * (m // k):(j + 1) * (m // k), j] = rng.uniform(1, 3, m // k)
    W += 0.05 * rng.random((m, k))
    H = rng.gamma(0.6, 1, size=(n, k)) + 0.01
    X = rng.poisson(H @ W.T * 8).astype(float)
    X[:, 0] += 1
    return X, W, H


def _matched_corr(A, B):
    from scipy.optimize import linear_sum_assignment

    k = A.shape[0]
    C = np.corrcoef(np.vstack([A, B]))[:k, k:]
    r, c = linear_sum_assignment(-C)
    return C[r, c]


def test_consensus_recovers_planted_programs_and_stability_picks_the_true_rank():
    X, W, _ = _planted()
    est = ConsensusNMF([4, 6], n_replicates=8, n_top_features=None, **FAST).fit(X)
    assert _matched_corr(est.components_[4], W.T).min() > 0.95
    ks = est.k_selection_
    stab = dict(zip(ks["k"], ks["stability"]))
    assert stab[4] > 0.9 and stab[4] > stab[6] + 0.1
    np.testing.assert_allclose(est.components_[4].sum(1), 1.0)
    assert est.usages_[4].shape == (150, 4) and (est.usages_[4] >= 0).all()


def test_sparse_input_gives_the_dense_result():
    X, _, _ = _planted(7, n=70, m=24, k=3)
    X = X.astype(int)
    kw = dict(n_replicates=4, n_top_features=16, **FAST)
    dense = ConsensusNMF(3, **kw).fit(X)
    sparse = ConsensusNMF(3, **kw).fit(sp.csr_matrix(X))
    np.testing.assert_allclose(sparse.components_[3], dense.components_[3], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sparse.usages_[3], dense.usages_[3], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(sparse.transform(sp.csr_matrix(X[:5])), dense.transform(X[:5]), rtol=1e-5, atol=1e-8)


def test_k_selection_fields():
    X, _, _ = _planted(1, n=80, m=24, k=3)
    est = ConsensusNMF([2, 3], n_replicates=6, n_top_features=None, **FAST).fit(X)
    ks = est.k_selection_
    assert list(ks.columns) == ["k", "stability", "error", "cophenetic", "kept"]
    assert list(ks["k"]) == [2, 3] and list(ks["kept"]) == [12, 18]
    assert ks["error"][0] > ks["error"][1] > 0
    assert all(-1 <= s <= 1 for s in ks["stability"]) and all(0 < c <= 1 for c in ks["cophenetic"])
    assert est.ranks_ == [2, 3] and est.n_features_in_ == 24 and not est.prepared_  # floats: 'auto' skips


def test_density_filter_removes_planted_outlier_components():
    rng = np.random.default_rng(0)
    R, m, k = 20, 30, 3
    base = rng.random((m, k)) ** 4
    W = np.stack([base * (1 + 0.02 * rng.standard_normal((m, k))) for _ in range(R)])
    outliers = [(2, 1), (9, 0), (15, 2)]  # (replicate, component) replaced by random vectors
    for r, j in outliers:
        W[r, :, j] = rng.random(m)
    c = cluster_components(np.abs(W), density_threshold=0.5, local_neighborhood_size=0.3)
    removed = {(i // k, i % k) for i in np.flatnonzero(~c.kept)}
    assert removed == set(outliers)
    assert int(c.kept.sum()) == R * k - 3 and (c.labels[~c.kept] == -1).all()
    true = base.T / base.T.sum(1, keepdims=True)
    assert _matched_corr(c.consensus, true).min() > 0.999


def test_local_density_is_cnmfs():
    rng = np.random.default_rng(1)
    C = rng.random((12, 5))
    D = np.sqrt(((C[:, None] - C[None]) ** 2).sum(-1))
    ref = np.sort(D, axis=1)[:, :4].sum(1) / 3  # self (0) + 3 nearest, divided by 3 (cNMF)
    np.testing.assert_allclose(local_density(C, 3), ref, atol=1e-12)


def test_density_threshold_leaving_too_few_components_names_the_rank():
    X = np.random.default_rng(2).poisson(5, size=(60, 20)).astype(float)  # no programs: replicates disagree
    with pytest.raises(ValueError, match=r"density_threshold=0.02 leaves \d+ of 30 .*at rank 3.*raise density_thr"):
        ConsensusNMF([3], n_replicates=10, n_top_features=None, density_threshold=0.02, **FAST).fit(X)


def test_cophenetic_is_one_for_agreeing_replicates_and_subsamples():
    rng = np.random.default_rng(0)
    H = np.tile(rng.random((1, 50, 3)), (4, 1, 1))
    assert cophenetic_correlation(H) == pytest.approx(1.0)
    H2 = rng.random((5, 300, 3))
    a = cophenetic_correlation(H2, max_samples=100, seed=1)
    assert a == cophenetic_correlation(H2, max_samples=100, seed=1) and -1 <= a <= 1


def test_names_go_through_and_transform():
    pd = pytest.importorskip("pandas")
    X, _, _ = _planted(3, n=70, m=24, k=3)
    df = pd.DataFrame(X.astype(int), index=[f"c{i}" for i in range(70)], columns=[f"g{j}" for j in range(24)])
    est = ConsensusNMF(3, n_replicates=5, n_top_features=16, **FAST).fit(df)
    assert est.prepared_ and len(est.feature_names_) == 16
    assert list(est.feature_names_) == [f"g{j}" for j in est.features_]
    assert list(est.sample_names_) == list(df.index)
    comps, usages = est.frames(3)
    assert list(comps.columns) == list(est.feature_names_) and list(usages.index) == list(df.index)
    tops = est.top_features(3, n=4)
    assert len(tops) == 3 and all(t.startswith("g") for row in tops for t in row)
    U = est.transform(df, k=3)
    np.testing.assert_allclose(U, est.usages_[3], rtol=1e-2, atol=1e-3 * U.max())
    named = ConsensusNMF(3, n_replicates=5, prepare=False, **FAST).fit(X, feature_names=df.columns)
    assert list(named.feature_names_) == list(df.columns)


@pytest.mark.parametrize("beta_loss,solver,expect,tol", [("frobenius", "auto", "cd", 1e-4),
                                                          ("kullback-leibler", "auto", "mu", 1e-6),
                                                          ("frobenius", "mu", "mu", 1e-6)])
def test_solver_auto_is_cd_for_frobenius_as_cnmf(monkeypatch, beta_loss, solver, expect, tol):
    """The replicates' solver: coordinate descent for Frobenius (cNMF's choice), MU otherwise; its default tol."""
    from torchnmf import replicates

    seen = []
    real = replicates.fit_replicates

    def spy(*args, **kw):
        seen.append((kw["solver"], kw["tol"]))
        return real(*args, **kw)

    monkeypatch.setattr(replicates, "fit_replicates", spy)
    X, _, _ = _planted(2, n=60, m=20, k=3)
    est = ConsensusNMF([2, 3], n_replicates=4, n_top_features=None, beta_loss=beta_loss, solver=solver,
                       max_iter=200, random_state=0)
    assert est.get_params()["solver"] == solver and est.get_params()["tol"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X)
    assert seen == [(expect, tol)] * 2 and est.solver_ == expect


def test_solver_cd_needs_frobenius():
    X, _, _ = _planted(2, n=60, m=20, k=3)
    with pytest.raises(ValueError, match="solver='cd'.*frobenius"):
        ConsensusNMF(3, n_replicates=4, beta_loss="kullback-leibler", solver="cd").fit(X)
    with pytest.raises(ValueError, match="solver must be"):
        ConsensusNMF(3, n_replicates=4, solver="hals").fit(X)


def test_sklearn_conventions_clone_get_params_pickle():
    from sklearn.base import clone

    est = ConsensusNMF([2, 3], n_replicates=4, beta_loss="kullback-leibler", density_threshold=0.4, solver="mu")
    assert est.get_params()["density_threshold"] == 0.4 and clone(est).solver == "mu"
    c = clone(est).set_params(n_replicates=5)
    assert c.n_replicates == 5 and est.n_replicates == 4
    bad = ConsensusNMF(ranks=[1, 3])  # parameters are checked in fit, not __init__
    with pytest.raises(ValueError, match="ranks must be at least 2"):
        bad.fit(np.ones((5, 5)))
    X, _, _ = _planted(4, n=50, m=16, k=2)
    est = ConsensusNMF(2, n_replicates=4, n_top_features=None, **FAST).fit(X)
    back = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(back.components_[2], est.components_[2])
    np.testing.assert_allclose(back.transform(X[:10]), est.transform(X[:10]))


def test_plots():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    X, _, _ = _planted(5, n=50, m=16, k=2)
    est = ConsensusNMF([2, 3], n_replicates=4, n_top_features=None, **FAST).fit(X)
    f1 = est.plot_k_selection()
    assert len(f1.axes) == 2 and "stability" in f1.axes[0].get_ylabel() and "error" in f1.axes[1].get_ylabel()
    f2 = est.plot_clustering(3)
    assert "rank 3" in f2._suptitle.get_text()
    plt.close("all")


@pytest.mark.parametrize("kwargs, X, match", [
    (dict(ranks=[2], n_replicates=1), None, "n_replicates"),
    (dict(ranks=[9]), None, r"ranks \[9\] exceed min"),
    (dict(ranks=[2]), "negative", "negative"),
    (dict(ranks=[2]), "nan", "NaN"),
    (dict(ranks=[2], local_neighborhood_size=0.01), None, "local_neighborhood_size"),
    (dict(ranks=[2], density_threshold=-1), None, "density_threshold"),
])
def test_bad_input(kwargs, X, match):
    base = np.random.default_rng(0).poisson(3, size=(8, 6)).astype(float) + 1
    if X == "negative":
        base[2, 3] = -1
    elif X == "nan":
        base[1, 1] = np.nan
    with pytest.raises(ValueError, match=match):
        ConsensusNMF(n_top_features=None, **dict(dict(n_replicates=4), **kwargs)).fit(base)


# -- command line --------------------------------------------------------------------------------
def _cli(*argv):
    from torchnmf.cli import main

    return main(list(argv))


def test_cli_writes_outputs_and_resumes_from_checkpoint(tmp_path, monkeypatch, capsys):
    X, _, _ = _planted(6, n=60, m=20, k=3)
    np.save(tmp_path / "x.npy", X.astype(int))
    out = tmp_path / "out"
    calls = []
    real = est_mod.fit_rank

    def counting(Xt, k, **kw):
        calls.append(k)
        if k == 4 and len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second rank
        return real(Xt, k, **kw)

    monkeypatch.setattr(est_mod, "fit_rank", counting)
    args = [str(tmp_path / "x.npy"), "--ranks", "3", "4", "--replicates", "4", "--genes", "15",
            "--max-iter", "200", "--quiet", "-o", str(out)]
    assert _cli("consensus", *args) == 130
    assert sorted(os.listdir(out)) == ["k3.json", "k3.npz"]  # rank 3 saved, nothing half-written
    calls.clear()
    assert _cli("consensus", *args) == 0
    assert calls == [4]  # rank 3 came from its checkpoint
    for name in ("k_selection.json", "k_selection.png", "k3.npz", "k4.npz", "k3.json", "k4.json"):
        assert (out / name).stat().st_size > 0
    ks = json.loads((out / "k_selection.json").read_text())
    assert ks["ranks"] == [3, 4] and {"stability", "error", "cophenetic", "kept"} <= set(ks)
    with np.load(out / "k4.npz") as z:
        assert z["components"].shape == (4, 15) and z["usages"].shape == (60, 4)
        assert len(z["feature_names"]) == 15 and len(z["sample_names"]) == 60
    prog = json.loads((out / "k4.json").read_text())["programs"]
    assert len(prog) == 4 and all(len(p["top_features"]) == 15 for p in prog)
    calls.clear()
    assert _cli("consensus", *args[:-2], "--replicates", "5", "-o", str(out)) == 2  # other settings
    assert "other settings (replicates 4 -> 5)" in capsys.readouterr().err and calls == []
    assert _cli("consensus", *args[:-2], "--solver", "mu", "-o", str(out)) == 2  # a checkpoint of cd is not MU's
    assert "other settings" in capsys.readouterr().err and calls == []
    assert ks["solver"] == "cd" and ks["tol"] == 1e-4


@pytest.mark.parametrize("extra, match", [
    (["--ranks", "1"], "--ranks must be at least 2"),
    (["--ranks", "2", "--replicates", "1"], "--replicates must be at least 2"),
    (["--ranks", "30"], "--ranks 30 is larger than min"),
    (["--ranks", "2", "--genes", "0"], "--genes"),
    (["--ranks", "2", "--replicates", "3"], "--local-neighborhood-size=0.3 gives int(0.3 * 3) = 0 neighbours"),
])
def test_cli_bad_input_writes_nothing(tmp_path, capsys, extra, match):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).poisson(3, size=(20, 10)) + 1)
    out = tmp_path / "out"
    assert _cli("consensus", str(tmp_path / "x.npy"), *extra, "--quiet", "-o", str(out)) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_cli_negative_data_and_empty_rows(tmp_path, capsys):
    X = np.random.default_rng(0).poisson(3, size=(20, 10)) + 1
    X[5, 2] = -3
    np.save(tmp_path / "neg.npy", X)
    assert _cli("consensus", str(tmp_path / "neg.npy"), "--ranks", "2", "-o", str(tmp_path / "o")) == 2
    assert "negative" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_cli_csv_with_names_no_prepare(tmp_path):
    pd = pytest.importorskip("pandas")
    X, _, _ = _planted(8, n=40, m=12, k=2)
    df = pd.DataFrame(X / 3.0, index=[f"cell{i}" for i in range(40)], columns=[f"gene{j}" for j in range(12)])
    df.to_csv(tmp_path / "x.csv")
    out = tmp_path / "out"
    assert _cli("consensus", str(tmp_path / "x.csv"), "--ranks", "2", "--replicates", "4", "--no-prepare",
                "--quiet", "-o", str(out)) == 0
    with np.load(out / "k2.npz") as z:
        assert z["feature_names"].tolist() == list(df.columns) and z["sample_names"].tolist() == list(df.index)
    programs = json.loads((out / "k2.json").read_text())["programs"]
    assert all(name.startswith("gene") for p in programs for name in p["top_features"])
    assert json.loads((out / "k_selection.json").read_text())["prepared"] is False


def test_cli_reports_unconverged_ranks_in_one_line_each(tmp_path, capsys):
    X, _, _ = _planted(6, n=60, m=20, k=3)
    np.save(tmp_path / "x.npy", X.astype(int))
    assert _cli("consensus", str(tmp_path / "x.npy"), "--ranks", "2", "3", "--replicates", "4", "--genes", "15",
                "--max-iter", "3", "--solver", "mu", "--quiet", "-o", str(tmp_path / "out")) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [line for line in lines if line.startswith("torchnmf consensus: warning: rank ")], err
    assert len(lines) == 2 and all("raise --max-iter" in line for line in lines)
