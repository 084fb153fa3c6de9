"""Optional GPU fast paths for plain 2-D NMF multiplicative updates (Triton).

:func:`torchnmf.updates.mu_update` calls :func:`supports` first and, where it answers True,
hands the update to :func:`mu_update` here; everything else takes the generic path. The
package imports and works without Triton: :func:`available` is then False and
:func:`supports` always False.

What runs where (``V ≈ H Wᵀ``, the update of ``H``; ``W`` is updated on ``V.T``):

* dense ``V``, any beta except 2-without-mask: the fused kernel of
  :mod:`torchnmf.kernels.fused_mu` — one read of ``V`` (and of the mask) per factor update,
  the reconstruction never stored;
* dense ``V``, beta = 2 without a mask: not taken here — the generic Gram form
  ``(V W) / (H (WᵀW))`` already reads ``V`` once through cuBLAS;
* sparse ``V`` (CSR), beta = 1 without a mask: the nonzero kernel of
  :mod:`torchnmf.kernels.sparse` (gather, dot, ratio, row sums in registers).

Precision: fp32 accuracy by default (``'tf32x3'``, three TF32 tensor-core products per fp32
product, on Ampere and newer; plain fp32 ``'ieee'`` before); lossy TF32 only when asked for
with ``precision='tf32'`` or when ``torch.backends.cuda.matmul.allow_tf32`` is True (the switch
the generic path's matmuls follow too). See :mod:`torchnmf.kernels.fused_mu` for the measured
accuracy of each.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import numbers
import os
import sys
from typing import Iterator, Optional, Tuple, Union

import torch
from torch import Tensor

from ..data import check_beta, check_option, is_sparse
from ..updates import EPSILON, _multiply, _register_fast_path, mu_gamma
from ..updates import mu_update as _generic_mu_update

__all__ = ["available", "supports", "mu_update", "default_gamma", "set_enabled", "disabled",
           "set_precision", "EPSILON", "MAX_RANK"]


#: Largest rank the fused kernels take: their ``BLOCK x rank`` factor tiles and accumulators
#: live in registers. :func:`mu_update` hands larger ranks to the generic path.
MAX_RANK = 256

_FACTOR_DTYPES = (torch.float32, torch.float64)
_DATA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _find_triton() -> bool:
    # Triton is imported only when a kernel first runs: importing it fixes its interpreter
    # mode (TRITON_INTERPRET) for the whole process, and it is slow to import.
    if "triton" in sys.modules:
        return sys.modules["triton"] is not None
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


_TRITON = _find_triton()
_ENABLED = True


def set_enabled(flag: bool) -> bool:
    """Turn the fast paths on or off for the whole process; returns the previous setting.

    With ``False``, :func:`supports` answers False and :func:`torchnmf.updates.mu_update`
    (hence ``NMF.fit``) takes the generic path, e.g. to compare the two.
    """
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(flag)
    return previous


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Context manager running its body with the fast paths off (see :func:`set_enabled`)."""
    previous = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


def available() -> bool:
    """Whether Triton is installed, so the fused kernels can run (it is imported on first use)."""
    return _TRITON


def _interpreting() -> bool:
    # read the environment rather than triton's knobs, so that asking does not import triton
    flag = os.environ.get("TRITON_INTERPRET", "0").strip().lower()
    return _TRITON and flag in ("1", "true", "on", "yes")


def _runs_here(t: Tensor) -> bool:
    # compiled kernels need cuda; the interpreter runs on cpu tensors
    return t.is_cuda or (_interpreting() and t.device.type == "cpu")


def supports(V, beta, mask=None) -> bool:
    """Whether :func:`mu_update` has a fast path for this input.

    Parameters
    ----------
    V : object
        The data of ``V ≈ H Wᵀ``.
    beta : float
        Beta-divergence parameter.
    mask : Tensor, optional
        Observed-entry mask.

    Returns
    -------
    bool
        False while disabled (:func:`set_enabled`). True for a 2-D cuda tensor (cpu under
        ``TRITON_INTERPRET=1``) of a floating dtype: dense with any finite beta except
        beta = 2 without a mask (the generic Gram form is already optimal), or sparse (COO,
        CSR, CSC) with beta = 1 and no mask. Never raises: input checking is the generic
        path's (and :func:`mu_update`'s) job.
    """
    if not (_TRITON and _ENABLED) or not isinstance(V, Tensor) or V.dim() != 2 or not _runs_here(V):
        return False
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(beta):
        return False
    if V.dtype not in _DATA_DTYPES:
        return False
    if is_sparse(V):
        layouts = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc)
        return V.layout in layouts and float(beta) == 1.0 and mask is None
    if mask is not None and (not isinstance(mask, Tensor) or mask.shape != V.shape
                             or mask.device != V.device or is_sparse(mask)):
        return False
    return not (float(beta) == 2.0 and mask is None)


