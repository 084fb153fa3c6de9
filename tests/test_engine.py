"""The fit engine: stop rule, warning, records, stop flag, progress — the same for every model."""
import math
import warnings

import numpy as np
import pytest
import torch

from torchnmf import NMF, NMFD
from torchnmf.engine import ConvergenceWarning, FitResult, has_converged, noise_floor, relative_change, run
from torchnmf.history import History
from torchnmf.plca import PLCA
from torchnmf.poisson import GammaPoisson


# -- the rule ---------------------------------------------------------------------
def test_relative_change_is_per_step_and_against_the_current_value():
    assert relative_change(110.0, 100.0) == pytest.approx(0.1)
    assert relative_change(110.0, 100.0, steps=10) == pytest.approx(0.01)
    assert relative_change(-110.0, -100.0) == pytest.approx(0.1)  # an ELBO: against |ELBO|
    # scikit-learn's rule: the decrease against the first value
    assert relative_change(110.0, 100.0, rule="sklearn", first=1000.0) == pytest.approx(0.01)
    assert relative_change(100.0, 110.0, rule="sklearn", first=1000.0) == pytest.approx(-0.01)
    assert relative_change(100.0, 110.0, rule="sklearn", first=1000.0, maximize=True) == pytest.approx(0.01)


def test_a_huge_initial_error_does_not_stop_the_fit():
    # the bug of the old rule: progress measured against the first error (3.3e11) looked like nothing
    first, old, new = 3.3e11, 1.2e7, 1.1e7
    assert has_converged(relative_change(old, new, rule="sklearn", first=first), 1e-4, rule="sklearn")
    assert not has_converged(relative_change(old, new), 1e-4)


def test_noise_floor_of_the_dtype():
    assert noise_floor(torch.float32) == pytest.approx(10 * torch.finfo(torch.float32).eps)
    rise = 5 * torch.finfo(torch.float32).eps  # float32 rounding noise, up or down
    assert has_converged(relative_change(1.0, 1.0 + rise), 1e-9, torch.float32)
    assert not has_converged(relative_change(1.0, 1.0 + rise), 1e-9, torch.float64)
    assert not has_converged(0.0, 0.0)  # tol = 0 never converges
    assert not has_converged(math.nan, 1e-3)


# -- the loop ------------------------------------------------------------------------
def _geometric(ratio=0.5, floor=1.0):
    """A step whose objective approaches ``floor`` geometrically."""
    state = {"x": 10.0}

    def step(i, measure):
        value = floor + state["x"]
        state["x"] *= ratio
        return value

    return step


def test_run_converges_and_records_step_time_change():
    h = History()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = run(_geometric(), max_iter=100, tol=1e-6, history=h, model="toy")
    assert isinstance(res, FitResult) and res.converged and res.n_iter < 100
    assert h.converged_ is True and h.n_iter_ == res.n_iter and h.tol == 1e-6
    assert h.steps == list(range(len(h)))
    assert math.isnan(h.changes[0]) and all(c >= 0 for c in h.changes[1:])
    assert h.changes[-1] <= 1e-6 < h.changes[-2]
    assert all(b >= a for a, b in zip(h.times, h.times[1:]))


def test_run_warns_exactly_once_when_max_iter_ends_it():
    h = History()
    with pytest.warns(ConvergenceWarning, match=r"toy reached max_iter=5 .*relative change .* > tol=1e-06") as rec:
        res = run(_geometric(0.9), max_iter=5, tol=1e-6, history=h, model="toy")
    assert len([w for w in rec if issubclass(w.category, ConvergenceWarning)]) == 1
    assert not res.converged and res.n_iter == 5 and h.converged_ is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(_geometric(0.9), max_iter=5, tol=0, history=History(), model="toy")  # tol=0: asked for max_iter


def test_warning_points_at_the_callers_line():
    V = torch.rand(20, 10, dtype=torch.float64)
    with pytest.warns(ConvergenceWarning) as rec:
        NMF(V.shape, 3).double().fit(V, max_iter=2)
    assert rec[0].filename == __file__


