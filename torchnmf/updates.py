"""Functional multiplicative updates for plain 2-D NMF, ``V (N, C) ≈ H Wᵀ``.

:func:`mu_update` is the work-horse of :meth:`torchnmf.nmf.NMF.fit`: one beta-divergence
multiplicative update of ``H`` with ``W`` fixed (update ``W`` by calling it on ``V.T`` with
the roles swapped). It is written for speed on dense and sparse input:

* beta = 2 uses the Gram form, numerator ``V W`` and denominator ``H (WᵀW)``, never forming
  the reconstruction;
* beta = 1 uses the column sums of ``W`` as denominator;
* a sparse ``V`` (torch COO, CSR or CSC) is never densified: it is indexed once in CSR order
  and the reconstruction is computed only at its non-zeros (``torch.sparse.sampled_addmm``),
  the numerator by a CSR product; only a general beta or a mask needs dense row blocks of the
  reconstruction for the denominator.

The epsilon handling follows scikit-learn's ``solver='mu'`` so iterates match it.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from ._csr import csc_pattern, csr_tensor, row_blocks, row_indices, sampled_mm, to_csr
from .data import check_beta, check_not_meta

__all__ = ["mu_update", "mu_gamma", "mu_statistics", "mu_apply", "EPSILON"]

#: Floor for reconstructions and zero denominators (scikit-learn's choice: float32 eps).
EPSILON = float(torch.finfo(torch.float32).eps)

# rows of a dense reconstruction block built at once (keeps temporaries near 32 MB)
_BLOCK_ELEMS = 1 << 22

# non-zeros of a sparse V handled at once (_Nonzeros.parts): 256 KiB float32 temporaries
_NNZ_BLOCK = 1 << 16

# The optional fused GPU path (the package's ``kernels`` module) registers itself here when it is
# imported: it depends on this module, never the reverse. The package imports its names lazily,
# so the first cuda update loads it by name (once), whoever imported this module.
_fast_path: Optional[Tuple[Callable, Callable]] = None
_FAST_PATH_MODULE = __package__ + ".kernels"
_fast_path_loaded = False


def _load_fast_path() -> None:
    """Import the optional fused path once (it calls :func:`_register_fast_path`)."""
    global _fast_path_loaded
    if not _fast_path_loaded:
        _fast_path_loaded = True
        importlib.import_module(_FAST_PATH_MODULE)


def _register_fast_path(supports: Optional[Callable], update: Optional[Callable]) -> None:
    """Install ``(supports(V, beta, mask) -> bool, update(V, W, H, ...))`` as :func:`mu_update`'s
    cuda fast path (``None`` removes it). Called by :mod:`torchnmf.kernels` on import."""
    global _fast_path
    _fast_path = None if supports is None or update is None else (supports, update)


def mu_gamma(beta: float) -> float:
    """Exponent making the beta-divergence MU monotone (Févotte & Idier 2011).

    ``1/(2-beta)`` for beta < 1, ``1`` for 1 <= beta <= 2, ``1/(beta-1)`` for beta > 2.
    """
    if beta < 1:
        return 1.0 / (2.0 - beta)
    if beta > 2:
        return 1.0 / (beta - 1.0)
    return 1.0


def _dot(A: Tensor, B: Tensor) -> Tensor:
    """``Σ A ∘ B`` for two 2-D tensors of one shape, whatever their strides.

    Both operands are flattened in the same logical order (a temporary is made only for an
    operand that is not contiguous in that order): flattening each in its own memory order
    pairs wrong entries when one is row-major and the other column-major (issue 14).
    """
    if B.dim() == 2 and not B.is_contiguous() and B.t().is_contiguous():
        A, B = A.t(), B.t()  # follow B's memory order, so B (the larger temporary) is a view
    return torch.dot(A.reshape(-1), B.reshape(-1))


def _big_mm(A: Tensor, B: Tensor) -> Tensor:
    """``A @ B`` for a big ``A`` (N, C) and a thin ``B`` (C, R), computed as ``(Bᵀ Aᵀ)ᵀ``.

    MKL is markedly faster with the thin operand on the left (measured 1.3-3x on CPU for
    R = 20, fp64 most); the result is a transposed view, which every later op accepts.
    """
    return (B.t() @ A.t()).t()


class _Nonzeros:
    """The non-zero pattern of a sparse 2-D ``V`` in CSR order, built once per fit (``cache["nz"]``).

    Products on the non-zeros run through torch's CSR kernels, the ones that make a
    Gamma-Poisson CAVI sweep fast (:func:`torchnmf.poisson.gamma.expected_counts`):
    ``sampled_addmm`` for the reconstruction at the non-zeros and CSR ``@`` dense for the
    numerator, 5-10x faster on CPU than gathered rows and a COO product (issue 16). Indices are
    int32 where they fit (the CSR product is ~1.5x faster and they take half the memory).

    Attributes
    ----------
    vals : Tensor, shape (nnz,)
        The values of ``V``, row-major (as a coalesced COO tensor holds them).
    crow, col : Tensor, shapes (N + 1,) and (nnz,)
        CSR row pointers and column indices.
    shape : tuple of int
        ``(N, C)``.
    """

    def __init__(self, V: Tensor):
        if V.layout == torch.sparse_coo:
            V = V.coalesce()
        S = V if V.layout == torch.sparse_csr else to_csr(V)
        self.shape = tuple(V.shape)
        self.vals = S.values()
        crow, col = S.crow_indices(), S.col_indices()
        if max(self.vals.numel(), *self.shape) < 2 ** 31 - 1:
            crow, col = crow.to(torch.int32), col.to(torch.int32)
        self.crow, self.col = crow, col
        self._rows: Optional[Tensor] = None
        self._csc: Optional[Tuple[Tensor, Tensor, Tensor]] = None
        self._parts: Optional[list] = None
        self.row0, self._keep_csc = 0, True

    def parts(self, size: Optional[int] = None) -> list:
        """``(part, H rows, W rows)``: the pattern in parts of consecutive rows of at most ``size`` non-zeros.

        ``size`` defaults to ``_NNZ_BLOCK``; the parts are made on the first call (later calls
        return them whatever ``size``).

        One part, this pattern itself, when it holds no more (the products of the whole
        block, as before). Each part is a :class:`_Nonzeros` of its rows (views of the
        indices and values, its own row pointers) with ``row0`` its first row; it does not
        keep its transposed pattern (:meth:`tmm` rebuilds it: once per block in OnlineMU).
        """
        if self._parts is None:  # the list never holds self: no reference cycle keeps a block alive
            self._parts = []
            size = _NNZ_BLOCK if size is None else size
            blocks = row_blocks(self.crow, size)  # a part's own list is [] already: never re-split
            for r0, r1 in blocks if len(blocks) > 1 else []:
                i0, i1 = int(self.crow[r0]), int(self.crow[r1])
                part = object.__new__(_Nonzeros)
                part.shape, part.vals = (r1 - r0, self.shape[1]), self.vals[i0:i1]
                part.crow, part.col = self.crow[r0:r1 + 1] - i0, self.col[i0:i1]
                part._rows = part._csc = None
                part._parts, part.row0, part._keep_csc = [], r0, False
                self._parts.append((part, slice(r0, r1), slice(None)))
        return self._parts or [(self, slice(None), slice(None))]

    def at(self, M: Tensor) -> Tensor:
        """``M`` (N, C) at this pattern's non-zeros, shape (nnz,)."""
        return M[self.rows + self.row0, self.col.long()]

    @property
    def rows(self) -> Tensor:
        """Row of each non-zero, shape (nnz,) (int64, made on first use)."""
        if self._rows is None:
            self._rows = row_indices(self.crow, nnz=self.vals.numel())
        return self._rows

    def csr(self, values: Tensor) -> Tensor:
        """The CSR matrix of this pattern holding ``values`` (nnz,)."""
        return csr_tensor(self.crow, self.col, values, self.shape)

    def dot(self, H: Tensor, W: Tensor) -> Tensor:
        """``(H Wᵀ)[n, c]`` at every non-zero ``(n, c)``, shape (nnz,), without forming ``H Wᵀ``."""
        if H.dtype not in (torch.float32, torch.float64) or W.dtype != H.dtype:
            return _gather_dot(H, W, self.rows, self.col.long())
        return sampled_mm(self.crow, self.col, H, W.t())

    def mm(self, values: Tensor, W: Tensor) -> Tensor:
        """``S @ W`` for the matrix ``S`` of this pattern holding ``values`` (nnz,); shape (N, R)."""
        if values.dtype != W.dtype:
            values = values.to(W.dtype)
        if W.dtype not in (torch.float32, torch.float64):  # CPU CSR products take fp32/fp64 only
            return _spmm(self.rows, self.col.long(), values, self.shape, W)
        return self.csr(values) @ W

    def tmm(self, values: Tensor, H: Tensor) -> Tensor:
        """``Sᵀ @ H`` for the matrix ``S`` of this pattern holding ``values`` (nnz,); ``H`` (N, R), result (C, R).

        Through the CSR matrix of ``Sᵀ`` (its pattern built once): one permutation of
        ``values``, no COO copy or sort of the indices per product.
        """
        if values.dtype != H.dtype:
            values = values.to(H.dtype)
        N, C = self.shape
        if H.dtype not in (torch.float32, torch.float64):
            return torch.sparse.mm(torch.sparse_coo_tensor(torch.stack([self.col.long(), self.rows]), values, (C, N),
                                                           check_invariants=False), H)
        ccol, rows_by_col, perm = self._transpose()
        return csr_tensor(ccol, rows_by_col, values[perm], (C, N)) @ H

    def _transpose(self) -> Tuple[Tensor, Tensor, Tensor]:
        """CSC pattern of this CSR one (see :func:`torchnmf._csr.csc_pattern`), built once."""
        if self._csc is not None:
            return self._csc
        csc = csc_pattern(self.crow, self.col, self.shape, lambda: self.rows, counting=self.col.device.type == "cpu")
        if self._keep_csc:
            self._csc = csc
        return csc

    def transposed(self) -> "_TransposedNonzeros":
        """The same non-zeros seen as those of ``Vᵀ`` (C, N), without copying them."""
        return _TransposedNonzeros(self)