#: Exponent that makes the multiplicative update monotone: :func:`torchnmf.updates.mu_gamma`.
default_gamma = mu_gamma


_PRECISION: Optional[str] = None


def set_precision(precision: Optional[str]) -> Optional[str]:
    """Set the fp32 matmul precision used when :func:`mu_update` gets none (e.g. from ``NMF.fit``).

    Parameters
    ----------
    precision : {'ieee', 'tf32', 'tf32x3'} or None
        None restores the automatic choice (see :func:`mu_update`).

    Returns
    -------
    str or None
        The previous setting.
    """
    global _PRECISION
    if precision is not None:
        check_option(precision, ("ieee", "tf32", "tf32x3"), "precision")
    previous, _PRECISION = _PRECISION, precision
    return previous


def _default_precision(device: torch.device) -> str:
    if _PRECISION is not None:
        return _PRECISION
    if device.type != "cuda":
        return "ieee"  # the interpreter computes in numpy either way
    if torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "tf32x3" if torch.cuda.get_device_capability(device) >= (8, 0) else "ieee"


def _check(V: Tensor, W: Tensor, H: Tensor, mask: Optional[Tensor]) -> None:
    for t, n in ((V, "V"), (W, "W"), (H, "H")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{n} must be 2-D, got shape {tuple(t.shape)}")
    for t, n in ((W, "W"), (H, "H"), (mask, "mask")):
        if t is not None and t.device != V.device:
            raise ValueError(
                f"V is on {V.device} but {n} is on {t.device}; move the model and the data "
                f"to one device (e.g. model.to(V.device))"
            )
    if W.layout != torch.strided or H.layout != torch.strided:
        raise TypeError("W and H must be dense tensors")
    if H.dtype != W.dtype:
        raise TypeError(f"W and H must have one dtype, got W {W.dtype} and H {H.dtype}")
    if not W.is_floating_point():
        raise TypeError(f"W and H must be floating-point tensors, got {W.dtype}")
    if V.dtype not in _DATA_DTYPES:
        raise TypeError(f"V must be float16, bfloat16, float32 or float64, got {V.dtype}")
    N, C = V.shape
    if W.shape[0] != C or H.shape[0] != N or W.shape[1] != H.shape[1]:
        raise ValueError(
            f"shapes do not match V ≈ H Wᵀ: V {tuple(V.shape)}, W {tuple(W.shape)}, "
            f"H {tuple(H.shape)}; expected W (V.shape[1], R) and H (V.shape[0], R)"
        )
    if mask is not None:
        if not isinstance(mask, Tensor) or is_sparse(mask):
            raise TypeError("mask must be a dense tensor for the fused path")
        if mask.shape != V.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(V.shape)}")
    if not _runs_here(V):
        raise ValueError(
            f"the fused kernels need cuda tensors (or TRITON_INTERPRET=1 for Triton's CPU "
            f"interpreter); V is on {V.device}"
        )


