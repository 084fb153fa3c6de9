"""The evidence lower bound record shared by every probabilistic layer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping

import torch
from torch import Tensor

__all__ = ["ELBO"]


@dataclass(frozen=True)
class ELBO:
    r"""One evaluation of an evidence lower bound, kept in parts.

    ``total = data - sum(kls.values())``. KL terms are read as attributes as well
    (``elbo.U_kls``), and ``elbo.Z`` is an alias of the data term, the name the
    Gamma-Poisson literature gives it (the expected log-likelihood of the latent counts).

    Parameters
    ----------
    data : Tensor, shape ()
        Expected log-likelihood (or its Monte Carlo estimate).
    kls : mapping of str to Tensor of shape ()
        Kullback-Leibler terms, each subtracted once from ``data``.

    Examples
    --------
    >>> import torch
    >>> e = ELBO(torch.tensor(-10.0), {"U_kls": torch.tensor(1.0), "alpha_kls": torch.tensor(2.0)})
    >>> float(e.total), float(e.U_kls)
    (-13.0, 1.0)
    """

    data: Tensor
    kls: Mapping[str, Tensor] = field(default_factory=dict)

    @property
    def total(self) -> Tensor:
        """The bound itself: data term minus every KL term, shape ()."""
        total = self.data
        for value in self.kls.values():
            total = total - value
        return total

    @property
    def Z(self) -> Tensor:  # noqa: N802 - the literature's name
        """Alias of :attr:`data`."""
        return self.data

    def __getattr__(self, name: str) -> Tensor:
        kls = self.__dict__.get("kls", {})
        if name in kls:
            return kls[name]
        raise AttributeError(f"ELBO has no term {name!r}; terms are {['data', *kls]}")

    def detach(self) -> "ELBO":
        """The same record with every term detached from the autograd graph."""
        return ELBO(self.data.detach(), {k: v.detach() for k, v in self.kls.items()})

    def to_dict(self) -> Dict[str, float]:
        """Python floats of every term and the total, for logging and JSON."""
        out = {"data": float(self.data)}
        out.update({k: float(v) for k, v in self.kls.items()})
        out["total"] = float(self.total)
        return out

    def __float__(self) -> float:
        return float(self.total)

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={v:.6g}" for k, v in self.to_dict().items())
        return f"ELBO({parts})"

    @staticmethod
    def zero(like: Tensor) -> "ELBO":
        """An empty record on ``like``'s device and dtype."""
        return ELBO(torch.zeros((), dtype=like.dtype, device=like.device), {})
