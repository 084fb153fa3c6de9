"""``ConsensusNMF``: a cNMF study (replicates at several ranks, consensus, k-selection) as one estimator."""
from __future__ import annotations

import numbers
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch

from .. import data
from ..engine import ConvergenceWarning
from .prepare import Prepared, apply_preparation, as_matrix, prepare
from .rank import RankResult, fit_rank
from .refit import refit_usages, to_tensor

try:
    from sklearn.base import BaseEstimator
except ImportError:  # pragma: no cover - scikit-learn is an extra; get_params/set_params by hand
    class BaseEstimator:  # type: ignore[no-redef]
        """get_params/set_params from the ``__init__`` signature (scikit-learn's convention)."""

        @classmethod
        def _get_param_names(cls):
            import inspect

            return sorted(p for p in inspect.signature(cls.__init__).parameters if p != "self")

        def get_params(self, deep: bool = True) -> dict:
            return {name: getattr(self, name) for name in self._get_param_names()}

        def set_params(self, **params):
            for name, value in params.items():
                if name not in self._get_param_names():
                    raise ValueError(f"invalid parameter {name!r} for {type(self).__name__}")
                setattr(self, name, value)
            return self

__all__ = ["ConsensusNMF", "KSELECTION_FIELDS"]

KSELECTION_FIELDS = ("k", "stability", "error", "cophenetic", "kept")


def _check_ranks(ranks) -> List[int]:
    if isinstance(ranks, numbers.Integral) and not isinstance(ranks, bool):
        ranks = [ranks]
    try:
        out = [r for r in ranks]
    except TypeError:
        raise TypeError(f"ranks must be an int or a sequence of ints, got {type(ranks).__name__}") from None
    if not out:
        raise ValueError("ranks is empty: give at least one rank, e.g. ranks=range(5, 11)")
    for r in out:
        if isinstance(r, bool) or not isinstance(r, numbers.Integral):
            raise TypeError(f"ranks must hold ints, got {r!r}")
        if r < 2:
            raise ValueError(f"ranks must be at least 2 (a consensus of 1 component is trivial), got {r}")
    if len(set(out)) != len(out):
        raise ValueError(f"ranks has repeated values: {out}")
    return sorted(int(r) for r in out)


def _is_counts(M) -> bool:
    vals = M.data if hasattr(M, "indptr") else M
    return bool(np.all(vals == np.round(vals)))


