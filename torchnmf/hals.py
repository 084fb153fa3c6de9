r"""One coordinate-descent (HALS) sweep over the components of many replicates at once.

scikit-learn's ``NMF(solver='cd')`` (``_update_cdnmf_fast``) updates one factor ``B``
(``n x k``) of ``X ≈ B Aᵀ`` with the other, ``A``, fixed, one component ``j = 0..k-1`` after
the other, each from the current values of the others (Gauss-Seidel over the components):

.. math::

    g = B G_{:, j} - (XA)_{:, j}, \qquad B_{:, j} \leftarrow \max(0, B_{:, j} - g / G_{jj})

with ``G = AᵀA + l2 I`` and ``XA`` the product with ``X`` less ``l1``; a zero ``G_jj`` leaves
the column as it is. The sweep also sums the projected gradient ``|g|`` (``min(0, g)`` where
``B`` is 0), scikit-learn's ``violation``, from which its stop rule is made.

:func:`hals_sweep` does this for ``R`` replicates at once: ``B`` as an ``(n, R, k)`` view of
the stacked factor, one batched vector operation per component, never a loop over replicates
and no host synchronisation.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hals_sweep"]


def hals_sweep(B: Tensor, G: Tensor, XA: Tensor, l1: float = 0.0, l2: float = 0.0) -> Tensor:
    """Update ``B`` in place by one coordinate-descent sweep over its components, every replicate at once.

    Parameters
    ----------
    B : Tensor, shape (n, R, k)
        The factor updated, one ``(n, k)`` slice per replicate (a view of the stacked factor);
        modified in place.
    G : Tensor, shape (R, k, k)
        Each replicate's Gram matrix of the fixed factor, ``AᵀA`` (symmetric).
    XA : Tensor, shape (n, R, k)
        Each replicate's product of ``X`` with the fixed factor.
    l1, l2 : float, default 0
        Penalty ``l1 ΣB + l2/2 ‖B‖²`` (scikit-learn's ``l1_reg``, ``l2_reg``).

    Returns
    -------
    Tensor, shape (R,)
        Each replicate's sum of the absolute projected gradients met during the sweep
        (scikit-learn's ``violation``), in ``B``'s dtype.
    """
    k = B.shape[2]
    if l2:
        G = G + l2 * torch.eye(k, dtype=G.dtype, device=G.device)
    hess = G.diagonal(dim1=1, dim2=2).t()  # (k, R)
    # a zero Hessian leaves its column as it is (scikit-learn): a step of grad / inf = 0
    hess = hess.where(hess != 0, torch.full_like(hess, float("inf")))
    # components as contiguous (n, R) slabs: the per-component operations run 2-3x faster there
    # than on strided columns (CPU, 2000 x 20 x 8), which pays for the two copies
    Bt = B.permute(2, 0, 1).contiguous()  # (k, n, R)
    Gc = G.permute(2, 1, 0).contiguous()  # Gc[j, l, r] = G[r, l, j]
    violation = B.new_zeros(B.shape[1])
    for j in range(k):
        b = Bt[j]
        xa = XA[:, :, j] - l1 if l1 else XA[:, :, j]
        # the gradient from the current B: components before j already updated (Gauss-Seidel)
        grad = (Bt * Gc[j].unsqueeze(1)).sum(0) - xa
        pg = grad.where(b != 0, grad.clamp(max=0))
        violation += pg.abs().sum(0)
        b.sub_(grad / hess[j]).clamp_(min=0)
    B.copy_(Bt.permute(1, 2, 0))
    return violation
