"""The sparse Poisson factor analysis notes' models: ``SpikeSlab``, ``SFA`` and ``SPFA``.

The notes' code runs with its class definitions replaced by this import::

    from torchnmf.compat.spfa import SFA, SPFA
    fit = SFA(n=n, p=p, k=k).fit(x, init=(l, f), n_epochs=2000, log_dir='runs/spfa/norm-1/')
    fit = SPFA(n=n, p=p, k=k).fit(x, s=torch.ones([n, 1]), init=(l, f), n_epochs=4000)

Same parameters (``l``/``f`` with ``logits``, ``mean``, ``log_prec``, ``prior_logodds``,
``log_prior_prec``), same one-draw Monte Carlo ELBO and RMSprop steps, with these
differences:

* The KL of the point-normal posteriors is :func:`torchnmf.poisson.spfa.spike_slab_kl`, the
  exact one. The notes' expression has ``.5 * pip * (1 + log_prec - ...)`` where the Gaussian
  KL ``KL(N(m, 1/prec) || N(0, 1/prior_prec)) = .5 (log_prec - log_prior_prec
  + prior_prec (m² + 1/prec) - 1)`` has ``-1``: the notes' KL of each matrix is ours plus
  ``Σ pip`` (the sum of its inclusion probabilities), so the logged ``loss/kl_l`` and
  ``loss/kl_f`` are lower than the notes' by ``Σ pip_l`` and ``Σ pip_f``, and ``loss/elbo``
  (and ``history_``) higher by their sum. The notes' objective also rewards small inclusion
  probabilities by that extra ``Σ pip``; ours does not.
* The variance of ``LF'`` is summed without cancellation.
* The epochs run through :func:`torchnmf.engine.run` (records in ``history_``), and a
  non-finite loss stops the fit with :class:`NonFiniteLossError` naming the epoch, the
  parameters left as they were after the last finite epoch.

Errors are of the notes' types and of ours at once: a bad ``x``, ``s`` or ``init`` raises
:class:`InputError` (a ``ValueError`` and the notes' ``AssertionError``; non-tensors
:class:`InputTypeError`, a ``TypeError`` too), NaN or infinite ``x``
:class:`NonFiniteInputError` (also the ``RuntimeError`` of the notes' ``'nan loss'``), and
divergence :class:`NonFiniteLossError` (a ``RuntimeError`` as the notes' ``'nan loss'``, an
``AssertionError`` as their NaN-KL check).

:class:`torchnmf.poisson.SparsePoissonFA` is the package's own layer for this model (log or
softplus link, several draws, mini-batches).
"""
from __future__ import annotations


import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from .. import engine
from ..data import as_tensor, check_counts, check_finite, check_int, check_rank
from ..history import History
from ..poisson.spfa import spike_slab_kl

__all__ = ["SpikeSlab", "SFA", "SPFA", "NonFiniteLossError", "InputError", "InputTypeError",
           "NonFiniteInputError", "summary_writer"]


class NonFiniteLossError(FloatingPointError, RuntimeError, AssertionError):
    """The loss (or the KL) of a fit became NaN or infinite.

    A ``RuntimeError`` as the notes' ``raise RuntimeError('nan loss')`` and an
    ``AssertionError`` as their ``assert not torch.isnan(kl).any()``.
    """


class InputError(ValueError, AssertionError):
    """A bad value or shape of ``x``, ``s`` or ``init`` (the notes check these with ``assert``)."""


class InputTypeError(TypeError, AssertionError):
    """``x`` or ``s`` is not a tensor (the notes' ``assert torch.is_tensor(...)``)."""


class NonFiniteInputError(InputError, RuntimeError):
    """NaN or infinite ``x``: refused before the fit (the notes' fit raises ``RuntimeError('nan loss')``)."""


