import numpy as np
import pandas as pd
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from torchnmf.plotting import (check_image_shape, component_order, feature_scores, plot_components,  # noqa: E402
                               top_features)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_components_as_images():
    rng = np.random.RandomState(0)
    W = rng.rand(12, 5)  # 12 pixels = 3 x 4 images
    fig = plot_components(W, image_shape=(3, 4), cols=3)
    images = [a for a in fig.axes if a.images]
    assert len(fig.axes) == 5 and len(images) == 5
    for a in images:
        assert a.images[0].get_array().shape == (3, 4)
    # the first drawn is the largest component, shown exactly
    k = component_order(W)[0]
    np.testing.assert_array_equal(images[0].images[0].get_array(), W[:, k].reshape(3, 4))
    assert images[0].get_title() == f"component {k}"


def test_components_as_named_bars():
    W = np.zeros((6, 2))
    W[:, 0] = [0.1, 5, 0.3, 2, 0, 1]
    W[:, 1] = [1, 0, 0, 0, 0, 0]
    names = [f"word{j}" for j in range(6)]
    fig = plot_components(W, names=names, top=3, ranking="loading")
    a = fig.axes[0]
    assert [t.get_text() for t in a.get_yticklabels()] == ["word5", "word3", "word1"]  # largest on top
    assert [p.get_width() for p in a.patches] == [1, 2, 5]
    fig = plot_components(W, top=2, max_components=1)
    assert len(fig.axes) == 1 and fig.axes[0].get_yticklabels()[-1].get_text() == "feature 1"


@pytest.mark.parametrize("shape, err", [((5, 5), ValueError), ((3, -4), ValueError), (("a", 4), TypeError),
                                        ((3,), TypeError)])
def test_bad_image_shape(shape, err):
    with pytest.raises(err, match="image_shape"):
        check_image_shape(shape, 12)


def test_bad_arguments():
    W = np.ones((4, 2))
    with pytest.raises(ValueError, match="top"):
        plot_components(W, top=0)
    with pytest.raises(ValueError, match="names has 3 entries for 4 features"):
        plot_components(W, names=["a", "b", "c"])
    with pytest.raises(ValueError, match="order"):
        plot_components(W, order=[2])


def test_estimator_plot_components_images_and_names():
    from torchnmf.estimators import BetaNMF

    rng = np.random.RandomState(0)
    X = rng.poisson(3.0, size=(40, 16)).astype(float)
    est = BetaNMF(n_components=4, max_iter=20, random_state=0, device="cpu").fit(X)
    fig = est.plot_components(image_shape=(4, 4))
    assert len(fig.axes) == 4 and all(a.images[0].get_array().shape == (4, 4) for a in fig.axes)
    with pytest.raises(ValueError, match="image_shape 3x3 = 9 pixels does not match the 16 features"):
        est.plot_components(image_shape=(3, 3))
    df = pd.DataFrame(X, columns=[f"gene{j}" for j in range(16)])
    est.fit(df)
    fig = est.plot_components(top=5, max_components=2)
    assert len(fig.axes) == 2
    assert all(t.get_text().startswith("gene") for t in fig.axes[0].get_yticklabels())


# -- the figures say what they leave out, and keep the objective readable ----------------------
def test_components_say_how_many_are_shown():
    W = np.random.RandomState(0).rand(16, 25)
    fig = plot_components(W, image_shape=(4, 4))
    assert len(fig.axes) == 16 and fig._suptitle.get_text() == "16 of 25 components shown"
    fig = plot_components(W[:, :5], image_shape=(4, 4))
    assert fig._suptitle is None  # all drawn: nothing to say


def _objective_axes(fig):
    return [a for a in fig.axes if a.get_ylabel() == "beta-divergence"][0]


def _history(tol=1e-5):
    from torchnmf.history import History

    h = History(name="beta-divergence")
    values = [2e7] + [1e5 * 0.9 ** i + 4e4 for i in range(1, 30)]  # a start far above the rest
    prev = None
    for i, v in enumerate(values):
        h.annotate_next(step=i, change=np.nan if prev is None else abs(v - prev) / v)
        h.append(v)
        prev = v
    h.tol, h.converged_ = tol, False
    return h, values