def mu_update(
    V: Tensor,
    W: Tensor,
    H: Tensor,
    beta: float = 1,
    mask: Optional[Tensor] = None,
    l1: float = 0.0,
    l2: float = 0.0,
    gamma: Optional[float] = None,
    *,
    eps: float = EPSILON,
    out: Optional[Tensor] = None,
    with_loss: bool = False,
    precision: Optional[str] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """One multiplicative update of ``H`` for ``V ≈ H Wᵀ``, fused on the GPU.

    Same contract and numbers (up to float summation order) as
    :func:`torchnmf.updates.mu_update`; update ``W`` by calling it on ``V.T`` (no copy: any
    strides are read directly) with the factors' roles swapped.

    Parameters
    ----------
    V : Tensor, shape (N, C)
        Non-negative data: dense (any strides, fp16/bf16/fp32/fp64 — low precision is
        converted in registers) or sparse CSR (beta = 1 without mask only; COO/CSC are
        converted, which sorts). Not checked for negative or non-finite values here: the
        caller checks once before iterating.
    W : Tensor, shape (C, R)
        Fixed factor, fp32 or fp64, on ``V``'s device (fp16/bf16 factors and ranks above
        :data:`MAX_RANK` are handed to the generic path).
    H : Tensor, shape (N, R)
        Factor to update, same dtype and device as ``W``. Not modified unless passed as
        ``out``.
    beta : float
        Beta-divergence parameter.
    mask : Tensor, shape (N, C), optional
        1 (or True) for observed entries; entries with 0 do not count. Any dtype/strides.
    l1, l2 : float
        L1 and L2 penalties on ``H``, added to the denominator (``l1 + l2 H``).
    gamma : float, optional
        Exponent of the update ratio; default :func:`default_gamma` (monotone).
    eps : float
        Floor of the reconstruction (beta < 2) and of zero denominators.
    out : Tensor, shape (N, R), optional
        Where to write the result (may be ``H`` itself).
    with_loss : bool
        Also return the (masked) divergence at the input point, computed in the same pass.
    precision : {'ieee', 'tf32', 'tf32x3'}, optional
        fp32 matmul precision inside the dense kernel. Default: :func:`set_precision`'s
        setting if any, else 'tf32' if
        ``torch.backends.cuda.matmul.allow_tf32`` is set, else 'tf32x3' (fp32-accurate) on
        compute capability >= 8.0 and 'ieee' below. Ignored for fp64.

    Returns
    -------
    Tensor, shape (N, R)
        The updated ``H``; with ``with_loss`` a tuple ``(H_new, loss)``.

    Raises
    ------
    ValueError
        Tensors on different devices, mismatched shapes, or no cuda (and no interpreter).
    TypeError
        ``W`` and ``H`` of different dtypes, or a non-floating ``V``.
    RuntimeError
        Triton is not installed.
    """
    if not _TRITON:
        raise RuntimeError("torchnmf.kernels.mu_update needs the triton package (pip install triton)")
    _check(V, W, H, mask)
    beta = check_beta(beta)
    if precision is None:
        precision = _default_precision(V.device)
    check_option(precision, ("ieee", "tf32", "tf32x3"), "precision")
    if W.dtype == torch.float64:
        precision = "ieee"
    gamma = default_gamma(beta) if gamma is None else float(gamma)
    if out is not None and (out.shape != H.shape or out.dtype != H.dtype or out.device != H.device):
        raise ValueError("out must have the shape, dtype and device of H")
    if W.shape[1] > MAX_RANK or W.dtype not in _FACTOR_DTYPES:
        # too large for registers, or half-precision factors (whose updates would underflow
        # in a kernel accumulating in their dtype): the generic path does what torch does
        with disabled():  # the generic path must not dispatch back here
            return _generic_mu_update(V, W, H, beta=beta, mask=mask, l1=l1, l2=l2, gamma=gamma, eps=eps,
                           out=out, with_loss=with_loss)

    with torch.no_grad():
        loss = None
        if is_sparse(V):
            if beta != 1.0 or mask is not None:
                raise ValueError("a sparse V is supported by the fused path for beta=1 without mask only")
            from .sparse import nonzero_mu_numerator

            res = nonzero_mu_numerator(V, W, H, eps=eps, backend="triton", with_loss=with_loss)
            num, nz_loss = res if with_loss else (res, None)
            num = num.to(H.dtype)
            den = None
            if with_loss:  # Σ over all entries of the reconstruction = H.sum(0) · W.sum(0)
                loss = nz_loss.to(H.dtype) + torch.dot(H.sum(0), W.sum(0))
        else:
            from .fused_mu import mu_stats

            need_den = not (beta == 1.0 and mask is None)
            # the same floors as the generic path: the reconstruction is clamped for beta < 2
            floor = eps if beta < 2 else 0.0
            num, den, loss = mu_stats(
                V, W, H, beta, mask=mask, eps_num=floor, eps_den=floor,
                need_den=need_den, precision=precision, with_loss=with_loss,
            )
        if den is None:  # beta = 1 without mask: the denominator is the column sums of W
            den = W.sum(0).expand_as(H)
        # num is a fresh buffer of the kernels: the ratio may overwrite it
        result = _multiply(H, num, den, gamma, l1, l2, eps, out=out, num_is_scratch=True)
    return (result, loss) if with_loss else result


# torchnmf.updates.mu_update hands cuda input to this module through the hook (no import of
# kernels from updates: the dependency runs one way)
_register_fast_path(supports, mu_update)
