"""Coordinate-ascent variational inference (CAVI) for conjugate layers, as a torch optimizer."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..data import check_rank

__all__ = ["CAVI"]

#: Methods a layer offers for closed-form trainers (see torchnmf.poisson.gamma.GammaPoisson).
CONJUGATE_INTERFACE = ("prepare", "statistics", "update_U", "update_alpha", "update_kappa",
                       "update_lambda", "elbo_from_statistics", "mean_U")

Reduce = Callable[[Dict[str, object]], Dict[str, object]]


def check_conjugate(layer: nn.Module) -> nn.Module:
    """Raise ``TypeError`` unless ``layer`` offers the statistics/update methods closed-form trainers call."""
    if not isinstance(layer, nn.Module):
        raise TypeError(f"layer must be an nn.Module, got {type(layer).__name__}")
    missing = [m for m in CONJUGATE_INTERFACE if not callable(getattr(layer, m, None))]
    if missing:
        raise TypeError(f"layer {type(layer).__name__} has no conjugate-update method(s) {', '.join(missing)}; "
                        "closed-form trainers need a layer with sufficient statistics (e.g. GammaPoisson)")
    return layer


def unpack_batch(batch) -> Tuple[object, object, Optional[float]]:
    """Split a closure's return value: ``X``, ``(X, rows)`` or ``(X, rows, scale)``."""
    if isinstance(batch, tuple):
        if len(batch) == 2:
            return batch[0], batch[1], None
        if len(batch) == 3:
            return batch
        raise ValueError(f"the closure must return X, (X, rows) or (X, rows, scale); got a tuple of {len(batch)}")
    return batch, None, None


def _is_conjugate(layer) -> bool:
    return isinstance(layer, nn.Module) and all(callable(getattr(layer, m, None)) for m in CONJUGATE_INTERFACE)


class _ConjugateTrainer(torch.optim.Optimizer):
    """Shared plumbing: one parameter group over a layer (or a chain's parameters), a step counter, a data cache."""

    def __init__(self, layer, defaults: dict, reduce: Optional[Reduce]):
        if reduce is not None and not callable(reduce):
            raise TypeError(f"reduce must be callable, got {type(reduce).__name__}")
        self._chain = None
        if _is_conjugate(layer):
            params = list(layer.parameters())
        else:
            # a chain of GammaNMF/NMF layers: given as a module or as its parameters
            from ._chain import ChainRunner, chain_parameters

            params = chain_parameters(layer)
            if reduce is not None:
                raise ValueError("reduce: data-parallel fitting of chains is not supported; pass a conjugate layer")
            self._chain = ChainRunner(params)
            layer = None
        super().__init__(params, defaults)
        self.layer = layer
        self.reduce = reduce
        self._source = None  # (X object, rows object, prepared data, prepared rows)

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:
            raise ValueError(f"{type(self).__name__} takes one parameter group: the layer's")
        super().add_param_group(param_group)

    @property
    def _anchor(self):
        return self.param_groups[0]["params"][0]

    @property
    def steps(self) -> int:
        """Number of steps taken (saved in :meth:`state_dict`)."""
        return int(self.state[self._anchor].get("step", 0))

    def _count_step(self) -> None:
        self.state[self._anchor]["step"] = self.steps + 1

    def _prepare(self, X, rows):
        # Re-indexing the nonzeros costs about as much as a sweep: reuse it while the closure
        # returns the same objects (which therefore must not be modified in place).
        src = self._source
        if src is not None and src[0] is X and src[1] is rows:
            return src[2], src[3]
        self._source = src = None  # the previous batch's index is not kept while this one's is built
        data = self.layer.prepare(X, rows)
        r = None if rows is None else torch.as_tensor(rows)
        self._source = (X, rows, data, r)
        return data, r

    def _forget(self) -> None:
        """Drop the reused index of the last batch (a streaming fit never passes a batch twice)."""
        self._source = None

    def _statistics(self, data, rows, which, scale: float = 1.0) -> Dict[str, object]:
        stats = self.layer.statistics(data, rows=rows, scale=scale, chunk_size=self.param_groups[0]["chunk_size"],
                                      which=which)
        if self.reduce is not None:
            stats = self.reduce(stats)
        return stats

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._source = None
        self._cache = None
        if self._chain is not None:
            self._chain.reset()