def test_history_plot_starts_the_axis_after_the_first_step():
    h, values = _history()
    ax = h.plot()
    low, high = ax.get_ylim()
    assert high < values[0] and low <= min(values) and high >= max(values[1:])
    assert any("start 2e+07 (above the axis)" == t.get_text() for t in ax.texts)


def test_tol_line_on_the_right_axis_above_the_objective():
    h, values = _history()
    ax = h.plot()
    tol_lines = [ln for a in ax.figure.axes for ln in a.get_lines() if ln.get_label().startswith("tol = ")]
    assert len(tol_lines) == 1
    twin = tol_lines[0].axes
    assert twin is not ax and twin.get_shared_x_axes().joined(twin, ax)  # the right axis, same steps
    assert "relative change" in twin.get_ylabel()
    # in axes fractions the tol line sits above every point of the objective curve after its start
    t_lo, t_hi = np.log10(twin.get_ylim())
    tol_frac = (np.log10(1e-5) - t_lo) / (t_hi - t_lo)
    lo, hi = np.log10(ax.get_ylim())
    curve = (np.log10(values[1:]) - lo) / (hi - lo)
    assert curve.max() < tol_frac <= 1


def test_cli_plot_uses_the_same_objective_panel(tmp_path):
    from torchnmf.cli import main

    X = np.random.RandomState(0).poisson(3.0, size=(40, 16)).astype(float)
    np.save(tmp_path / "x.npy", X)
    assert main(["fit", str(tmp_path / "x.npy"), "--model", "nmf", "--rank", "5", "--max-iter", "30", "--quiet",
                 "-o", str(tmp_path / "f")]) == 0
    shown = []
    import matplotlib.figure

    orig = matplotlib.figure.Figure.savefig
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: (shown.append(self), orig(self, *a, **k)))
        assert main(["plot", str(tmp_path / "f"), "--components", "3"]) == 0
    fig = shown[0]
    assert fig._suptitle.get_text() == "3 of 5 components shown"
    tol_lines = [ln for a in fig.axes for ln in a.get_lines() if ln.get_label().startswith("tol = ")]
    assert len(tol_lines) == 1 and "relative change" in tol_lines[0].axes.get_ylabel()


# -- top features: markers, not features large in every component -----------------------------
def _planted(K=4, markers=3, shared=2.5, seed=0):
    """Loadings with ``markers`` specific features per component and one feature large in all."""
    rng = np.random.RandomState(seed)
    W = rng.uniform(0, 0.01, size=(1 + K * markers + 20, K))  # 20 background features
    W[0] = shared  # the housekeeping feature: the largest loading of every component
    for k in range(K):
        W[1 + k * markers: 1 + (k + 1) * markers, k] = rng.uniform(0.8, 1.0, size=markers)
    return W * rng.uniform(0.5, 20, size=K)  # components on different scales (NMF leaves it to H)


def test_specificity_ranks_markers_above_a_shared_large_feature():
    K, m = 4, 3
    W = _planted(K, m)
    for k in range(K):
        assert top_features(W, k, 1, "loading")[0] == 0  # raw: the shared feature tops every component
        assert set(top_features(W, k, m)) == set(range(1 + k * m, 1 + (k + 1) * m))  # default: its markers
    scores = feature_scores(W)
    assert scores.shape == W.shape and (scores >= 0).all()
    np.testing.assert_array_equal(feature_scores(W, "loading"), W)
    np.testing.assert_allclose(feature_scores(W * 7.0), scores)  # scale-free
    with pytest.raises(ValueError, match="ranking must be one of"):
        feature_scores(W, "zscore")


def test_bars_rank_by_specificity_by_default():
    W = _planted()
    names = [f"g{j}" for j in range(W.shape[0])]
    fig = plot_components(W, names=names, top=3, order=[0])
    a = fig.axes[0]
    assert sorted(t.get_text() for t in a.get_yticklabels()) == ["g1", "g2", "g3"]
    assert a.get_xlabel() == "specificity"
    fig = plot_components(W, names=names, top=3, order=[0], ranking="loading")
    assert fig.axes[0].get_yticklabels()[-1].get_text() == "g0" and fig.axes[0].get_xlabel() == "weight"