class ConsensusNMF(BaseEstimator):
    """Consensus NMF over a range of ranks, with cNMF's algorithm (Kotliar et al., eLife 2019).

    For each rank ``k`` in ``ranks``: ``n_replicates`` NMFs from different random starts
    (:func:`torchnmf.replicates.fit_replicates`, all replicates as one tensor program), their
    components clustered into ``k`` consensus components after dropping outliers, and the
    usages refitted with those components fixed. ``k_selection_`` scores each rank (stability,
    error, cophenetic correlation) to choose among them. See :doc:`/consensus`.

    Parameters
    ----------
    ranks : int or sequence of int
        The ranks to study; each at least 2 and at most ``min(n_samples, n_kept_features)``.
    n_replicates : int, default 100
        Random restarts per rank (at least 2; cNMF's users run 100 or more).
    beta_loss : float or {'frobenius', 'kullback-leibler', 'itakura-saito'}, default 'frobenius'
        Divergence of every fit (cNMF's default is Frobenius).
    n_top_features : int or None, default 2000
        Over-dispersed features kept by the preparation (all if fewer); ``None`` skips it.
    prepare : {'auto', True, False}, default 'auto'
        cNMF's preparation (:func:`torchnmf.consensus.prepare.prepare`): feature selection on
        the Fano factor and scaling to unit variance. ``'auto'`` prepares count input (every
        value an integer) and leaves other input, taken to be prepared already, as it is.
    density_threshold : float, default 0.5
        Replicate components whose local density (mean distance to their neighbours, unit
        vectors) is at or above this are outliers, dropped before the consensus; 2 keeps all.
    local_neighborhood_size : float, default 0.3
        Neighbours for the local density, as a fraction of ``n_replicates``.
    max_iter : int, default 1000
        Iteration limit of each replicate (and, at least 1000, of the usage refit).
    tol : float or None, default None
        Stop rule of each replicate. ``None``: 1e-4 with coordinate descent (scikit-learn's
        rule, the iteration's projected-gradient violation against the first's, as cNMF), 1e-6
        with multiplicative updates (relative change of the divergence per iteration, see
        :mod:`torchnmf.engine`; tighter because multiplicative updates slow down long before
        their optimum, and stopping them at 1e-4 leaves replicates apart that would converge
        together, which lowers the stability). The usage refit (multiplicative updates, the
        engine's rule) uses ``tol``, or 1e-6 when ``None``.
    solver : {'auto', 'cd', 'mu'}, default 'auto'
        Solver of the replicates (:func:`torchnmf.replicates.fit_replicates`): ``'cd'``
        coordinate descent (HALS, Frobenius loss only), ``'mu'`` multiplicative updates;
        ``'auto'``: ``'cd'`` for the Frobenius loss, ``'mu'`` otherwise, as cNMF chooses.
        Coordinate descent ends its replicates far closer to their optima, which is what the
        stability measures (simulated 800 x 300, rank 6: silhouette 0.98 against 0.87 with
        multiplicative updates at 1e-6).
    random_state : int or None, default None
        Seed of the replicates, k-means and refits (``None``: drawn once per fit, see ``seed_``).
    device : str or torch.device, optional
        Where to fit (``'auto'``: cuda when available); default cpu.
    dtype : {'float32', 'float64'} or torch dtype, optional
        Default float64 on the cpu, float32 on cuda.
    verbose : bool, default False
        Progress bars over ranks and replicates.

    Attributes
    ----------
    k_selection_ : pandas.DataFrame or dict of lists
        One row per rank, columns ``k``, ``stability``, ``error``, ``cophenetic``, ``kept``
        (a dict of equally long lists with those keys when pandas is not installed).
    components_ : dict of int -> ndarray, shape (k, n_kept_features)
        Consensus components per rank, each summing to 1 (in the prepared space).
    usages_ : dict of int -> ndarray, shape (n_samples, k)
        Usages per rank, refitted with the components fixed.
    clusterings_ : dict of int -> Clustering
        The replicates' unit-norm components, local densities and cluster labels per rank
        (for :meth:`plot_clustering`).
    results_ : dict of int -> RankResult
    ranks_ : list of int
    feature_names_ : ndarray of str, shape (n_kept_features,)
        Names of the kept features (the input's names, or ``'0', '1', ...`` by column).
    sample_names_ : ndarray of str, shape (n_samples,)
    features_ : ndarray of int, shape (n_kept_features,)
        Input columns kept by the preparation.
    prepared_ : bool
        Whether the preparation ran.
    n_features_in_ : int
    seed_ : int
        The seed used.
    solver_ : str
        The replicates' solver, ``'cd'`` or ``'mu'`` (``solver`` resolved).

    Examples
    --------
    >>> from torchnmf.consensus import ConsensusNMF
    >>> est = ConsensusNMF(ranks=[3, 4, 5], n_replicates=20, random_state=0).fit(X)  # doctest: +SKIP
    >>> est.k_selection_                                                           # doctest: +SKIP
    >>> est.plot_k_selection()                                                     # doctest: +SKIP
    """

    def __init__(self, ranks: Union[int, Sequence[int]] = (5, 6, 7, 8, 9, 10), n_replicates: int = 100, *,
                 beta_loss: Union[str, float] = "frobenius", n_top_features: Optional[int] = 2000,
                 prepare: Union[str, bool] = "auto", density_threshold: float = 0.5,
                 local_neighborhood_size: float = 0.3, max_iter: int = 1000, tol: Optional[float] = None,
                 solver: str = "auto", random_state: Optional[int] = None, device=None, dtype=None,
                 verbose: bool = False):
        self.ranks = ranks
        self.n_replicates = n_replicates
        self.beta_loss = beta_loss
        self.n_top_features = n_top_features
        self.prepare = prepare
        self.density_threshold = density_threshold
        self.local_neighborhood_size = local_neighborhood_size
        self.max_iter = max_iter
        self.tol = tol
        self.solver = solver
        self.random_state = random_state
        self.device = device
        self.dtype = dtype
        self.verbose = verbose

    # -- validation ----------------------------------------------------------------------
    def _validate(self) -> dict:
        """Check every parameter (scikit-learn: in fit, not __init__); returns the resolved ones."""
        from ..estimators._base import resolve_device, resolve_dtype
        from ..estimators.nmf import beta_from_loss

        ranks = _check_ranks(self.ranks)
        n_rep = data.check_int(self.n_replicates, "n_replicates", low=2)
        beta = beta_from_loss(self.beta_loss)
        if self.prepare not in ("auto", True, False):
            raise ValueError(f"prepare must be 'auto', True or False, got {self.prepare!r}")
        if self.n_top_features is not None:
            data.check_int(self.n_top_features, "n_top_features", low=1)
        dt = data.check_real(self.density_threshold, "density_threshold", low=0)
        if dt <= 0:
            raise ValueError(f"density_threshold must be positive (2 keeps every component), got {dt}")
        lns = data.check_real(self.local_neighborhood_size, "local_neighborhood_size", low=0, high=1)
        if lns <= 0:
            raise ValueError(f"local_neighborhood_size must be in (0, 1], got {lns}")
        if int(lns * n_rep) < 1:  # cNMF would divide by zero neighbours
            raise ValueError(f"local_neighborhood_size={lns} gives int({lns} * {n_rep}) = 0 neighbours for the local "
                             f"density with n_replicates={n_rep}; raise local_neighborhood_size or n_replicates")
        max_iter = data.check_int(self.max_iter, "max_iter", low=1)
        if self.solver not in ("auto", "cd", "mu"):
            raise ValueError(f"solver must be 'auto', 'cd' or 'mu', got {self.solver!r}")
        solver = ("cd" if beta == 2 else "mu") if self.solver == "auto" else self.solver
        if solver == "cd" and beta != 2:
            raise ValueError(f"solver='cd' (coordinate descent) needs beta_loss='frobenius', got "
                             f"beta_loss={self.beta_loss!r}; use solver='mu' or 'auto'")
        if self.tol is None:
            tol, refit_tol = (1e-4 if solver == "cd" else 1e-6), 1e-6
        else:
            tol = refit_tol = data.check_real(self.tol, "tol", low=0)
        if self.random_state is None:
            seed = int(np.random.randint(0, 2**31 - 1))
        else:
            seed = data.check_int(self.random_state, "random_state", low=0)
        device = resolve_device(self.device) or torch.device("cpu")
        dtype = resolve_dtype(self.dtype, torch.float32 if device.type == "cuda" else torch.float64)
        return dict(ranks=ranks, n_replicates=n_rep, beta=beta, density_threshold=dt,
                    local_neighborhood_size=lns, max_iter=max_iter, tol=tol, refit_tol=refit_tol, solver=solver,
                    seed=seed, device=device, dtype=dtype)

    def _prepare(self, X, feature_names=None, sample_names=None) -> Prepared:
        if self.prepare == "auto":
            M, fn, sn = as_matrix(X, feature_names, sample_names)
            enabled = _is_counts(M)
            return prepare(M, self.n_top_features, feature_names=fn, sample_names=sn, enabled=enabled)
        return prepare(X, self.n_top_features, feature_names=feature_names, sample_names=sample_names,
                       enabled=bool(self.prepare))

    @staticmethod
    def _check_rank_range(ranks: List[int], shape) -> None:
        top = min(shape)
        bad = [r for r in ranks if r > top]
        if bad:
            raise ValueError(f"ranks {bad} exceed min(n_samples, n_features) = {top} of the prepared matrix "
                             f"{tuple(shape)}; choose ranks up to {top}")

    # -- fitting -------------------------------------------------------------------------
    def fit(self, X, y=None, *, feature_names: Optional[Sequence[str]] = None,
            sample_names: Optional[Sequence[str]] = None) -> "ConsensusNMF":
        """Run the study on ``X``.

        Parameters
        ----------
        X : array-like, pandas DataFrame, scipy.sparse matrix or tensor, shape (n_samples, n_features)
            Non-negative, finite; counts for the preparation. Never modified; sparse input is
            never densified (only the kept columns are copied).
        y : ignored
        feature_names, sample_names : sequence of str, optional
            Names of the columns / rows (default: a DataFrame's columns / index).

        Returns
        -------
        self

        Raises
        ------
        ValueError
            A bad parameter or input (named), ranks above ``min(n_samples, n_kept_features)``,
            samples left empty by the selection, or a density threshold that leaves fewer than
            ``k`` components at some rank.
        """
        params = self._validate()
        prep = self._prepare(X, feature_names, sample_names)
        self._check_rank_range(params["ranks"], prep.X.shape)
        results = self._fit_ranks(prep, params, {})
        self._set_results(prep, params, results)
        return self

    def _fit_ranks(self, prep: Prepared, params: dict, done: Dict[int, RankResult],
                   on_rank: Optional[Callable[[RankResult], None]] = None) -> Dict[int, RankResult]:
        """Fit the ranks not in ``done`` (a checkpoint's), calling ``on_rank`` after each."""
        Xt = to_tensor(prep.X, params["device"], params["dtype"])
        results = dict(done)
        todo = [k for k in params["ranks"] if k not in done]
        bar = None
        if self.verbose and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(params["ranks"]), initial=len(done), desc="consensus ranks")
        try:
            for k in todo:
                res = fit_rank(Xt, k, n_replicates=params["n_replicates"], beta=params["beta"], tol=params["tol"],
                               max_iter=params["max_iter"], seed=params["seed"], solver=params["solver"],
                               refit_tol=params["refit_tol"],
                               density_threshold=params["density_threshold"],
                               local_neighborhood_size=params["local_neighborhood_size"],
                               device=params["device"], dtype=params["dtype"], verbose=self.verbose)
                if res.n_converged < params["n_replicates"]:
                    warnings.warn(f"rank {k}: {params['n_replicates'] - res.n_converged} of {params['n_replicates']} "
                                  f"replicates reached max_iter={params['max_iter']} before tol={params['tol']}; "
                                  f"raise max_iter", ConvergenceWarning, stacklevel=3)
                results[k] = res
                if on_rank is not None:
                    on_rank(res)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return results

    def _set_results(self, prep: Prepared, params: dict, results: Dict[int, RankResult]) -> None:
        ranks = params["ranks"]
        self.ranks_ = list(ranks)
        self.results_ = {k: results[k] for k in ranks}
        self.components_ = {k: results[k].clustering.consensus for k in ranks}
        self.usages_ = {k: results[k].usages for k in ranks}
        self.clusterings_ = {k: results[k].clustering for k in ranks}
        self.feature_names_ = prep.feature_names
        self.sample_names_ = prep.sample_names
        self.features_ = prep.features
        self.prepared_ = prep.prepared
        self.n_features_in_ = int(prep.n_features_in)
        self.seed_ = params["seed"]
        self._beta = params["beta"]
        self.solver_, self._refit_tol = params["solver"], params["refit_tol"]
        self._fit_device, self._fit_dtype = params["device"], params["dtype"]
        self._preparation = Prepared(None, prep.features, prep.scale, prep.feature_names, None, prep.prepared,
                                     prep.n_features_in)
        self.k_selection_ = k_selection_table(self.results_.values())

    # -- using the result ----------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "components_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this ConsensusNMF is not fitted yet: call fit(X) first")

    def _rank(self, k: Optional[int]) -> int:
        self._check_fitted()
        if k is None:
            if len(self.ranks_) == 1:
                return self.ranks_[0]
            raise ValueError(f"k is needed: the model has ranks {self.ranks_}")
        if k not in self.components_:
            raise ValueError(f"k={k} was not fitted; the fitted ranks are {self.ranks_}")
        return int(k)

    def transform(self, X, k: Optional[int] = None) -> np.ndarray:
        """Usages of new samples at rank ``k``, the consensus components held fixed.

        Parameters
        ----------
        X : array-like, DataFrame or scipy.sparse matrix, shape (n_samples', n_features_in_)
            The same features as the training data (the preparation's columns and scales
            are applied).
        k : int, optional
            A fitted rank (may be left out when only one was fitted).

        Returns
        -------
        ndarray, shape (n_samples', k)
        """
        k = self._rank(k)
        p = self._preparation
        if p.prepared:
            Y, _ = apply_preparation(p, X, self.n_features_in_)
        else:
            Y, _, _ = as_matrix(X)
            if Y.shape[1] != self.n_features_in_:
                raise ValueError(f"X has {Y.shape[1]} features, but the model was fitted on {self.n_features_in_}")
        Xt = to_tensor(Y, self._fit_device, self._fit_dtype)
        H, _ = refit_usages(Xt, self.components_[k], beta=self._beta, tol=self._refit_tol, max_iter=self.max_iter,
                            seed=self.seed_)
        return H

    def top_features(self, k: int, n: int = 10) -> List[List[str]]:
        """Names of the ``n`` heaviest features of each consensus component at rank ``k``.

        Returns
        -------
        list of k lists of str
        """
        k = self._rank(k)
        C = self.components_[k]
        return [[str(self.feature_names_[j]) for j in np.argsort(-row, kind="stable")[:n]] for row in C]

    def frames(self, k: int):
        """Components and usages at rank ``k`` as pandas DataFrames labelled with the names.

        Returns
        -------
        components : pandas.DataFrame, shape (k, n_kept_features)
            Columns: ``feature_names_``; index: ``program_0``... .
        usages : pandas.DataFrame, shape (n_samples, k)
            Index: ``sample_names_``; columns: ``program_0``... .
        """
        import pandas as pd

        k = self._rank(k)
        programs = [f"program_{i}" for i in range(k)]
        return (pd.DataFrame(self.components_[k], index=programs, columns=list(self.feature_names_)),
                pd.DataFrame(self.usages_[k], index=list(self.sample_names_), columns=programs))

    def plot_k_selection(self, ax=None):
        """Stability and error against the rank, on two y-axes (cNMF's k-selection plot).

        Parameters
        ----------
        ax : matplotlib Axes, optional

        Returns
        -------
        matplotlib.figure.Figure
        """
        from .plot import plot_k_selection

        self._check_fitted()
        return plot_k_selection(self.k_selection_, ax=ax)

    def plot_clustering(self, k: int):
        """The replicates' components at rank ``k``: clustered distance matrix and local densities.

        Returns
        -------
        matplotlib.figure.Figure
        """
        from .plot import plot_clustering

        return plot_clustering(self.clusterings_[self._rank(k)])


def k_selection_table(results: Iterable[RankResult]):
    """The k-selection rows of fitted ranks: a pandas DataFrame, or a dict of lists without pandas.

    Parameters
    ----------
    results : iterable of RankResult

    Returns
    -------
    pandas.DataFrame or dict
        Columns / keys ``k``, ``stability``, ``error``, ``cophenetic``, ``kept``.
    """
    rows = sorted(results, key=lambda r: r.clustering.k)
    table = {name: [r.clustering.k if name == "k" else getattr(r, name) for r in rows] for name in KSELECTION_FIELDS}
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is optional
        return table
    return pd.DataFrame(table)
