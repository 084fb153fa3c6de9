"""Nonzero-only kernels for a sparse CSR ``V``: NMF's beta=1 numerator and the Poisson sweep.

Both computations visit each nonzero ``(n, c, x)`` once, gather one row of each factor,
reduce over the rank and scatter the result back:

* :func:`nonzero_mu_numerator` — ``num[n] = Σ_c x / max(H[n]·W[c], eps) · W[c]``, the
  numerator of NMF's beta=1 multiplicative update of ``H`` (its denominator is ``W.sum(0)``:
  zero entries contribute nothing else).
* :func:`nonzero_softmax_stats` — for log-weights ``A (N, K)`` and ``B (C, K)``, the
  responsibilities ``phi[n, c] = softmax_k(A[n] + B[c])`` of every nonzero, summed as
  ``Σ_c x phi`` per row, ``Σ_n x phi`` per column, and ``Σ x logsumexp_k(A[n] + B[c])``.
  With ``A = E[log U]``, ``B = E[log alpha]`` these are the statistics of one CAVI sweep of
  Gamma-Poisson factorization and its ELBO data term; phi is never stored.

Two backends give the same numbers:

* ``'torch'`` — chunks of nonzeros: gather, reduce, ``index_add_``; ``chunk_size`` bounds the
  extra memory to ``O(chunk_size · K)``. Any device.
* ``'triton'`` — one program per CSR row walks the row's nonzeros in blocks, keeps the row's
  sums in registers (no atomics for rows) and, for the column sums of the Poisson sweep,
  uses atomic adds. Nothing of size ``nnz x K`` is materialised. Needs cuda, or Triton's
  CPU interpreter (``TRITON_INTERPRET=1``). Column sums by atomics are summed in a
  run-dependent order: results agree to float rounding, not bitwise, between runs.

Accumulation is in fp32 for fp16/bf16/fp32 factors and in fp64 for fp64 factors.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import Tensor

from .._csr import csr_tensor, quiet_csr, to_csr  # noqa: F401  (re-exported: their old home)
from ..data import check_int, check_option, is_sparse

__all__ = ["csr_parts", "to_csr", "csr_tensor", "quiet_csr", "nonzero_mu_numerator", "nonzero_softmax_stats"]


try:  # Triton is optional
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


def _acc_dtype(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def csr_parts(V: Tensor, name: str = "V") -> Tuple[Tensor, Tensor, Tensor]:
    """Row pointers, column indices and values of a 2-D sparse tensor in CSR order.

    Parameters
    ----------
    V : Tensor, shape (N, C)
        Sparse tensor in CSR (used as is), COO or CSC layout (converted to CSR, which sorts:
        keep a CSR copy of ``V`` and of ``V.T`` when calling repeatedly).

    Returns
    -------
    crow : LongTensor, shape (N + 1,)
    col : LongTensor, shape (nnz,)
    val : Tensor, shape (nnz,)
    """
    if not is_sparse(V):
        raise TypeError(f"{name} must be a torch sparse tensor, got a {V.layout} tensor")
    if V.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(V.shape)}")
    if V.layout != torch.sparse_csr:
        V = to_csr(V)
    return V.crow_indices(), V.col_indices(), V.values()


def _rows_of(crow: Tensor) -> Tensor:
    counts = crow[1:] - crow[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), counts)


def _check(V: Tensor, F1: Tensor, F2: Tensor, n1: str, n2: str) -> None:
    if not is_sparse(V):
        raise TypeError(f"V must be a torch sparse tensor, got a {V.layout} tensor")
    if V.dim() != 2:
        raise ValueError(f"V must be 2-D, got shape {tuple(V.shape)}")
    for t, n in ((F1, n1), (F2, n2)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"{n} must be a 2-D tensor")
        if t.is_sparse or t.layout != torch.strided:
            raise TypeError(f"{n} must be a dense tensor")
        if not t.is_floating_point():
            raise TypeError(f"{n} must be a floating-point tensor, got {t.dtype}")
        if t.device != V.device:
            raise ValueError(f"V is on {V.device} but {n} is on {t.device}; move them to one device")
    if not V.is_floating_point():
        raise TypeError(f"V must be a floating-point tensor, got {V.dtype}")
    if F1.shape[0] != V.shape[0] or F2.shape[0] != V.shape[1] or F1.shape[1] != F2.shape[1]:
        raise ValueError(
            f"shapes do not match: V {tuple(V.shape)}, {n1} {tuple(F1.shape)}, {n2} {tuple(F2.shape)}; "
            f"expected {n1} (V.shape[0], R) and {n2} (V.shape[1], R)"
        )


def _pick(backend: str, V: Tensor) -> str:
    check_option(backend, ("auto", "torch", "triton"), "backend")
    if backend == "auto":
        return "triton" if triton is not None and V.is_cuda else "torch"
    if backend == "triton":
        if triton is None:
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        from .fused_mu import interpreting

        if not V.is_cuda and not interpreting():
            raise ValueError(
                "backend='triton' needs cuda tensors, or TRITON_INTERPRET=1 for the CPU interpreter"
            )
    return backend


# --------------------------------------------------------------------------- triton kernels

def _csr_ratio_kernel(CROW, COL, VAL, H, W, NUM, LOSS, R, s_hn, s_hr, s_wc, s_wr, s_on, eps,
                      WANT_LOSS: tl.constexpr, ACC_F64: tl.constexpr, BLOCK_Z: tl.constexpr, BLOCK_R: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc_t = tl.float64 if ACC_F64 else tl.float32
    start = tl.load(CROW + row)
    end = tl.load(CROW + row + 1)
    k = tl.arange(0, BLOCK_R)
    km = k < R
    h = tl.load(H + row * s_hn + k * s_hr, mask=km, other=0.0).to(acc_t)
    acc = tl.zeros((BLOCK_R,), dtype=acc_t)
    lacc = tl.zeros((BLOCK_Z,), dtype=acc_t)
    for z0 in range(start, end, BLOCK_Z):
        z = z0 + tl.arange(0, BLOCK_Z)
        zm = z < end
        c = tl.load(COL + z, mask=zm, other=0)
        x = tl.load(VAL + z, mask=zm, other=0.0).to(acc_t)
        w = tl.load(W + c[:, None] * s_wc + k[None, :] * s_wr,
                    mask=zm[:, None] & km[None, :], other=0.0).to(acc_t)
        p = tl.sum(w * h[None, :], axis=1)
        p = tl.where(zm, tl.maximum(p, eps), 1.0)
        ratio = tl.where(zm, x / p, 0.0)
        acc += tl.sum(ratio[:, None] * w, axis=0)
        if WANT_LOSS:  # x log(x / p) - x, the nonzeros' part of the KL divergence
            pos = zm & (x > 0)
            lacc += tl.where(pos, x * tl.log(tl.where(pos, x, 1.0) / p), 0.0) - x
    tl.store(NUM + row * s_on + k, acc, mask=km)
    if WANT_LOSS:
        tl.store(LOSS + row, tl.sum(lacc, axis=0))


def _csr_softmax_kernel(CROW, COL, VAL, A, B, ROWS, COLS, LSE, K,
                        s_an, s_ak, s_bc, s_bk, s_rn, s_cc,
                        ACC_F64: tl.constexpr, BLOCK_Z: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc_t = tl.float64 if ACC_F64 else tl.float32
    start = tl.load(CROW + row)
    end = tl.load(CROW + row + 1)
    k = tl.arange(0, BLOCK_K)
    km = k < K
    a = tl.load(A + row * s_an + k * s_ak, mask=km, other=0.0).to(acc_t)
    racc = tl.zeros((BLOCK_K,), dtype=acc_t)
    lacc = tl.zeros((BLOCK_Z,), dtype=acc_t)
    for z0 in range(start, end, BLOCK_Z):
        z = z0 + tl.arange(0, BLOCK_Z)
        zm = z < end
        c = tl.load(COL + z, mask=zm, other=0)
        x = tl.load(VAL + z, mask=zm, other=0.0).to(acc_t)
        b = tl.load(B + c[:, None] * s_bc + k[None, :] * s_bk,
                    mask=zm[:, None] & km[None, :], other=0.0).to(acc_t)
        s = a[None, :] + b
        s = tl.where(km[None, :], s, -float("inf"))
        mx = tl.max(s, axis=1)
        e = tl.exp(s - mx[:, None])
        tot = tl.sum(e, axis=1)
        xphi = tl.where(zm[:, None] & km[None, :], (x / tot)[:, None] * e, 0.0)
        racc += tl.sum(xphi, axis=0)
        lacc += tl.where(zm, x * (mx + tl.log(tot)), 0.0)
        tl.atomic_add(COLS + c[:, None] * s_cc + k[None, :], xphi, mask=zm[:, None] & km[None, :])
    tl.store(ROWS + row * s_rn + k, racc, mask=km)
    tl.store(LSE + row, tl.sum(lacc, axis=0))


_jitted = {}


def _jit(fn):
    from .fused_mu import interpreting

    key = (fn.__name__, interpreting())
    if key not in _jitted:
        _jitted[key] = triton.jit(fn)
    return _jitted[key]


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


# --------------------------------------------------------------------------- public functions

def nonzero_mu_numerator(
    V: Tensor,
    W: Tensor,
    H: Tensor,
    eps: float = 0.0,
    chunk_size: int = 1 << 20,
    backend: str = "auto",
    with_loss: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Numerator of the beta=1 multiplicative update of ``H`` from the nonzeros of ``V``.

    Parameters
    ----------
    V : sparse Tensor, shape (N, C)
        CSR (or COO/CSC, converted) data, ``V ≈ H Wᵀ``.
    W : Tensor, shape (C, R)
    H : Tensor, shape (N, R)
    eps : float
        The reconstruction at a nonzero is clamped to ``>= eps``.
    chunk_size : int
        Nonzeros per chunk of the torch backend (peak extra memory ``~3 chunk_size R``).
    backend : {'auto', 'torch', 'triton'}
        'auto' uses Triton for cuda tensors when it is installed.
    with_loss : bool
        Also return ``Σ_nz x log(x / max(p, eps)) - x``, the nonzeros' part of the
        generalised KL divergence (add ``Σ H Wᵀ = H.sum(0) · W.sum(0)`` for the whole of it).

    Returns
    -------
    num : Tensor, shape (N, R)
        ``Σ_c V[n,c] / max((H Wᵀ)[n,c], eps) W[c]`` over nonzeros, in fp32 (fp64 when a
        factor is fp64).
    loss : Tensor, shape ()
        Only with ``with_loss``.
    """
    _check(V, H, W, "H", "W")
    chunk_size = check_int(chunk_size, "chunk_size", low=1)
    backend = _pick(backend, V)
    crow, col, val = csr_parts(V)
    N, R = H.shape
    acc = _acc_dtype(W, H)
    num = torch.zeros((N, R), dtype=acc, device=H.device)
    if backend == "triton":
        loss_rows = torch.zeros(N, dtype=acc, device=H.device)
        if N and R and col.numel():
            _jit(_csr_ratio_kernel)[(N,)](
                crow, col, val, H, W, num, loss_rows, R,
                H.stride(0), H.stride(1), W.stride(0), W.stride(1), num.stride(0), float(eps),
                WANT_LOSS=bool(with_loss), ACC_F64=acc == torch.float64, BLOCK_Z=32, BLOCK_R=_block(R),
            )
        return (num, loss_rows.sum()) if with_loss else num
    rows = _rows_of(crow)
    loss = torch.zeros((), dtype=acc, device=H.device)
    for z0 in range(0, col.numel(), chunk_size):
        r, c = rows[z0:z0 + chunk_size], col[z0:z0 + chunk_size]
        x = val[z0:z0 + chunk_size].to(acc)
        w = W[c].to(acc)
        p = (H[r].to(acc) * w).sum(1).clamp_min(eps)
        num.index_add_(0, r, (x / p).unsqueeze(1) * w)
        if with_loss:
            loss += (torch.xlogy(x, x / p) - x).sum()
    return (num, loss) if with_loss else num


