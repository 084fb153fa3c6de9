"""A deep Poisson factorization with ``fit`` and ``transform``, as easy to use as one layer.

:class:`GammaChain` is a :class:`torch.nn.Sequential` of :class:`~torchnmf.poisson.GammaNMF`
(and plain :class:`~torchnmf.nmf.NMF`) layers: everything a chain does under
:class:`~torchnmf.trainer.CAVI` it does too, and it adds what a single
:class:`~torchnmf.poisson.GammaPoisson` layer offers: :meth:`GammaChain.fit` runs the CAVI
sweeps through the fit engine (the stop rule, the ``History``, a progress bar, the
``ConvergenceWarning``), and :meth:`GammaChain.transform` infers the first factor of new rows
with every other factor fixed.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..data import check_positive, check_rank
from .chain import GammaNMF, _write, chain_data, collect
from .gamma import CountMatrix

__all__ = ["GammaChain"]


class GammaChain(nn.Sequential):
    r"""A chain of Gamma-Poisson layers with ``fit`` and ``transform``.

    ``GammaChain(GammaNMF((N, K1), rank=K2), GammaNMF(W=(C, K1)))`` models counts ``X``
    (N x C) as ``Poisson(H W1ᵀ W2ᵀ)`` (see :mod:`torchnmf.poisson.chain`). The factors shown
    by the layers (``chain[0].H``, ``chain[1].W``) are posterior means, plain tensors that
    ``.numpy()`` converts directly.

    Parameters
    ----------
    *layers : GammaNMF or NMF
        The first must be a :class:`~torchnmf.poisson.GammaNMF` holding both ``H`` and ``W``.

    Examples
    --------
    >>> import torch
    >>> from torchnmf.poisson import GammaChain, GammaNMF
    >>> X = torch.poisson(torch.rand(40, 3) @ torch.rand(3, 8) @ torch.rand(8, 30) * 2)
    >>> chain = GammaChain(GammaNMF((40, 8), rank=3, dtype=torch.float64),
    ...                    GammaNMF(W=(30, 8), dtype=torch.float64))
    >>> history = chain.fit(X, max_iter=20, tol=0)
    >>> len(history), chain.transform(X[:5]).shape, chain[0].H.numpy().shape
    (20, torch.Size([5, 3]), (40, 3))
    """

    def _first(self) -> GammaNMF:
        first = self[0] if len(self) else None
        if not isinstance(first, GammaNMF) or not (first.has("H") and first.has("W")):
            raise TypeError("GammaChain: the first layer must be a GammaNMF holding both H and W, e.g. "
                            "GammaNMF((N, K1), rank=K2)")
        return first

    def fit(self, X, max_iter: int = 1000, tol: float = 1e-6, verbose: bool = False, history=None,
            callback: Optional[Callable[[nn.Module, Any], Any]] = None, chunk_size: Optional[int] = None,
            trainer=None):
        """Fit every trainable factor by CAVI sweeps until the ELBO settles.

        Parameters
        ----------
        X : counts, shape (N, C)
            Dense or sparse tensor, numpy array, scipy.sparse matrix or CountMatrix; never modified.
        max_iter : int, default 1000
            Maximum number of sweeps.
        tol : float, default 1e-6
            Stop when the ELBO changes by at most ``tol`` relative to ``|ELBO|`` over a sweep
            (the rule of :mod:`torchnmf.engine`, Gamma-Poisson's default; see
            :ref:`default-tolerances`); reaching ``max_iter`` first warns with
            :class:`~torchnmf.engine.ConvergenceWarning`. 0 runs ``max_iter`` sweeps.
        verbose : bool, default False
            Show a progress bar with the ELBO (ignored when ``history`` is given).
        history : torchnmf.History, optional
            Receives one :class:`~torchnmf.ELBO` per sweep; its stop flag ends the fit.
        callback : callable, optional
            ``callback(chain, elbo)`` after each sweep; returning ``False`` stops the fit.
        chunk_size : int, optional
            Bound on the nonzeros processed at once.
        trainer : torchnmf.trainer.CAVI, optional
            Default: a new ``CAVI(self.parameters(), chunk_size=chunk_size)``.

        Returns
        -------
        torchnmf.History
        """
        from ..engine import run
        from ..history import History
        from ..trainer.cavi import CAVI

        self._first()
        max_iter = check_rank(max_iter, "max_iter")
        tol = check_positive(tol, "tol", allow_zero=True)
        _, chain = collect(lambda: (None, self(None)), "model")
        data = chain_data(X, chain)  # checked and indexed once, reused by every sweep
        own = history is None
        if own:
            history = History(verbose=verbose, total=max_iter, desc=f"{type(self).__name__}.fit", name="elbo",
                              maximize=True)
        trainer = trainer if trainer is not None else CAVI(self.parameters(), chunk_size=chunk_size)
        try:
            run(lambda i, measure: trainer.step(lambda: (data, self(None))), max_iter=max_iter, tol=tol,
                history=history, model=f"{type(self).__name__}.fit", dtype=chain.factors[0].dtype,
                callback=None if callback is None else (lambda i, record: callback(self, record)))
        finally:
            if own:
                history.close()
        return history

    def transform(self, X, max_iter: int = 100, tol: float = 1e-6, chunk_size: Optional[int] = None,
                  verbose: bool = False) -> Tensor:
        """Posterior means of the first factor (``H``) of new rows, every other factor fixed.

        A new first layer for the rows of ``X`` shares the fitted ``q(W)`` of the first layer
        (and the upper layers as they are); its ``q(H)`` starts at the fitted rows' mean and is
        fitted by CAVI sweeps (with per-row prior rates when the first layer learns them,
        starting from the mean of the fitted ones). Nothing of the fitted chain changes.

        Parameters
        ----------
        X : counts, shape (n_new, C)
        max_iter : int, default 100
            Maximum number of sweeps (no warning when reached: a transform's budget is its own).
        tol : float, default 1e-6
            Stop when the new rows' ELBO changes by at most ``tol`` relative to ``|ELBO|`` over a sweep.
        chunk_size : int, optional
        verbose : bool, default False
            A progress bar labelled "inferring loadings of new rows".

        Returns
        -------
        Tensor, shape (n_new, K)
            ``K`` the first layer's rank; detached.
        """
        from ..engine import run
        from ..history import History
        from ..trainer.cavi import CAVI

        first = self._first()
        max_iter = check_rank(max_iter, "max_iter")
        tol = check_positive(tol, "tol", allow_zero=True)
        _, chain = collect(lambda: (None, self(None)), "model")
        data = CountMatrix.from_input(X, "X", allow_noninteger=all(f.layer.allow_noninteger for f in chain.factors
                                                                   if hasattr(f, "layer")),
                                      dtype=first.dtype, device=first.device, shape=(None, chain.shape[1]))
        n = data.shape[0]
        if n == 0:
            return torch.zeros((0, first.rank), dtype=first.dtype, device=first.device)
        new = GammaNMF(H=(n, first.rank), W=tuple(first._raw("W_shape").shape), trainable_W=False,
                       a=float(first.H_prior_shape), prior_rate=float(first.H_prior_rate.mean()),
                       learn_prior_rate=first.learn_prior_rate, mode=first._mode,
                       allow_noninteger=first.allow_noninteger, generator=torch.Generator().manual_seed(0),
                       dtype=first.dtype, device=first.device)
        with torch.no_grad():
            new.reset_parameters(means={"H": first.H.mean(0).expand(n, -1), "W": first.W})
            for name in ("W_shape", "W_rate"):  # the fitted q(W) itself, not a start at its mean
                _write(new, name, getattr(first, name).detach().clone())
            new.W_prior_rate.copy_(first.W_prior_rate)
            new.W_prior_shape.copy_(first.W_prior_shape)
        model = nn.Sequential(new, *list(self)[1:])
        trainer = CAVI([new._raw("H_shape"), new._raw("H_rate")], chunk_size=chunk_size)
        history = History(verbose=verbose, total=max_iter, desc=f"{type(self).__name__}: inferring loadings of new rows",
                          name="elbo", maximize=True)
        try:
            run(lambda i, measure: trainer.step(lambda: (data, model(None))), max_iter=max_iter, tol=tol,
                history=history, model=f"{type(self).__name__}.transform", dtype=new.dtype, warn=False)
        finally:
            history.close()
        return new.H