def test_deferred_steps_measure_the_returned_point():
    state = {"x": 8.0, "pending": None}

    def step(i, measure):
        state["pending"] = state["x"] / 2
        return state["x"] if measure else None

    def commit():
        state["x"] = state["pending"]

    h = History()
    res = run(step, commit=commit, max_iter=6, tol=0, history=h, model="toy", check_every=2)
    assert res.n_iter == 6 and h.steps == [0, 2, 4, 6]
    assert h.values[-1] == state["x"] == 8.0 / 2 ** 6  # the last record is the final point


def test_non_finite_objective_names_the_model():
    with pytest.raises(FloatingPointError, match="toy: the objective became nan at step 0"):
        run(lambda i, m: float("nan"), max_iter=3, tol=0, history=History(), model="toy")


def test_float32_noise_does_not_keep_a_fit_running():
    # a float32 objective that only jitters at its resolution has converged, whatever tol says
    rng = np.random.RandomState(0)
    eps = float(torch.finfo(torch.float32).eps)
    step = lambda i, m: float(np.float32(1000.0 * (1 + eps * rng.choice([-1, 1]))))  # noqa: E731
    res = run(step, max_iter=50, tol=1e-12, history=History(), model="toy", dtype=torch.float32)
    assert res.converged and res.n_iter < 5


# -- every model: warning, stop flag, progress ----------------------------------------------------
def _counts(n=30, c=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.rand(n, 3, generator=g, dtype=torch.float64)
                         @ torch.rand(3, c, generator=g, dtype=torch.float64) * 4)


def _fit_nmf(history, **kw):
    V = _counts()
    torch.manual_seed(0)
    return NMF(V.shape, 3).double().fit(V, history=history, check_every=1, **kw)


def _fit_nmfd(history, **kw):
    V = _counts()[None]
    torch.manual_seed(0)
    return NMFD(V.shape, rank=2, T=3).double().fit(V, history=history, **kw)


def _fit_plca(history, **kw):
    V = _counts()
    torch.manual_seed(0)
    return PLCA(V.shape, rank=3).double().fit(V, history=history, **kw)[0]


def _fit_gamma(history, **kw):
    X = _counts()
    torch.manual_seed(0)
    layer = GammaPoisson(*X.shape, 3).double()
    layer.fit(X, history=history, **kw)
    return history.n_iter_


def _fit_parallel_nmf(history, **kw):
    from torchnmf.parallel import fit_nmf

    V = _counts()
    torch.manual_seed(0)
    return fit_nmf(NMF(V.shape, 3).double(), V, history=history, check_every=1, **kw)


def _fit_parallel_cavi(history, **kw):
    from torchnmf.parallel import fit_gamma_cavi

    X = _counts()
    torch.manual_seed(0)
    fit_gamma_cavi(GammaPoisson(*X.shape, 3).double(), X, history=history, **kw)
    return history.n_iter_


def _estimator(cls, **params):
    def fit(history, max_iter, tol, monkeypatch):
        # this estimator's history only (an estimator may fit others inside, e.g. an NMF start)
        monkeypatch.setattr(cls, "_new_history", lambda self, *a, **k: history)
        est = cls(max_iter=max_iter, tol=tol, random_state=0, **params).fit(_counts().numpy())
        return est.n_iter_
    return fit


def _models():
    from torchnmf.estimators import PNMF, BetaNMF, GammaPoissonFactorization

    return {
        "NMF.fit": _fit_nmf, "NMFD.fit": _fit_nmfd, "PLCA.fit": _fit_plca, "GammaPoisson.fit": _fit_gamma,
        "fit_nmf": _fit_parallel_nmf, "fit_gamma_cavi": _fit_parallel_cavi,
        "BetaNMF": _estimator(BetaNMF, n_components=3, check_every=1),
        "GammaPoissonFactorization": _estimator(GammaPoissonFactorization, n_components=3),
        "PNMF": _estimator(PNMF, n_components=3, device="cpu"),
    }


def _call(fit, history, monkeypatch, **kw):
    if fit.__name__ == "fit":  # estimators
        return fit(history, kw["max_iter"], kw["tol"], monkeypatch)
    return fit(history, **kw)


