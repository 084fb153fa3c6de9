"""Drawing fitted components: as images (parts of pictures) or as bars of their top features."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["plot_components", "component_order", "check_image_shape"]


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


def plot_components(W, *, image_shape: Optional[Sequence[int]] = None, names: Optional[Sequence[str]] = None,
                    top: int = 10, order: Optional[Sequence[int]] = None, max_components: int = 16,
                    axes=None, cols: int = 8, cmap: str = "gray_r"):
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
        At most this many are drawn.
    axes : sequence of matplotlib Axes, optional
        Draw into these (at least as many as components drawn); default: a new figure with
        ``cols`` axes per row.
    cols : int, default 8
    cmap : str, default 'gray_r'

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
            idx = np.argsort(-w, kind="stable")[:top][::-1]  # largest at the top
            a.barh(np.arange(len(idx)), w[idx], color="tab:blue")
            a.set_yticks(np.arange(len(idx)))
            labels = [str(names[j]) if names is not None else f"feature {j}" for j in idx]
            a.set_yticklabels(labels, fontsize=7)
            a.tick_params(axis="x", labelsize=6)
            a.set_xlabel("weight", fontsize=7)
        a.set_title(f"component {k}", fontsize=8)
    return axes[0].figure if axes else plt.figure()
