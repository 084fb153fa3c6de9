"""Fused Triton kernel for one beta-divergence multiplicative update of plain NMF.

For ``V (N, C) ≈ P = H Wᵀ`` the update of ``H`` needs, for every row ``n``,

.. math::
    \\mathrm{num}_{n r} = \\sum_c M_{nc} V_{nc} P_{nc}^{\\beta-2} W_{cr}, \\qquad
    \\mathrm{den}_{n r} = \\sum_c M_{nc} P_{nc}^{\\beta-1} W_{cr}.

The generic path forms ``P`` (N·C entries) in memory, transforms it elementwise and multiplies
it by ``W``: several full passes over N·C entries per factor update. The kernel here computes a
``BLOCK_N x BLOCK_C`` tile of ``P`` in registers from ``H`` and ``W``, applies the beta terms to
the matching tile of ``V`` and accumulates both products in the same pass, so ``V`` (and the
mask) are read once per factor update and ``P`` is never written to memory. For ``beta = 1``
without a mask the denominator is the column sums of ``W`` and is not computed here.

The reduction over ``C`` is split in ``n_split`` chunks that write separate fp32/fp64 partial
sums (no atomics, so results are deterministic); the caller sums them. That keeps the GPU busy
when ``N`` is small, e.g. for the ``W`` update, which is this same kernel on ``V.T`` (any
strides are accepted, so the transpose is never copied).

Precision. Products are accumulated in the factors' dtype (fp32 or fp64; a fp16/bf16 ``V`` is
converted in registers). Two N·C·R matmuls per factor update make exact fp32 (``'ieee'``, CUDA
cores) compute-bound at rank 64 on an H100 (~0.5 TFLOP per iteration for 100000x10000, about
8 ms at the card's peak fp32 rate), so :func:`torchnmf.kernels.mu_update` defaults to
``'tf32x3'`` on Ampere and newer: each fp32 operand is split into two TF32 parts and three
tensor-core products are summed, which keeps fp32 accuracy (emulated on CPU, same problem as
below: final divergence 1e-8 relative from fp64 with tf32x3 and with plain fp32; factors
1.1e-6 with both). ``'tf32'`` — the switch that is off by default — uses TF32 tensor cores for the two small matmuls per tile: their inputs are rounded
to a 10-bit mantissa (relative error up to 2**-11 ≈ 5e-4 per operand), accumulation stays fp32.
Multiplicative updates do not amplify it: on a 2000x1000, rank-32 KL problem, 100 iterations
with TF32-rounded matmul inputs (emulated on CPU) ended with a divergence 7e-7 relative from
the fp64 fit (plain fp32: 6e-9) and factors 8e-5 relative from it (fp32: 9e-7). Iterates are
therefore not comparable to fp32 ones beyond ~4 digits, and a step may raise the divergence by
that much.

Triton is imported lazily by :mod:`torchnmf.kernels`; this module requires it.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

import triton
import triton.language as tl
from triton import knobs

__all__ = ["mu_stats", "interpreting"]

# beta modes, compile-time constants
_BETA_1, _BETA_0, _BETA_2, _BETA_GEN = 0, 1, 2, 3


def _mu_stats_kernel(
    V, H, W, M, NUM, DEN, LOSS,
    n_rows, n_cols, rank, cols_per_split,
    s_vn, s_vc, s_hn, s_hr, s_wc, s_wr, s_mn, s_mc,
    s_os, s_on, s_or,
    beta, eps_num, eps_den,
    BETA_MODE: tl.constexpr, HAS_MASK: tl.constexpr, NEED_DEN: tl.constexpr,
    WANT_LOSS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    # 64-bit offsets: N·C may exceed 2**31 (int32 products would wrap silently)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    rk = tl.arange(0, BLOCK_R)
    kmask = rk < rank
    h = tl.load(H + rows[:, None] * s_hn + rk[None, :] * s_hr,
                mask=rmask[:, None] & kmask[None, :], other=0.0)
    num = tl.zeros((BLOCK_N, BLOCK_R), dtype=h.dtype)
    den = tl.zeros((BLOCK_N, BLOCK_R), dtype=h.dtype)
    lacc = tl.zeros((BLOCK_N,), dtype=h.dtype)
    c_lo = pid_s * cols_per_split
    c_hi = tl.minimum(c_lo + cols_per_split, n_cols)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        cmask = cols < c_hi
        w = tl.load(W + cols[:, None] * s_wc + rk[None, :] * s_wr,
                    mask=cmask[:, None] & kmask[None, :], other=0.0)
        # the reconstruction tile lives only in registers
        p = tl.dot(h, tl.trans(w), input_precision=PRECISION)
        valid = rmask[:, None] & cmask[None, :]
        if HAS_MASK:
            m = tl.load(M + rows[:, None] * s_mn + cols[None, :] * s_mc, mask=valid, other=0)
            valid = valid & (m != 0)
        v = tl.load(V + rows[:, None] * s_vn + cols[None, :] * s_vc, mask=valid, other=0.0)
        v = v.to(h.dtype)
        # dead lanes get 1 so no inf/NaN is formed there (they are zeroed below anyway)
        pn = tl.where(valid, tl.maximum(p, eps_num), 1.0)
        pd = tl.where(valid, tl.maximum(p, eps_den), 1.0)
        if BETA_MODE == 0:  # beta = 1: V / P
            a = v / pn
        elif BETA_MODE == 1:  # beta = 0: V / P^2 and 1 / P
            r = 1.0 / pn
            a = v * r * r
            b = 1.0 / pd
        elif BETA_MODE == 2:  # beta = 2: V and P
            a = v
            b = pd
        else:
            a = v * tl.exp((beta - 2.0) * tl.log(pn))
            b = tl.exp((beta - 1.0) * tl.log(pd))
        if WANT_LOSS:  # the divergence at the input point, from the same tile
            if BETA_MODE == 0:
                pos = v > 0
                lv = tl.log(tl.where(pos, v, 1.0))
                lt = tl.where(pos, v * (lv - tl.log(pn)), 0.0) - v + p
            elif BETA_MODE == 1:
                r = tl.where(valid, v / pn, 1.0)
                lt = r - tl.log(r) - 1.0
            elif BETA_MODE == 2:
                d = v - p
                lt = 0.5 * d * d
            else:
                vb = tl.where(v > 0, tl.exp(beta * tl.log(tl.where(v > 0, v, 1.0))), 0.0)
                lt = (vb + (beta - 1.0) * b * pd - beta * b * v) / (beta * (beta - 1.0))
            lacc += tl.sum(tl.where(valid, lt, 0.0), axis=1)
        a = tl.where(valid, a, 0.0).to(h.dtype)
        num += tl.dot(a, w, input_precision=PRECISION)
        if NEED_DEN:
            if BETA_MODE == 0:
                b = tl.where(valid, 1.0, 0.0).to(h.dtype)
            else:
                b = tl.where(valid, b, 0.0).to(h.dtype)
            den += tl.dot(b, w, input_precision=PRECISION)
    out = pid_s.to(tl.int64) * s_os + rows[:, None] * s_on + rk[None, :] * s_or
    omask = rmask[:, None] & kmask[None, :]
    tl.store(NUM + out, num, mask=omask)
    if NEED_DEN:
        tl.store(DEN + out, den, mask=omask)
    if WANT_LOSS:
        tl.store(LOSS + pid_s * tl.num_programs(0) + pid_n, tl.sum(lacc, axis=0))


_compiled = {}


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).

    Raises ``RuntimeError`` if the variable is set but Triton was imported without it (its
    library functions are then compiled-only and the interpreter cannot run them).
    """
    mode = bool(knobs.runtime.interpret)
    if mode and not type(tl.zeros).__name__ == "InterpretedFunction":
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton was imported; set it before the first "
            "`import triton` (e.g. in the environment of the process)"
        )
    return mode


