"""scikit-learn estimator for log-normal Poisson factorization (:class:`~torchnmf.poisson.LogNormalPoisson`)."""
from __future__ import annotations

import contextlib
import copy
import math
import warnings
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import constraints, engine
from ..data import as_tensor, check_finite, check_option, check_positive, check_rank
from ..history import History
from ..init import METHODS as INIT_METHODS
from ..init import initialize
from ..poisson.elbo import ELBO
from ..poisson.lognormal import ELBO_MODES, Counts, IndependentNormal, LogNormalPoisson
from ..trainer.gaussian_natural import GaussianNatural
from ._base import NotFittedError, TorchFactorization  # noqa: F401
from sklearn.utils.validation import check_is_fitted

__all__ = ["PNMF"]

TRAINING_MODES = ("standard", "natural")
SCHEDULERS = ("one_cycle", "plateau", None)
#: epochs per window of the stop rule for stochastic or scheduled fits (see :func:`torchnmf.engine.run`)
_STOCHASTIC_WINDOW = 5
#: below this learning rate SGD on the per-entry mean negative ELBO barely moves it (digits: ELBO
#: -121733 -> -106640 in 177 epochs at 0.01, -> -62745 at 1, -> -50246 at 10)
_SGD_MIN_LR = 0.5
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
              "rmsprop": torch.optim.RMSprop, "adagrad": torch.optim.Adagrad}


