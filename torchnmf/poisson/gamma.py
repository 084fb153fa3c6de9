r"""Gamma-Poisson matrix factorization, fitted by conjugate updates on nonzeros only.

Model, for counts :math:`X` with rows :math:`c`, columns :math:`t` and :math:`K` factors:

.. math::

    U_{ck} \sim \mathrm{Gamma}(a, \kappa_c), \quad
    \alpha_{tk} \sim \mathrm{Gamma}(b, \lambda_t), \quad
    Z_{ctk} \sim \mathrm{Poisson}(U_{ck}\alpha_{tk}), \quad
    X_{ct} = \textstyle\sum_k Z_{ctk}

(shape-rate parametrisation). The mean-field posterior is
:math:`q(U_{ck}) = \mathrm{Gamma}(s^U_{ck}, r^U_{ck})`,
:math:`q(\alpha_{tk}) = \mathrm{Gamma}(s^\alpha_{tk}, r^\alpha_{tk})` and
:math:`q(Z_{ct\cdot}) = \mathrm{Mult}(X_{ct}, \phi_{ct})`; :math:`\kappa` and :math:`\lambda`
are fitted by maximum likelihood (empirical Bayes) or kept fixed.

The multinomial parameters are never stored. They are optimal for the current
:math:`q(U), q(\alpha)`,
:math:`\phi_{ctk} = \mathrm{softmax}_k(\mathbb E\log U_{ck} + \mathbb E\log\alpha_{tk})`, and
every quantity a coordinate step needs is a sum of :math:`X_{ct}\phi_{ctk}` over the nonzeros.
Writing :math:`G^U_{ck} = \exp(\mathbb E\log U_{ck} - m_c)` (``m_c`` the row maximum, so
:math:`G \le 1` and nothing overflows) and likewise :math:`G^\alpha`, the softmax is
:math:`\phi_{ctk} = G^U_{ck}G^\alpha_{tk} / d_{ct}` with :math:`d_{ct} = \sum_k G^U_{ck}G^\alpha_{tk}`,
so

* :math:`d` on the nonzeros is one sampled dense-dense product (SDDMM),
* :math:`\sum_t X_{ct}\phi_{ctk} = G^U_{ck}\,[S G^\alpha]_{ck}` and
  :math:`\sum_c X_{ct}\phi_{ctk} = G^\alpha_{tk}\,[S^\top G^U]_{tk}` with the sparse matrix
  :math:`S_{ct} = X_{ct}/d_{ct}` (two sparse-dense products),

which takes :math:`O(\mathrm{nnz} + (\mathrm{rows}+\mathrm{cols})K)` memory and no
``exp`` over the nonzeros. Entries where :math:`d` underflows (factors whose preferred
components disagree by hundreds of nats) are recomputed by an explicit log-softmax over
:math:`K`, in chunks. Zero entries enter only through the column sums
:math:`\sum_c \mathbb E U_{ck}` and :math:`\sum_t \mathbb E\alpha_{tk}`.

The sufficient statistics of a batch of rows (:meth:`GammaPoisson.statistics`) are what a
trainer needs: :class:`torchnmf.trainer.CAVI` (full sweeps), :class:`torchnmf.trainer.NaturalGradient`
(stochastic variational inference) and data-parallel fitting, which sums the statistics named
in :attr:`GammaPoisson.global_statistics` over processes before each update.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Gamma, kl_divergence
from torch.nn.utils import parametrize

from .. import constraints
from .._csr import csc_pattern, is_canonical, row_blocks as _row_blocks, row_indices, sampled_mm
from .._special import digamma_positive
from ..data import (as_tensor, check_counts, check_magnitude, check_option, check_positive, check_positive_vector,
                    check_rank, check_shape, nonzeros)
from ..kernels.sparse import csr_tensor
from .elbo import ELBO

# layer -> {(dtype, device): (digamma(alpha_shape), log(alpha_rate))} while q(α) is held fixed
_ALPHA_LOGS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()

__all__ = ["GammaPoisson", "CountMatrix"]

Rows = Union[None, Tensor, np.ndarray, Sequence[int]]


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: Tuple[int, int]) -> Tensor:
    # torch's one-time "CSR support is in beta" notice is filtered around this call only: the
    # kernels used here (CSR @ dense, sampled_addmm) are stable
    return csr_tensor(crow, col, values, shape)


class CountMatrix:
    """The nonzero entries of a count matrix, indexed for row- and column-wise sparse products.

    Build it once with :meth:`GammaPoisson.prepare` (or :meth:`from_input`) and pass it
    instead of the raw matrix to avoid converting the input at every step.

    Parameters
    ----------
    rows, cols : LongTensor, shape (nnz,)
        Row and column of each nonzero.
    values : Tensor, shape (nnz,)
        Positive counts.
    shape : tuple of int
        ``(n_rows, n_cols)``.

    Attributes
    ----------
    rows, cols, values : Tensor, shape (nnz,)
        Row, column and count of each nonzero, sorted by row, then column. ``rows`` (int64)
        is made from ``crow`` on each access: it is not stored.
    crow : IntTensor or LongTensor, shape (n_rows + 1,)
        CSR row pointers.
    csc_pos : IntTensor or LongTensor, shape (nnz,)
        Position of each (row-major) nonzero in column-major order.
    ccol : IntTensor or LongTensor, shape (n_cols + 1,)
        CSC column pointers.
    rows_by_col : IntTensor or LongTensor, shape (nnz,)
        Row of each nonzero in column-major order.
    index_dtype : torch.dtype
        Of the index tensors above (except ``rows``): ``torch.int32`` while ``nnz`` and both
        sizes are below ``2**31`` (half the memory, and torch's CSR kernels run faster on
        them), ``torch.int64`` beyond.
    log_factorial : Tensor, shape ()
        :math:`\\sum \\log X_{ct}!` (``lgamma(X + 1)`` for non-integer counts), summed in
        float64 and stored in the values' dtype.
    log_factorial64 : Tensor, shape ()
        The same in float64 (float32's rounding of it exceeds the ELBO for large counts).
    row_totals, col_totals : Tensor, shape (n_rows,) and (n_cols,)
        Row and column sums of the counts, summed in the values' dtype.
    row_totals64, col_totals64 : Tensor, shape (n_rows,) and (n_cols,)
        The same summed in float64 (read by the float64 ELBO pass of a float32 layer).

    Notes
    -----
    Memory: ``nnz`` values and three ``nnz`` index arrays (``cols``, ``csc_pos``,
    ``rows_by_col``), int32 where the sizes allow: 16 bytes per nonzero for float32 counts.
    Made by :meth:`from_input` from a canonical CSR tensor (sorted columns, no repeats or
    zeros, e.g. a streamed batch) it shares the tensor's values and indices and builds the
    column-major pattern (``ccol``, ``rows_by_col``, ``csc_pos``) only when one of them is
    first read (:attr:`has_csc`); :func:`expected_counts` takes the column sums block by block
    without it.
    """

    def __init__(self, rows: Tensor, cols: Tensor, values: Tensor, shape: Tuple[int, int]):
        n_rows, n_cols = int(shape[0]), int(shape[1])
        self.shape = (n_rows, n_cols)
        rows, cols = rows.long(), cols.long()
        key = rows * n_cols + cols
        if key.numel() > 1 and not bool((key[1:] > key[:-1]).all()):
            order = torch.argsort(key)
            rows, cols, values = rows[order], cols[order], values[order]
            del order
        del key
        small = max(values.numel(), n_rows, n_cols) < 2 ** 31 - 1
        idx = torch.int32 if small else torch.int64
        self.index_dtype = idx
        self.values = values
        zero = torch.zeros(1, dtype=torch.long, device=rows.device)
        self.crow = torch.cat([zero, torch.bincount(rows, minlength=n_rows).cumsum(0)]).to(idx)
        self.ccol = torch.cat([zero, torch.bincount(cols, minlength=n_cols).cumsum(0)]).to(idx)
        # one stable sort by column gives both the CSC rows and each nonzero's CSC position
        col_order = torch.argsort(cols, stable=True)
        self.rows_by_col = rows[col_order].to(idx)
        self.csc_pos = torch.empty_like(col_order, dtype=idx)
        self.csc_pos[col_order] = torch.arange(col_order.numel(), dtype=idx, device=rows.device)
        del col_order
        self.log_factorial64 = torch.lgamma(values.double() + 1).sum()
        self.log_factorial = self.log_factorial64.to(values.dtype)
        self._totals(rows, cols)
        self.cols = cols.to(idx)

    def _totals(self, rows: Tensor, cols: Tensor) -> None:
        n_rows, n_cols = self.shape
        values = self.values
        self.row_totals = values.new_zeros(n_rows).index_add_(0, rows, values)
        self.col_totals = values.new_zeros(n_cols).index_add_(0, cols, values)
        if values.dtype == torch.float64:
            self.row_totals64, self.col_totals64 = self.row_totals, self.col_totals
        else:
            v64 = values.double()
            self.row_totals64 = v64.new_zeros(n_rows).index_add_(0, rows, v64)
            self.col_totals64 = v64.new_zeros(n_cols).index_add_(0, cols, v64)

    def row_indices(self) -> Tensor:
        """Row of each nonzero, shape (nnz,), int64, made from ``crow`` (it is not stored)."""
        return row_indices(self.crow, nnz=self.nnz)

    def __getattr__(self, name: str):
        # ``rows`` (see Attributes) is computed, not stored; not a property so that autodoc
        # does not make a second 'rows' target beside streaming.RowBatch.rows
        if name == "rows":
            return self.row_indices()
        if name in ("ccol", "rows_by_col", "csc_pos") and "crow" in self.__dict__:  # see _from_csr
            self._build_csc()
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def has_csc(self) -> bool:
        """Whether the column-major pattern (``ccol``, ``rows_by_col``, ``csc_pos``) is built."""
        return "csc_pos" in self.__dict__

    def _build_csc(self) -> None:
        self.ccol, self.rows_by_col, perm = csc_pattern(self.crow, self.cols, self.shape, self.row_indices,
                                                        counting=self.values.device.type == "cpu")
        self.csc_pos = torch.empty_like(perm, dtype=self.index_dtype)
        self.csc_pos[perm] = torch.arange(perm.numel(), dtype=self.index_dtype, device=perm.device)

    def totals(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """Row and column sums of the counts for a computation in ``dtype``, shapes (n_rows,), (n_cols,).

        Summed in float64 for ``torch.float64`` (whatever the values' dtype), in the values'
        dtype otherwise (and cast).
        """
        if dtype == torch.float64:
            return self.row_totals64, self.col_totals64
        return self.row_totals.to(dtype), self.col_totals.to(dtype)

    def log_factorial_in(self, dtype: torch.dtype) -> Tensor:
        """:attr:`log_factorial64` for ``torch.float64``, :attr:`log_factorial` cast to ``dtype`` otherwise."""
        return self.log_factorial64 if dtype == torch.float64 else self.log_factorial.to(dtype)

    @property
    def nnz(self) -> int:
        """Number of nonzero entries."""
        return self.values.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "CountMatrix":
        """A copy on ``device`` with values of ``dtype`` (``self`` when nothing changes)."""
        device = torch.device(device) if device is not None else self.device
        dtype = dtype or self.dtype
        if device == self.device and dtype == self.dtype:
            return self
        out = object.__new__(CountMatrix)
        out.shape = self.shape
        out.index_dtype = self.index_dtype
        for name in ("cols", "crow", "csc_pos", "ccol", "rows_by_col"):
            setattr(out, name, getattr(self, name).to(device))
        out.values = self.values.to(device=device, dtype=dtype)
        out.log_factorial64 = self.log_factorial64.to(device)
        out.log_factorial = out.log_factorial64.to(dtype)
        # summed again in the new dtype: float32 totals of large counts are rounded, and the
        # float64 ELBO (GammaPoisson.statistics) reads them
        out._totals(out.row_indices(), out.cols.long())
        return out

    @classmethod
    def from_input(cls, X, name: str = "X", *, allow_noninteger: bool = False,
                   dtype: Optional[torch.dtype] = None, device=None,
                   shape: Optional[Sequence[Optional[int]]] = None) -> "CountMatrix":
        """Check and index a count matrix.

        Parameters
        ----------
        X : Tensor (dense or sparse COO/CSR/CSC), numpy array, scipy.sparse matrix or CountMatrix
            Shape ``(n_rows, n_cols)``; non-negative integer counts (any values with
            ``allow_noninteger``). It is never modified.
        name : str
            Argument name used in error messages.
        allow_noninteger : bool, default False
            Accept non-integer values (a quasi-likelihood fit).
        dtype, device : optional
            Of the values; default the input's floating dtype (default dtype for integers).
        shape : sequence of int or None, optional
            Expected shape (``None`` matches any size).

        Raises
        ------
        TypeError, ValueError
            Through :mod:`torchnmf.data`: non-numeric input, wrong dimensions, NaN/inf,
            negative or (without ``allow_noninteger``) non-integer counts, wrong shape, counts
            too large for the dtype (:func:`~torchnmf.data.check_magnitude`).
        """
        if isinstance(X, CountMatrix):
            if shape is not None:
                check_shape(torch.empty(X.shape, device="meta"), shape, name)
            return X.to(device=device, dtype=dtype)
        T = as_tensor(X, name, device=device, ndim=2, float_only=False)
        if shape is not None:
            check_shape(T, shape, name)
        # checked in the input's own dtype: a float32 cast could hide a non-integer or its noise
        T = check_counts(T, name, allow_noninteger=allow_noninteger, escape="allow_noninteger=True")
        if dtype is not None:
            T = as_tensor(T, name, dtype=dtype)
        # the fits' check: counts too large for the dtype's arithmetic (one float32 entry of
        # 3e38) gave NaN from the trainers' steps and the ELBO without an error
        check_magnitude(T, name, T.dtype)
        if T.layout == torch.sparse_csr and is_canonical(T.crow_indices(), T.col_indices()):
            vals = T.values()
            if not bool((vals == 0).any()):  # explicit zeros are dropped by the general path
                return cls._from_csr(T.crow_indices(), T.col_indices(), vals, tuple(T.shape))
        rows, cols, vals = nonzeros(T)
        return cls(rows, cols, vals, tuple(T.shape))

    @classmethod
    def _from_csr(cls, crow: Tensor, col: Tensor, values: Tensor, shape: Tuple[int, int]) -> "CountMatrix":
        """From canonical CSR parts (sorted columns, no repeats, no zeros), shared where their types allow.

        The path of streamed row blocks: no COO indices, no int64 sort keys, no sort (the CSC
        pattern by scipy's counting sort on the host); the sums over the nonzeros in blocks.
        """
        out = object.__new__(cls)
        n_rows, n_cols = out.shape = (int(shape[0]), int(shape[1]))
        idx = out.index_dtype = torch.int32 if max(values.numel(), n_rows, n_cols) < 2 ** 31 - 1 else torch.int64
        out.values, out.crow, out.cols = values, crow.to(idx), col.to(idx)
        # the column-major pattern (ccol, rows_by_col, csc_pos) is built on first use: the local
        # steps of a streamed batch never read it, and its column sums go block by block without it
        out.row_totals, out.col_totals = values.new_zeros(n_rows), values.new_zeros(n_cols)
        wide = values.dtype != torch.float64
        out.row_totals64 = values.new_zeros(n_rows, dtype=torch.float64) if wide else out.row_totals
        out.col_totals64 = values.new_zeros(n_cols, dtype=torch.float64) if wide else out.col_totals
        log_factorial = values.new_zeros((), dtype=torch.float64)
        for r0, r1 in _row_blocks(out.crow, _BLOCK):
            lo, hi = int(out.crow[r0]), int(out.crow[r1])
            rows = row_indices(out.crow[r0:r1 + 1], first=r0, nnz=hi - lo)
            cols, v = out.cols[lo:hi], values[lo:hi]
            out.row_totals.index_add_(0, rows, v)
            out.col_totals.index_add_(0, cols, v)
            v64 = v.double()
            if wide:
                out.row_totals64.index_add_(0, rows, v64)
                out.col_totals64.index_add_(0, cols, v64)
            log_factorial += torch.lgamma(v64 + 1).sum()
            del rows, v64
        out.log_factorial64 = log_factorial
        out.log_factorial = log_factorial.to(values.dtype)
        return out

    def __repr__(self) -> str:
        return f"CountMatrix(shape={self.shape}, nnz={self.nnz}, dtype={self.dtype}, device={self.device})"


#: Nonzeros per sub-block of the elementwise work of :func:`expected_counts` (and rows of q(α)
#: times K in GammaPoisson._alpha_terms): bounds those temporaries to a few MiB (the float64 ELBO
#: pass of a 1M-nonzero matrix held several nnz-sized float64 arrays at once). The sampled
#: product itself is not split by default: each call has a fixed cost.
_BLOCK = 1 << 17

#: Entries of q(U)'s start drawn and written at once by GammaPoisson.reset_parameters.
_INIT_BLOCK = 1 << 16


def _column_terms(elog_a: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The column factors of :func:`expected_counts`: ``(m_a, g_a, g_a.T)``.

    Parameters
    ----------
    elog_a : Tensor, shape (m, K)
        :math:`\\mathbb E\\log \\alpha`.

    Returns
    -------
    m_a : Tensor, shape (m, 1)
        Row maxima of ``elog_a`` (the shift that keeps ``exp`` finite).
    g_a : Tensor, shape (m, K)
        ``exp(elog_a - m_a)``.
    g_a_t : Tensor, shape (K, m)
        ``g_a.t()``, a view (the sampled product's operand).
    """
    ma = elog_a.amax(1, keepdim=True)
    ga = torch.exp(elog_a - ma)
    # a transposed view, not a copy: torch's sampled product reads it as fast (faster on CPU)
    return ma, ga, ga.t()


def expected_counts(data: CountMatrix, elog_u: Tensor, elog_a: Tensor, need_rows: bool = True,
                    need_cols: bool = True, chunk_size: Optional[int] = None,
                    col_terms: Optional[Tuple[Tensor, Tensor, Tensor]] = None
                    ) -> Tuple[Optional[Tensor], Optional[Tensor], Tensor]:
    r"""Expected latent counts summed over columns and over rows, and the log normaliser.

    With :math:`\phi_{ctk} = \mathrm{softmax}_k(\mathbb E\log U_{ck} + \mathbb E\log\alpha_{tk})`,
    over the nonzeros only (see the module notes for how).

    Parameters
    ----------
    data : CountMatrix, shape (n, m)
    elog_u : Tensor, shape (n, K)
        :math:`\mathbb E\log U` of the data's rows.
    elog_a : Tensor, shape (m, K)
        :math:`\mathbb E\log \alpha`.
    need_rows, need_cols : bool
        Compute the row sums / column sums (the log normaliser is always computed).
    chunk_size : int, optional
        Nonzeros handled at once by the sampled product, the row sums and the log-softmax
        fallback (default: all). Elementwise work runs in sub-blocks of ``_BLOCK`` (131072)
        nonzeros whatever ``chunk_size``: the extra memory is about two arrays of
        ``chunk_size`` values (``d = X / d`` in place) plus one ``nnz`` array of ``X / d``
        when ``need_cols``.
    col_terms : tuple of Tensor, optional
        ``(m_a, g_a, g_a.T)`` already computed from ``elog_a`` by ``_column_terms``
        (shapes ``(m, 1)``, ``(m, K)``, ``(K, m)``), so that repeated calls with the same
        ``elog_a`` (the local iterations of an SVI step) do not recompute them.

    Returns
    -------
    row_counts : Tensor, shape (n, K), or None
        :math:`\sum_t X_{ct}\phi_{ctk}`.
    col_counts : Tensor, shape (m, K), or None
        :math:`\sum_c X_{ct}\phi_{ctk}`.
    log_norm : Tensor, shape ()
        :math:`\sum_{ct} X_{ct}\log\sum_k \exp(\mathbb E\log U_{ck} + \mathbb E\log\alpha_{tk})`;
        differentiable in ``elog_u`` and ``elog_a``.
    """
    n, m = data.shape
    K = elog_u.shape[1]
    if data.nnz == 0:
        zero = elog_u.sum() * 0
        return (elog_u.new_zeros(n, K) if need_rows else None,
                elog_a.new_zeros(m, K) if need_cols else None, zero)
    dtype = elog_u.dtype
    crow, cols = data.crow, data.cols
    mu = elog_u.amax(1, keepdim=True)
    gu = torch.exp(elog_u - mu)
    ma, ga, gaT = _column_terms(elog_a) if col_terms is None else col_terms
    row_totals, col_totals = data.totals(dtype)
    # sum X (log d + m_c + m_t), the shifts summed through the row and column totals
    log_norm = (row_totals * mu[:, 0]).sum() + (col_totals * ma[:, 0]).sum()
    row_counts = gu.new_zeros(n, K) if need_rows else None
    # X / d in column-major order, filled block by block, for the column sums' product; without a
    # built column-major pattern (a streamed batch), each block's transpose is taken on its own
    by_block = need_cols and not data.has_csc
    w_csc = data.values.new_empty(data.nnz, dtype=dtype) if need_cols and not by_block else None
    col_sums = gu.new_zeros(m, K) if by_block else None
    col_fix = None
    tiny = math.sqrt(torch.finfo(dtype).tiny)
    # the counts in the factors' dtype (a float64 copy only for the float64 ELBO pass of a float32 layer)
    x_all = data.values.to(dtype)
    for r0, r1 in _row_blocks(crow, chunk_size):
        # one block (the default): its bounds are known without reading crow (host syncs)
        i0, i1 = (0, data.nnz) if (r0, r1) == (0, n) else (int(crow[r0]), int(crow[r1]))
        crow_b, cols_b = crow[r0:r1 + 1] - i0, cols[i0:i1]
        if torch.is_grad_enabled() and (gu.requires_grad or gaT.requires_grad):
            # beta=0: the pattern's values (the counts, finite) are multiplied by 0, not read
            d_all = torch.sparse.sampled_addmm(_csr(crow_b, cols_b, x_all[i0:i1], (r1 - r0, m)), gu[r0:r1], gaT,
                                               beta=0.0).values()
        else:  # no index copies (see sampled_mm)
            d_all = sampled_mm(crow_b, cols_b, gu[r0:r1], gaT)
        # X / d of the block: written over d where no gradient flows through d
        w_all = d_all
        if d_all.requires_grad:
            w_all = torch.empty_like(d_all, requires_grad=False) if need_rows or need_cols else None
        # elementwise work in sub-blocks of _BLOCK nonzeros: O(_BLOCK) temporaries, not
        # several nnz-sized arrays
        for j0 in range(0, i1 - i0, _BLOCK):
            j1 = min(i1 - i0, j0 + _BLOCK)
            x, d = x_all[i0 + j0:i0 + j1], d_all[j0:j1]
            # d <= K always; below sqrt(tiny) its terms may have underflowed: recompute exactly.
            bad_idx = None
            if bool(d.detach().min() < tiny):
                bad = d < tiny
                bad_idx = torch.nonzero(bad).flatten()
                d = torch.where(bad, torch.ones_like(d), d)
                w = torch.where(bad, torch.zeros_like(x), x / d)
                del bad
            else:
                w = x / d
            log_d = torch.log(d)
            if bad_idx is not None:
                step = chunk_size or bad_idx.numel()
                lses = []
                for k in range(0, bad_idx.numel(), step):
                    idx = bad_idx[k:k + step]
                    # rows and columns of the entries idx, from the block's row pointers
                    r_idx = torch.searchsorted(crow_b, (idx + j0).to(crow_b.dtype), right=True).long() - 1 + r0
                    c_idx = cols_b[idx + j0].long()
                    logits = elog_u[r_idx] + elog_a[c_idx]
                    lse = torch.logsumexp(logits, 1)
                    # the bad entries' log d is replaced by their exact lse, which already holds the shifts
                    lses.append(lse - mu[r_idx, 0] - ma[c_idx, 0])
                    if need_rows or need_cols:
                        with torch.no_grad():
                            xphi = torch.exp(logits.detach() - lse.detach()[:, None]) * x[idx, None]
                            if need_rows:
                                row_counts.index_add_(0, r_idx, xphi)
                            if need_cols:
                                if col_fix is None:
                                    col_fix = elog_a.new_zeros(m, K)
                                col_fix.index_add_(0, c_idx, xphi)
                log_d = log_d.index_put((bad_idx,), torch.cat(lses))
            log_norm = log_norm + (x * log_d).sum()
            del log_d, d
            if need_rows or need_cols:
                w_all[j0:j1] = w.detach()
            del w
        with torch.no_grad():
            if need_rows:
                row_counts[r0:r1] += gu[r0:r1] * (_csr(crow_b, cols_b, w_all, (r1 - r0, m)) @ ga)
            if by_block:  # transposed in parts of _BLOCK nonzeros: part-sized index arrays
                for q0, q1 in _row_blocks(crow_b, _BLOCK):
                    j0, j1 = int(crow_b[q0]), int(crow_b[q1])
                    crow_q, cols_q = crow_b[q0:q1 + 1] - j0, cols_b[j0:j1]
                    ccol_q, rows_q, perm = csc_pattern(crow_q, cols_q, (q1 - q0, m),
                                                       lambda: row_indices(crow_q, nnz=j1 - j0),  # (on a GPU)
                                                       counting=crow_q.device.type == "cpu")
                    col_sums += _csr(ccol_q, rows_q, w_all[j0:j1][perm], (m, q1 - q0)) @ gu[r0 + q0:r0 + q1]
                    del ccol_q, rows_q, perm
            elif need_cols:
                w_csc[data.csc_pos[i0:i1]] = w_all
        del w_all, d_all
    col_counts = None
    if need_cols:
        with torch.no_grad():
            col_counts = ga * (col_sums if by_block else _csr(data.ccol, data.rows_by_col, w_csc, (m, n)) @ gu)
            del w_csc, col_sums
            if col_fix is not None:
                col_counts += col_fix
    return row_counts, col_counts, log_norm


def _kl_gamma(shape: Tensor, rate: Tensor, digamma_shape: Tensor, log_rate: Tensor, shape0: Tensor,
              rate0: Tensor) -> Tensor:
    """Elementwise KL(Gamma(shape, rate) || Gamma(shape0, rate0)), reusing digamma(shape) and log(rate).

    The formula of ``torch.distributions.kl_divergence`` for two Gammas, written out so that
    the digamma and log already computed for the expected counts are not computed again.
    """
    return ((shape - shape0) * digamma_shape - torch.lgamma(shape) + torch.lgamma(shape0)
            + shape0 * (log_rate - torch.log(rate0)) + shape * (rate0 / rate - 1))


class GammaPoisson(nn.Module):
    r"""Gamma-Poisson matrix factorization with a mean-field variational posterior.

    ``X ≈ E[U] E[α]ᵀ`` for counts ``X`` of shape ``(n_rows, n_cols)``; see the module notes
    for the model. The variational shapes and rates are positive parameters
    (:mod:`torchnmf.constraints`) of shape ``(n_rows, rank)`` (``U_shape``, ``U_rate``)
    and ``(n_cols, rank)`` (``alpha_shape``, ``alpha_rate``); the hyperparameters are buffers
    ``a``, ``b`` (shape ``()``), ``kappa`` (``(n_rows,)``) and ``lambda_`` (``(n_cols,)``),
    so :meth:`state_dict` holds everything to resume a fit.

    Fit it with :meth:`fit`, with :class:`torchnmf.trainer.CAVI` or
    :class:`torchnmf.trainer.NaturalGradient` in a loop of your own, or, in ``softplus``/``exp``
    mode, with any gradient optimizer maximising :meth:`elbo`.

    Parameters
    ----------
    n_rows, n_cols : int
        Shape of the count matrix.
    rank : int
        Number of factors ``K``.
    a, b : float, default 0.3
        Prior shapes of ``U`` and ``α`` (values below 1 favour sparse factors).
    kappa : float or array of shape (n_rows,), default 1.0
        Prior rates of the rows of ``U`` (initial values when ``learn_kappa``).
    lambda_ : float or array of shape (n_cols,), default 1.0
        Prior rates of the rows of ``α`` (initial values when ``learn_lambda``).
    learn_kappa, learn_lambda : bool, default True
        Fit ``kappa`` / ``lambda_`` by maximum likelihood after each sweep; fixed otherwise.
    mode : {'multiplicative', 'softplus', 'exp', 'projected'}, default 'multiplicative'
        Positivity mode of the variational parameters; ``'multiplicative'`` means they are
        changed in place by closed-form trainers only.
    allow_noninteger : bool, default False
        Accept non-integer counts (the Poisson likelihood is then a quasi-likelihood).
    generator : torch.Generator, optional
        For the random initialisation.
    dtype, device : optional
        Of parameters and buffers.

    Examples
    --------
    >>> import torch
    >>> X = torch.poisson(torch.rand(30, 4) @ torch.rand(4, 20) * 3)
    >>> layer = GammaPoisson(30, 20, rank=4, dtype=torch.float64)
    >>> history = layer.fit(X, max_iter=50)
    >>> layer().shape, history.elbos[-1].total.shape
    (torch.Size([30, 20]), torch.Size([]))
    """

    #: Statistics that are sums over rows (already scaled to the full data): a data-parallel
    #: fit sums these over processes (``all_reduce``) before the updates; the others are local.
    global_statistics = ("alpha_counts", "U_mean_sum", "log_likelihood", "U_kl")

    _names = ("U_shape", "U_rate", "alpha_shape", "alpha_rate")

    def __init__(self, n_rows: int, n_cols: int, rank: int, *, a: float = 0.3, b: float = 0.3,
                 kappa: Union[float, Tensor, np.ndarray] = 1.0, lambda_: Union[float, Tensor, np.ndarray] = 1.0,
                 learn_kappa: bool = True, learn_lambda: bool = True, mode: str = "multiplicative",
                 allow_noninteger: bool = False, generator: Optional[torch.Generator] = None,
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        n_rows = check_rank(n_rows, "n_rows")
        n_cols = check_rank(n_cols, "n_cols")
        rank = check_rank(rank, "rank")
        check_option(mode, constraints.MODES, "mode")
        dtype = dtype or torch.get_default_dtype()
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        if dtype in (torch.float16, torch.bfloat16):  # torch's sampled product has no half precision
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}: the Gamma-Poisson "
                            "updates need torch's sparse kernels, which have no half precision")
        a = check_positive(a, "a")
        b = check_positive(b, "b")
        self.n_rows, self.n_cols, self.rank = n_rows, n_cols, rank
        self.learn_kappa, self.learn_lambda = bool(learn_kappa), bool(learn_lambda)
        self.allow_noninteger = bool(allow_noninteger)
        self.register_buffer("a", torch.tensor(a, dtype=dtype, device=device))
        self.register_buffer("b", torch.tensor(b, dtype=dtype, device=device))
        self.register_buffer("kappa", check_positive_vector(kappa, n_rows, "kappa", dtype=dtype, device=device))
        self.register_buffer("lambda_", check_positive_vector(lambda_, n_cols, "lambda_", dtype=dtype, device=device))
        kw = dict(dtype=dtype, device=device)
        for name in self._names:
            setattr(self, name, nn.Parameter(torch.ones((n_rows if name.startswith("U") else n_cols, rank), **kw)))
            constraints.positive(self, name, mode, copy=False)  # allocated once: no full-size copy freed
        self.reset_parameters(generator)

    # -- parameters ------------------------------------------------------------
    def _raw(self, name: str) -> Tensor:
        if parametrize.is_parametrized(self, name):
            return getattr(self.parametrizations, name).original
        return self._parameters[name]

    @torch.no_grad()
    def _write(self, name: str, value: Tensor, rows: Optional[Tensor] = None) -> None:
        raw = self._raw(name)
        if rows is None:
            constraints.assign_(raw, value)
        elif constraints.mode_of(raw) in ("multiplicative", "projected"):
            raw[rows] = value
        else:
            full = getattr(self, name).detach().clone()
            full[rows] = value
            constraints.assign_(raw, full)

    def _trainable(self, *names: str) -> bool:
        return all(self._raw(n).requires_grad for n in names)

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Random initialisation: shapes ``prior + Uniform(0, 1)``, rates equal to the prior rates."""
        gen_device = generator.device if generator is not None else self.device
        for name, prior in (("U_shape", self.a), ("alpha_shape", self.b)):
            raw = self._raw(name)
            n, rank = raw.shape
            # drawn in float64, so that layers of any dtype and mode start from the same point; from a
            # host generator in blocks of a fixed number of entries, written in place where the raw
            # parameter holds the values: a layer of many rows needs no full-size temporaries
            direct = constraints.mode_of(raw) in ("multiplicative", "projected")
            value = raw if direct else torch.empty(raw.shape, dtype=self.dtype, device=self.device)
            step = max(1, _INIT_BLOCK // rank) if gen_device.type == "cpu" else n
            for lo in range(0, n, step):
                noise = torch.rand((min(step, n - lo), rank), generator=generator, dtype=torch.float64,
                                   device=gen_device)
                value[lo:lo + step].copy_(noise).add_(prior)
                del noise
            if not direct:
                self._write(name, value)
        for name, rate in (("U_rate", self.kappa), ("alpha_rate", self.lambda_)):
            raw = self._raw(name)
            if constraints.mode_of(raw) in ("multiplicative", "projected"):
                raw.copy_(rate[:, None].expand_as(raw))
            else:
                self._write(name, rate[:, None].expand_as(raw).clone())

    @torch.no_grad()
    def set_means(self, U, alpha) -> None:
        r"""Start from point estimates: posteriors with means ``U`` and ``alpha`` (e.g. a KL-NMF solution).

        With :math:`X \approx U\alpha^\top` a Poisson (KL) fit, the expected latent counts of
        factor ``k`` in row ``c`` are about :math:`U_{ck}\sum_t\alpha_{tk}` (exactly at a
        fixed point of the KL multiplicative updates), so the shapes are set as a coordinate
        step would set them, :math:`s^U_{ck} = a + U_{ck}\sum_t\alpha_{tk}` and
        :math:`s^\alpha_{tk} = b + \alpha_{tk}\sum_c U_{ck}`, and the rates to
        ``shape / mean`` so that :math:`\mathbb E[U] = U` and :math:`\mathbb E[\alpha] = \alpha`.
        Learned prior rates are set to their empirical-Bayes values for these means
        (:meth:`update_kappa`, :meth:`update_lambda`). Entries below ``1e-12`` times their
        factor's largest entry are raised to that floor (a zero mean is no Gamma's).

        Parameters
        ----------
        U : Tensor or array, shape (n_rows, rank)
            Non-negative row factors, the new ``E[U]``.
        alpha : Tensor or array, shape (n_cols, rank)
            Non-negative column factors, the new ``E[α]``.

        Raises
        ------
        ValueError
            Wrong shapes, negative or non-finite entries, or a factor that is all zero.
        """
        out = []
        for value, name, rows in ((U, "U", self.n_rows), (alpha, "alpha", self.n_cols)):
            T = check_shape(as_tensor(value, name, ndim=2, float_only=False), (rows, self.rank), name)
            if not bool(torch.isfinite(T).all()) or bool((T < 0).any()):
                raise ValueError(f"{name} must be finite and non-negative")
            T = T.to(device=self.device, dtype=self.dtype)
            top = float(T.max())
            if top <= 0:
                raise ValueError(f"{name} is all zero: no posterior mean to start from")
            # the floor stays a normal number: shape / (denormal mean) overflows the rate
            out.append(T.clamp_min(max(top * 1e-12, torch.finfo(T.dtype).tiny)))  # a new tensor
        mu, ma = out
        shape_u = self.a + mu * ma.sum(0)
        shape_a = self.b + ma * mu.sum(0)
        for name, shape, mean in (("U", shape_u, mu), ("alpha", shape_a, ma)):
            if not bool(torch.isfinite(shape / mean).all()):
                raise ValueError(f"{name}'s means are too small for {str(self.dtype).replace('torch.', '')} "
                                 f"(largest {float(mean.max()):.3g}): the posterior rates shape / mean overflow; "
                                 "rescale U and alpha (their products are what the data fix) or use float64")
        self._write("U_shape", shape_u)
        self._write("U_rate", shape_u / mu)
        self._write("alpha_shape", shape_a)
        self._write("alpha_rate", shape_a / ma)
        self.update_kappa()
        self.update_lambda()

    @property
    def dtype(self) -> torch.dtype:
        return self.kappa.dtype

    @property
    def device(self) -> torch.device:
        return self.kappa.device

    # -- posterior summaries ---------------------------------------------------
    def _rows(self, rows: Rows) -> Optional[Tensor]:
        if rows is None:
            return None
        if isinstance(rows, slice):
            return torch.arange(self.n_rows, device=self.device)[rows]
        last = self.__dict__.get("_checked_rows")
        if (last is not None and last[0] is rows and last[1] == rows._version and last[2]._version == last[3]
                and last[2].device == self.device):
            # the tensor just checked (an SVI step passes it at every local iteration): no new
            # checks, which cost three host syncs; changed in place, it is checked again
            return last[2]
        r = torch.as_tensor(np.asarray(rows) if not isinstance(rows, Tensor) else rows)
        if r.dim() != 1 or (r.numel() and (r.is_floating_point() or r.dtype == torch.bool)):
            raise ValueError(f"rows must be a 1-D array of integer row indices, got shape {tuple(r.shape)} "
                             f"and dtype {r.dtype}")
        r = r.long().to(self.device)
        if r.numel() and (int(r.min()) < 0 or int(r.max()) >= self.n_rows):
            raise ValueError(f"rows must be indices in [0, {self.n_rows}), got range "
                             f"[{int(r.min())}, {int(r.max())}]")
        if torch.unique(r).numel() != r.numel():
            raise ValueError("rows must not repeat an index")
        if isinstance(rows, Tensor):
            self.__dict__["_checked_rows"] = (rows, rows._version, r, r._version)
        return r

    @contextlib.contextmanager
    def alpha_fixed(self):
        """Within the block ``q(α)`` does not change: :meth:`statistics` computes ``E log α``
        (digamma and log) and the column factors of the expected counts once per dtype, and
        :meth:`update_U` the column sums of ``E[α]`` once, instead of at every call (the local
        iterations of an SVI step).

        The caller guarantees that ``alpha_shape``/``alpha_rate`` are not modified in the block.
        """
        outer = self in _ALPHA_LOGS
        if not outer:
            _ALPHA_LOGS[self] = {}
        try:
            yield self
        finally:
            if not outer:
                _ALPHA_LOGS.pop(self, None)

    def _alpha_terms(self, shape_a: Tensor, rate_a: Tensor, dtype: torch.dtype, kl: bool
                     ) -> Tuple[Tensor, Tuple[Tensor, ...], Optional[Tensor]]:
        """``(E log α, _column_terms(E log α), KL(q(α) || p(α)) or None)`` computed in ``dtype``.

        Over blocks of rows of ``q(α)``: the cast to ``dtype`` and the digamma/log temporaries
        are ``O(block K)`` instead of several ``(n_cols, K)`` arrays at once (the float64 ELBO
        pass of a float32 layer), and the blocks stay in cache (faster than whole-array passes
        on CPU). Elementwise the same values; the KL is summed per block. Within
        :meth:`alpha_fixed` the first two are computed once per dtype and reused (the local
        iterations of an SVI step); the KL, needed once per step, is computed when asked.
        """
        cache = _ALPHA_LOGS.get(self)
        key = (dtype, shape_a.device)
        if cache is not None and key in cache and not kl:
            return (*cache[key], None)
        b, lam = self.b.to(dtype), self.lambda_.to(dtype)
        m = shape_a.shape[0]
        elog_a = torch.empty(shape_a.shape, dtype=dtype, device=shape_a.device)
        alpha_kl = torch.zeros((), dtype=dtype, device=shape_a.device) if kl else None
        step = max(1, _BLOCK // max(1, shape_a.shape[1]))
        for j in range(0, m, step):
            s, r = shape_a[j:j + step].to(dtype), rate_a[j:j + step].to(dtype)
            # float32 CPU: a vectorised series, 2-3x faster than torch.digamma (float64: torch's)
            digamma_s, log_r = digamma_positive(s), torch.log(r)
            torch.sub(digamma_s, log_r, out=elog_a[j:j + step])
            if kl:
                alpha_kl += _kl_gamma(s, r, digamma_s, log_r, b, lam[j:j + step, None]).sum()
        if cache is not None and key in cache:
            return (*cache[key], alpha_kl)  # the same values: keep the tensors already in use
        out = (elog_a, _column_terms(elog_a))
        if cache is not None:
            cache[key] = out
        return (*out, alpha_kl)

    def _alpha_mean_sum(self) -> Tensor:
        """``Σ_t E[α_tk]``, shape ``(K,)``, reused within :meth:`alpha_fixed`."""
        cache = _ALPHA_LOGS.get(self)
        if cache is not None and "mean_sum" in cache:
            return cache["mean_sum"]
        out = self.mean_alpha().sum(0)
        if cache is not None:
            cache["mean_sum"] = out
        return out

    def _u(self, name: str, rows: Optional[Tensor]) -> Tensor:
        v = getattr(self, name)
        return v if rows is None else v[rows]

    def q_U(self, rows: Rows = None) -> Gamma:
        """The variational posterior of ``U`` (or of its ``rows``), a Gamma of batch shape ``(n, K)``."""
        r = self._rows(rows)
        return Gamma(self._u("U_shape", r), self._u("U_rate", r), validate_args=False)

    def q_alpha(self) -> Gamma:
        """The variational posterior of ``α``, a Gamma of batch shape ``(n_cols, K)``."""
        return Gamma(self.alpha_shape, self.alpha_rate, validate_args=False)

    def mean_U(self, rows: Rows = None) -> Tensor:
        """Posterior mean :math:`\\mathbb E U = s^U / r^U`, shape ``(n_rows, K)`` (or ``(len(rows), K)``)."""
        r = self._rows(rows)
        return self._u("U_shape", r) / self._u("U_rate", r)

    def mean_alpha(self) -> Tensor:
        """Posterior mean :math:`\\mathbb E\\alpha`, shape ``(n_cols, K)``."""
        return self.alpha_shape / self.alpha_rate

    def log_mean_U(self, rows: Rows = None) -> Tensor:
        """:math:`\\mathbb E\\log U = \\psi(s^U) - \\log r^U`, shape ``(n_rows, K)``."""
        r = self._rows(rows)
        return torch.digamma(self._u("U_shape", r)) - torch.log(self._u("U_rate", r))

    def log_mean_alpha(self) -> Tensor:
        """:math:`\\mathbb E\\log\\alpha`, shape ``(n_cols, K)``."""
        return torch.digamma(self.alpha_shape) - torch.log(self.alpha_rate)

    def geometric_mean_U(self, rows: Rows = None) -> Tensor:
        """:math:`\\exp\\mathbb E\\log U`, shape ``(n_rows, K)``."""
        return torch.exp(self.log_mean_U(rows))

    def geometric_mean_alpha(self) -> Tensor:
        """:math:`\\exp\\mathbb E\\log\\alpha`, shape ``(n_cols, K)``."""
        return torch.exp(self.log_mean_alpha())

    def forward(self, rows: Rows = None) -> Tensor:
        """Expected rate ``E[U] E[α]ᵀ``, shape ``(n_rows, n_cols)`` (or ``(len(rows), n_cols)``).

        Dense: meant for moderate sizes, plotting and chaining with other layers.
        """
        return self.mean_U(rows) @ self.mean_alpha().t()

    # -- data ------------------------------------------------------------------
    def prepare(self, X, rows: Rows = None, allow_noninteger: Optional[bool] = None) -> CountMatrix:
        """Check counts and index their nonzeros for this layer (dtype, device, shape).

        Parameters
        ----------
        X : array-like or sparse, shape (n_rows, n_cols), or (len(rows), n_cols)
            Counts: dense or sparse torch tensor, numpy array, scipy.sparse matrix or
            :class:`CountMatrix`. Never modified.
        rows : 1-D integer array, optional
            Rows of the full data that ``X`` holds (a minibatch or a shard).
        allow_noninteger : bool, optional
            Default: the layer's setting.

        Returns
        -------
        CountMatrix
        """
        r = self._rows(rows)
        allow = self.allow_noninteger if allow_noninteger is None else allow_noninteger
        n = self.n_rows if r is None else r.numel()
        return CountMatrix.from_input(X, "X", allow_noninteger=allow, dtype=self.dtype, device=self.device,
                                      shape=(n, self.n_cols))

    # -- sufficient statistics and closed-form updates ---------------------------
    def _kl_U(self, rows: Optional[Tensor]) -> Tensor:
        kappa = self.kappa if rows is None else self.kappa[rows]
        prior = Gamma(self.a.expand(kappa.shape[0], 1), kappa[:, None], validate_args=False)
        return kl_divergence(self.q_U(rows), prior).sum()

    def _kl_alpha(self) -> Tensor:
        prior = Gamma(self.b.expand(self.n_cols, 1), self.lambda_[:, None], validate_args=False)
        return kl_divergence(self.q_alpha(), prior).sum()

    def statistics(self, X, rows: Rows = None, scale: float = 1.0, chunk_size: Optional[int] = None,
                   which: Sequence[str] = ("U", "alpha", "elbo")) -> Dict[str, object]:
        r"""Sufficient statistics of a batch of rows under the current posterior.

        With :math:`\phi` optimal for the current :math:`q(U), q(\alpha)`, over the nonzeros
        of ``X`` only, in chunks of ``chunk_size`` nonzeros.

        Parameters
        ----------
        X : counts or CountMatrix, shape (len(rows), n_cols)
            The batch (the whole matrix when ``rows`` is None).
        rows : 1-D integer array, optional
            Rows of the full data held by ``X``.
        scale : float, default 1
            Factor from the batch to the full data (``n_rows / len(rows)`` for a uniform
            minibatch; 1 for the full data or for one shard of a data-parallel fit).
        chunk_size : int, optional
            Bound on the nonzeros processed at once.
        which : sequence of {'U', 'alpha', 'elbo'}
            Which expected-count sums to compute, and whether to add the KL terms the ELBO
            needs (:meth:`elbo_from_statistics`).

        Returns
        -------
        dict
            ``rows`` (LongTensor or None) and ``scale``;
            ``U_counts`` (``(len(rows), K)``, :math:`\sum_t X_{ct}\phi_{ctk}`, not scaled) if
            ``'U'`` in ``which``; ``alpha_counts`` (``(n_cols, K)``,
            :math:`\text{scale}\sum_{c}X_{ct}\phi_{ctk}`) if ``'alpha'`` in ``which``;
            ``U_mean_sum`` (``(K,)``, scale · :math:`\sum_c\mathbb E U_{ck}`);
            ``log_likelihood`` (``()``, scale · :math:`\sum_{ct} [X_{ct}\log\sum_k
            e^{\mathbb E\log U_{ck}+\mathbb E\log\alpha_{tk}} - \log X_{ct}!]`);
            with ``'elbo'``: ``U_kl`` (``()``, scale · KL of the batch rows of ``q(U)`` from
            their prior) and ``alpha_kl`` (``()``, KL of ``q(α)`` from its prior, not scaled:
            the same on every shard). Keys in :attr:`global_statistics` add up over disjoint
            batches.
        """
        for w in which:
            check_option(w, ("U", "alpha", "elbo"), "which")
        scale = check_positive(scale, "scale")
        if chunk_size is not None:
            chunk_size = check_rank(chunk_size, "chunk_size")
        r = self._rows(rows)
        data = self.prepare(X, r)
        with torch.no_grad():
            # the rows were checked once above: read their parameters without re-checking
            shape_u, rate_u = self._u("U_shape", r), self._u("U_rate", r)
            shape_a, rate_a = self.alpha_shape, self.alpha_rate
            dtype = shape_u.dtype
            pass_dtype = dtype
            if "elbo" in which and dtype != torch.float64:
                # the ELBO is a small difference of huge count terms (Σ x log rate, Σ log x!,
                # Σ E[U] E[α], the KLs' lgamma): a float32 layer computes this pass in float64 so
                # that it reports the float64 figure; the counts for the updates are cast back.
                # q(α) and the counts are cast per block (_alpha_terms, expected_counts): no
                # float64 copy of them is held.
                pass_dtype = torch.float64
                shape_u, rate_u = shape_u.double(), rate_u.double()
            digamma_u, log_rate_u = torch.digamma(shape_u), torch.log(rate_u)
            elog_a, col_terms, alpha_kl = self._alpha_terms(shape_a, rate_a, pass_dtype, "elbo" in which)
            row_counts, col_counts, log_norm = expected_counts(
                data, digamma_u - log_rate_u, elog_a, "U" in which, "alpha" in which, chunk_size, col_terms=col_terms)
            del elog_a, col_terms
            stats: Dict[str, object] = {"rows": r, "scale": scale}
            if row_counts is not None:
                stats["U_counts"] = row_counts.to(dtype)
            if col_counts is not None:
                stats["alpha_counts"] = (col_counts * scale).to(dtype)
            stats["U_mean_sum"] = (shape_u / rate_u).sum(0) * scale
            stats["log_likelihood"] = (log_norm - data.log_factorial_in(log_norm.dtype)) * scale
            if "elbo" in which:
                kappa = self.kappa if r is None else self.kappa[r]
                stats["U_kl"] = _kl_gamma(shape_u, rate_u, digamma_u, log_rate_u, self.a.to(shape_u.dtype),
                                          kappa[:, None].to(shape_u.dtype)).sum() * scale
                stats["alpha_kl"] = alpha_kl
        return stats

    def elbo_from_statistics(self, stats: Dict[str, object]) -> ELBO:
        """The ELBO (an estimate, for a scaled minibatch) from :meth:`statistics` and the current ``q(α)``.

        ``data = log_likelihood - Σ_k U_mean_sum_k Σ_t E[α_tk]``, ``U_kls = U_kl``,
        ``alpha_kls = alpha_kl`` (recomputed when absent). The statistics must include
        ``'elbo'`` and be computed for the current ``q(α)``.
        """
        if "U_kl" not in stats:
            raise ValueError("stats: compute the statistics with 'elbo' in which= to get an ELBO")
        with torch.no_grad():
            mean_sum = stats["U_mean_sum"]  # float64 for the ELBO of a float32 layer (statistics)
            alpha_sum = (self.alpha_shape.to(mean_sum.dtype) / self.alpha_rate.to(mean_sum.dtype)).sum(0)
            data = stats["log_likelihood"] - (mean_sum * alpha_sum).sum()
            alpha_kl = stats["alpha_kl"] if "alpha_kl" in stats else self._kl_alpha()
            # the figure in float64, reported in the layer's dtype
            dtype = self.alpha_shape.dtype
            return ELBO(data.to(dtype), {"U_kls": stats["U_kl"].to(dtype), "alpha_kls": alpha_kl.to(dtype)})

    @torch.no_grad()
    def update_U(self, stats: Dict[str, object]) -> None:
        """Coordinate step for ``q(U)`` of the statistics' rows: ``s = a + U_counts``, ``r = κ + Σ_t E[α]``.

        Skipped when ``U_shape`` or ``U_rate`` has ``requires_grad=False`` (frozen).
        """
        if not self._trainable("U_shape", "U_rate"):
            return
        r = stats["rows"]
        kappa = self.kappa if r is None else self.kappa[r]
        self._write("U_shape", self.a + stats["U_counts"], r)
        self._write("U_rate", kappa[:, None] + self._alpha_mean_sum(), r)

    @torch.no_grad()
    def update_alpha(self, stats: Dict[str, object], rho: float = 1.0) -> None:
        """Step for ``q(α)`` towards ``s = b + alpha_counts``, ``r = λ + U_mean_sum`` (natural parameters).

        ``rho = 1`` is the coordinate-ascent update; ``0 < rho < 1`` the stochastic
        natural-gradient step ``(1 - rho) * current + rho * estimate``. Skipped when frozen.
        """
        if not self._trainable("alpha_shape", "alpha_rate"):
            return
        shape_hat = self.b + stats["alpha_counts"]
        rate_hat = self.lambda_[:, None] + stats["U_mean_sum"].to(self.lambda_.dtype)
        if rho != 1.0:
            shape_hat = torch.lerp(self.alpha_shape.detach(), shape_hat, rho)
            rate_hat = torch.lerp(self.alpha_rate.detach(), rate_hat, rho)
        self._write("alpha_shape", shape_hat)
        self._write("alpha_rate", rate_hat)

    @torch.no_grad()
    def update_kappa(self, rows: Rows = None) -> None:
        """Maximum-likelihood prior rates of ``U`` (of ``rows``): ``κ_c = a K / Σ_k E[U_ck]`` (if learned)."""
        if not self.learn_kappa:
            return
        r = self._rows(rows)
        new = self.a * self.rank / self.mean_U(r).sum(1)
        if r is None:
            self.kappa.copy_(new)
        else:
            self.kappa[r] = new

    @torch.no_grad()
    def update_lambda(self) -> None:
        """Maximum-likelihood prior rates of ``α``: ``λ_t = b K / Σ_k E[α_tk]`` (if learned)."""
        if self.learn_lambda:
            self.lambda_.copy_(self.b * self.rank / self.mean_alpha().sum(1))

    # -- objective ---------------------------------------------------------------
    def elbo(self, X, chunk_size: Optional[int] = None) -> ELBO:
        r"""The evidence lower bound on the full data, with :math:`\phi` optimal for the current posterior.

        ``data`` (alias ``Z``): :math:`\sum_{ct}[X_{ct}\log\sum_k e^{\mathbb E\log U_{ck} +
        \mathbb E\log\alpha_{tk}} - \log X_{ct}!] - \sum_k(\sum_c\mathbb EU_{ck})(\sum_t\mathbb E\alpha_{tk})`
        (the expected complete log-likelihood plus the entropy of ``q(Z)``);
        ``U_kls``, ``alpha_kls``: KL divergences of the posteriors from their priors;
        ``total = Z - U_kls - alpha_kls``.

        Differentiable in the variational parameters when gradients are enabled and some
        parameter is in a gradient mode (``softplus``, ``exp``, ``projected``).

        Parameters
        ----------
        X : counts or CountMatrix, shape (n_rows, n_cols)
        chunk_size : int, optional

        Returns
        -------
        ELBO
        """
        if chunk_size is not None:
            chunk_size = check_rank(chunk_size, "chunk_size")
        data = self.prepare(X)
        grad = torch.is_grad_enabled() and any(True for _ in constraints.gradient_parameters(self))
        with torch.set_grad_enabled(grad):
            # in float64 whatever the layer's dtype (see statistics): the float32 terms' rounding
            # exceeds the ELBO itself for large counts; the parameters are upcast exactly
            f64 = torch.float64
            s_u, r_u = self.U_shape.to(f64), self.U_rate.to(f64)
            s_a, r_a = self.alpha_shape.to(f64), self.alpha_rate.to(f64)
            dg_u, lr_u, dg_a, lr_a = torch.digamma(s_u), torch.log(r_u), torch.digamma(s_a), torch.log(r_a)
            _, _, log_norm = expected_counts(data, dg_u - lr_u, dg_a - lr_a, False, False, chunk_size)
            z = log_norm - data.log_factorial64 - ((s_u / r_u).sum(0) * (s_a / r_a).sum(0)).sum()
            kl_u = _kl_gamma(s_u, r_u, dg_u, lr_u, self.a.to(f64), self.kappa[:, None].to(f64)).sum()
            kl_a = _kl_gamma(s_a, r_a, dg_a, lr_a, self.b.to(f64), self.lambda_[:, None].to(f64)).sum()
            dtype = self.alpha_shape.dtype  # the float64 figure, reported in the layer's dtype
            return ELBO(z.to(dtype), {"U_kls": kl_u.to(dtype), "alpha_kls": kl_a.to(dtype)})

    # -- fitting -----------------------------------------------------------------
    def fit(self, X, max_iter: int = 1000, tol: float = 1e-6, verbose: bool = False, history=None,
            callback: Optional[Callable] = None, chunk_size: Optional[int] = None, trainer=None):
        """Fit by coordinate ascent (:class:`torchnmf.trainer.CAVI`) until the ELBO settles.

        Parameters
        ----------
        X : counts, shape (n_rows, n_cols)
            Dense or sparse tensor, numpy array, scipy.sparse matrix or CountMatrix; never modified.
        max_iter : int, default 1000
            Maximum number of sweeps (typical data meets the default ``tol`` well before; see
            :ref:`default-tolerances`).
        tol : float, default 1e-6
            Stop when the ELBO changes by at most ``tol`` relative to ``|ELBO|`` over a sweep
            (the rule of :mod:`torchnmf.engine`; 0 runs ``max_iter``); reaching ``max_iter``
            first warns with :class:`~torchnmf.engine.ConvergenceWarning`.
        verbose : bool, default False
            Show a tqdm progress bar (ignored when ``history`` is given).
        history : torchnmf.History, optional
            Records are appended to it; another thread may read it and call
            :meth:`~torchnmf.History.request_stop`, which ends the fit after the current sweep.
        callback : callable, optional
            ``callback(layer, elbo)`` after each sweep.
        chunk_size : int, optional
            Bound on the nonzeros processed at once.
        trainer : torch.optim.Optimizer, optional
            Default: a new ``CAVI(self, chunk_size=chunk_size)``; pass one to resume its state.

        Returns
        -------
        torchnmf.History
            ``history.elbos`` holds one :class:`~torchnmf.ELBO` per sweep.

        Raises
        ------
        FloatingPointError
            If the ELBO becomes NaN or infinite.
        """
        from ..engine import run_stateful
        from ..history import History
        from ..trainer.cavi import CAVI

        max_iter = check_rank(max_iter, "max_iter")
        tol = check_positive(tol, "tol", allow_zero=True)
        data = self.prepare(X)
        if history is None:
            history = History(verbose=verbose, total=max_iter, desc="GammaPoisson", name="elbo", maximize=True)
        trainer = trainer if trainer is not None else CAVI(self, chunk_size=chunk_size)
        try:
            run_stateful(self, trainer, lambda i, measure: trainer.step(lambda: data), max_iter=max_iter, tol=tol,
                         history=history, model=f"{type(self).__name__}.fit",
                         callback=None if callback is None else (lambda i, record: callback(self, record)))
        finally:
            history.close()
        return history

    @torch.no_grad()
    def transform(self, X, max_iter: int = 100, tol: float = 1e-6, chunk_size: Optional[int] = None,
                  progress: Optional[Callable[[], Any]] = None) -> Tensor:
        """Posterior means of the row factors of new rows, with ``q(α)`` (and ``λ``) fixed.

        Coordinate ascent on the new rows' ``q(U)`` (and their ``κ`` when learned, starting
        from the mean of the fitted ``κ``); the layer is not changed.

        Parameters
        ----------
        X : counts, shape (n_new, n_cols)
        max_iter : int, default 100
        tol : float, default 1e-6
            Stop when the largest relative change of the posterior means is below ``tol``.
        chunk_size : int, optional
        progress : callable, optional
            Called after each iteration (e.g. a progress bar's ``update``).

        Returns
        -------
        Tensor, shape (n_new, K)
        """
        from ..engine import max_relative_change  # lazily: the engine's history imports poisson

        max_iter = check_rank(max_iter, "max_iter")
        tol = check_positive(tol, "tol", allow_zero=True)
        allow = self.allow_noninteger
        data = CountMatrix.from_input(X, "X", allow_noninteger=allow, dtype=self.dtype, device=self.device,
                                      shape=(None, self.n_cols))
        n = data.shape[0]
        elog_a = self.log_mean_alpha()
        col_sum = self.mean_alpha().sum(0)
        kappa = self.kappa.mean().expand(n).clone()
        shape = torch.full((n, self.rank), float(self.a), dtype=self.dtype, device=self.device) + 1.0
        rate = kappa[:, None] + col_sum
        mean = shape / rate
        for _ in range(max_iter):
            counts, _, _ = expected_counts(data, torch.digamma(shape) - torch.log(rate), elog_a, True, False, chunk_size)
            shape = self.a + counts
            if self.learn_kappa:
                kappa = self.a * self.rank / (shape / rate).sum(1)
            rate = kappa[:, None] + col_sum
            new = shape / rate
            change = max_relative_change(mean, new)
            mean = new
            if progress is not None:
                progress()
            if change < tol:
                break
        return mean

    def extra_repr(self) -> str:
        mode = constraints.mode_of(self._raw("U_shape"))
        return (f"n_rows={self.n_rows}, n_cols={self.n_cols}, rank={self.rank}, a={float(self.a):g}, "
                f"b={float(self.b):g}, learn_kappa={self.learn_kappa}, learn_lambda={self.learn_lambda}, mode={mode!r}")