class CAVI(_ConjugateTrainer):
    r"""Coordinate-ascent variational inference: one full sweep per :meth:`step`.

    Two kinds of models: a conjugate layer (:class:`~torchnmf.poisson.GammaPoisson`), or a
    chain of :class:`~torchnmf.poisson.GammaNMF` (and plain :class:`~torchnmf.NMF`) layers given
    by its parameters, ``CAVI(model.parameters())`` (or the module, ``CAVI(model)``; only the
    parameters are kept), trained through a closure like :class:`BetaMu`::

        model = nn.Sequential(GammaNMF((N, K1), rank=K0), GammaNMF(W=(K2, K1)), GammaNMF(W=(C, K2)))
        trainer = CAVI(model.parameters())
        for _ in range(200):
            elbo = trainer.step(lambda: (X, model(None)))   # X dense, sparse, numpy or scipy

    For a chain one sweep updates the first factor (``H``), then every other trainable factor
    in chain order, then the prior rates (see :mod:`torchnmf.trainer._chain` for the schedule
    and :mod:`torchnmf.poisson.chain` for the statistics); factors whose parameters are not in
    the trainer or have ``requires_grad=False`` are left alone. ``NMF`` factors (modes
    ``multiplicative``/``projected``) take the KL multiplicative update, the point-mass case.
    The step returns the chain's ELBO after the sweep (:func:`~torchnmf.poisson.chain.chain_elbo`).
    A one-layer chain follows exactly the ``GammaPoisson`` trajectory from the same start.

    For a conjugate layer, each step updates ``q(U)``, then ``q(α)`` (each with the multinomial :math:`\phi` optimal
    for the current posterior), then the empirical-Bayes hyperparameters, so every half-step
    increases the ELBO. The trainer sees only the layer's statistics and update methods
    (:meth:`GammaPoisson.statistics` and friends), never its class.

    Parameters
    ----------
    layer : nn.Module or iterable of Tensor
        A conjugate layer such as :class:`torchnmf.poisson.GammaPoisson`, or the parameters
        (or module) of a chain of ``GammaNMF`` / ``NMF`` layers.
    chunk_size : int, optional
        Bound on the nonzeros processed at once (peak memory).
    update_hyper : bool, default True
        Update the prior rates (for those the layer learns) after each sweep.
    reduce : callable, optional
        ``reduce(stats) -> stats`` applied to every statistics dict before it is used; for a
        data-parallel fit, sum the layer's ``global_statistics`` over processes
        (``torch.distributed.all_reduce``) while each closure returns its shard ``(X, rows)``.

    Notes
    -----
    The closure returns the data: ``X`` (the full count matrix), or ``(X, rows)`` for a shard
    of rows when ``reduce`` is given. Its conversion is reused while the closure returns the
    very same objects, so do not modify them in place between steps (return a new object, or a
    prepared :class:`~torchnmf.poisson.gamma.CountMatrix`).

    :meth:`step` returns the ELBO after the sweep. Its data term needs :math:`\phi` for the new
    posterior, which is also what the next sweep's ``q(U)`` update needs, so that pass is kept
    and reused: a sweep costs two passes over the nonzeros.

    Examples
    --------
    >>> import torch
    >>> from torchnmf.poisson import GammaPoisson
    >>> X = torch.poisson(torch.rand(20, 3) @ torch.rand(3, 15) * 4)
    >>> layer = GammaPoisson(20, 15, rank=3, dtype=torch.float64)
    >>> trainer = CAVI(layer)
    >>> elbos = [trainer.step(lambda: X) for _ in range(10)]
    >>> bool(elbos[-1].total >= elbos[0].total)
    True
    """

    def __init__(self, layer: nn.Module, chunk_size: Optional[int] = None, update_hyper: bool = True,
                 reduce: Optional[Reduce] = None):
        if chunk_size is not None:
            chunk_size = check_rank(chunk_size, "chunk_size")
        super().__init__(layer, dict(chunk_size=chunk_size, update_hyper=bool(update_hyper)), reduce)
        self._cache = None  # (data, parameter versions, statistics of the last pass)

    def _versions(self):
        return tuple((id(t), t._version) for t in [*self.layer.parameters(), *self.layer.buffers()])

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """One sweep: ``q(U)``, ``q(α)``, hyperparameters.

        Parameters
        ----------
        closure : callable
            Returns ``X`` or, with ``reduce``, ``(X, rows)``; for a chain ``(X, model(None))``.

        Returns
        -------
        torchnmf.ELBO
            The ELBO after the sweep (summed over shards when ``reduce`` sums the statistics).
        """
        if closure is None:
            raise ValueError("CAVI.step needs a closure returning the data (X or (X, rows); (X, model(None)) "
                             "for a chain)")
        group = self.param_groups[0]
        if self._chain is not None:
            record = self._chain.cavi(closure, group["chunk_size"], group["update_hyper"])
            self._count_step()
            return record
        X, rows, _ = unpack_batch(closure())
        if rows is not None and self.reduce is None:
            raise ValueError("rows: CAVI sweeps the full data; pass (X, rows) shards only together with "
                             "reduce= (data-parallel fitting), or use NaturalGradient for minibatches")
        data, r = self._prepare(X, rows)
        layer, group = self.layer, self.param_groups[0]
        cache = self._cache
        if cache is not None and cache[0] is data and cache[1] == self._versions():
            stats = cache[2]
        else:
            stats = self._statistics(data, r, ("U",))
        layer.update_U(stats)
        layer.update_alpha(self._statistics(data, r, ("alpha",)))
        if group["update_hyper"]:
            layer.update_kappa(r)
            layer.update_lambda()
        stats = self._statistics(data, r, ("U", "elbo"))
        self._cache = (data, self._versions(), stats)
        self._count_step()
        return layer.elbo_from_statistics(stats)