class _StopAt(History):
    def __init__(self, at, **kw):
        super().__init__(**kw)
        self.at = at

    def append(self, record):
        go_on = super().append(record)
        if len(self) == self.at:
            self.request_stop()
        return go_on


@pytest.mark.parametrize("name", list(_models()))
def test_every_model_warns_once_stops_on_request_and_shows_progress(name, monkeypatch):
    fit = _models()[name]
    maximize = name not in ("NMF.fit", "NMFD.fit", "PLCA.fit", "fit_nmf", "BetaNMF")
    # reaching max_iter with a tolerance: one ConvergenceWarning naming the model
    with pytest.warns(ConvergenceWarning) as rec:
        _call(fit, History(maximize=maximize), monkeypatch, max_iter=3, tol=1e-12)
    mine = [w for w in rec if issubclass(w.category, ConvergenceWarning)]
    assert len(mine) == 1 and "max_iter=3" in str(mine[0].message)
    # tol = 0 asks for max_iter steps: no warning, and the bar counts to max_iter
    closed = []
    monkeypatch.setattr(History, "close", lambda self: closed.append(None if self._bar is None else self._bar.n))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        h = History(verbose=True, total=4, maximize=maximize)
        n = _call(fit, h, monkeypatch, max_iter=4, tol=0)
    assert n == 4 and h.n_iter_ == 4 and h.converged_ is False
    bar = h._bar.n if h._bar is not None else closed[0]  # estimators close the bar, layers leave it to the owner
    assert bar == 4
    monkeypatch.undo()
    # a stop request (another thread, a callback) ends the fit after the current step, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        h = _StopAt(2, maximize=maximize)
        n = _call(fit, h, monkeypatch, max_iter=50, tol=1e-12)
    assert len(h) == 2 and n <= 2 and h.converged_ is False


# -- real data: the default tolerance does not stop far from the end ---------------------------
def _digits():
    from sklearn.datasets import load_digits

    return load_digits().data.astype(np.float64)


def _image_patches():
    """16x16 patches of scikit-learn's bundled photograph (an image matrix: 600 images x 256 pixels)."""
    from sklearn.datasets import load_sample_image
    from sklearn.feature_extraction.image import extract_patches_2d

    gray = load_sample_image("china.jpg").mean(axis=2)
    P = extract_patches_2d(gray, (16, 16), max_patches=600, random_state=0)
    return P.reshape(len(P), -1).astype(np.float64)


