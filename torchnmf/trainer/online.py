"""Online (mini-batch) multiplicative updates for NMF over batches of rows."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import data
from .._csr import to_csr
from ..constraints import assign_, value_of
from ..distributed import all_reduce_stats
from ..updates import EPSILON, mu_gamma, mu_statistics, mu_update

__all__ = ["OnlineMU"]


#: Non-zeros of a sparse batch handled at once (see torchnmf.updates._NNZ_BLOCK).
_NNZ_BLOCK = 1 << 15


class OnlineMU(torch.optim.Optimizer):
    r"""Online multiplicative updates of the shared factor of ``V (N, C) ≈ H Wᵀ``, batch by batch.

    Each :meth:`step` takes one batch of rows ``V_b (B, C)`` and their activations
    ``H_b (B, R)``; it fits ``H_b`` with ``W`` fixed (``inner_iter`` multiplicative
    updates, written back into ``H_b``), then updates ``W`` from statistics accumulated
    over the batches with exponential forgetting (Lefèvre, Bach & Févotte 2011, as
    scikit-learn's ``MiniBatchNMF``):

    .. math::
        A \leftarrow \rho A + W^{1/\gamma} \circ [M\circ V_b \circ \hat V_b^{\beta-2}]^\top H_b,\quad
        B \leftarrow \rho B + [M\circ\hat V_b^{\beta-1}]^\top H_b + \ell_1 + \ell_2 W,\quad
        W \leftarrow (A / B)^{\gamma}

    with :math:`\rho` = ``forget_factor ** (batch rows / n_samples)``. :math:`\rho = 0` is the
    full-batch multiplicative update; larger :math:`\rho` averages the update targets of
    past batches (a decaying learning rate). In a data-parallel job (``distributed=True``)
    each process steps on its own batch and the statistics are summed over processes with
    ``all_reduce``, so every process keeps the same ``W``.

    Parameters
    ----------
    params : iterable of Tensor
        Exactly one parameter: ``W`` of shape (C, R), a positive parameter in any mode.
    beta : float, default 1
        Beta-divergence (2 Euclidean, 1 generalised KL, 0 Itakura-Saito).
    forget_factor : float in [0, 1], default 0.7
        Weight of the past statistics per pass over ``n_samples`` rows.
    n_samples : int, optional
        Rows in the whole data set (all processes). Default: ``forget_factor`` applies per step.
    inner_iter : int, default 1
        Multiplicative updates of ``H_b`` per step (use more for fresh random ``H_b``).
    l1, l2 : float, default 0
        Penalties ``l1 Σ W + l2/2 ||W||²`` on W, and the same on each ``H_b``.
    eps : float, default float32 eps
        Floor of the reconstruction and of zero denominators.
    distributed : bool, default False
        Sum the statistics over the processes of ``group`` (:func:`torchnmf.distributed.all_reduce_stats`).
    group : ProcessGroup, optional
    timeout : float, optional
        Seconds to wait for the peers before :class:`~torchnmf.distributed.DistributedTimeoutError`.

    Examples
    --------
    >>> import torch
    >>> from torchnmf.trainer import OnlineMU
    >>> V = torch.rand(100, 20)
    >>> W = torch.rand(20, 4)
    >>> opt = OnlineMU([W], beta=1, n_samples=100, inner_iter=5)
    >>> for V_b in V.split(25):
    ...     H_b = torch.rand(len(V_b), 4)
    ...     loss = opt.step(lambda: (V_b, H_b))
    """

    def __init__(self, params, beta: float = 1, forget_factor: float = 0.7, n_samples: Optional[int] = None,
                 inner_iter: int = 1, l1: float = 0.0, l2: float = 0.0, eps: float = EPSILON, *,
                 distributed: bool = False, group=None, timeout: Optional[float] = None):
        beta = data.check_beta(beta)
        forget_factor = data.check_real(forget_factor, "forget_factor", 0, 1)
        if n_samples is not None:
            n_samples = data.check_rank(n_samples, "n_samples")
        inner_iter = data.check_rank(inner_iter, "inner_iter")
        defaults = dict(beta=float(beta), forget_factor=forget_factor, n_samples=n_samples, inner_iter=inner_iter,
                        l1=data.check_positive(l1, "l1", allow_zero=True),
                        l2=data.check_positive(l2, "l2", allow_zero=True),
                        eps=data.check_positive(eps, "eps"))
        super().__init__(params, defaults)
        plist = [p for g in self.param_groups for p in g["params"]]
        if len(plist) != 1 or plist[0].dim() != 2:
            raise ValueError("OnlineMU takes exactly one parameter, the shared factor W of shape (C, R); got "
                             f"{[tuple(p.shape) for p in plist]}")
        self.distributed = bool(distributed)
        self.group = group
        self.timeout = timeout

    def _batch(self, closure, W: Tensor):
        out = closure()
        if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
            raise TypeError("the closure must return (V_b, H_b) or (V_b, H_b, mask_b)")
        V, H = out[0], out[1]
        mask = out[2] if len(out) == 3 else None
        if not isinstance(H, Tensor) or H.dim() != 2 or H.shape[1] != W.shape[1]:
            raise ValueError(f"H_b must be a tensor of shape (B, {W.shape[1]}), got "
                             f"{tuple(H.shape) if isinstance(H, Tensor) else type(H).__name__}")
        if H.dtype != W.dtype or H.device != W.device:
            raise TypeError(f"H_b must have W's dtype and device ({W.dtype}, {W.device}), got {H.dtype}, {H.device}")
        V = data.as_tensor(V, "V_b", ndim=2, dtype=W.dtype, device=W.device)
        data.check_nonnegative(V, "V_b")
        data.check_shape(V, (H.shape[0], W.shape[0]), "V_b")
        if bool((H < 0).any()):
            raise ValueError("H_b must be non-negative")
        M = data.check_mask(mask, V.shape, "mask_b", device=W.device, dtype=W.dtype)
        return V, H, M

    @torch.no_grad()
    def step(self, closure) -> Tensor:
        """Fit one batch's ``H_b`` (in place) and update ``W``.

        Parameters
        ----------
        closure : callable
            Returns ``(V_b, H_b)`` or ``(V_b, H_b, mask_b)``: the batch (B, C), dense or
            torch sparse, never modified; its activations (B, R) with W's dtype and device,
            overwritten with the fitted values; optionally a 0/1 mask of observed entries.

        Returns
        -------
        Tensor, shape ()
            The beta-divergence of the batch (summed over processes when distributed) at
            the fitted ``H_b`` and the ``W`` before this step.
        """
        if closure is None:
            raise ValueError("OnlineMU.step needs a closure returning (V_b, H_b)")
        group = self.param_groups[0]
        p = group["params"][0]
        W = value_of(p).detach()
        with torch.enable_grad():  # a closure may build its batch with autograd on
            V, H, M = self._batch(closure, W)
        beta, eps, l1, l2 = group["beta"], group["eps"], group["l1"], group["l2"]
        # parts of 32,768 non-zeros: a streamed block's working set is then about half the block
        # (65,536, mu_update's default, held about a block; measured in benchmarks/anndata_backed.py)
        cache: dict = {"nnz_block": _NNZ_BLOCK}
        Hn = H
        for _ in range(group["inner_iter"]):
            Hn = mu_update(V, W, Hn, beta, M, l1, l2, eps=eps, cache=cache)
            if beta < 1:  # as scikit-learn, for stability
                Hn.masked_fill_(Hn < torch.finfo(torch.float64).eps, 0.0)
        H.copy_(Hn)
        # Vᵀ without copying V: a view (dense) or the CSC transpose of a CSR V, whose statistics reuse
        # the non-zero pattern the H updates built (a COO transpose cost several copies of the batch)
        if V.layout not in (torch.strided, torch.sparse_csr):
            V = to_csr(V.coalesce() if V.layout == torch.sparse_coo else V)
            cache.pop("nz", None)
        tcache = {"nnz_block": _NNZ_BLOCK}
        if "nz" in cache:
            tcache["nz"] = cache["nz"].transposed()
        num, den, loss = mu_statistics(V.t(), H, W, beta, None if M is None else M.t(), eps=eps, with_loss=True,
                                       cache=tcache)
        del cache, tcache
        stats = {"num": num, "den": den, "loss": loss, "rows": torch.tensor(float(H.shape[0]), dtype=W.dtype,
                                                                             device=W.device)}
        if self.distributed:
            stats = all_reduce_stats(stats, group=self.group, timeout=self.timeout)
        num, den = stats["num"], stats["den"]
        if l1:
            den = den + l1
        if l2:
            den = den + l2 * W
        den = torch.where(den < torch.finfo(den.dtype).tiny, torch.as_tensor(eps, dtype=den.dtype, device=den.device),
                          den)  # a subnormal denominator is zero here too (see updates._multiply)
        g = mu_gamma(beta)
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["numerator"] = W.clone()  # scikit-learn's start: A = W, B = 1
            state["denominator"] = torch.ones_like(W)
        n = group["n_samples"]
        rho = group["forget_factor"] ** (float(stats["rows"]) / n if n else 1.0)
        target = W.pow(1.0 / g) if g != 1 else W
        # new tensors, not in-place: a loaded state dict may share them with another optimizer
        A = state["numerator"] = state["numerator"] * rho + num * target
        B = state["denominator"] = state["denominator"] * rho + den
        Wn = A / B
        if g != 1:
            Wn.pow_(g)
        if beta <= 1:  # as scikit-learn, for stability
            Wn.masked_fill_(Wn < torch.finfo(torch.float64).eps, 0.0)
        assign_(p, Wn)
        state["step"] += 1
        if not bool(torch.isfinite(stats["loss"])):
            raise FloatingPointError(f"the batch divergence became {float(stats['loss'])} at step {state['step']}; "
                                     "check the data's scale or use a larger beta")
        return stats["loss"]