def nonzero_softmax_stats(
    V: Tensor,
    A: Tensor,
    B: Tensor,
    chunk_size: int = 1 << 20,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor]:
    """Row and column sums of ``x · softmax_k(A[n] + B[c])`` over the nonzeros ``x`` of ``V``.

    Parameters
    ----------
    V : sparse Tensor, shape (N, C)
        CSR (or COO/CSC, converted) non-negative weights (counts).
    A : Tensor, shape (N, K)
        Row log-weights (e.g. ``E[log U]``).
    B : Tensor, shape (C, K)
        Column log-weights (e.g. ``E[log alpha]``).
    chunk_size : int
        Nonzeros per chunk of the torch backend (peak extra memory ``~4 chunk_size K``).
    backend : {'auto', 'torch', 'triton'}

    Returns
    -------
    row_stats : Tensor, shape (N, K)
        ``Σ_c x_nc phi_nck``.
    col_stats : Tensor, shape (C, K)
        ``Σ_n x_nc phi_nck``.
    lse : Tensor, shape ()
        ``Σ x_nc logsumexp_k(A[n,k] + B[c,k])`` (the data term of a Poisson ELBO, up to
        the ``-Σ log x!`` and rate terms).

    All three in fp32 (fp64 when ``A`` or ``B`` is fp64).
    """
    _check(V, A, B, "A", "B")
    chunk_size = check_int(chunk_size, "chunk_size", low=1)
    backend = _pick(backend, V)
    crow, col, val = csr_parts(V)
    (N, K), C = A.shape, B.shape[0]
    acc = _acc_dtype(A, B)
    rs = torch.zeros((N, K), dtype=acc, device=A.device)
    cs = torch.zeros((C, K), dtype=acc, device=A.device)
    if backend == "triton":
        lse_rows = torch.zeros(N, dtype=acc, device=A.device)
        if N and K and col.numel():
            _jit(_csr_softmax_kernel)[(N,)](
                crow, col, val, A, B, rs, cs, lse_rows, K,
                A.stride(0), A.stride(1), B.stride(0), B.stride(1), rs.stride(0), cs.stride(0),
                ACC_F64=acc == torch.float64, BLOCK_Z=32, BLOCK_K=_block(K),
            )
        return rs, cs, lse_rows.sum()
    rows = _rows_of(crow)
    lse = torch.zeros((), dtype=acc, device=A.device)
    for z0 in range(0, col.numel(), chunk_size):
        r, c = rows[z0:z0 + chunk_size], col[z0:z0 + chunk_size]
        x = val[z0:z0 + chunk_size].to(acc)
        s = A[r].to(acc) + B[c].to(acc)
        ls = torch.logsumexp(s, 1)
        xphi = torch.exp(s - ls.unsqueeze(1)).mul_(x.unsqueeze(1))
        rs.index_add_(0, r, xphi)
        cs.index_add_(0, c, xphi)
        lse += (x * ls).sum()
    return rs, cs, lse
