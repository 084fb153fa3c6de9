import numpy as np
import pandas as pd
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from torchnmf.plotting import check_image_shape, component_order, plot_components  # noqa: E402


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
    fig = plot_components(W, names=names, top=3)
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
