"""Drawing fits: objective histories, and components as images (parts of pictures) or as bars of their top features."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["plot_components", "plot_objective", "component_order", "check_image_shape", "feature_scores",
           "top_features", "RANKINGS"]

#: How :func:`top_features` ranks a component's features: by ``'specificity'`` (the default) or raw ``'loading'``.
RANKINGS = ("specificity", "loading")


def check_image_shape(image_shape, n_features: int) -> Optional[Tuple[int, int]]:
    """Validate ``image_shape`` = ``(height, width)`` against ``n_features`` pixels.

    Returns
    -------
    tuple of int or None
        ``None`` when ``image_shape`` is ``None``.

    Raises
    ------
    ValueError, TypeError
        Not two positive integers, or ``height * width != n_features``.
    """
    if image_shape is None:
        return None
    try:
        h, w = (int(v) for v in image_shape)
        ok = all(float(v) == int(v) for v in image_shape)
    except (TypeError, ValueError):
        raise TypeError(f"image_shape must be two integers (height, width), got {image_shape!r}") from None
    if not ok or h <= 0 or w <= 0:
        raise ValueError(f"image_shape must be two positive integers (height, width), got {image_shape!r}")
    if h * w != n_features:
        raise ValueError(f"image_shape {h}x{w} = {h * w} pixels does not match the {n_features} features")
    return h, w


def component_order(W: np.ndarray, H: Optional[np.ndarray] = None) -> np.ndarray:
    """Components sorted by their total contribution ``sum(H[:, k]) * sum(W[:, k])``, largest first.

    Parameters
    ----------
    W : ndarray, shape (n_features, K)
    H : ndarray, shape (n_samples, K), optional
        Without it, by ``sum(W[:, k])``.

    Returns
    -------
    ndarray of int, shape (K,)
    """
    weight = W.sum(0) * (H.sum(0) if H is not None else 1.0)
    return np.argsort(-weight, kind="stable")


def feature_scores(W, ranking: str = "specificity") -> np.ndarray:
    """Each feature's score in each component, by which :func:`top_features` ranks them.

    ``'loading'``: the loading ``W[j, k]`` itself. Raw loadings put features that are large
    everywhere (housekeeping genes such as FTL, B2M; stop words) at the top of every component.

    ``'specificity'``: with every component scaled to total 1 (``P = W / W.sum(0)``, so a
    component's scale, which NMF leaves to ``H``, does not matter), the feature's share in the
    component times the part of the feature's total over components that lies in it,
    ``P[j, k] * P[j, k] / sum_l P[j, l]``. A feature spread evenly over ``K`` components is
    discounted ``K``-fold; a marker found in one component keeps its share. The share alone
    (``P[j, k] / sum_l P[j, l]``) would rank a barely used feature that happens to sit in one
    component as high as a real marker, and cNMF's z-scored program scores need the data and
    a regression, not just the factors; the product needs only ``W``.

    Parameters
    ----------
    W : array-like, shape (n_features, K)
        One component per column (``components_.T`` of an estimator). Non-negative.
    ranking : {'specificity', 'loading'}, default 'specificity'

    Returns
    -------
    ndarray, shape (n_features, K)
    """
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"W must have shape (n_features, n_components), got {W.shape}")
    if ranking == "loading":
        return W
    with np.errstate(invalid="ignore", divide="ignore"):
        P = np.nan_to_num(W / W.sum(0, keepdims=True))
        share = np.nan_to_num(P / P.sum(1, keepdims=True))
    return P * share


def top_features(W, k: int, top: int = 10, ranking: str = "specificity") -> np.ndarray:
    """The indices of component ``k``'s ``top`` features, best first.

    Parameters
    ----------
    W : array-like, shape (n_features, K)
    k : int
        The component (column of ``W``).
    top : int, default 10
    ranking : {'specificity', 'loading'}, default 'specificity'
        See :func:`feature_scores`.

    Returns
    -------
    ndarray of int, shape (min(top, n_features),)
        Ties keep the features' order.
    """
    return np.argsort(-feature_scores(W, ranking)[:, k], kind="stable")[:top]


def plot_components(W, *, image_shape: Optional[Sequence[int]] = None, names: Optional[Sequence[str]] = None,
                    top: int = 10, order: Optional[Sequence[int]] = None, max_components: int = 16,
                    axes=None, cols: int = 8, cmap: str = "gray_r", ranking: str = "specificity"):
    """Draw components as images or as horizontal bars of their ``top`` features.

    Parameters
    ----------
    W : array-like, shape (n_features, K)
        One component per column (``components_.T`` of an estimator).
    image_shape : (int, int), optional
        ``(height, width)`` with ``height * width == n_features``: draw each component as an
        image of that shape. Default: bar charts.
    names : sequence of str, shape (n_features,), optional
        Feature names for the bar labels (default ``feature j``).
    top : int, default 10
        Features per bar chart.
    order : sequence of int, optional
        Which components to draw, in order (default all, by :func:`component_order`).
    max_components : int, default 16
        At most this many are drawn; when fewer than ``K`` are, the figure's title says
        "16 of 25 components shown".
    axes : sequence of matplotlib Axes, optional
        Draw into these (at least as many as components drawn); default: a new figure with
        ``cols`` axes per row.
    cols : int, default 8
    cmap : str, default 'gray_r'
    ranking : {'specificity', 'loading'}, default 'specificity'
        How the bar charts pick and draw their features (:func:`feature_scores`): by
        specificity, so that markers, not features large in every component, lead; or by
        raw loading (the bars then show the loadings).

    Returns
    -------
    matplotlib.figure.Figure
        The figure of the axes drawn on.

    Raises
    ------
    ValueError, TypeError
        Bad ``image_shape``, ``top``, ``max_components``, ``order`` or ``names``.
    """
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"W must have shape (n_features, n_components), got {W.shape}")
    n_features, K = W.shape
    shape = check_image_shape(image_shape, n_features)
    scores = feature_scores(W, ranking) if shape is None else W
    for value, label in ((top, "top"), (max_components, "max_components"), (cols, "cols")):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if names is not None and len(names) != n_features:
        raise ValueError(f"names has {len(names)} entries for {n_features} features")
    order = component_order(W) if order is None else np.asarray(order, dtype=int)
    if order.size and (order.min() < 0 or order.max() >= K):
        raise ValueError(f"order must index the {K} components, got {order.tolist()}")
    order = order[:max_components]
    import matplotlib.pyplot as plt

    if axes is None:
        c = min(len(order), cols)
        rows = int(math.ceil(len(order) / c))
        size = (1.6, 1.6) if shape else (2.6, 0.25 * min(top, n_features) + 0.8)
        fig, grid = plt.subplots(rows, c, figsize=(size[0] * c + 0.4, size[1] * rows + 0.4), squeeze=False)
        axes = list(grid.ravel())
        for a in axes[len(order):]:
            a.remove()
    axes = list(axes)
    if len(axes) < len(order):
        raise ValueError(f"{len(axes)} axes for {len(order)} components")
    for a, k in zip(axes, order):
        w = W[:, k]
        if shape:
            a.imshow(w.reshape(shape), cmap=cmap, interpolation="nearest")
            a.set_xticks([])
            a.set_yticks([])
        else:
            s = scores[:, k]
            idx = np.argsort(-s, kind="stable")[:top][::-1]  # best at the top
            a.barh(np.arange(len(idx)), s[idx], color="tab:blue")
            a.set_yticks(np.arange(len(idx)))
            labels = [str(names[j]) if names is not None else f"feature {j}" for j in idx]
            a.set_yticklabels(labels, fontsize=7)
            a.tick_params(axis="x", labelsize=6)
            a.set_xlabel("weight" if ranking == "loading" else "specificity", fontsize=7)
        a.set_title(f"component {k}", fontsize=8)
    fig = axes[0].figure if axes else plt.figure()
    if len(order) < K:  # say so: a grid of 16 reads as "all of them"
        fig.suptitle(f"{len(order)} of {K} components shown", fontsize="medium")
    return fig


def _limits(lo: float, hi: float, bottom: float, top: float, log: bool) -> Tuple[float, float]:
    """Axis limits that put the data range ``[lo, hi]`` at axes fractions ``[bottom, top]``."""
    f = np.log10 if log else (lambda v: v)
    a, b = float(f(lo)), float(f(hi))
    if not b > a:  # a flat curve: give it a unit (or one decade) of room
        pad = 0.5 if log or a == 0 else 0.05 * abs(a)
        a, b = a - pad, b + pad
    span = (b - a) / (top - bottom)
    low = a - bottom * span
    high = low + span
    return (10.0 ** low, 10.0 ** high) if log else (low, high)


def plot_objective(ax, steps, values, *, name: str = "objective", changes=None, tol: Optional[float] = None,
                   maximize: bool = False, logy: Optional[bool] = None):
    """Draw an objective history on ``ax`` and the stop rule's view on a right axis.

    Two things keep the curve readable: a start far outside the later values (the first
    objective of a fit is often orders of magnitude above the rest) is left off the axis,
    whose range starts after the first step, with its value written in a corner; and with a
    tolerance the relative change and the ``tol`` line get a right axis of their own whose
    band (top for a minimised objective, bottom for a maximised one) does not overlap the
    objective's, so the ``tol`` line never sits on the objective curve.

    Parameters
    ----------
    ax : matplotlib Axes
    steps : sequence of int, shape (n,)
        The step of each value.
    values : sequence of float, shape (n,)
    name : str, default 'objective'
        Label of the curve and the left axis.
    changes : sequence of float, shape (n,), optional
        The relative change per step the stop rule read at each value (``nan`` where none).
    tol : float, optional
        The tolerance; drawn (with ``changes``) on the right axis.
    maximize : bool, default False
        The objective is maximised (an ELBO).
    logy : bool, optional
        Log scale for the objective; default when every value is positive and ``maximize`` is False.

    Returns
    -------
    matplotlib Axes or None
        The right axis holding the relative change and the ``tol`` line (``None`` when not drawn).
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    steps = np.asarray(steps, dtype=np.float64).ravel()
    if logy is None:
        logy = bool(values.size) and not maximize and bool((values > 0).all())
    ax.plot(steps, values, label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    twin = None
    ok = np.zeros(0, dtype=bool)
    if changes is not None and tol:
        changes = np.asarray(changes, dtype=np.float64).ravel()
        ok = np.isfinite(changes) & (changes > 0)
    if ok.any():
        twin = ax.twinx()
        twin.plot(steps[ok], changes[ok], color="tab:gray", lw=1, alpha=0.8, label="relative change")
        twin.axhline(tol, color="tab:red", ls="--", lw=1, label=f"tol = {tol:g}")
        twin.set_yscale("log")
        twin.set_ylabel("relative change per step (right)", color="tab:gray")
        twin.tick_params(axis="y", colors="tab:gray")
        band = (0.03, 0.34) if maximize else (0.66, 0.97)
        lo, hi = min(changes[ok].min(), tol), max(changes[ok].max(), tol)
        limits = _limits(lo, hi, *band, log=True)
        first, last = int(math.floor(math.log10(lo))), int(math.ceil(math.log10(hi)))
        every = max(1, (last - first + 4) // 5)  # ticks in the band only, at most about 5 of them
        twin.set_yticks([10.0 ** e for e in range(first, last + 1, every)])
        twin.minorticks_off()
        twin.set_ylim(*limits)
    finite = values[np.isfinite(values)]
    if finite.size:
        f = np.log10 if logy else (lambda v: v)
        rest = values[1:][np.isfinite(values[1:])] if values.size >= 3 else finite
        rest = rest if rest.size else finite
        lo, hi = float(rest.min()), float(rest.max())
        first, span = float(f(values[0])) if np.isfinite(values[0]) else np.nan, float(f(hi) - f(lo))
        off = values.size >= 3 and np.isfinite(first) and (first > f(hi) + span or first < f(lo) - span)
        if not off:
            lo, hi = float(finite.min()), float(finite.max())
        band = (0.04, 0.96) if twin is None else ((0.42, 0.97) if maximize else (0.03, 0.58))
        if off or twin is not None:
            ax.set_ylim(*_limits(lo, hi, *band, log=logy))
        if off:
            where = "above" if first > f(hi) else "below"
            ax.text(0.01, 0.99 if where == "above" else 0.01, f"start {values[0]:.3g} ({where} the axis)",
                    transform=ax.transAxes, fontsize="x-small", color="tab:blue",
                    va="top" if where == "above" else "bottom", ha="left")
    handles, labels = ax.get_legend_handles_labels()
    if twin is not None:
        h2, l2 = twin.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    (twin or ax).legend(handles, labels, loc="center right", fontsize="small", framealpha=0.8)
    return twin
