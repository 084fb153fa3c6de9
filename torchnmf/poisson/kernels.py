"""Covariance functions for Gaussian-process factor priors, batched over components.

Every kernel returns one covariance matrix per component: shape ``(K, N, M)`` for inputs
of ``N`` and ``M`` points (``(K, N)`` for the diagonal), so the ``K`` latent factors of a
log-normal Poisson layer each get their own lengthscale and output scale.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..constraints import positive
from ..data import check_positive_vector, check_rank

__all__ = ["Matern32", "MultiGroupKernel", "pairwise_distance"]


def pairwise_distance(x1: Tensor, x2: Tensor) -> Tensor:
    """Euclidean distances between the rows of ``x1`` (N, D) and ``x2`` (M, D), shape (N, M).

    Computed from differences rather than the ``|x|^2 - 2 x.y + |y|^2`` expansion, which
    loses all precision for nearby points in float32 and would spoil Cholesky factors.
    """
    return torch.cdist(x1, x2, compute_mode="donot_use_mm_for_euclid_dist")


class Matern32(nn.Module):
    r"""Matern 3/2 kernel with a lengthscale and output scale per component.

    .. math:: k_k(x, x') = \sigma_k^2 \,(1 + \sqrt{3}\, r / \ell_k)\, \exp(-\sqrt{3}\, r / \ell_k),
              \qquad r = \lVert x - x' \rVert

    Parameters
    ----------
    n_components : int
        Number of components ``K`` (one kernel each).
    lengthscale : float or sequence of K floats, default 1.0
        Initial lengthscales :math:`\ell_k` (> 0), in the units of the coordinates.
    sigma : float or sequence of K floats, default 1.0
        Initial output scales :math:`\sigma_k` (> 0); the prior variance is ``sigma**2``.
    trainable : bool, default True
        Whether gradient optimizers update ``lengthscale`` and ``sigma``.

    Attributes
    ----------
    lengthscale, sigma : Tensor, shape (K,)
        Positive parameters in ``softplus`` mode (see :mod:`torchnmf.constraints`).

    Examples
    --------
    >>> import torch
    >>> k = Matern32(2, lengthscale=[1.0, 2.0])
    >>> k(torch.zeros(3, 2), torch.ones(4, 2)).shape
    torch.Size([2, 3, 4])
    """

    def __init__(self, n_components: int, lengthscale=1.0, sigma=1.0, trainable: bool = True):
        super().__init__()
        self.n_components = check_rank(n_components, "n_components")
        self.lengthscale = nn.Parameter(check_positive_vector(lengthscale, self.n_components, "lengthscale"))
        self.sigma = nn.Parameter(check_positive_vector(sigma, self.n_components, "sigma"))
        positive(self, "lengthscale", "softplus", requires_grad=trainable)
        positive(self, "sigma", "softplus", requires_grad=trainable)

    def from_distance(self, r: Tensor) -> Tensor:
        """Kernel values from distances ``r`` of shape ``(..., )``; returns ``(K, ...)``."""
        shape = (-1,) + (1,) * r.dim()
        s = math.sqrt(3.0) * r.unsqueeze(0) / self.lengthscale.to(r.dtype).reshape(shape)
        return self.sigma.to(r.dtype).reshape(shape) ** 2 * (1.0 + s) * torch.exp(-s)

    def forward(self, x1: Tensor, x2: Optional[Tensor] = None, diag: bool = False) -> Tensor:
        """Covariances between coordinates.

        Parameters
        ----------
        x1 : Tensor, shape (N, D)
        x2 : Tensor, shape (M, D), optional
            Defaults to ``x1``.
        diag : bool, default False
            Return only the variances ``k(x1_n, x1_n)`` (``x2`` must be omitted).

        Returns
        -------
        Tensor
            Shape ``(K, N, M)``, or ``(K, N)`` with ``diag``.
        """
        if diag:
            if x2 is not None:
                raise ValueError("diag=True takes a single set of coordinates")
            return (self.sigma.to(x1.dtype) ** 2)[:, None].expand(-1, x1.shape[0])
        return self.from_distance(pairwise_distance(x1, x1 if x2 is None else x2))

    def extra_repr(self) -> str:
        return f"n_components={self.n_components}"


class MultiGroupKernel(nn.Module):
    r"""A spatial kernel attenuated between groups (multi-group GP, MGGP).

    .. math:: k_k((x, g), (x', g')) = k^{\text{base}}_k(x, x')\;
              \rho_k^{[g \neq g']}, \qquad \rho_k = \frac{1}{1 + a_k}

    where :math:`a_k \ge 0` is the group-difference parameter: ``a = 0`` shares one
    spatial field across groups, large ``a`` makes the groups' fields independent. The
    group factor :math:`(1-\rho) I + \rho\, \mathbf{1}\mathbf{1}^\top` is positive
    semi-definite, so the product is a valid kernel (Schur product theorem). At
    ``x = x'`` it matches the attenuation :math:`(1 + a)^{-p/2}` of Jones et al.'s MGGP
    for ``p = 2`` dimensions.

    Parameters
    ----------
    base : nn.Module
        A kernel such as :class:`Matern32`, called as ``base(x1, x2)`` and
        ``base(x1, diag=True)``, with ``n_components``.
    group_diff_param : float or sequence of K floats, default 1.0
        Initial :math:`a_k` (> 0).
    trainable : bool, default True

    Attributes
    ----------
    group_diff_param : Tensor, shape (K,)
        Positive parameter in ``softplus`` mode.
    """

    def __init__(self, base: nn.Module, group_diff_param=1.0, trainable: bool = True):
        super().__init__()
        self.base = base
        self.n_components = base.n_components
        self.group_diff_param = nn.Parameter(check_positive_vector(group_diff_param, self.n_components, "group_diff_param"))
        positive(self, "group_diff_param", "softplus", requires_grad=trainable)

    def attenuation(self, g1: Tensor, g2: Tensor) -> Tensor:
        """The group factor for integer labels ``g1`` (..., N) and ``g2`` (..., M).

        Returns
        -------
        Tensor
            Shape ``(K, ..., N, M)``: 1 within a group, :math:`\\rho_k` across groups.
        """
        rho = 1.0 / (1.0 + self.group_diff_param)
        differ = (g1.unsqueeze(-1) != g2.unsqueeze(-2)).to(rho.dtype)
        return 1.0 - differ.unsqueeze(0) * (1.0 - rho).reshape((-1,) + (1,) * differ.dim())

    def from_distance(self, r: Tensor, g1: Tensor, g2: Tensor) -> Tensor:
        """Kernel values from distances ``r`` (..., N, M) and labels ``g1`` (..., N), ``g2`` (..., M)."""
        return self.base.from_distance(r) * self.attenuation(g1, g2).to(r.dtype)

    def forward(self, x1: Tensor, g1: Tensor, x2: Optional[Tensor] = None, g2: Optional[Tensor] = None,
                diag: bool = False) -> Tensor:
        """Covariances between (coordinate, group) pairs.

        Parameters
        ----------
        x1 : Tensor, shape (N, D)
        g1 : LongTensor, shape (N,)
        x2 : Tensor, shape (M, D), optional
        g2 : LongTensor, shape (M,), optional
            Both default to ``x1``/``g1``.
        diag : bool, default False

        Returns
        -------
        Tensor
            Shape ``(K, N, M)``, or ``(K, N)`` with ``diag`` (equal to the base variances).
        """
        if diag:
            return self.base(x1, diag=True)
        if x2 is None:
            x2, g2 = x1, g1
        elif g2 is None:
            raise ValueError("g2 (the groups of x2) is required with x2")
        return self.base(x1, x2) * self.attenuation(g1, g2).to(x1.dtype)
