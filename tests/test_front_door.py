"""What a new user meets first: rank limits, the PNMF transform's length, no library warnings."""
import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from torchnmf.estimators import BetaNMF, GammaPoissonFactorization, PNMF


def counts(n=12, c=5, seed=0):
    return np.random.RandomState(seed).poisson(3.0, size=(n, c)).astype(float)


@pytest.mark.parametrize("make", [
    lambda k: BetaNMF(n_components=k, max_iter=5, device="cpu"),
    lambda k: GammaPoissonFactorization(n_components=k, max_iter=5, device="cpu"),
    lambda k: PNMF(n_components=k, max_iter=5),
])
def test_rank_above_min_shape_refused(make):
    X = counts()
    with pytest.raises(ValueError, match=r"n_components=6 is larger than min\(n_samples, n_features\) = 5"):
        make(6).fit(X)
    with pytest.raises(ValueError, match=r"= 4 \(n_samples=4, n_features=5\)"):
        make(5).fit(X[:4])
    assert make(5).fit(X).components_.shape == (5, 5)  # the bound itself is allowed


def test_betanmf_default_rank_is_min_shape():
    est = BetaNMF(max_iter=5, device="cpu").fit(counts(3, 7))
    assert est.n_components_ == 3


def bars(monkeypatch):
    """Record every tqdm bar made (label, total, final count): robust to the terminal's width and refresh rate."""
    import tqdm.auto

    made, real = [], tqdm.auto.tqdm

    def make(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tqdm.auto, "tqdm", make)
    return made


def seen(made):
    return [(b.desc, b.total, b.n) for b in made]


def test_pnmf_transform_no_longer_than_fit(monkeypatch):
    made = bars(monkeypatch)
    X = counts(20, 6)
    est = PNMF(n_components=2, max_iter=3, tol=0, random_state=0, verbose=True)
    est.fit_transform(X)
    assert est.n_iter_ == 3
    assert seen(made) == [("PNMF", 3, 3), ("PNMF: inferring factors (W fixed)", 3, 3)]  # not 200
    est.set_params(transform_max_iter=7)
    est.transform(X)
    assert seen(made)[-1] == ("PNMF: inferring factors (W fixed)", 7, 7)
    with pytest.raises(ValueError, match="transform_max_iter"):
        PNMF(n_components=2, transform_max_iter=0).fit(X)


def test_pnmf_transform_default_matches_explicit_steps():
    X = counts(20, 6)
    a = PNMF(n_components=2, max_iter=4, tol=0, random_state=0).fit(X)
    b = PNMF(n_components=2, max_iter=4, tol=0, random_state=0, transform_max_iter=4).fit(X)
    np.testing.assert_allclose(a.transform(X), b.transform(X))
    mean_a, _ = a.transform_F(X, max_iter=2)
    mean_b, _ = b.transform_F(X, max_iter=2)
    np.testing.assert_allclose(mean_a, mean_b)


SPARSE_CALLS = r"""
import warnings, numpy as np, scipy.sparse as sp
warnings.simplefilter("error", UserWarning)  # any library UserWarning fails this process
from torchnmf.estimators import BetaNMF, GammaPoissonFactorization
X = sp.csr_matrix(np.random.RandomState(0).poisson(1.0, size=(30, 8)).astype(float))
BetaNMF(n_components=2, max_iter=3, tol=0, device="cpu").fit(X).transform(X)
GammaPoissonFactorization(n_components=2, max_iter=3, tol=0, device="cpu").fit(X).transform(X)
from torchnmf.cli import main
sp.save_npz("{path}", X)
assert main(["fit", "{path}", "--rank", "2", "--max-iter", "3", "--tol", "0", "--quiet", "--device", "cpu",
             "--model", "gamma-poisson", "-o", "{out}"]) == 0
"""


def test_sparse_input_leaks_no_user_warning(tmp_path):
    # a fresh process: torch warns about sparse CSR once per process
    code = SPARSE_CALLS.format(path=tmp_path / "X.npz", out=tmp_path / "o")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "UserWarning" not in res.stderr


# -- issue 23.6: the package imports its names on first use --------------------------------------
def test_import_torchnmf_is_light_and_names_resolve():
    code = ("import sys, torchnmf; assert 'torch' not in sys.modules, 'torch imported'; "
            "from torchnmf import NMF, BetaMu, GammaPoisson, metrics; assert 'torch' in sys.modules; "
            "import torchnmf.nmf as m; assert NMF is m.NMF and torchnmf.NMF is NMF; "
            "ns = {}; exec('from torchnmf import *', ns); missing = set(torchnmf.__all__) - set(ns); "
            "assert not missing, missing; assert 'GammaNMF' in dir(torchnmf); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    import torchnmf
    with pytest.raises(AttributeError, match="has no attribute 'NotAName'"):
        torchnmf.NotAName


# -- no silent phases: every phase of a verbose fit has a labelled bar ------------------------
def test_gamma_poisson_phases_have_labelled_bars(monkeypatch):
    from torchnmf.estimators import GammaPoissonFactorization

    made = bars(monkeypatch)
    X = counts(30, 8)
    est = GammaPoissonFactorization(n_components=2, max_iter=3, tol=0, init_max_iter=4, random_state=0,
                                    device="cpu", verbose=True)
    est.fit(X)
    (start, total, _), sweeps = seen(made)
    assert start == "GammaPoissonFactorization: initialising from KL-NMF" and total == 4  # init_max_iter
    assert sweeps == ("GammaPoissonFactorization", 3, 3)
    est.set_params(transform_max_iter=5)
    est.transform(X)
    assert seen(made)[-1] == ("GammaPoissonFactorization: inferring row factors (components fixed)", 5, 5)
    est.set_params(verbose=False).fit(X)  # quiet means quiet, every phase
    est.transform(X)
    assert len(made) == 3


def test_pnmf_loadings_phase_has_a_labelled_bar(monkeypatch):
    made = bars(monkeypatch)
    X = counts(20, 6)
    est = PNMF(n_components=2, max_iter=2, tol=0, random_state=0, verbose=True).fit(X)
    est.transform_W(X[:, :3], max_iter=2)  # new features of the training samples
    assert seen(made)[-1] == ("PNMF: inferring loadings (F fixed)", 2, 2)