class _TransposedNonzeros:
    """The non-zeros of ``Vᵀ`` for the :class:`_Nonzeros` of ``V``: same values and order, roles swapped.

    What :func:`_sparse_update` needs for the update of ``W`` in ``V ≈ H Wᵀ`` (``Vᵀ ≈ W Hᵀ``)
    from a CSR ``V``: reconstructions at the non-zeros by the same sampled product, the
    numerator through the transposed pattern (:meth:`_Nonzeros.tmm`).
    """

    def __init__(self, base: _Nonzeros):
        self.base, self.shape, self.vals = base, base.shape[::-1], base.vals
        self._parts: Optional[list] = None

    @property
    def rows(self) -> Tensor:
        return self.base.col.long()

    @property
    def col(self) -> Tensor:
        return self.base.rows

    def parts(self, size: Optional[int] = None) -> list:
        """The base's parts seen transposed: the part of rows ``r0:r1`` of ``V`` reads rows ``r0:r1`` of ``W`` here."""
        if self._parts is None:  # as the base's: never self (no reference cycle)
            self._parts = [(p.transposed(), ws, hs) for p, hs, ws in self.base.parts(size) if p is not self.base]
        return self._parts or [(self, slice(None), slice(None))]

    def at(self, M: Tensor) -> Tensor:
        """``M`` (C, N) at these non-zeros (``M`` is the mask of ``Vᵀ``)."""
        return M[self.base.col.long(), self.base.rows + self.base.row0]

    def dot(self, H: Tensor, W: Tensor) -> Tensor:
        return self.base.dot(W, H)

    def mm(self, values: Tensor, W: Tensor) -> Tensor:
        return self.base.tmm(values, W)