def summary_writer(log_dir):
    """A :class:`torch.utils.tensorboard.SummaryWriter` for ``log_dir``.

    Raises
    ------
    ImportError
        When the ``tensorboard`` package is missing, saying how to install it.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("log_dir writes TensorBoard scalars and needs the tensorboard package: "
                          "pip install tensorboard (or torchnmf[tensorboard]); pass log_dir=None to fit "
                          f"without it ({e})") from None
    return SummaryWriter(str(log_dir))


class SpikeSlab(nn.Module):
    """Independent point-normal posteriors on the entries of a ``(p, k)`` matrix, per-column priors.

    Parameters
    ----------
    p, k : int

    Attributes
    ----------
    logits, mean, log_prec : Parameter, shape (p, k)
        Inclusion logit, slab mean and slab log precision of ``q``.
    prior_logodds, log_prior_prec : Parameter, shape (1, k)
        Prior inclusion log odds and slab log precision.
    """

    def __init__(self, p: int, k: int):
        super().__init__()
        p, k = check_rank(p, "p"), check_rank(k, "k")
        self.logits = nn.Parameter(torch.randn([p, k]))
        self.mean = nn.Parameter(torch.randn([p, k]))
        self.log_prec = nn.Parameter(torch.zeros([p, k]))
        self.prior_logodds = nn.Parameter(torch.randn([1, k]))
        self.log_prior_prec = nn.Parameter(torch.full([1, k], 1.))

    def forward(self):
        """``E[M]``, ``V[M]`` (each (p, k)) and ``KL(q(M) || p(M))`` (a scalar).

        The KL is the exact one, the notes' minus ``Σ sigmoid(logits)`` (see the module notes).

        Raises
        ------
        NonFiniteLossError
            When the KL is NaN (the notes' ``assert``), e.g. after a diverged step.
        """
        sd = torch.exp(-0.5 * self.log_prec)
        kl = spike_slab_kl(self.logits, self.mean, sd, self.prior_logodds, torch.exp(self.log_prior_prec)).sum()
        if bool(torch.isnan(kl)):
            raise NonFiniteLossError("SpikeSlab: the KL is NaN (non-finite parameters: the fit diverged; "
                                     "try a smaller lr)")
        pip = torch.sigmoid(self.logits)
        pm = pip * self.mean
        pv = pip * (sd ** 2 + torch.sigmoid(-self.logits) * self.mean ** 2)
        return pm, pv, kl


class _Model(nn.Module):
    def __init__(self, n: int, p: int, k: int):
        super().__init__()
        # checked here, by the caller's names (SpikeSlab(n, k) would call n "p")
        n, p, k = check_rank(n, "n"), check_rank(p, "p"), check_rank(k, "k")
        self.l = SpikeSlab(n, k)
        self.f = SpikeSlab(p, k)
        self.n, self.p, self.k = int(n), int(p), int(k)

    def _eta(self):
        pm_l, pv_l, kl_l = self.l.forward()
        pm_f, pv_f, kl_f = self.f.forward()
        eta_mean = pm_l @ pm_f.T
        eta_scale = torch.sqrt(pv_l @ (pm_f ** 2 + pv_f).T + (pm_l ** 2) @ pv_f.T)
        # unvalidated: a diverged scale (0, inf, NaN) ends as a NonFiniteLossError, not torch's ValueError
        eta = torch.distributions.Normal(eta_mean, eta_scale, validate_args=False).rsample()
        return eta, kl_l, kl_f

    @staticmethod
    def _log(writer, global_step, err, kl_l, kl_f, elbo):
        if writer is not None:
            writer.add_scalar('loss/kl_l', kl_l, global_step)
            writer.add_scalar('loss/kl_f', kl_f, global_step)
            writer.add_scalar('loss/err', err, global_step)
            writer.add_scalar('loss/elbo', elbo, global_step)

    def _check_x(self, x, counts: bool = False) -> Tensor:
        if not torch.is_tensor(x):
            raise InputTypeError(f"x must be a tensor, got {type(x).__name__}")
        if tuple(x.shape) != (self.n, self.p):
            raise InputError(f"x must have shape {(self.n, self.p)}, got {tuple(x.shape)}")
        x = as_tensor(x, "x", ndim=2, sparse="dense", float_only=False)  # refuses complex x by name
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteInputError("x must be finite: it has NaN or infinite entries (drop or impute them)")
        if counts:  # in x's own dtype, before the parameters' (float32) could hide a non-integer
            if bool((x < 0).any()):
                raise InputError("x must be non-negative counts")
            x = check_counts(x, "x")
        return x.detach().to(self.l.mean.dtype)  # detached: the fit's backward must not reach the caller's x.grad

    def _init(self, init):
        if init is None:
            return
        if not isinstance(init, (tuple, list)) or len(init) != 2:
            raise InputTypeError("init must be a pair (l, f) of initial means")
        for name, mod, value, rows in (("l", self.l, init[0], self.n), ("f", self.f, init[1], self.p)):
            if not torch.is_tensor(value) or tuple(value.shape) != (rows, self.k):
                raise InputError(f"init {name} must be a tensor of shape {(rows, self.k)}, "
                                 f"got {getattr(value, 'shape', type(value).__name__)}")
            value = as_tensor(value, f"init {name}", sparse="dense", float_only=False)  # complex refused
            check_finite(value, f"init {name}")
            with torch.no_grad():  # copied in the parameters' dtype; the caller's tensor is not shared
                mod.mean.copy_(value.to(mod.mean))

    def _fit(self, loss_fn, init, n_epochs, log_dir, kwargs):
        n_epochs = check_int(n_epochs, "n_epochs", low=1)
        self._init(init)
        opt = torch.optim.RMSprop(self.parameters(), **kwargs)
        writer = summary_writer(log_dir) if log_dir is not None else None
        name = f"{type(self).__name__}.fit"
        history = self.history_ = History(name="elbo", maximize=True)  # kept when the fit fails

        def step(i, measure):
            saved = [p.detach().clone() for p in self.parameters()]
            opt.zero_grad()
            try:
                loss = loss_fn(writer, i)
            except NonFiniteLossError as e:
                raise NonFiniteLossError(f"{name}: at epoch {i}: {e}") from None
            value = float(loss.detach())
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"{name}: the loss became {value} at epoch {i}; the model holds the "
                                         f"parameters after epoch {i - 1}, its last finite state (try a smaller lr)")
            loss.backward()
            opt.step()
            if not all(bool(torch.isfinite(p).all()) for p in self.parameters()):
                with torch.no_grad():
                    for p, s in zip(self.parameters(), saved):
                        p.copy_(s)
                raise NonFiniteLossError(f"{name}: the step of epoch {i} made parameters non-finite; the model "
                                         f"holds the parameters before it, its last finite state")
            return -value

        try:
            engine.run(step, max_iter=n_epochs, tol=0, history=history, model=name, dtype=self.l.mean.dtype,
                       warn=False)
        finally:
            history.close()
            if writer is not None:
                writer.close()
        return self


class SFA(_Model):
    """Gaussian factor analysis with point-normal priors: ``x ~ Normal(LF', 1)`` (the notes' sanity check).

    Parameters
    ----------
    n, p, k : int
        Rows and columns of ``x`` and the number of factors.

    Attributes
    ----------
    l, f : SpikeSlab
        Posteriors of the loadings (n, k) and factors (p, k).
    history_ : torchnmf.History
        The ELBO of every epoch (one-draw estimates), after :meth:`fit`.
    """

    def forward(self, x, writer=None, global_step=None):
        """The negative ELBO (one Monte Carlo draw); logs its parts to ``writer`` if given."""
        eta, kl_l, kl_f = self._eta()
        err = torch.distributions.Normal(eta, 1, validate_args=False).log_prob(x).sum()
        elbo = err - kl_l - kl_f
        self._log(writer, global_step, err, kl_l, kl_f, elbo)
        return -elbo

    def fit(self, x, init=None, n_epochs=1000, log_dir=None, **kwargs):
        """Fit by RMSprop on the one-draw ELBO; return ``self``.

        Parameters
        ----------
        x : Tensor of shape (n, p)
            Finite; never modified.
        init : (Tensor (n, k), Tensor (p, k)), optional
            Initial slab means of ``l`` and ``f`` (copied).
        n_epochs : int, default 1000
        log_dir : str, optional
            Write the ELBO and its parts as TensorBoard scalars there (needs ``tensorboard``).
        **kwargs
            :class:`torch.optim.RMSprop` options (``lr`` ...).

        Returns
        -------
        self
        """
        x = self._check_x(x)
        return self._fit(lambda writer, i: self.forward(x, writer=writer, global_step=i), init, n_epochs, log_dir,
                         kwargs)


class SPFA(_Model):
    """Sparse Poisson factor analysis, softplus link: ``x ~ Poisson(s softplus(LF'))`` (the notes' model).

    Parameters
    ----------
    n, p, k : int

    Attributes
    ----------
    l, f : SpikeSlab
    history_ : torchnmf.History
    """

    def forward(self, x, s, writer=None, global_step=None):
        """The negative ELBO (one Monte Carlo draw) for counts ``x`` and size factors ``s`` (n, 1)."""
        eta, kl_l, kl_f = self._eta()
        err = torch.distributions.Poisson(s * Fn.softplus(eta), validate_args=False).log_prob(x).sum()
        elbo = err - kl_l - kl_f
        self._log(writer, global_step, err, kl_l, kl_f, elbo)
        return -elbo

    def fit(self, x, s, init=None, n_epochs=1000, log_dir=None, **kwargs):
        """Fit by RMSprop on the one-draw ELBO; return ``self``.

        Parameters
        ----------
        x : Tensor of shape (n, p)
            Non-negative counts; never modified.
        s : Tensor of shape (n, 1)
            Positive size factors.
        init, n_epochs, log_dir, **kwargs
            As :meth:`SFA.fit`.

        Returns
        -------
        self

        Raises
        ------
        InputError, InputTypeError, NonFiniteInputError
            Bad ``x``, ``s`` or ``init`` (``ValueError``/``TypeError`` and ``AssertionError``).
        NonFiniteLossError
            The fit diverged (``RuntimeError``).
        """
        x = self._check_x(x, counts=True)
        if not torch.is_tensor(s):
            raise InputTypeError(f"s must be a tensor, got {type(s).__name__}")
        if tuple(s.shape) != (self.n, 1):
            raise InputError(f"s must have shape {(self.n, 1)}, got {tuple(s.shape)}")
        s = as_tensor(s, "s", sparse="dense", float_only=False)  # refuses complex s by name
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise InputError("s must be finite and positive (size factors, e.g. torch.ones([n, 1]))")
        s = s.detach().to(x.dtype)
        return self._fit(lambda writer, i: self.forward(x, s, writer=writer, global_step=i), init, n_epochs, log_dir,
                         kwargs)