@contextlib.contextmanager
def _seeded(g: torch.Generator, device: torch.device):
    """Seed the global torch RNG (Monte Carlo draws) from ``g`` inside, restore it after."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=g))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class PNMF(TorchFactorization):
    r"""Log-normal Poisson factorization with the scikit-learn API.

    ``X`` (samples x features) is modelled as ``X.T ~ Poisson(W exp(F))`` with loadings
    ``W`` (features x K) and Gaussian ``q(F)`` (K x samples) under a ``Normal(0, prior_scale^2)``
    prior; the fit maximises the ELBO of :class:`torchnmf.poisson.LogNormalPoisson`.

    Parameters
    ----------
    n_components : int, default 2
        At most ``min(n_samples, n_features)``.
    loadings_mode : {'softplus', 'exp', 'projected', 'multiplicative'}, default 'multiplicative'
        Positivity of ``W``; ``'multiplicative'`` updates ``W`` by the layer's
        multiplicative update instead of the gradient optimizer.
    mode : {'lower-bound', 'expanded', 'simple'}, default 'lower-bound'
        ELBO estimate (analytic Jensen bound, or Monte Carlo with ``E`` draws).
    training_mode : {'standard', 'natural'}, default 'natural'
        ``'standard'``: ``optimizer`` on the negative ELBO for all parameters.
        ``'natural'``: :class:`torchnmf.trainer.GaussianNatural` for ``q(F)`` (step
        ``learning_rate`` times ``batch_size / n_samples``), ``optimizer`` (or the
        multiplicative update) for ``W``. (:class:`SpatialPNMF`: natural steps for the
        inducing values of a ``diagonal_only`` SVGP, gradient steps for the other GP
        parameters.)
    E : int, default 3
        Monte Carlo draws per step.
    max_iter : int, default 500
        Epochs (passes over all batches).
    tol : float, default 1e-5
        Stop when the epoch ELBO changes by at most ``tol`` relative to ``|ELBO|`` (the rule
        of :mod:`torchnmf.engine`; 0: never); reaching ``max_iter`` first warns with
        :class:`~torchnmf.engine.ConvergenceWarning`. Stochastic or scheduled fits (a
        gradient optimizer, a scheduler, a Monte Carlo ``mode`` or mini-batches) compare the
        means of the last 5 epochs with the 5 before, and never stop during a one-cycle
        warm-up.
    learning_rate : float, optional
        Default 0.05 for gradient optimizers; for natural steps 0.5 (``lower-bound``) or
        0.1 (Monte Carlo modes).
    optimizer : {'adam', 'adamw', 'sgd', 'rmsprop', 'adagrad'} or Optimizer class, default 'adam'
        With ``training_mode='standard'`` the loss is the mean negative ELBO per entry, so
        ``'sgd'`` needs a ``learning_rate`` of about 1 to 10 (below 0.5 it warns: the ELBO
        hardly moves).
    random_state : int, numpy/torch generator or None
        Seeds initialization, shuffling and Monte Carlo draws (the global torch RNG is
        left untouched).
    verbose : bool, default False
        Progress bars, one per phase, labelled: the fit's epochs (with the ELBO), and the
        refit of ``q(F)`` with ``W`` fixed that :meth:`fit_transform` and :meth:`transform`
        run after it ("inferring factors").
    device : 'auto', str, torch.device or None, default None
        ``None`` follows a tensor input's device.
    dtype : {None, 'float32', 'float64'}
    init : {'random', 'nndsvd', 'nndsvda', 'nndsvdar', 'k-means', None}, default None
        Initial ``W`` and ``exp(mean F)`` from :func:`torchnmf.init.initialize` (``None``: auto).
    scheduler : {'one_cycle', 'plateau', None}, default None
        Learning-rate schedule of the optimizers (per batch step for ``one_cycle``, per
        epoch on the ELBO for ``plateau``).
    batch_size : int, optional
        Samples per mini-batch (default all). Must not exceed ``n_samples``.
    y_batch_size : int, optional
        Features per mini-batch (default all). Must not exceed ``n_features``.
    shuffle : bool, default True
        Reshuffle batches every epoch.
    prior_scale : float, default 1
    init_scale : float, default 0.1
        Initial posterior standard deviation of ``F``.
    transform_max_iter : int, optional
        Steps of the variational fit of :meth:`transform` / :meth:`transform_F` (and of
        :meth:`fit_transform` after the fit) and of the multiplicative updates of
        :meth:`transform_W`. Default: as many as the fit took (``n_iter_``), at most 200,
        so a transform never takes longer than its fit by default. ``verbose`` shows their
        progress bar.
    allow_noninteger : bool, default False
        Accept any non-negative ``X`` (the Poisson likelihood is then a quasi-likelihood).
        By default ``X`` holds counts: values within 1e-6 of an integer are rounded (with a
        warning), others refused (:func:`torchnmf.data.check_counts`).

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        ``W.T``.
    layer_ : LogNormalPoisson
        The fitted layer.
    elbo_ : float
        Final ELBO (last epoch).
    n_iter_ : int
    history_ : torchnmf.history.History
        ELBO records, one per epoch.
    n_components_, n_features_in_ : int

    Notes
    -----
    The defaults (natural steps for ``q(F)``, multiplicative updates of ``W``, the analytic
    ``'lower-bound'``) recover simulated factors best: matched correlation 0.95 for ``F`` and
    0.99 for ``W`` against 0.55 for Adam on all parameters (``training_mode='standard',
    loadings_mode='softplus'``, the defaults before), in fewer epochs (benchmarks/README.md,
    ``pnmf_recovery.py``). They differ from the PNMF package's (``'standard'``, Adam,
    ``'projected'``, ``'expanded'``), which :class:`torchnmf.compat.pnmf.PNMF` keeps.
    Natural steps in the Monte Carlo modes are noisier (0.72 in ``'expanded'``): prefer
    ``'lower-bound'`` with them.

    ``transform`` (and ``fit_transform``) refit ``q(F)`` for the given data with ``W`` fixed;
    the joint fit's own posterior is :meth:`log_factors` / :meth:`factor_uncertainty`.

    :func:`sklearn.utils.estimator_checks.check_estimator` passes (tested with the default
    ``mode='lower-bound'``; the Monte Carlo modes are reproducible per ``random_state`` too).
    Fitted or not, it pickles and :func:`sklearn.base.clone`\ s (the positive parametrizations
    of ``W`` and of spatial priors are stored as raw values and put back on loading).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).poisson(3.0, size=(40, 12))
    >>> model = PNMF(n_components=2, max_iter=50, random_state=0).fit(X)
    >>> model.transform(X).shape, model.components_.shape
    ((40, 2), (2, 12))
    """

    def __init__(self, n_components: int = 2, loadings_mode: str = "multiplicative", mode: str = "lower-bound",
                 training_mode: str = "natural", E: int = 3, max_iter: int = 500, tol: float = 1e-5,
                 learning_rate: Optional[float] = None, optimizer="adam", random_state=None, verbose: bool = False,
                 device=None, dtype=None, init: Optional[str] = None, scheduler: Optional[str] = None,
                 batch_size: Optional[int] = None, y_batch_size: Optional[int] = None, shuffle: bool = True,
                 prior_scale: float = 1.0, init_scale: float = 0.1, transform_max_iter: Optional[int] = None,
                 allow_noninteger: bool = False):
        self.n_components = n_components
        self.loadings_mode = loadings_mode
        self.mode = mode
        self.training_mode = training_mode
        self.E = E
        self.max_iter = max_iter
        self.tol = tol
        self.learning_rate = learning_rate
        self.optimizer = optimizer
        self.random_state = random_state
        self.verbose = verbose
        self.device = device
        self.dtype = dtype
        self.init = init
        self.scheduler = scheduler
        self.batch_size = batch_size
        self.y_batch_size = y_batch_size
        self.shuffle = shuffle
        self.prior_scale = prior_scale
        self.init_scale = init_scale
        self.transform_max_iter = transform_max_iter
        self.allow_noninteger = allow_noninteger

    def _count_rule(self) -> dict:
        """How :func:`torchnmf.data.check_counts` treats non-integers for this estimator."""
        if not isinstance(self.allow_noninteger, (bool, np.bool_)):
            raise TypeError(f"allow_noninteger must be True or False, got {self.allow_noninteger!r}")
        return dict(allow_noninteger=bool(self.allow_noninteger), escape="allow_noninteger=True")

    # -- parameter checks ------------------------------------------------------------
    #: n_components above min(n_samples, n_features) allowed (the PNMF package's API warns instead)
    _overcomplete_ok = False
    #: one fit iteration (max_iter, n_iter_, history_, callbacks, schedules) is one mini-batch
    #: step instead of an epoch (the PNMF package's API)
    _batch_iterations = False
    #: weights of the log-likelihood and of the KL in the objective the steps follow (the
    #: recorded ELBO is unweighted); 1 and 1 is the ELBO
    _ll_weight = 1.0
    _kl_weight = 1.0

    def _check_params(self, N: int, D: int):
        rank = check_rank(self.n_components, "n_components")
        if rank > min(N, D) and not self._overcomplete_ok:
            raise ValueError(f"n_components={rank} is larger than min(n_samples, n_features) = {min(N, D)} "
                             f"(n_samples={N}, n_features={D})")
        check_option(self.loadings_mode, constraints.MODES, "loadings_mode")
        check_option(self.mode, ELBO_MODES, "mode")
        check_option(self.training_mode, TRAINING_MODES, "training_mode")
        check_rank(self.E, "E")
        check_rank(self.max_iter, "max_iter")
        if self.transform_max_iter is not None:
            check_rank(self.transform_max_iter, "transform_max_iter")
        check_positive(self.tol, "tol", allow_zero=True)
        check_positive(self.prior_scale, "prior_scale")
        check_positive(self.init_scale, "init_scale")
        check_option(self.init, INIT_METHODS, "init")
        check_option(self.scheduler, SCHEDULERS, "scheduler")
        if self.learning_rate is not None:
            check_positive(self.learning_rate, "learning_rate")
        if not (isinstance(self.optimizer, type) and issubclass(self.optimizer, torch.optim.Optimizer)):
            check_option(self.optimizer, tuple(OPTIMIZERS), "optimizer")
        for name, value, n, what in (("batch_size", self.batch_size, N, "samples"),
                                     ("y_batch_size", self.y_batch_size, D, "features")):
            if value is not None:
                check_rank(value, name)
                if value > n:
                    raise ValueError(f"{name}={value} is larger than the number of {what} ({n})")

    def _lr(self, natural: bool) -> float:
        if self.learning_rate is not None:
            return float(self.learning_rate)
        if natural:
            return 0.5 if self.mode == "lower-bound" else 0.1
        return 0.05

    def _make_optimizer(self, params, lr):
        params = list(params)
        if not params:
            return None
        cls = self.optimizer if isinstance(self.optimizer, type) else OPTIMIZERS[self.optimizer]
        opt = cls(params, lr=lr)
        constraints.attach_projection(opt)
        return opt

    def _make_scheduler(self, opt, total_steps: int, **options):
        """``('batch', OneCycleLR)`` or ``('epoch', ReduceLROnPlateau)`` for ``opt`` per ``scheduler``.

        ``options`` go to the scheduler (the knobs of :class:`torchnmf.compat.pnmf.PNMF`).
        """
        if self.scheduler == "one_cycle":
            # momentum is cycled only where the optimizer has one (not natural steps)
            options.setdefault("cycle_momentum", "momentum" in opt.defaults or "betas" in opt.defaults)
            options.setdefault("pct_start", 0.3)  # OneCycleLR's default, named: the warm-up the stop rule waits for
            sch = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=[g_["lr"] for g_ in opt.param_groups], total_steps=total_steps, **options)
            sch.warmup_steps_ = options["pct_start"] * total_steps
            return "batch", sch
        return "epoch", torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", **options)

    # -- fitting ---------------------------------------------------------------------
    def _init_layer(self, T: Tensor, g: torch.Generator) -> LogNormalPoisson:
        N, D = T.shape
        K = int(self.n_components)
        method = self.init
        if method is None:
            method = "nndsvda" if K <= min(N, D) else "random"
        if method in ("nndsvd", "nndsvda", "nndsvdar") and K > min(N, D):
            raise ValueError(f"init={method!r} needs n_components <= min(n_samples, n_features) = {min(N, D)}, "
                             f"got {K}")
        W0, H0 = initialize(T.to(torch.float64), K, method, random_state=g)
        W0 = W0.to(device=T.device, dtype=T.dtype)
        H0 = H0.to(device=T.device, dtype=T.dtype)
        # zeros of NNDSVD are floored so that log H is finite: exp(F) ~ H
        floor = float(H0[H0 > 0].mean()) * 1e-2 if bool((H0 > 0).any()) else 1e-2
        loc = torch.log(H0.clamp_min(floor)).t() - self.init_scale ** 2 / 2
        W0 = W0.clamp_min(float(W0.max()) * 1e-6 if float(W0.max()) > 0 else 1e-6)
        return LogNormalPoisson(D, N, K, mode=self.mode, E=self.E, loadings_mode=self.loadings_mode,
                                prior_scale=self.prior_scale, W=W0, init_loc=loc, init_scale=self.init_scale,
                                dtype=T.dtype, device=T.device)

    def _batches(self, n: int, size: Optional[int], g: torch.Generator, device):
        if size is None or size >= n:
            return [None]
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        return [b.to(device) for b in order.split(int(size))]

    def fit(self, X, y=None, return_history: bool = False, callback: Optional[Callable] = None,
            callback_interval: int = 1, *, layer: Optional[str] = None, use_highly_variable: Optional[bool] = None):
        """Fit the factorization.

        Parameters
        ----------
        X : array-like, scipy.sparse, tensor or AnnData of shape (n_samples, n_features)
            Counts: values within 1e-6 of an integer are rounded (with a warning), others
            refused (see :func:`torchnmf.data.check_counts`). Never modified.
        y : ignored
        return_history : bool, default False
            Return ``history_`` instead of ``self``.
        callback : callable, optional
            ``callback(estimator, iteration, elbo)`` every ``callback_interval`` epochs, with
            ``elbo`` a :class:`torchnmf.ELBO`; returning ``False`` (or calling
            ``estimator.history_.request_stop()``) stops the fit after that epoch.
        callback_interval : int, default 1
        layer : str, optional
            AnnData input only: the layer to factorize (default ``adata.X``).
        use_highly_variable : bool, optional
            AnnData input only: fit the genes flagged in ``var['highly_variable']`` (default:
            when that column exists, as :func:`scanpy.tl.pca`).

        Returns
        -------
        self, or the History if ``return_history``.
        """
        X = self._adata_in(X, layer, use_highly_variable, reset=True, counts=not self.allow_noninteger)
        T = self._check_X(X, reset=True, counts=True, **self._count_rule())
        N, D = T.shape
        self._check_params(N, D)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        callback_interval = check_rank(callback_interval, "callback_interval")
        g = self._generator()
        with _seeded(g, T.device):
            self._fit(T, g, callback, callback_interval)
        self._tensor_input_ = isinstance(X, Tensor)
        return self.history_ if return_history else self

    def _fit(self, T: Tensor, g: torch.Generator, callback, callback_interval: int):
        N, D = T.shape
        layer = self._init_layer(T, g)
        counts = Counts.from_samples(T)
        natural = self.training_mode == "natural"
        lr = self._lr(natural)
        multiplicative_W = self.loadings_mode == "multiplicative"
        if natural:
            # natural steps for the mean-field Gaussian parts of q(F) (all of it for independent
            # priors, the inducing values of a diagonal SVGP); gradient steps for the rest (W,
            # kernel and prior mean, and GP posteriors that are not mean-field)
            try:
                groups = layer.factors.natural_groups()
            except NotImplementedError:
                groups = []
            nat = GaussianNatural(groups, lr=lr, max_step=1.0) if groups else None
            in_nat = [p for g_ in groups for p in g_["params"]]
            grad_params = [p for p in constraints.gradient_parameters(layer) if all(p is not q for q in in_nat)]
            grad_opt = self._make_optimizer(grad_params, 0.05 if self.learning_rate is None else lr)
            # per-sample posteriors take B / N of a full step per batch; a global one (GP
            # inducing values) sees an unbiased estimate of the full ELBO, so a full step
            local_nat = isinstance(layer.factors, IndependentNormal)
        else:
            nat = None
            grad_opt = self._make_optimizer(constraints.gradient_parameters(layer), lr)
            if isinstance(grad_opt, torch.optim.SGD) and lr < _SGD_MIN_LR:
                # the loss is the per-entry mean negative ELBO: its gradients are small, and
                # plain SGD (unlike Adam) takes steps proportional to them
                warnings.warn(f"{type(self).__name__}: optimizer SGD at learning_rate={lr:g} hardly moves the ELBO "
                              "(the loss is the mean negative ELBO per entry, whose gradients are small); use "
                              f"learning_rate of about 1 to 10 with SGD, or optimizer Adam", UserWarning,
                              stacklevel=engine._user_stacklevel())
        n_sb = 1 if self.batch_size is None else math.ceil(N / self.batch_size)
        n_fb = 1 if self.y_batch_size is None else math.ceil(D / self.y_batch_size)
        per_batch = self._batch_iterations  # an iteration is one batch (the PNMF package's), not an epoch
        steps_per_iter = 1 if per_batch else n_sb * n_fb
        schedulers = [self._make_scheduler(opt, self.max_iter * steps_per_iter) for opt in (nat, grad_opt)
                      if opt is not None and self.scheduler is not None]
        # stochastic or scheduled fits read the ELBO's change over windows of epochs and never
        # stop in a one-cycle warm-up, where the learning rate is too small to move the ELBO;
        # the deterministic default (natural steps, multiplicative W, analytic bound, one batch)
        # keeps the plain rule
        stochastic = (grad_opt is not None or schedulers or self.mode != "lower-bound" or n_sb > 1 or n_fb > 1)
        window = _STOCHASTIC_WINDOW if stochastic else 1
        warmup = max([math.ceil(getattr(sch, "warmup_steps_", 0) / steps_per_iter) for _, sch in schedulers],
                     default=0)
        history = self._new_history("elbo", maximize=True, total=self.max_iter)
        self.history_ = history
        norm = float(N * D)
        x_max = float(counts.values.max()) if counts.values.numel() else 0.0  # for the error message

        def batch_step(idx, fidx) -> ELBO:
            batch = counts.select(idx, fidx)
            for opt in (nat, grad_opt):
                if opt is not None:
                    opt.zero_grad()
            elbo = layer.elbo(batch, idx, fidx, check=False)
            if self._ll_weight == 1 and self._kl_weight == 1:
                loss = -elbo.total
            else:  # a tempered objective (the PNMF package's scale_ll_D / scale_kl_NM = False);
                # natural steps are sized for a KL of weight 1
                w_ll, w_kl = ((self._ll_weight / self._kl_weight, 1.0) if natural
                              else (self._ll_weight, self._kl_weight))
                loss = w_kl * sum(elbo.kls.values()) - w_ll * elbo.data
            (loss if natural else loss / norm).backward()
            if nat is not None:
                # the ELBO is scaled by N / B, so a local step of lr * B / N is
                # lr times the full local update (see GaussianNatural)
                frac = 1.0 if idx is None or not local_nat else idx.numel() / N
                saved = [group["lr"] for group in nat.param_groups]
                for group in nat.param_groups:
                    group["lr"] = group["lr"] * frac
                nat.step()
                for group, lr_ in zip(nat.param_groups, saved):
                    group["lr"] = lr_
            if grad_opt is not None:
                grad_opt.step()
            for kind, sch in schedulers:
                if kind == "batch":
                    sch.step()
            if multiplicative_W:
                layer.update_W_(batch, idx, fidx, check=False)
            return elbo.detach()

        def record_of(parts, i: int) -> ELBO:
            record = ELBO(torch.stack([p.data for p in parts]).mean(),
                          {k: torch.stack([p.kls[k] for p in parts]).mean() for k in parts[0].kls})
            if not math.isfinite(float(record)):
                raise FloatingPointError(
                    f"{self._public_name}: the ELBO became {float(record)} at "
                    f"{'iteration' if per_batch else 'epoch'} {i + 1}; lower learning_rate (now {lr}), use "
                    f"mode='lower-bound', or divide X by a constant (its largest entry is {x_max:.3g}; float64 "
                    f"has more range)")
            for kind, sch in schedulers:
                if kind == "epoch":
                    sch.step(float(record))
            return record

        def stream():
            while True:  # epochs of batches (reshuffled each epoch), one batch per iteration
                for idx in self._batches(N, self.batch_size, g, T.device):
                    for fidx in self._batches(D, self.y_batch_size, g, T.device):
                        yield idx, fidx

        batches = stream() if per_batch else None

        def epoch_step(epoch, measure):
            if per_batch:
                return record_of([batch_step(*next(batches))], epoch)
            return record_of([batch_step(idx, fidx) for idx in self._batches(N, self.batch_size, g, T.device)
                              for fidx in self._batches(D, self.y_batch_size, g, T.device)], epoch)

        def on_record(epoch, record):
            if callback is not None and (epoch + 1) % callback_interval == 0:
                self.layer_, self.n_iter_ = layer, epoch + 1
                return callback(self, epoch + 1, record)
            return None

        try:
            n_iter = engine.run(epoch_step, max_iter=self.max_iter, tol=self.tol, history=history,
                                model=self._public_name, dtype=T.dtype, callback=on_record, window=window,
                                warmup=warmup).n_iter
        finally:
            history.close()
        self.layer_ = layer
        self.n_iter_ = n_iter
        self.n_components_ = int(self.n_components)
        self.elbo_ = float(history[-1]) if len(history) else float("nan")
        self.components_ = self._to_numpy(layer.W.detach().t())

    def fit_transform(self, X, y=None, *, layer: Optional[str] = None, use_highly_variable: Optional[bool] = None,
                      **fit_params):
        """Fit, then return ``E_q[exp F]`` for ``X``, shape (n_samples, n_components).

        ``q(F)`` is refitted with the fitted ``W`` exactly as :meth:`transform` does, so
        ``fit_transform(X)`` equals ``fit(X).transform(X)``; the posterior of the joint fit
        itself is :meth:`log_factors` / :meth:`factor_uncertainty`. ``layer``,
        ``use_highly_variable`` and ``fit_params`` as in :meth:`fit`.
        """
        X = self._adata_in(X, layer, use_highly_variable, reset=True)
        out = self.fit(X, **fit_params)
        if isinstance(out, History):
            raise ValueError("fit_transform does not take return_history; call fit instead")
        T = self._check_X(X, reset=False, counts=True, **self._count_rule())
        factors = self._fit_factors(T, self._transform_steps())
        return self._output(self._expected_factors(factors), X, "fit_transform")

    # -- helpers over the fitted posterior -------------------------------------------
    @staticmethod
    def _expected_factors(factors) -> Tensor:
        mu, var = factors.marginals()
        return torch.exp(mu + var / 2).t().detach()

    def _fitted_output(self, T: Tensor):
        T = T.detach()
        return T if getattr(self, "_tensor_input_", False) else T.cpu().numpy()

    def get_loadings(self):
        """Loadings ``W``, shape (n_features, n_components)."""
        check_is_fitted(self, "layer_")
        return self._fitted_output(self.layer_.W)

    def log_factors(self):
        """Posterior means of ``F`` for the training samples, shape (n_samples, n_components)."""
        check_is_fitted(self, "layer_")
        return self._fitted_output(self.layer_.factors.marginals()[0].t())

    def factor_uncertainty(self, kind: str = "std"):
        """Posterior ``'std'`` or ``'variance'`` of ``F``, shape (n_samples, n_components)."""
        check_is_fitted(self, "layer_")
        check_option(kind, ("std", "variance"), "kind")
        var = self.layer_.factors.marginals()[1].t()
        return self._fitted_output(var.sqrt() if kind == "std" else var)

    def factor_samples(self, n: int = 1, exp: bool = False, random_state=None):
        """``n`` draws of ``F`` (or ``exp(F)``) from ``q``, shape (n, n_samples, n_components)."""
        check_is_fitted(self, "layer_")
        n = check_rank(n, "n")
        from ..init import check_random_state

        g = check_random_state(random_state)
        mu, var = self.layer_.factors.marginals()
        eps = torch.randn((n, *mu.shape), generator=g, dtype=mu.dtype).to(mu.device)
        F = (mu + var.sqrt() * eps).transpose(1, 2)
        return self._fitted_output(torch.exp(F) if exp else F)

    def transform_F(self, X, max_iter: Optional[int] = None, *, layer: Optional[str] = None) -> Tuple:
        """Variational fit of ``q(F)`` for new samples with ``W`` fixed.

        Parameters
        ----------
        X : array-like, tensor or AnnData of shape (n_new, n_features)
        max_iter : int, optional
            Default ``transform_max_iter``.
        layer : str, optional
            AnnData input only: the layer to read (default ``adata.X``); the fitted genes are
            taken by name.

        Returns
        -------
        mean, std : arrays (tensors for tensor input) of shape (n_new, n_components)
            Posterior mean and standard deviation of the log-factors.
        """
        check_is_fitted(self, "layer_")
        X = self._adata_in(X, layer, reset=False, counts=not self.allow_noninteger)
        T = self._check_X(X, reset=False, counts=True, **self._count_rule())
        max_iter = self._transform_steps(max_iter)
        factors = self._fit_factors(T, max_iter)
        mu, var = factors.marginals()
        return self._output(mu.t(), X), self._output(var.sqrt().t(), X)

    def _transform_steps(self, max_iter: Optional[int] = None) -> int:
        """Steps of a transform: ``max_iter``, else ``transform_max_iter``, else the fit's ``n_iter_`` (<= 200)."""
        if max_iter is not None:
            return check_rank(max_iter, "max_iter")
        if self.transform_max_iter is not None:
            return check_rank(self.transform_max_iter, "transform_max_iter")
        return max(1, min(200, int(getattr(self, "n_iter_", 200))))


    def _fit_factors(self, T: Tensor, max_iter: int, tol: float = 0.0) -> IndependentNormal:
        N, D = T.shape
        fitted = self.layer_
        W = fitted.W.detach()
        prior = float(fitted.factors.prior_scale) if hasattr(fitted.factors, "prior_scale") else self.prior_scale
        layer = LogNormalPoisson(D, N, self.n_components_, mode=self.mode, E=self.E, loadings_mode="projected",
                                 prior_scale=prior, W=W, init_scale=self.init_scale, dtype=W.dtype, device=W.device)
        layer.W.requires_grad_(False)
        # start from the least-squares-like guess exp(F) ~ mean count share per component
        with torch.no_grad():
            totals = torch.as_tensor(_row_sums(T), dtype=W.dtype, device=W.device)
            guess = totals[:, None] / W.sum(0).clamp_min(1e-12)[None, :] / self.n_components_
            layer.factors.loc.copy_(torch.log(guess.clamp_min(1e-8)).t())
        return self._refit_factors(layer, Counts.from_samples(T.to(W.dtype)), max_iter, tol)

    def _refit_factors(self, layer: LogNormalPoisson, counts: Counts, max_iter: int, tol: float = 0.0):
        """Steps of ``layer.factors`` (``q(F)``) on ``counts`` with ``W`` fixed; return them.

        At most ``max_iter`` steps through :func:`torchnmf.engine.run`; with ``tol > 0`` they
        stop once the ELBO's relative change per step is at most ``tol`` (read over windows
        of steps for the Monte Carlo modes; no warning when ``max_iter`` comes first: a
        transform's budget is its own choice).
        """
        factors = layer.factors
        with _seeded(self._generator(), layer.W.device):
            if self.mode == "lower-bound" or self.training_mode == "natural":
                opt = GaussianNatural(factors.natural_groups(), lr=self._lr(True), max_step=1.0)
                scale = 1.0
            else:
                opt = torch.optim.Adam(factors.parameters(), lr=self._lr(False))
                scale = float(layer.n_features * layer.n_samples)

            def step(i, measure):
                opt.zero_grad()
                elbo = layer.elbo(counts, check=False).total
                (-elbo / scale).backward()
                opt.step()
                return elbo.detach()

            bar = self._bar(max_iter, "inferring factors (W fixed)")

            def show(i, record):
                if bar is not None:  # the value before update(), which draws the bar
                    if i % 10 == 0 or i == max_iter - 1:
                        bar.set_postfix(elbo=f"{float(record):.6g}", refresh=False)
                    bar.update(1)

            try:
                engine.run(step, max_iter=max_iter, tol=tol, history=History(name="elbo", maximize=True),
                           model=f"{self._public_name}.transform", dtype=layer.W.dtype, callback=show, warn=False,
                           window=1 if self.mode == "lower-bound" else _STOCHASTIC_WINDOW)  # Monte Carlo: noisy
            finally:
                if bar is not None:
                    bar.close()
        return factors

    def transform(self, X, *, layer: Optional[str] = None):
        """``E_q[exp F]`` for new samples (``q(F)`` refitted with ``W`` fixed), shape (n_new, n_components).

        For AnnData input, ``layer`` is the layer to read (default ``adata.X``) and the fitted
        genes are taken by name.
        """
        check_is_fitted(self, "layer_")
        X = self._adata_in(X, layer, reset=False, counts=not self.allow_noninteger)
        T = self._check_X(X, reset=False, counts=True, **self._count_rule())
        factors = self._fit_factors(T, self._transform_steps())
        return self._output(self._expected_factors(factors), X)

    def inverse_transform(self, X):
        """Expected counts ``X @ components_`` from factors ``E[exp F]``, shape (n_samples, n_features)."""
        check_is_fitted(self, "layer_")
        Y = as_tensor(X, "X", ndim=2, sparse="dense", float_only=False)
        if Y.shape[1] != self.n_components_:
            raise ValueError(f"X has {Y.shape[1]} columns, expected n_components={self.n_components_}")
        check_finite(Y, "X")
        W = self.layer_.W.detach()
        out = Y.to(device=W.device, dtype=W.dtype) @ W.t()
        return self._output(out, X, "inverse_transform")

    def transform_W(self, X, max_iter: Optional[int] = None):
        """Loadings for new features of the training samples, with ``q(F)`` fixed.

        Parameters
        ----------
        X : array-like or tensor of shape (n_samples, n_new_features)
            New features measured on the *training* samples.
        max_iter : int, optional
            Multiplicative updates (default ``transform_max_iter``).

        Returns
        -------
        array or tensor of shape (n_components, n_new_features)
            Like :attr:`components_`.
        """
        check_is_fitted(self, "layer_")
        from ..data import check_counts

        T = check_counts(as_tensor(X, "X", ndim=2, float_only=False), "X", **self._count_rule())
        N = self.layer_.n_samples
        if T.shape[0] != N:
            raise ValueError(f"X has {T.shape[0]} samples, expected the {N} training samples")
        max_iter = self._transform_steps(max_iter)
        W = self.layer_.W.detach()
        T = T.to(device=W.device, dtype=W.dtype)
        factors = copy.deepcopy(self.layer_.factors).requires_grad_(False)
        D_new = int(T.shape[1])
        layer = LogNormalPoisson(D_new, N, self.n_components_, mode=self.mode, E=self.E,
                                 loadings_mode="multiplicative", factors=factors,
                                 W=torch.ones(D_new, self.n_components_, dtype=W.dtype, device=W.device)
                                 / self.n_components_, dtype=W.dtype, device=W.device)
        counts = Counts.from_samples(T)
        with _seeded(self._generator(), W.device):
            bar = self._bar(max_iter, "inferring loadings (F fixed)")
            for _ in range(max_iter):
                layer.update_W_(counts, check=False)
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
        return self._output(layer.W.detach().t(), X)


def _row_sums(T: Tensor) -> Tensor:
    if T.layout == torch.strided:
        return T.sum(1)
    return torch.sparse.sum(T.coalesce() if T.layout == torch.sparse_coo else T.to_sparse_coo(), 1).to_dense()