def _sparse_parts(V: Tensor, cache: Optional[dict]) -> Union[_Nonzeros, _TransposedNonzeros]:
    """The :class:`_Nonzeros` of a sparse 2-D ``V`` (of ``V.t()``, transposed, for a CSC ``V``), cached in ``cache``."""
    if cache is not None and "nz" in cache:
        return cache["nz"]
    nz = _Nonzeros(V.t()).transposed() if V.layout == torch.sparse_csc else _Nonzeros(V)
    if cache is not None:
        cache["nz"] = nz
    return nz


def _gather_dot(H: Tensor, W: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``(H Wᵀ)[rows, cols]`` without forming ``H Wᵀ``, in chunks of bounded memory (any dtype)."""
    out = torch.empty(rows.shape[0], dtype=H.dtype, device=H.device)
    step = max(1, _BLOCK_ELEMS // max(1, H.shape[1]))
    for s in range(0, rows.shape[0], step):
        e = s + step
        out[s:e] = (H[rows[s:e]] * W[cols[s:e]]).sum(1)
    return out


def _spmm(rows: Tensor, cols: Tensor, vals: Tensor, shape, W: Tensor) -> Tensor:
    """``S @ W`` for the COO matrix ``S`` with the given (coalesced) entries (any dtype)."""
    S = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, shape, is_coalesced=True,
                                check_invariants=False)
    return torch.sparse.mm(S, W)


def _dense_blocks(H: Tensor, W: Tensor, beta: float, eps: float, M: Optional[Tensor], want_sum: bool):
    """Denominator ``(M ∘ (HWᵀ)^(beta-1)) W`` and ``Σ M ∘ (HWᵀ)^beta``, by row blocks of ``HWᵀ``."""
    N, C = H.shape[0], W.shape[0]
    den = torch.empty_like(H)
    total = H.new_zeros(())
    step = max(1, _BLOCK_ELEMS // max(1, C))
    for s in range(0, N, step):
        WH = H[s:s + step] @ W.t()
        if beta < 2:
            WH.clamp_min_(eps)
        D = WH if beta == 2 else WH.pow(beta - 1)
        if M is not None:
            D = D * M[s:s + step]
        den[s:s + step] = D @ W
        if want_sum:
            total = total + (D * WH).sum()
    return den, total


def _buffer_like(V: Tensor, cache: dict, name: str) -> Tensor:
    """A scratch tensor of ``V``'s shape, dtype and strides, kept in ``cache`` across calls."""
    buf = cache.get(name)
    if buf is None or buf.shape != V.shape or buf.dtype != V.dtype or buf.stride() != V.stride():
        buf = cache[name] = torch.empty_like(V)
    return buf


def _dense_update(V, W, H, beta, M, eps, with_loss, cache):
    """Numerator, denominator and (optionally) the divergence for a dense ``V``."""
    loss = None
    if beta == 2 and M is None:
        num = _big_mm(V, W)
        WtW = W.t() @ W
        den = H @ WtW
        if with_loss:
            if "sq" not in cache:
                cache["sq"] = _dot(V, V)
            loss = 0.5 * (cache["sq"] - 2 * (H * num).sum() + ((H.t() @ H) * WtW).sum())
        return num, den, loss

    # the reconstruction, in a buffer laid out like V (so V ∘ WH runs in memory order)
    buf = _buffer_like(V, cache, "WH")
    if buf.is_contiguous() or not buf.t().is_contiguous():
        WH = torch.matmul(H, W.t(), out=buf)
    else:  # V is a transposed view (the W update): write the product in memory order
        torch.matmul(W, H.t(), out=buf.t())
        WH = buf
    if beta < 2:
        WH.clamp_min_(eps)
    if beta == 1:
        den = W.sum(0).expand_as(H) if M is None else _big_mm(M, W)
        if with_loss:
            if "c1" not in cache:
                X = torch.xlogy(V, V) - V
                cache["c1"] = (X if M is None else X * M).sum()
            # Σ V log WH: WH >= eps > 0 here, so a plain (vectorised) log; xlogy is ~10x slower
            L = torch.log(WH)
            if M is not None:
                loss = cache["c1"] - L.mul_(V).mul_(M).sum() + (H * den).sum()
            else:
                loss = cache["c1"] - _dot(V, L) + torch.dot(H.sum(0), W.sum(0))
        ratio = torch.div(V, WH, out=WH)
        if M is not None:
            ratio.mul_(M)
        num = _big_mm(ratio, W)
        return num, den, loss
    if beta == 2:  # with a mask
        if "MV" not in cache:
            cache["MV"] = V * M
        MV = cache["MV"]
        if with_loss:
            loss = 0.5 * (M * (V - WH).pow(2)).sum()
        num = _big_mm(MV, W)
        den = _big_mm(WH * M, W)
        return num, den, loss
    # kept buffers: a fresh (N, C) temporary costs page faults, more than the arithmetic
    P = torch.pow(WH, beta - 2, out=_buffer_like(V, cache, "P"))
    D = torch.mul(WH, P, out=_buffer_like(V, cache, "D"))  # WH^(beta-1)
    Nm = P.mul_(V)  # V WH^(beta-2)
    if M is not None:
        D.mul_(M)
        Nm.mul_(M)
    if with_loss:
        if beta == 0:
            r = V / WH
            t = r - torch.log(r) - 1
            loss = (t if M is None else t * M).sum()
        else:
            if "cb" not in cache:
                Vb = V.pow(beta)
                cache["cb"] = (Vb if M is None else Vb * M).sum()
            loss = (cache["cb"] + (beta - 1) * (D * WH).sum() - beta * (D * V).sum()) / (beta * (beta - 1))
    return _big_mm(Nm, W), _big_mm(D, W), loss


def _sparse_update(V, W, H, beta, M, eps, with_loss, cache):
    """Numerator, denominator and (optionally) the divergence for a sparse ``V``, on its non-zeros.

    The non-zeros are taken in parts of at most ``cache["nnz_block"]`` (default
    ``_NNZ_BLOCK``; consecutive rows of the CSR pattern, see :meth:`_Nonzeros.parts`): the
    arrays over the non-zeros (reconstruction, ratio) are one part's, so a streamed block's
    working set stays a fraction of the block.
    """
    if beta <= 0:
        raise ValueError("beta <= 0 needs a strictly positive V; a sparse V has zeros")
    nz = _sparse_parts(V, cache)
    parts = nz.parts(cache.get("nnz_block"))
    num = None if len(parts) == 1 else H.new_zeros(H.shape)
    t1 = t2 = H.new_zeros(()) if with_loss else None  # the divergence's sums over the non-zeros
    for part, hs, ws in parts:
        Hp, Wp, vals = H[hs], W[ws], part.vals
        if beta == 2 and M is None:
            contrib = part.mm(vals, Wp)
        else:
            m = None if M is None else part.at(M)
            wh = part.dot(Hp, Wp)  # a fresh array: for KL clamped and divided in place (one nnz array, not three)
            whc = wh.clamp_min_(eps) if beta < 2 else wh
            if beta == 1:
                r = ratio = torch.div(vals, whc, out=whc)  # X / (HWᵀ), also read by the loss
            elif beta == 2:
                r = vals
            else:
                r = vals * whc.pow(beta - 2)
            if m is not None:
                r = r * m
            contrib = part.mm(r, Wp)
            del r
            if with_loss:
                w = 1 if m is None else m
                if beta == 1:
                    t1 = t1 + (w * torch.xlogy(vals, ratio).sub_(vals)).sum()
                elif beta == 2:
                    t1, t2 = t1 + (w * vals * vals).sum(), t2 + (w * vals * wh).sum()
                else:
                    t1 = t1 + (w * vals.pow(beta)).sum()
                    t2 = t2 + (w * vals * whc.pow(beta - 1)).sum()
            del wh, whc
        if num is None:
            num = contrib
        else:
            num[hs] += contrib
        del contrib
    loss = None
    if beta == 2 and M is None:
        WtW = W.t() @ W
        den = H @ WtW
        if with_loss:
            if "sq" not in cache:
                cache["sq"] = torch.dot(nz.vals, nz.vals)
            loss = 0.5 * (cache["sq"] - 2 * (H * num).sum() + ((H.t() @ H) * WtW).sum())
        return num, den, loss
    if beta == 1:
        if M is None:
            den = W.sum(0).expand_as(H)
            all_sum = torch.dot(H.sum(0), W.sum(0)) if with_loss else None
        else:
            den = M @ W
            all_sum = (H * den).sum() if with_loss else None
    else:
        den, all_sum = _dense_blocks(H, W, beta, eps, M, with_loss)
    if with_loss:
        if beta == 1:
            loss = t1 + all_sum
        elif beta == 2:
            loss = 0.5 * (t1 - 2 * t2 + all_sum)
        else:
            loss = (t1 + (beta - 1) * all_sum - beta * t2) / (beta * (beta - 1))
    return num, den, loss


def _statistics(V, W, H, beta: float, mask, eps, with_loss, cache):
    """(num, den, loss) of :func:`mu_update`, dense or sparse ``V``; ``mask`` cast to H's dtype."""
    M = None if mask is None else (mask if mask.dtype == H.dtype else mask.to(H.dtype))
    update = _dense_update if V.layout == torch.strided else _sparse_update
    return update(V, W, H, beta, M, eps, with_loss, {} if cache is None else cache)


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
    cache: Optional[Dict] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    r"""One multiplicative update of ``H`` for ``V ≈ H Wᵀ`` under the beta-divergence.

    .. math::
        H \leftarrow H \circ \left(\frac{[M \circ V \circ (HW^\top)^{\beta-2}]\,W}
        {[M \circ (HW^\top)^{\beta-1}]\,W + \ell_1 + \ell_2 H}\right)^{\gamma}

    To update ``W`` call ``mu_update(V.T, H, W, ...)`` (with ``mask.T``).

    Parameters
    ----------
    V : Tensor, shape (N, C)
        Non-negative target, dense or sparse (COO or CSR; never densified). Not checked
        here for speed: :meth:`torchnmf.nmf.NMF.fit` validates its input.
    W : Tensor, shape (C, R)
        The fixed factor.
    H : Tensor, shape (N, R)
        The factor to update (not modified unless passed as ``out``).
    beta : float, default 1
        Divergence: 2 Euclidean, 1 generalised KL, 0 Itakura-Saito, any real in between or
        beyond. beta <= 0 needs a strictly positive dense ``V``.
    mask : Tensor, shape (N, C), optional
        1 (or True) for observed entries, 0 for missing ones, which then do not count.
    l1, l2 : float, default 0
        Penalties ``l1 Σ H + l2/2 ||H||²`` added to the divergence.
    gamma : float, optional
        Exponent of the update; default :func:`mu_gamma` (monotone for every beta).
    eps : float, default float32 eps
        Floor of the reconstruction (beta < 2) and of zero denominators, as scikit-learn.
    out : Tensor, shape (N, R), optional
        Where to write the result (may be ``H`` itself, for an in-place update).
    with_loss : bool, default False
        Also return the (masked) beta-divergence at the *input* point, from quantities the
        update computes anyway (no extra reconstruction).
    cache : dict, optional
        An opaque dict kept by the caller across calls with the same ``V`` and ``mask``
        (buffers, norms of ``V``, the non-zero pattern of a sparse ``V``).

    Returns
    -------
    Tensor, shape (N, R)
        The updated ``H``; with ``with_loss``, a tuple ``(H_new, loss)``.
    """
    # ---- fused-kernel dispatch point (issue 8, torchnmf.kernels; optional) ----
    if V.is_cuda:
        _load_fast_path()
    if V.is_cuda and _fast_path is not None:
        supports, fused_update = _fast_path
        if supports(V, beta, mask):
            return fused_update(V, W, H, beta=beta, mask=mask, l1=l1, l2=l2, gamma=gamma,
                                eps=eps, out=out, with_loss=with_loss)
    # ---------------------------------------------------------------------------
    for t, n in ((V, "V"), (W, "W"), (H, "H")):
        check_not_meta(t, n)
    if V.dim() != 2 or W.dim() != 2 or H.dim() != 2:
        raise ValueError(f"V, W and H must be 2-D, got shapes {tuple(V.shape)}, {tuple(W.shape)}, {tuple(H.shape)}")
    if W.shape[1] != H.shape[1] or V.shape[0] != H.shape[0] or V.shape[1] != W.shape[0]:
        raise ValueError(
            f"shapes do not match V (N, C) ≈ H (N, R) Wᵀ (R, C): V {tuple(V.shape)}, "
            f"W {tuple(W.shape)}, H {tuple(H.shape)}"
        )
    beta = check_beta(beta)
    g = mu_gamma(beta) if gamma is None else float(gamma)
    with torch.no_grad():
        num, den, loss = _statistics(V, W, H, beta, mask, eps, with_loss, cache)
        # num is a fresh tensor here: the ratio may overwrite it
        result = _multiply(H, num, den, g, l1, l2, eps, out=out, num_is_scratch=True)
    return (result, loss) if with_loss else result


def mu_statistics(
    V: Tensor,
    W: Tensor,
    H: Tensor,
    beta: float = 1,
    mask: Optional[Tensor] = None,
    *,
    eps: float = EPSILON,
    with_loss: bool = False,
    cache: Optional[Dict] = None,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    r"""Numerator, denominator (before penalties) and divergence of :func:`mu_update`.

    For ``V.T`` with roles swapped (the ``W`` update) all three are sums over the rows of
    ``V``, so a data-parallel fit sums them over row shards (:mod:`torchnmf.parallel`)
    before :func:`mu_apply`.

    Parameters
    ----------
    V, W, H, beta, mask, eps, with_loss, cache
        As :func:`mu_update`.

    Returns
    -------
    num, den : Tensor, shape (N, R)
        ``[M ∘ V ∘ (HWᵀ)^(β-2)] W`` and ``[M ∘ (HWᵀ)^(β-1)] W`` (contiguous).
    loss : Tensor of shape () or None
        The divergence at the input point with ``with_loss``.
    """
    with torch.no_grad():
        num, den, loss = _statistics(V, W, H, check_beta(beta), mask, eps, with_loss, cache)
        # _big_mm gives transposed views; collectives (all_reduce) want contiguous tensors
        return num.contiguous(), den.contiguous(), loss


def mu_apply(H: Tensor, num: Tensor, den: Tensor, beta: float = 1, l1: float = 0.0, l2: float = 0.0,
             gamma: Optional[float] = None, *, eps: float = EPSILON) -> Tensor:
    """``H ∘ (num / (den + l1 + l2 H))^γ``, the last step of :func:`mu_update` (new tensor).

    Parameters
    ----------
    H, num, den : Tensor, shape (N, R)
        ``num``/``den`` as returned by :func:`mu_statistics` (summed over shards if need be).
    beta, l1, l2, gamma, eps
        As :func:`mu_update`.
    """
    g = mu_gamma(float(beta)) if gamma is None else float(gamma)
    with torch.no_grad():
        return _multiply(H, num, den, g, l1, l2, eps)


def _multiply(H: Tensor, num: Tensor, den: Tensor, g: float, l1: float, l2: float, eps: float,
              out: Optional[Tensor] = None, num_is_scratch: bool = False) -> Tensor:
    """``H ∘ (num / (den + l1 + l2 H))^g``, zero (and subnormal) denominators floored at ``eps``.

    A subnormal denominator is zero for the update's purpose: dividing by it overflows to inf,
    and a factor entry already at 0 then gives 0 · inf = NaN (a Frobenius fit whose entries
    collapse reached 3.7e-315 and failed).
    """
    if l1:
        den = den + l1
    if l2:
        den = den + l2 * H
    den = torch.where(den < torch.finfo(den.dtype).tiny, torch.as_tensor(eps, dtype=den.dtype, device=den.device),
                      den)
    mult = num.div_(den) if num_is_scratch else num / den
    if g != 1:
        mult.pow_(g)
    return torch.mul(H, mult, out=out) if out is not None else H * mult
