"""Input checking and conversion, in one place so one mistake gets one message.

Every layer, trainer helper and estimator calls these. None of them writes to what the
user passed: a returned tensor may share memory with the input, so callers never modify it
in place.
"""
from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from typing import Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ._csr import csr_tensor, row_indices

__all__ = [
    "as_tensor",
    "check_finite",
    "check_nonnegative",
    "check_counts",
    "count_rule",
    "COUNT_TOL",
    "check_not_meta",
    "check_magnitude",
    "check_shape",
    "check_rank",
    "check_positive",
    "check_int",
    "check_real",
    "check_beta",
    "check_positive_vector",
    "check_option",
    "check_mask",
    "nonzeros",
    "is_sparse",
]

ArrayLike = Union[Tensor, np.ndarray, "scipy.sparse.spmatrix", Sequence]  # noqa: F821


def is_sparse(X: Tensor) -> bool:
    """Whether ``X`` is a torch sparse tensor (COO, CSR, CSC, BSR or BSC)."""
    return isinstance(X, Tensor) and X.layout != torch.strided


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside torchnmf, so a warning points at the user's call
    (as engine's; data is a leaf module and does not import it)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _native(A: np.ndarray) -> np.ndarray:
    """``A`` in a dtype torch reads: native byte order (``>f8`` -> ``float64``), ``longdouble`` as float64."""
    if A.dtype.kind == "f" and A.dtype.itemsize > 8:  # longdouble / float128: torch has no such dtype
        return A.astype(np.float64)
    if not A.dtype.isnative:
        return A.astype(A.dtype.newbyteorder("="))
    return A


def _from_scipy(X, dtype) -> Tensor:
    coo = X.tocoo()
    idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    vals = torch.from_numpy(_native(np.asarray(coo.data)))
    # scipy's indices are in range: skip torch's check (and its "checks implicitly disabled" warning)
    out = torch.sparse_coo_tensor(idx, vals, coo.shape, check_invariants=False)
    if dtype is not None:
        out = out.to(dtype)
    return out.coalesce()


def as_tensor(
    X,
    name: str = "X",
    *,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
    ndim: Union[int, Iterable[int], None] = None,
    sparse: str = "keep",
    float_only: bool = True,
) -> Tensor:
    """Convert array-like input to a tensor, checking type and dimensions.

    Parameters
    ----------
    X : Tensor, numpy array, scipy.sparse matrix, pandas DataFrame or nested sequence
        The input.
    name : str
        The argument's name, used in error messages.
    dtype : torch.dtype, optional
        Target floating dtype. Default: keep a floating tensor's dtype; convert integer
        or numpy input to ``torch.get_default_dtype()`` (float64 numpy stays float64).
    device : str or torch.device, optional
        Target device; default keeps a tensor's device (cpu for other input).
    ndim : int or iterable of int, optional
        Allowed numbers of dimensions.
    sparse : {'keep', 'dense', 'coo'}
        Keep sparse input sparse (scipy becomes torch COO), densify it, or make any
        input a coalesced COO tensor.
    float_only : bool
        Raise ``TypeError`` for a torch tensor of non-floating dtype instead of
        converting it. Numpy and python input is converted either way.

    Returns
    -------
    Tensor
        Detached from autograd (a tensor that requires grad, an ``nn.Parameter``, is data
        here); possibly sharing memory with ``X``: never write to it in place.

    Raises
    ------
    TypeError
        Non-numeric, boolean or complex input, or an integer tensor with ``float_only``.
    ValueError
        Wrong number of dimensions or unknown ``sparse``.
    """
    check_option(sparse, ("keep", "dense", "coo"), "sparse")
    if X is None:
        raise TypeError(f"{name} must be an array or tensor, got None")
    if hasattr(X, "tocoo") and hasattr(X, "nnz"):  # scipy.sparse
        if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
            raise TypeError(f"{name} must hold real numbers, got dtype {X.dtype}")
        if X.dtype == np.bool_:
            raise TypeError(f"{name} must hold real numbers, got dtype bool")
        target = dtype or (torch.float64 if _native(np.empty(0, X.dtype)).dtype == np.float64
                           else torch.get_default_dtype())
        T = _from_scipy(X, target)
    elif isinstance(X, Tensor):
        T = check_not_meta(X, name)  # before any conversion, which would fail obscurely
        # data, not a parameter: a fit's backward must neither run through the caller's graph
        # (a second backward fails) nor write into its .grad
        if T.requires_grad:
            T = T.detach()
        if T.dtype == torch.bool or T.is_complex():
            raise TypeError(f"{name} must hold real numbers, got dtype {T.dtype}")
        if not T.is_floating_point():
            if float_only:
                raise TypeError(
                    f"{name} must be a floating-point tensor, got dtype {T.dtype}; "
                    f"convert it with {name}.float() or {name}.double()"
                )
            T = T.to(dtype or torch.get_default_dtype())
    else:
        if hasattr(X, "to_numpy"):  # pandas
            X = X.to_numpy()
        try:
            A = np.asarray(X)
        except Exception as err:  # ragged lists and the like
            raise TypeError(f"{name} could not be read as an array: {err}") from None
        if A.dtype == np.bool_ or A.dtype.kind not in "iuf":
            raise TypeError(f"{name} must hold real numbers, got dtype {A.dtype}")
        A = _native(A)  # big-endian and longdouble arrays: torch cannot read them as they are
        target = dtype or (torch.float64 if A.dtype == np.float64 else torch.get_default_dtype())
        T = torch.as_tensor(np.ascontiguousarray(A), dtype=target)
    if dtype is not None and T.dtype != dtype:
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        T = T.to(dtype)
    if device is not None:
        T = T.to(device)
    check_not_meta(T, name)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if T.dim() not in allowed:
            raise ValueError(
                f"{name} must have {' or '.join(map(str, allowed))} dimensions, "
                f"got shape {tuple(T.shape)}"
            )
    if sparse == "dense" and is_sparse(T):
        T = T.to_dense()
    elif sparse == "coo":
        T = T.to_sparse_coo() if T.layout != torch.sparse_coo else T
        T = T.coalesce()
    return T


def check_not_meta(X, name: str = "X"):
    """Raise ``TypeError`` if ``X`` is a tensor on the ``meta`` device; return ``X``.

    Meta tensors have shapes but no values: every fit, initialisation and check reads values,
    so they are refused up front with this message instead of failing deep inside (e.g.
    "Tensor.item() cannot be called on meta tensors"). Shape-only dry runs are not supported.
    """
    if isinstance(X, Tensor) and X.is_meta:
        raise TypeError(f"{name} is on the meta device, which holds shapes but no values; torchnmf needs "
                        f"data with values: create {name} on 'cpu' or 'cuda'")
    return X


def _values(X: Tensor) -> Tensor:
    """The stored values of ``X`` as the matrix holds them (an uncoalesced COO is summed first:
    its duplicates 1.5 + 1.5 are one count of 3, and -1 + 2 one non-negative entry)."""
    if X.layout == torch.sparse_coo:
        return X.coalesce().values()
    if X.layout in (torch.sparse_csr, torch.sparse_bsr):
        return X.values()
    if X.layout in (torch.sparse_csc, torch.sparse_bsc):
        return X.values()
    return X


def check_finite(X: Tensor, name: str = "X") -> Tensor:
    """Raise ``ValueError`` if ``X`` (dense or sparse) holds NaN or infinity; return ``X``."""
    v = _values(X)
    if v.is_floating_point() and v.numel() and not _finite_range(v):
        raise ValueError(f"{name} contains NaN or infinity")
    return X


def _finite_range(v: Tensor) -> bool:
    """Whether every value of ``v`` (non-empty, floating) is finite, from its min and max alone.

    ``aminmax`` propagates NaN and keeps infinities, so both ends are finite exactly when all
    values are; unlike ``isfinite(v).all()`` it makes no ``v``-sized temporaries (``isfinite``
    took 2.7 MiB for a 1.6 MiB block).
    """
    lo, hi = torch.aminmax(v)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_nonnegative(X: Tensor, name: str = "X") -> Tensor:
    """Raise ``ValueError`` if ``X`` holds NaN, infinity or negative values; return ``X``."""
    check_finite(X, name)
    v = _values(X)
    if v.numel() and float(v.min()) < 0:
        raise ValueError(f"{name} must be non-negative, got minimum {float(v.min()):.4g}")
    return X


#: Values checked at once by check_counts and check_magnitude (their temporaries: a few MiB).
_CHECK_BLOCK = 1 << 18


def check_magnitude(X: Tensor, name: str = "X", dtype: Optional[torch.dtype] = None,
                    beta: Optional[float] = None) -> Tensor:
    """Raise ``ValueError`` if ``X`` is too large for a factorization's arithmetic in ``dtype``.

    Objectives sum ``x log x`` (or ``x``, ``x²``) over every entry and reconstructions sum
    products over the rank: a float32 ``X`` whose entries approach 3.4e38 gives infinite
    objectives and NaN factors. ``X`` is refused, with its size and the dtype's range, when
    ``Σ |x| (1 + log max(|x|, 1))`` (accumulated in float64) exceeds ``finfo(dtype).max / 1024``;
    with ``beta > 1`` also when ``Σ |x|^beta`` does (the beta-divergence's terms, and the
    Gram products of its multiplicative updates: ``Σ x²`` for beta = 2).

    Parameters
    ----------
    X : Tensor, shape (...)
        Dense or sparse, finite.
    name : str
        Argument name for the message.
    dtype : torch.dtype, optional
        Dtype the computation runs in; default ``X.dtype``.
    beta : float, optional
        The beta-divergence the computation evaluates (default: ``x log x`` terms only).

    Returns
    -------
    Tensor
        ``X`` itself.
    """
    check_not_meta(X, name)  # no values to measure
    v = _values(X)
    dtype = dtype or X.dtype
    if not v.numel() or not v.is_floating_point() or not dtype.is_floating_point:
        return X
    limit = torch.finfo(dtype).max / 1024
    lo, hi = (float(t) for t in torch.aminmax(v))
    amax = max(abs(lo), abs(hi))
    # in blocks of _CHECK_BLOCK values: float64 and |v| temporaries of a block, not of V (V may be large)
    v = v if v.dim() else v.reshape(1)  # blocks along the first dimension (rows of a dense X)
    total = sum(float((b if lo >= 0 else b.abs()).sum(dtype=torch.float64)) for b in v.split(_CHECK_BLOCK))
    total *= 1.0 + math.log(max(amax, 1.0))
    terms = "Σ x log x"
    if beta is not None and beta > 1 and amax > 0 and total <= limit:
        # Σ |x|^beta as amax^beta Σ (|x| / amax)^beta, in float64 and in logs (no overflow here)
        powers = sum(float(((b if lo >= 0 else b.abs()).to(torch.float64) / amax).pow_(beta).sum())
                     for b in v.split(_CHECK_BLOCK))
        log_total = beta * math.log(amax) + math.log(max(powers, 1e-300))
        total = math.exp(min(log_total, 709.0))
        terms = f"Σ x^{beta:g}"
    if total > limit:
        raise ValueError(
            f"{name} is too large for {str(dtype).replace('torch.', '')} arithmetic: its largest entry is "
            f"{amax:.3g} and its objective terms ({terms}) reach {total:.3g}, which overflows the dtype "
            f"(max {torch.finfo(dtype).max:.3g}); divide {name} by a constant or use float64"
        )
    return X


#: Values within this distance of an integer are counts stored as floats (the noise of a saved
#: or pandas-read count, e.g. 3.0000000000004) and are rounded; farther ones are not counts.
COUNT_TOL = 1e-6


def count_rule(values: Tensor, tol: float = COUNT_TOL) -> Tuple[Tensor, Tensor, Tensor]:
    """The one rule for float-valued counts, used by every count model and the command line.

    A value within ``tol`` of an integer (or within a few float64 ulps of it, for values so
    large that ``tol`` is below their spacing) is that integer stored as a float; any other
    value is not a count.

    Parameters
    ----------
    values : Tensor, shape (n,)
        Finite floating values (any dtype; float16/bfloat16 are checked in float32).
    tol : float, default COUNT_TOL (1e-6)

    Returns
    -------
    rounded : Tensor, shape (n,)
        The nearest integers, in the dtype of ``values``.
    changed : BoolTensor, shape (n,)
        Values that rounding changes.
    bad : BoolTensor, shape (n,)
        Values farther than ``tol`` from every integer.
    """
    v = values.float() if values.dtype in (torch.float16, torch.bfloat16) else values
    r = torch.round(v)
    d = (v - r).abs()
    slack = torch.clamp(v.abs() * (8 * float(np.finfo(np.float64).eps)), min=tol)
    return r.to(values.dtype), d > 0, d > slack


def _first(X: Tensor, mask: Tensor) -> Tuple[int, int, float]:
    """Row, column and value of the first (row-major) entry of 2-D ``X`` whose stored value is in ``mask``."""
    v = _values(X)
    if X.layout == torch.strided:
        flat = int(torch.nonzero(mask.reshape(-1))[0])
        i, j = divmod(flat, X.shape[-1]) if X.dim() == 2 else (flat, 0)
        return i, j, float(v.reshape(-1)[flat])
    k = torch.nonzero(mask).reshape(-1)
    if X.layout == torch.sparse_coo:
        rows, cols = X.coalesce().indices()[:2]
    elif X.layout == torch.sparse_csr:
        crow, cols = X.crow_indices(), X.col_indices()
        rows = row_indices(crow)
    elif X.layout == torch.sparse_csc:
        ccol, rows = X.ccol_indices(), X.row_indices()
        cols = row_indices(ccol)  # the column of each entry, from the CSC column pointers
    else:  # blocked layouts: report the first block's entry
        return 0, 0, float(v.reshape(-1)[int(k[0])])
    key = rows[k].long() * int(X.shape[1]) + cols[k].long()
    m = int(k[int(torch.argmin(key))])
    return int(rows[m]), int(cols[m]), float(v[m])


def _with_values(X: Tensor, values: Tensor) -> Tensor:
    """A new tensor with ``X``'s layout and pattern and ``values`` as its stored values."""
    if X.layout == torch.strided:
        return values
    if X.layout == torch.sparse_coo:
        C = X.coalesce()
        return torch.sparse_coo_tensor(C.indices(), values, C.shape, check_invariants=False).coalesce()
    if X.layout == torch.sparse_csr:
        return csr_tensor(X.crow_indices(), X.col_indices(), values, tuple(X.shape))
    if X.layout == torch.sparse_csc:
        return torch.sparse_csc_tensor(X.ccol_indices(), X.row_indices(), values, X.shape)
    return _with_values(X.to_sparse_coo(), values)


def _not_counts_message(name: str, where: str, value: float) -> str:
    """What is wrong with a value that is not a count (shared by the library and the command line,
    which add their own advice)."""
    return (f"{name} must hold counts (non-negative integers), but {where} holds {value!r}, which is not "
            f"within {COUNT_TOL:g} of an integer")


def check_counts(X: Tensor, name: str = "X", allow_noninteger: bool = False, *,
                 escape: Optional[str] = None) -> Tensor:
    """Check ``X`` holds finite non-negative counts; round counts stored as floats.

    The rule of :func:`count_rule`: values within :data:`COUNT_TOL` of an integer are rounded
    (with a ``UserWarning`` saying how many), any other non-integer is refused with a
    ``ValueError`` naming the first one (row, column, value) and the argument.

    Parameters
    ----------
    X : Tensor, shape (n_rows, n_cols)
        Dense or sparse; never modified.
    name : str
        Argument name for the messages.
    allow_noninteger : bool, default False
        Accept any non-negative values unchanged (a quasi-likelihood fit).
    escape : str, optional
        The model's own way to accept non-integers (e.g. ``"allow_noninteger=True"``), named
        in the message after the advice to round.

    Returns
    -------
    Tensor
        ``X`` itself, or a new tensor (same layout) with near-integers rounded.
    """
    check_nonnegative(X, name)
    v = _values(X)
    if allow_noninteger or not v.numel() or not v.is_floating_point():
        return X
    # the rule in blocks along the first dimension (its temporaries are a block's); the rounded copy
    # only when a value changes
    flat = v if v.dim() else v.reshape(1)
    n = 0
    for s in range(0, flat.shape[0], _CHECK_BLOCK):
        _, changed, bad = count_rule(flat[s:s + _CHECK_BLOCK])
        if bool(bad.any()):
            break
        n += int(changed.sum())
    else:
        bad = None
    if bad is not None:
        mask = torch.zeros(flat.shape, dtype=torch.bool, device=v.device)
        mask[s:s + _CHECK_BLOCK] = bad
        i, j, value = _first(X, mask.reshape(v.shape))
        where = f"row {i}, column {j}" if X.dim() == 2 else f"entry {i}"
        hint = f"; or pass {escape} to fit non-integer data (a quasi-likelihood)" if escape else ""
        raise ValueError(f"{_not_counts_message(name, where, value)}: if {name} holds counts, round it "
                         f"(e.g. {name}.round()); for data that are not counts use NMF (a model for "
                         f"real values){hint}")
    if not n:
        return X
    warnings.warn(f"{name}: rounded {n} value{'s' if n != 1 else ''} within {COUNT_TOL:g} of an integer to "
                  "that integer (counts stored as floats)", UserWarning, stacklevel=_user_stacklevel())
    return _with_values(X, count_rule(v)[0])


def check_shape(X: Tensor, expected: Sequence[Optional[int]], name: str = "X") -> Tensor:
    """Raise ``ValueError`` unless ``X.shape`` matches ``expected`` (``None`` matches any size)."""
    shape = tuple(X.shape)
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        want = tuple("*" if e is None else e for e in expected)
        raise ValueError(f"{name} has shape {shape}, expected {want}")
    return X


def check_int(value, name: str, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """Return ``value`` as an int: ``TypeError`` unless it is an integer, ``ValueError`` outside ``[low, high]``.

    Parameters
    ----------
    value : object
        The argument; python and numpy integers pass, booleans and floats (even 2.0) do not.
    name : str
        Argument name for the messages.
    low, high : int, optional
        Inclusive bounds.

    Returns
    -------
    int
    """
    what = "a positive integer" if low == 1 and high is None else (
        "a non-negative integer" if low == 0 and high is None else "an integer")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        if what == "an integer":
            what += f" in [{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"{name} must be {what}, got {value}")
    return value


def check_real(value, name: str, low: Optional[float] = None, high: Optional[float] = None,
               closed: str = "both") -> float:
    """Return ``value`` as a finite float: ``TypeError`` for a non-number, ``ValueError`` for NaN,
    infinity or a value outside the interval.

    Parameters
    ----------
    value : object
        The argument; python and numpy reals pass, booleans, strings and tensors do not.
    name : str
        Argument name for the messages.
    low, high : float, optional
        Bounds of the interval (``None``: unbounded on that side).
    closed : {'both', 'left', 'right', 'neither'}, default 'both'
        Which bounds belong to the interval.

    Returns
    -------
    float
    """
    check_option(closed, ("both", "left", "right", "neither"), "closed")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    lo_in, hi_in = closed in ("both", "left"), closed in ("both", "right")
    bad_lo = low is not None and (value < low if lo_in else value <= low)
    bad_hi = high is not None and (value > high if hi_in else value >= high)
    if bad_lo or bad_hi or not math.isfinite(value):
        if low is not None and high is not None:
            what = f"in {'[' if lo_in else '('}{low:g}, {high:g}{']' if hi_in else ')'}"
        elif low is not None:
            what = f"{'>=' if lo_in else '>'} {low:g} and finite"
        elif high is not None:
            what = f"{'<=' if hi_in else '<'} {high:g} and finite"
        else:
            what = "a finite real number"
        raise ValueError(f"{name} must be {what}, got {value}")
    return value


def check_beta(beta, name: str = "beta") -> float:
    """Return the beta-divergence parameter as a float: any finite real (NaN and ±inf refused).

    ``TypeError`` for a non-number (e.g. a loss name, see
    :func:`torchnmf.estimators.nmf.beta_from_loss`), ``ValueError`` for NaN or infinity, which
    would make every multiplicative update a no-op or a division by zero.
    """
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"{name} must be a finite real number, got {beta!r}")
    if not math.isfinite(float(beta)):
        raise ValueError(f"{name} must be a finite real number, got {float(beta)}")
    return float(beta)


def check_rank(rank, name: str = "rank", max_rank: Optional[int] = None) -> int:
    """Return ``rank`` as an int, raising if it is not a positive integer (or exceeds ``max_rank``)."""
    rank = check_int(rank, name, low=1)
    if max_rank is not None and rank > max_rank:
        raise ValueError(f"{name}={rank} is larger than the data allows ({max_rank})")
    return rank


def check_positive(value, name: str, allow_zero: bool = False) -> float:
    """Return ``value`` as a float, raising ``ValueError`` unless it is finite and > 0 (>= 0).

    Shorthand for :func:`check_real` with ``low=0``.
    """
    return check_real(value, name, low=0.0, closed="left" if allow_zero else "neither")


def check_positive_vector(value, size: int, name: str, *, dtype: Optional[torch.dtype] = None,
                          device=None) -> Tensor:
    """A positive finite scalar broadcast to, or a vector of, length ``size``, as a new tensor.

    Parameters
    ----------
    value : float or array-like of shape (size,)
        The hyperparameter (e.g. one Gamma shape per component).
    size : int
        Length of the vector.
    name : str
        Argument name for the messages.
    dtype, device : optional
        Of the result (default dtype; cpu).

    Returns
    -------
    Tensor, shape (size,)
        A fresh tensor (never shares memory with ``value``).
    """
    dtype = dtype or torch.get_default_dtype()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.full((size,), check_positive(value, name), dtype=dtype, device=device)
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a positive number or a vector of {size}, got {value!r}")
    v = as_tensor(value, name, dtype=dtype, device=device, float_only=False, sparse="dense")
    if v.dim() == 0:
        return torch.full((size,), check_positive(float(v), name), dtype=dtype, device=device)
    if tuple(v.shape) != (size,):
        raise ValueError(f"{name} must be a positive number or a vector of {size}, got shape {tuple(v.shape)}")
    check_finite(v, name)
    if bool((v <= 0).any()):
        raise ValueError(f"{name} must be positive, got minimum {float(v.min()):.4g}")
    return v.detach().clone()


def check_option(value, valid: Sequence, name: str):
    """Return ``value`` if it is one of ``valid``; otherwise raise ``ValueError`` listing them."""
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}; got {value!r}")
    return value


