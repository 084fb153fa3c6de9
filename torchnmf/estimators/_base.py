"""Machinery shared by torchnmf's scikit-learn estimators.

Input conversion (numpy, scipy.sparse, pandas DataFrame, torch on any device) with
scikit-learn's validation messages for array-likes and :mod:`torchnmf.data` for tensors,
``device='auto'``, the ``dtype`` rule, ``random_state`` as a :class:`torch.Generator`,
the objective history with progress bar, and the output type (numpy for array-like input,
a tensor on the input's device for tensor input, or whatever :meth:`set_output` asks for).
"""
from __future__ import annotations

import copy
import os
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils import parametrize

from ..data import as_tensor, check_finite, check_magnitude, check_nonnegative, is_sparse
from ..history import History, plot_history
from ..init import check_random_state

try:
    from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted
except ImportError as err:  # pragma: no cover - optional dependency
    raise ImportError("torchnmf.estimators needs scikit-learn: pip install scikit-learn") from err

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn
    def _validate_data(est, X, reset=True, **kw):
        return est._validate_data(X, reset=reset, **kw)

try:
    from sklearn.utils._set_output import _get_output_config
except ImportError:  # pragma: no cover
    _get_output_config = None

__all__ = ["TorchFactorization", "NotFittedError", "resolve_device", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float": torch.float32, "double": torch.float64}


def resolve_device(device: Union[str, torch.device, None]) -> Optional[torch.device]:
    """``'auto'`` -> cuda when available else cpu; ``None`` -> ``None`` (follow the input)."""
    if device is None:
        return None
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', None or a torch device such as 'cpu' or 'cuda'; got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for cuda, which is not available here; use device='auto'")
    if dev.type == "meta":
        raise ValueError("device='meta' holds shapes but no values; an estimator needs data with values "
                         "('cpu', 'cuda' or 'auto')")
    return dev


def resolve_dtype(dtype, default: torch.dtype) -> torch.dtype:
    """``None`` -> ``default``; a name (``'float32'``...), numpy or torch floating dtype otherwise."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        out = dtype
    elif isinstance(dtype, str) and dtype in _DTYPES:
        out = _DTYPES[dtype]
    else:
        try:
            out = {np.dtype("float32"): torch.float32, np.dtype("float64"): torch.float64}[np.dtype(dtype)]
        except (TypeError, KeyError):
            raise ValueError(f"dtype must be None, 'float32' or 'float64'; got {dtype!r}") from None
    if out not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be None, 'float32' or 'float64'; got {dtype!r}")
    return out


def _unparametrized_copy(module: torch.nn.Module):
    """A deep copy of ``module`` whose parametrized tensors are plain again (their raw values).

    Returns the copy and ``[(submodule path, tensor name, parametrizations), ...]``. Not
    :func:`torch.nn.utils.parametrize.remove_parametrizations`: the copy shares its dynamic
    class with ``module``, and removing deletes the property from that class, breaking ``module``.
    """
    copied = copy.deepcopy(module)
    found = []
    for path, sub in list(copied.named_modules()):
        if not parametrize.is_parametrized(sub):
            continue
        plain = {}
        for name, plist in sub.parametrizations.items():
            if not hasattr(plist, "original"):  # pragma: no cover - multi-tensor right_inverse: not used here
                raise TypeError(f"cannot pickle the parametrization of {name!r} in {type(module).__name__}")
            found.append((path, name, list(plist)))
            plain[name] = plist.original
        del sub._modules["parametrizations"]
        sub.__class__ = sub.__class__.__bases__[0]  # this copy only: the shared class stays as it is
        for name, raw in plain.items():
            if isinstance(raw, torch.nn.Parameter):
                sub._parameters[name] = raw
            else:
                sub._buffers[name] = raw
    return copied, found


class TorchFactorization(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Base class of torchnmf's estimators (not used directly).

    Subclasses define ``__init__`` with their hyperparameters, among them ``device``,
    ``dtype``, ``random_state`` and ``verbose``, and use the helpers below.

    Conventions
    -----------
    - ``X`` has shape ``(n_samples, n_features)``: numpy, scipy.sparse, pandas DataFrame or a
      torch tensor (dense or sparse, cpu or cuda). It is never modified.
    - An :class:`anndata.AnnData` (or an ``.h5ad`` path) is read by :mod:`torchnmf.anndata_io`:
      ``fit``/``transform`` take ``layer=`` (default ``X``) and ``use_highly_variable=``
      (default: ``var['highly_variable']`` when present, as :func:`scanpy.tl.pca`), and the gene
      names become ``feature_names_in_``; ``transform`` takes the fitted genes by name.
    - ``device='auto'`` computes on cuda when available; ``None`` follows a tensor input's
      device (cpu for other input).
    - ``dtype=None`` keeps float32 / float64 input as it is and computes other input in
      float64; ``'float32'`` or ``'float64'`` forces one.
    - Outputs are numpy arrays for array-like input and tensors on the input's device for
      tensor input, unless :meth:`set_output` asks for pandas or polars.
    - ``history_`` is a :class:`torchnmf.history.History` of the objective per iteration.
    """

    @property
    def _public_name(self) -> str:
        """The estimator's name in messages and progress bars: a compat wrapper's internal core
        (e.g. ``compat.pnmf._Plain``) sets ``_display_name`` to the class the user made."""
        return getattr(type(self), "_display_name", type(self).__name__)

    # -- input -----------------------------------------------------------------
    def _check_X(self, X, *, reset: bool, counts: bool = False, allow_noninteger: bool = False,
                 escape: Optional[str] = None) -> Tensor:
        """Validate and convert ``X`` to a tensor on the estimator's device and dtype."""
        device = resolve_device(getattr(self, "device", "auto"))
        X = self._adata_in(X, reset=reset)
        names = None
        if getattr(X, "_torchnmf_adata", False):  # an AnnData's matrix (torchnmf.anndata_io.Selection)
            X, names = X.tensor(), X.feature_names
        if isinstance(X, Tensor):
            T = as_tensor(X, "X", ndim=2, float_only=False)
            if 0 in T.shape:
                raise ValueError(f"X has shape {tuple(T.shape)}; at least one sample and one feature are required")
            check_finite(T, "X")
            if reset:
                self.n_features_in_ = int(T.shape[1])
                if hasattr(self, "feature_names_in_"):
                    del self.feature_names_in_
                if names is not None:
                    self.feature_names_in_ = names
            elif T.shape[1] != self.n_features_in_:
                raise ValueError(
                    f"X has {T.shape[1]} features, but {self._public_name} is expecting "
                    f"{self.n_features_in_} features as input"
                )
            default = T.dtype if T.dtype in (torch.float32, torch.float64) else torch.float64
            dtype = resolve_dtype(getattr(self, "dtype", None), default)
            T = T.to(device=device if device is not None else T.device, dtype=dtype)
        else:
            try:
                A = _validate_data(self, X, reset=reset, accept_sparse=("csr", "csc", "coo"),
                                   dtype=[np.float64, np.float32])
            except (ValueError, TypeError) as err:
                if type(err) not in (ValueError, TypeError):
                    raise
                # scikit-learn's message ("Expected 2D array, got scalar array instead", ...)
                # does not say which argument: name it, keep its advice
                msg = str(err).replace(type(self).__name__, self._public_name)
                raise type(err)(msg if msg.startswith("X ") else f"X (shape (n_samples, n_features)): {msg}") from None
            dtype = resolve_dtype(getattr(self, "dtype", None),
                                  torch.float32 if A.dtype == np.float32 else torch.float64)
            T = as_tensor(A, "X", dtype=dtype, device=device)
        vals = T.coalesce().values() if T.layout == torch.sparse_coo else (T.values() if is_sparse(T) else T)
        if vals.numel() and bool((vals < 0).any()):
            # scikit-learn's wording, which its estimator checks look for
            raise ValueError(f"Negative values in data passed to {self._public_name}: X must be non-negative, "
                             f"got minimum {float(vals.min()):.4g}")
        if counts:
            from ..data import check_counts

            T = check_counts(T, "X", allow_noninteger=allow_noninteger, escape=escape)
        else:
            check_nonnegative(T, "X")
        check_magnitude(T, "X")
        return T

    def _adata_in(self, X, layer: Optional[str] = None, use_highly_variable: Optional[bool] = None, *,
                  reset: bool, counts: bool = False):
        """``X`` itself, or for an AnnData (or an .h5ad path) its matrix with the gene names.

        The conversion lives in :mod:`torchnmf.anndata_io`, imported only when it is needed.
        """
        is_path = isinstance(X, (str, os.PathLike)) and os.fspath(X).lower().endswith(".h5ad")
        if type(X).__module__.split(".")[0] == "anndata" or is_path:
            from ..anndata_io import estimator_input

            return estimator_input(self, X, layer, use_highly_variable, reset=reset, counts=counts)
        if layer is not None or use_highly_variable is not None:
            raise TypeError(f"layer= and use_highly_variable= apply to AnnData input only, got X of type "
                            f"{type(X).__name__}")
        return X

    # -- output ----------------------------------------------------------------
    def _output(self, T: Tensor, like, method: str = "transform"):
        """Return ``T`` as the caller expects: a tensor for tensor input, else numpy."""
        T = T.detach()
        wants_default = True
        if _get_output_config is not None:
            wants_default = _get_output_config("transform", self)["dense"] == "default"
        if isinstance(like, Tensor) and wants_default:
            return T.to(like.device)
        return T.cpu().numpy()

    @staticmethod
    def _to_numpy(T: Tensor) -> np.ndarray:
        return T.detach().cpu().numpy()

    # -- randomness, history ---------------------------------------------------
    def _generator(self) -> torch.Generator:
        """A fresh generator from ``random_state`` (an int gives the same fit every time)."""
        return check_random_state(getattr(self, "random_state", None))

    def _new_history(self, name: str, maximize: bool = False, total: Optional[int] = None) -> History:
        # ``_phase``: the label an estimator fitted as a step of another gives this bar (no silent phases)
        return History(verbose=bool(getattr(self, "verbose", False)), total=total,
                       desc=getattr(self, "_phase", None) or self._public_name, name=name, maximize=maximize)

    def _bar(self, total: int, what: str):
        """A tqdm bar over ``total`` steps labelled ``'<estimator>: <what>'`` when ``verbose``, else ``None``."""
        if not getattr(self, "verbose", False):
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is an optional dependency
            raise ImportError("verbose progress bars need tqdm: pip install tqdm") from None
        return tqdm(total=total, desc=f"{self._public_name}: {what}", leave=False)

    def plot_history(self, ax=None, **kwargs):
        """Plot ``history_`` with matplotlib (see :func:`torchnmf.history.plot_history`).

        Returns
        -------
        matplotlib.axes.Axes
        """
        check_is_fitted(self, "history_")
        return plot_history(self.history_, ax=ax, **kwargs)

    def plot_components(self, image_shape=None, top: int = 10, max_components: int = 16, axes=None,
                        **kwargs):
        """Draw ``components_`` as images or as bars of their top features (named when known).

        Parameters
        ----------
        image_shape : (int, int), optional
            ``(height, width)`` with ``height * width == n_features_in_``: each component is
            drawn as an image (e.g. ``(8, 8)`` for scikit-learn's digits). Default: bars.
        top : int, default 10
            Features per bar chart, labelled by ``feature_names_in_`` when the input had
            column names.
        max_components : int, default 16
            Components drawn, the largest (by ``sum(components_[k])``) first.
        axes : sequence of matplotlib Axes, optional
            Draw into these instead of a new figure.
        **kwargs
            Passed to :func:`torchnmf.plotting.plot_components` (``cols``, ``cmap``, ``order``).

        Returns
        -------
        matplotlib.figure.Figure
        """
        check_is_fitted(self, "components_")
        from ..plotting import plot_components

        names = getattr(self, "feature_names_in_", None)
        return plot_components(np.asarray(self.components_).T, image_shape=image_shape, names=names, top=top,
                               max_components=max_components, axes=axes, **kwargs)

    # -- pickling ----------------------------------------------------------------
    def __getstate__(self):
        # torch refuses to pickle modules with parametrizations (softplus/exp positive
        # parameters): pickle a copy without them, with what is needed to put them back.
        state = dict(super().__getstate__())  # object.__getstate__ returns __dict__ itself: never edit it
        records = {}
        for key, value in list(state.items()):
            if isinstance(value, torch.nn.Module) and any(parametrize.is_parametrized(m) for m in value.modules()):
                state[key], records[key] = _unparametrized_copy(value)
        if records:
            state["_torchnmf_parametrizations"] = records
        return state

    def __setstate__(self, state):
        records = state.pop("_torchnmf_parametrizations", {})
        super().__setstate__(state)
        for key, found in records.items():
            module = getattr(self, key)
            for path, name, chain in found:
                sub = module.get_submodule(path)
                raw = getattr(sub, name).detach().clone()
                for p in chain:
                    parametrize.register_parametrization(sub, name, p, unsafe=True)
                with torch.no_grad():  # registering ran right_inverse on it: put the exact raw value back
                    getattr(sub.parametrizations, name).original.copy_(raw)

    # -- scikit-learn metadata -------------------------------------------------
    @property
    def _n_features_out(self):
        return self.n_components_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        tags.input_tags.sparse = True
        tags.requires_fit = True
        if tags.transformer_tags is not None:
            tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    def _more_tags(self):  # scikit-learn < 1.6
        return {"requires_positive_X": True, "preserves_dtype": [np.float64, np.float32]}

    def _check_fitted(self):
        check_is_fitted(self, "n_components_")
