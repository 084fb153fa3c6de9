"""The ``fireyfish`` (yet-another-poisfac) API over :class:`~torchnmf.poisson.GammaNMF` and CAVI.

Code written for fireyfish runs with its import line changed to::

    from torchnmf.compat import fireyfish; from torchnmf.compat.fireyfish import Trainer

Names: the row loadings ``U`` are the layer's ``H`` and the column loadings ``alpha`` its
``W``; ``rho`` is the prior shape of both (``a``), ``kappas``/``lambdas`` the
maximum-likelihood prior rates of rows and columns; ``batchsize`` bounds the nonzeros
processed at once (the sweeps are full CAVI sweeps of :class:`torchnmf.trainer.CAVI`, so
``trainer.elbos`` never decreases).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import List, Optional

import torch
from torch import nn

from .. import engine
from ..data import check_positive, check_rank
from ..history import History
from ..poisson.chain import GammaNMF
from ..poisson.elbo import ELBO
from ..poisson.gamma import CountMatrix
from ..trainer.cavi import CAVI

__all__ = ["PoisModel", "Trainer"]


class PoisModel(nn.Module):
    """Poisson factorization ``X_ct ~ Poisson(Σ_k U_ck alpha_tk)`` with Gamma priors (fireyfish's model).

    Parameters
    ----------
    countmatrix : counts, shape (n_rows, n_cols)
        Dense or sparse tensor, numpy array or scipy.sparse matrix; checked and indexed once,
        never modified.
    Nfactors : int
        Number of factors K.
    batchsize : int, optional
        Nonzeros processed at once (peak memory); None processes all at once.
    rho : float, default 1.0
        Prior shape of ``U`` and ``alpha``.

    Attributes
    ----------
    layer : GammaNMF
        The model: ``layer.H`` is ``E[U]`` ``(n_rows, K)``, ``layer.W`` is ``E[alpha]`` ``(n_cols, K)``.
    """

    def __init__(self, countmatrix, Nfactors: int, batchsize: Optional[int] = None, rho: float = 1.0):
        super().__init__()
        K = check_rank(Nfactors, "Nfactors")
        self.batchsize = None if batchsize is None else check_rank(batchsize, "batchsize")
        self.rho = check_positive(rho, "rho")
        # float64 values keep log X! exact whatever the model's dtype (converted per sweep when needed)
        self.countmatrix = CountMatrix.from_input(countmatrix, "countmatrix", dtype=torch.float64)
        self.layer = GammaNMF(self.countmatrix.shape, rank=K, a=self.rho)

    def initialize(self, generator: Optional[torch.Generator] = None) -> None:
        """Random initial posteriors (shapes ``rho + Uniform(0, 1)``, rates the prior rates)."""
        self.layer.reset_parameters(generator)

    def forward(self) -> torch.Tensor:
        """Expected counts ``E[U] E[alpha]ᵀ``, shape ``(n_rows, n_cols)`` (dense)."""
        return self.layer(None)

    @torch.no_grad()
    def save_params(self, parms=None) -> SimpleNamespace:
        """The learned parameters as numpy arrays.

        Parameters
        ----------
        parms : dict or object, optional
            Also filled with the arrays (items of a dict, attributes otherwise).

        Returns
        -------
        SimpleNamespace
            ``sU``, ``rU`` (``(n_rows, K)``: posterior shape and rate of ``U``), ``kappas``
            (``(n_rows,)``), ``salpha``, ``ralpha`` (``(n_cols, K)``), ``lambdas`` (``(n_cols,)``).
        """
        L = self.layer
        values = dict(sU=L.H_shape, rU=L.H_rate, kappas=L.H_prior_rate, salpha=L.W_shape, ralpha=L.W_rate,
                      lambdas=L.W_prior_rate)
        values = {k: v.detach().cpu().numpy().copy() for k, v in values.items()}
        if parms is not None:
            for k, v in values.items():
                if isinstance(parms, dict):
                    parms[k] = v
                else:
                    setattr(parms, k, v)
        return SimpleNamespace(**values)


class Trainer:
    """Runs CAVI sweeps on a :class:`PoisModel`; ``elbos`` holds one record per sweep.

    Each record has ``Z`` (the data term), ``U_kls``, ``alpha_kls`` and
    ``total = Z - U_kls - alpha_kls`` (the ELBO after the sweep). Setting ``KEEPGOING = False``
    (e.g. from another thread) ends a running :meth:`go` after the current sweep.

    Parameters
    ----------
    model : PoisModel
    """

    def __init__(self, model: PoisModel):
        if not isinstance(model, PoisModel):
            raise TypeError(f"model must be a PoisModel, got {type(model).__name__}")
        self.model = model
        self.cavi = CAVI(model.parameters(), chunk_size=model.batchsize)
        self.elbos: List[ELBO] = []
        self.KEEPGOING = True

    def go(self, n: int) -> None:
        """Run up to ``n`` sweeps (fewer if ``KEEPGOING`` becomes False)."""
        n = check_rank(n, "n")
        self.KEEPGOING = True
        model = self.model

        def closure():
            return model.countmatrix, model.layer(None)

        def sweep(i, measure):
            record = self.cavi.step(closure)
            return ELBO(record.data, {"U_kls": record.H_kls, "alpha_kls": record.W1_kls})

        def keep(i, record):
            self.elbos.append(record)
            return self.KEEPGOING  # False (set from another thread) ends go() after this sweep

        # fireyfish runs exactly n sweeps (no tolerance); the engine checks each ELBO is finite
        engine.run(sweep, max_iter=n, tol=0.0, history=History(name="elbo", maximize=True), model="fireyfish.Trainer.go",
                   dtype=model.countmatrix.dtype if hasattr(model.countmatrix, "dtype") else None, callback=keep)