def check_mask(mask, shape: Sequence[int], name: str = "mask", device=None, dtype=None) -> Optional[Tensor]:
    """Convert a missing-entry mask (1 or True = observed) to a float tensor of ``shape``."""
    if mask is None:
        return None
    if isinstance(mask, Tensor) and mask.dtype == torch.bool:
        M = mask
    else:
        M = as_tensor(mask, name, float_only=False, sparse="dense")
    if tuple(M.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(M.shape)}, expected {tuple(shape)}")
    M = M.to(device=device, dtype=dtype or torch.get_default_dtype())
    if bool(((M != 0) & (M != 1)).any()):
        raise ValueError(f"{name} must hold only 0 and 1 (or booleans)")
    return M


def nonzeros(X: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Row indices, column indices and values of the non-zero entries of a 2-D tensor.

    Parameters
    ----------
    X : Tensor, shape (n_rows, n_cols)
        Dense or sparse (COO, CSR, CSC).

    Returns
    -------
    rows, cols : LongTensor, shape (nnz,)
    values : Tensor, shape (nnz,)
        Explicit zeros of a sparse input are dropped.
    """
    if X.dim() != 2:
        raise ValueError(f"X must be 2-D, got shape {tuple(X.shape)}")
    if X.layout == torch.strided:
        rows, cols = torch.nonzero(X, as_tuple=True)
        return rows, cols, X[rows, cols]
    C = X.to_sparse_coo().coalesce() if X.layout != torch.sparse_coo else X.coalesce()
    rows, cols = C.indices()
    vals = C.values()
    keep = vals != 0
    if not bool(keep.all()):
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
    return rows, cols, vals