def _kernel():
    # Decorated on first use and cached per mode (the mode is read from the environment).
    mode = interpreting()
    if mode not in _compiled:
        _compiled[mode] = triton.jit(_mu_stats_kernel)
    return _compiled[mode]


def _config(rank_block: int, interp: bool, f64: bool) -> Tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps, num_stages) for a rank block.

    Chosen by hand, not measured (no GPU was available when this was written): run
    ``benchmarks/gpu.py --tune`` on the target card and pass the best as ``config=``.
    """
    if interp:
        return 16, 32, 1, 1
    stages = 2 if f64 else 3  # fp64 tiles would exceed shared memory with 3 stages
    if rank_block <= 32:
        return 128, 64, 8, stages
    if rank_block <= 64:
        return 64, 64, 4, stages
    if rank_block <= 128:
        return 64, 32, 8, 2
    return 32, 32, 8, 2


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def mu_stats(
    V: Tensor,
    W: Tensor,
    H: Tensor,
    beta: float = 1.0,
    mask: Optional[Tensor] = None,
    eps_num: float = 0.0,
    eps_den: float = 0.0,
    need_den: bool = True,
    precision: str = "tf32x3",
    n_split: Optional[int] = None,
    with_loss: bool = False,
    config: Optional[Tuple[int, int, int, int]] = None,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Numerator and denominator of the multiplicative update of ``H`` in one pass over ``V``.

    Parameters
    ----------
    V : Tensor, shape (N, C)
        Data, any strides; fp16, bf16, fp32 or fp64 (converted to the factors' dtype in
        registers).
    W : Tensor, shape (C, R)
        The fixed factor, fp32 or fp64.
    H : Tensor, shape (N, R)
        The factor being updated, same dtype and device as ``W``.
    beta : float
        Beta-divergence parameter.
    mask : Tensor, shape (N, C), optional
        Observed entries (non-zero = observed), any dtype and strides.
    eps_num, eps_den : float
        The reconstruction is clamped to ``>= eps_num`` in the numerator's term and to
        ``>= eps_den`` in the denominator's (0 for no clamp where the power is >= 0).
    need_den : bool
        Compute the denominator (for beta = 1 without a mask it is ``W.sum(0)`` and the caller
        may skip it).
    precision : {'ieee', 'tf32', 'tf32x3'}
        Input precision of the in-kernel fp32 matmuls (see the module docstring); fp64
        factors always use 'ieee'.
    n_split : int, optional
        Number of chunks of the reduction over ``C``; default chosen to fill the GPU.
    with_loss : bool
        Also return the (masked) beta-divergence at the input point, summed in the same
        pass (``xlogy`` conventions and clamps as :func:`torchnmf.updates.mu_update`).
    config : (BLOCK_N, BLOCK_C, num_warps, num_stages), optional
        Launch configuration (powers of two >= 16 for the blocks); default by rank.

    Returns
    -------
    num : Tensor, shape (N, R)
        ``(M ⊙ V ⊙ P^(β-2)) W`` with ``P = H Wᵀ``.
    den : Tensor, shape (N, R) or None
        ``(M ⊙ P^(β-1)) W``, or None when ``need_den`` is False.
    loss : Tensor, shape () or None
        The divergence, when ``with_loss``.

    Notes
    -----
    No input checking here beyond what the launch needs: :func:`torchnmf.kernels.mu_update`
    validates devices, dtypes and shapes first.
    """
    N, C = V.shape
    R = W.shape[1]
    if H.dtype == torch.float64:
        precision = "ieee"  # TF32 variants exist for fp32 operands only
    interp = interpreting()
    BR = max(16, triton.next_power_of_2(R))
    BN, BC, warps, stages = config or _config(BR, interp, H.dtype == torch.float64)
    n_row_blocks = triton.cdiv(N, BN)
    if n_split is None:
        # about four programs per SM, never chunks shorter than a few column blocks
        target = 4 * _sm_count(V.device)
        n_split = max(1, min(math.ceil(target / n_row_blocks), triton.cdiv(C, 4 * BC)))
    cols_per_split = triton.cdiv(triton.cdiv(C, n_split), BC) * BC
    n_split = triton.cdiv(C, cols_per_split) if C else 1
    num = torch.empty((n_split, N, R), dtype=H.dtype, device=H.device)
    den = torch.empty_like(num) if need_den else num  # placeholder pointer when unused
    loss = torch.zeros((n_split, n_row_blocks), dtype=H.dtype, device=H.device)
    if C == 0:
        num.zero_()
        den.zero_()
    mode = {1.0: _BETA_1, 0.0: _BETA_0, 2.0: _BETA_2}.get(float(beta), _BETA_GEN)
    has_mask = mask is not None
    Mt = mask if has_mask else V
    if has_mask and Mt.dtype == torch.bool:
        Mt = Mt.view(torch.uint8)  # same bytes; triton loads int1 pointers poorly
    extra = {} if interp else {"num_warps": warps, "num_stages": stages}
    if N and C:
        _kernel()[(n_row_blocks, n_split)](
            V, H, W, Mt, num, den, loss,
            N, C, R, cols_per_split,
            V.stride(0), V.stride(1), H.stride(0), H.stride(1), W.stride(0), W.stride(1),
            Mt.stride(0), Mt.stride(1),
            num.stride(0), num.stride(1), num.stride(2),
            float(beta), float(eps_num), float(eps_den),
            BETA_MODE=mode, HAS_MASK=has_mask, NEED_DEN=need_den, WANT_LOSS=with_loss,
            BLOCK_N=BN, BLOCK_C=BC, BLOCK_R=BR, PRECISION=precision,
            **extra,
        )
    num_total = num.sum(0) if n_split > 1 else num[0]
    den_total = (den.sum(0) if n_split > 1 else den[0]) if need_den else None
    return num_total, den_total, (loss.sum() if with_loss else None)