def _ends_close_or_warns(make, X):
    """The default fit ends within 1% of the ``tol=0`` fit at ``max_iter``, or warns that it did not."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        est = make().fit(X)
    warned = [w for w in rec if issubclass(w.category, ConvergenceWarning)]
    full = make(tol=0.0).fit(X)
    final, reference = est.history_.values[-1], full.history_.values[-1]
    gap = abs(final - reference) / abs(reference)
    assert warned or gap <= 0.01, (est.n_iter_, gap)
    assert len(warned) <= 1
    assert bool(warned) == (est.history_.converged_ is False)
    if warned:  # it warned because it really ran to max_iter
        assert est.n_iter_ == full.n_iter_
    return est, gap


@pytest.mark.parametrize("data", ["digits", "image"])
@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
def test_betanmf_default_fit_on_real_data(data, beta_loss):
    from torchnmf.estimators import BetaNMF

    X = _digits() if data == "digits" else _image_patches()
    _ends_close_or_warns(lambda **kw: BetaNMF(n_components=16, beta_loss=beta_loss, random_state=0, **kw), X)


@pytest.mark.parametrize("data", ["digits", "image"])
def test_nmf_fit_default_on_real_data(data):
    X = torch.from_numpy(_digits() if data == "digits" else _image_patches())
    torch.manual_seed(0)
    start = NMF(X.shape, 16).double()
    runs = {}
    for tol in (None, 0.0):
        m = NMF(W=start.W.detach(), H=start.H.detach())
        h = History()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            m.fit(X, history=h, **({} if tol is None else {"tol": tol}))
        runs[tol] = (h.values[-1], [w for w in rec if issubclass(w.category, ConvergenceWarning)])
    (final, warned), (reference, _) = runs[None], runs[0.0]
    assert warned or abs(final - reference) <= 0.01 * reference


@pytest.mark.parametrize("data", ["digits", "image"])
def test_probabilistic_estimators_default_tol_on_real_data(data):
    from torchnmf.estimators import PNMF, GammaPoissonFactorization

    X = np.round(_digits()[:500] if data == "digits" else _image_patches()[:300] / 8)
    # default tol, fewer sweeps/epochs than the default max_iter to keep the suite short
    _ends_close_or_warns(lambda **kw: GammaPoissonFactorization(n_components=8, max_iter=40, random_state=0, **kw), X)
    _ends_close_or_warns(lambda **kw: PNMF(n_components=4, max_iter=40, random_state=0, device="cpu", **kw), X)


def test_sklearn_rule_stops_where_scikit_learn_would():
    from torchnmf.estimators import BetaNMF

    X = _digits()
    ours = BetaNMF(n_components=16, random_state=0, stop_rule="sklearn", tol=1e-4, max_iter=500).fit(X)
    # scikit-learn's rule: decrease between checks 10 iterations apart, relative to the first error
    v = ours.history_.values
    assert ours.n_iter_ < 500 and ours.history_.converged_
    assert (v[-2] - v[-1]) / v[0] < 1e-4 <= (v[-3] - v[-2]) / v[0]


# -- the command line says it too -------------------------------------------------------------
@pytest.mark.parametrize("model", ["nmf", "gamma-poisson", "pnmf"])
def test_cli_reports_convergence_in_one_line_and_the_summary(tmp_path, capsys, model):
    import json

    from torchnmf.cli import main

    path = tmp_path / "X.npy"
    np.save(path, _counts(25, 9).numpy())
    out = tmp_path / "res"
    base = ["fit", str(path), "--model", model, "--rank", "2", "--quiet", "--device", "cpu", "-o", str(out)]
    assert main(base + ["--max-iter", "3", "--tol", "1e-12"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("torchnmf fit: warning: ") and "max_iter=3" in err[0], err
    summary = json.loads((tmp_path / "res.json").read_text())
    assert summary["converged"] is False and summary["n_iter"] == 3 and summary["tol"] == 1e-12
    assert summary["last_relative_change"] > 1e-12
    with np.load(tmp_path / "res.npz") as z:
        assert len(z["history_steps"]) == len(z["history"]) == len(z["history_changes"])
    # a loose tolerance is met: no warning, converged recorded
    assert main(base + ["--max-iter", "50", "--tol", "0.5"]) == 0
    assert "warning" not in capsys.readouterr().err
    summary = json.loads((tmp_path / "res.json").read_text())
    assert summary["converged"] is True and summary["n_iter"] < 50
    # the default tolerance is the model's own
    assert main(base + ["--max-iter", "2"]) == 0
    capsys.readouterr()
    from torchnmf.estimators import PNMF, BetaNMF, GammaPoissonFactorization

    default = {"nmf": BetaNMF, "gamma-poisson": GammaPoissonFactorization, "pnmf": PNMF}[model]().tol
    assert json.loads((tmp_path / "res.json").read_text())["tol"] == default


def test_plot_history_marks_the_tolerance():
    import matplotlib

    matplotlib.use("Agg")
    h = History()
    run(_geometric(0.9), max_iter=20, tol=1e-3, history=h, model="toy", warn=False)
    ax = h.plot()
    lines = [ln for other in ax.figure.axes for ln in other.get_lines()]
    tol_lines = [ln for ln in lines if ln.get_label().startswith("tol = ")]
    assert len(tol_lines) == 1 and list(tol_lines[0].get_ydata()) == [1e-3, 1e-3]
    assert "max_iter reached" in ax.get_title()


def _noisy_rise(n_flat: int = 3):
    """An objective flat for ``n_flat`` steps (a warm-up), then rising with a one-step dip."""
    values = [10.0] * n_flat + [10.0 + 0.5 * k for k in range(1, 60)]
    values[n_flat + 8] = values[n_flat + 7]  # one noisy step that does not move

    def step(i, measure):
        return values[i] if measure else None
    return step


def test_window_and_warmup_do_not_stop_a_stochastic_fit_early():
    # the plain rule stops on the flat warm-up and on the single noisy step
    h = History()
    assert run(_noisy_rise(), max_iter=40, tol=1e-3, history=h, model="toy").n_iter == 2
    h = History()
    with pytest.warns(ConvergenceWarning):
        res = run(_noisy_rise(), max_iter=40, tol=1e-3, history=h, model="toy", window=3, warmup=5)
    assert not res.converged and res.n_iter == 40
    # the windowed change is the one between the means of the last 3 and the 3 before, per step
    v = h.values
    assert h.changes[-1] == pytest.approx(abs(sum(v[-3:]) - sum(v[-6:-3])) / 3 / abs(sum(v[-3:]) / 3) / 3)
    assert all(math.isnan(c) for c in h.changes[:5])


def test_warmup_only_delays_convergence():
    def flat(i, measure):
        return 1.0
    h = History()
    res = run(flat, max_iter=50, tol=1e-6, history=h, model="toy", window=2, warmup=10)
    assert res.converged and res.n_iter == 10


# -- defaults that finish, warnings at the user's line ---------------------------------------
README_EXAMPLE = '''
import torch
from sklearn.datasets import load_digits
from torchnmf import NMF
from torchnmf.estimators import BetaNMF

X = load_digits().data
est = BetaNMF(n_components=16, beta_loss="kullback-leibler", random_state=0, device="cpu")
H = est.fit_transform(X)
parts = est.components_

net = NMF(X.shape, rank=16).double()
net.fit(torch.from_numpy(X), beta=1)
'''


def test_readme_ten_lines_converge_without_a_warning():
    import pathlib

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.rst").read_text()
    for line in README_EXAMPLE.strip().splitlines():  # the example here is the README's, less comments
        code = line.split("#")[0].strip().replace(', device="cpu"', "")
        assert code in readme, f"README's example changed: {code!r}"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(compile(README_EXAMPLE, "README.rst", "exec"), {})


def test_convergence_warning_through_set_output_points_at_the_callers_line():
    # fit_transform is wrapped by scikit-learn's set_output (sklearn/utils/_set_output.py)
    from torchnmf.estimators import BetaNMF, GammaPoissonFactorization

    X = np.random.RandomState(0).poisson(3.0, size=(30, 8)).astype(float)
    for est in (BetaNMF(3, max_iter=2, random_state=0, device="cpu"),
                GammaPoissonFactorization(3, max_iter=2, random_state=0, device="cpu")):
        with pytest.warns(ConvergenceWarning) as rec:
            est.fit_transform(X)
        assert [w.filename for w in rec if issubclass(w.category, ConvergenceWarning)] == [__file__]


def test_progress_bar_shows_the_objective_just_recorded(monkeypatch):
    import io

    import tqdm.auto

    out = io.StringIO()
    real = tqdm.auto.tqdm
    monkeypatch.setattr(tqdm.auto, "tqdm", lambda *a, **k: real(*a, **k, file=out, mininterval=0, miniters=1))
    h = History(verbose=True, total=3, name="loss")
    for value in (30.5, 20.25, 10.125):
        h.append(value)
        assert f"loss={value:.6g}" in out.getvalue().split("\r")[-1]  # the bar as drawn now
    h.close()


def test_betanmf_defaults_converge_on_single_cell_like_counts():
    # programs of sparse gene usage, negative-binomial noise, a few housekeeping genes
    from torchnmf.estimators import BetaNMF

    rs = np.random.RandomState(1)
    programs = rs.gamma(0.3, 1.0, size=(4, 80))
    programs /= programs.sum(1, keepdims=True)
    housekeeping = rs.gamma(2, 1, size=80) * (rs.rand(80) < 0.05)
    usage = rs.dirichlet(np.full(4, 0.2), size=120)
    mu = rs.lognormal(np.log(2000), 0.4, size=(120, 1)) * (0.8 * usage @ programs
                                                           + 0.2 * housekeeping / housekeeping.sum())
    X = rs.poisson(rs.gamma(2.0, mu / 2.0)).astype(float)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = BetaNMF(4, random_state=0, device="cpu").fit(X)
    assert est.history_.converged_ and est.n_iter_ < est.max_iter
