"""The fit engine: the one loop every ``fit`` of the package runs.

A model supplies its *step* (one update, optionally measuring the objective of the point
it starts from) and, for data-parallel fits, a way for the processes to agree; the engine
does the rest, identically for every model:

* records the objective in a :class:`~torchnmf.history.History` with the step, the wall
  time and the relative change (the progress bar and the stop flag live there);
* refuses a non-finite objective with a :class:`FloatingPointError` naming the model;
* decides convergence (:func:`relative_change`, :func:`has_converged`);
* saves checkpoints and resumes from them (:func:`resume`);
* warns once with :class:`ConvergenceWarning` when ``max_iter`` ends a fit that had a
  tolerance and did not meet it.

The stop rule
-------------
``'relative'`` (the default everywhere): every ``check_every`` steps the objective is
measured and the fit stops when its change *per step* relative to the current value,
``|f_new - f_old| / max(|f_new|, tiny) / steps``, is at most ``tol``. Measured against the
current objective (or ``|ELBO|``), not the first one, the rule does not stop early on real
data whose initial error is orders of magnitude above the final one. The tolerance is
never below ten times the machine epsilon of the fit's dtype: changes below that are
rounding noise (float32 sums over many entries rise and fall by ~1e-6 relative even
under monotone updates), so a float32 fit stops at its noise floor instead of running
on, and a rise within it is not treated as divergence.

Stochastic and scheduled fits (mini-batches, Monte Carlo ELBOs, gradient optimizers under
a learning-rate schedule) pass ``window`` and ``warmup`` to :func:`run`: the change is then
read between the means of the last ``window`` measurements and of the ``window`` before
them (per step), so one noisy epoch cannot stop the fit, and no stop is taken before
``warmup`` steps are done (the warm-up of a one-cycle schedule, whose tiny learning rate
moves the objective by less than any tolerance). ``window=1, warmup=0`` is the rule above,
which the deterministic fits (multiplicative updates, CAVI) keep.

``'sklearn'``: scikit-learn's rule for its ``NMF``, the *decrease* between two
measurements relative to the first measured objective, ``(f_old - f_new) / f_0 < tol``
(a rise stops the fit too). Offered by :class:`~torchnmf.estimators.BetaNMF` and
:meth:`NMF.fit <torchnmf.nmf.BaseComponent.fit>` through ``stop_rule='sklearn'``.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Union

import torch

from .history import History, Record

__all__ = ["ConvergenceWarning", "FitResult", "STOP_RULES", "relative_change", "has_converged", "noise_floor",
           "run", "resume", "run_stateful",
           "max_relative_change"]

try:  # scikit-learn's class, so `warnings.filterwarnings(..., ConvergenceWarning)` users already have works
    from sklearn.exceptions import ConvergenceWarning
except ImportError:  # pragma: no cover - scikit-learn is optional
    class ConvergenceWarning(UserWarning):
        """A fit reached ``max_iter`` before meeting its tolerance."""

STOP_RULES = ("relative", "sklearn")

#: a step: ``step(iteration, measure)`` -> the objective of the point the step starts from
#: (``None`` when not measured)
Step = Callable[[int, bool], Optional[Record]]


@dataclass
class FitResult:
    """What :func:`run` did.

    Attributes
    ----------
    n_iter : int
        Steps done in all (including those before a resume).
    converged : bool
        Whether the stop rule was met (``False`` when ``max_iter`` or a stop request ended it).
    change : float
        The last relative change measured (``nan`` before two measurements).
    stopped : bool
        Whether a stop request (:meth:`History.request_stop`, a callback) ended the fit.
    """

    n_iter: int
    converged: bool
    change: float
    stopped: bool = False


def noise_floor(dtype: Optional[torch.dtype]) -> float:
    """The smallest relative change the stop rule tells apart from rounding: ``10 * eps(dtype)``."""
    if dtype is None or not dtype.is_floating_point:
        dtype = torch.float64
    return 10.0 * torch.finfo(dtype).eps


def relative_change(old: float, new: float, steps: int = 1, *, rule: str = "relative", first: Optional[float] = None,
                    maximize: bool = False) -> float:
    """The change between two measurements of an objective, as the stop rule reads it.

    Parameters
    ----------
    old, new : float
        Two consecutive measurements, ``steps`` steps apart.
    steps : int, default 1
        Steps between them (``check_every``): the ``'relative'`` rule is per step.
    rule : {'relative', 'sklearn'}, default 'relative'
        See the module documentation.
    first : float, optional
        The first measurement of the fit (``'sklearn'`` rule only).
    maximize : bool, default False
        The objective is maximised (an ELBO): the ``'sklearn'`` rule then reads the increase.

    Returns
    -------
    float
        ``|new - old| / max(|new|, tiny) / steps`` (``'relative'``), or the signed
        improvement relative to ``|first|`` (``'sklearn'``).
    """
    tiny = torch.finfo(torch.float64).tiny
    if rule == "sklearn":
        gain = (new - old) if maximize else (old - new)
        return gain / max(abs(first if first is not None else old), tiny)
    return abs(new - old) / max(abs(new), tiny) / max(int(steps), 1)


def has_converged(change: float, tol: float, dtype: Optional[torch.dtype] = None, rule: str = "relative") -> bool:
    """Whether a :func:`relative_change` meets ``tol`` (``tol = 0`` never converges).

    Under the ``'relative'`` rule the tolerance is raised to :func:`noise_floor` of
    ``dtype``: a change below the dtype's resolution is noise, not progress.
    """
    if tol <= 0 or not math.isfinite(change):
        return False
    if rule == "sklearn":
        return change < tol
    return change <= max(tol, noise_floor(dtype))


def max_relative_change(old: torch.Tensor, new: torch.Tensor) -> float:
    """The largest entrywise ``|new - old| / old`` (``old`` floored at its dtype's tiny; 0 when empty).

    The stop test of inner fixed-point loops over posterior means (local SVI iterations,
    transforms of new rows), where the largest entry, not a total, must have settled.

    Parameters
    ----------
    old, new : Tensor, same shape
        Non-negative iterates (e.g. posterior means), ``new`` the later one.

    Returns
    -------
    float
    """
    if old.numel() == 0:
        return 0.0
    return float(((new - old).abs() / old.clamp_min(torch.finfo(old.dtype).tiny)).max())


def _check_finite(record: Record, model: str, step: int) -> None:
    value = float(record)
    if not math.isfinite(value):
        raise FloatingPointError(f"{model}: the objective became {value} at step {step}; check the data's "
                                 "scale and the hyperparameters (a smaller learning rate, another beta or init)")


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside torchnmf and scikit-learn.

    Warnings then point at the user's line: an estimator's ``fit_transform`` is reached
    through scikit-learn's ``set_output`` wrapper (``sklearn/utils/_set_output.py``), and
    through ``cross_val_score`` or a ``Pipeline`` from deeper inside scikit-learn. Frames are
    recognised by their module's name, not their file, so installed and source checkouts
    (and zip imports) read the same.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_back is not None and _internal(frame.f_globals.get("__name__", "")):
        frame, level = frame.f_back, level + 1
    return level


def _internal(module: str) -> bool:
    return module.split(".", 1)[0] in ("torchnmf", "sklearn")


def _agree_flag(flag: bool, agree: Optional[Callable[[bool], bool]]) -> bool:
    return flag if agree is None else bool(agree(flag))


def run(step: Step, *, max_iter: int, tol: float, history: History, model: str, check_every: int = 1,
        commit: Optional[Callable[[], None]] = None, start: int = 0, dtype: Optional[torch.dtype] = None,
        rule: str = "relative", checkpoint=None, state: Optional[Callable[[], Dict[str, Any]]] = None,
        agree: Optional[Callable[[bool], bool]] = None, callback: Optional[Callable[[int, Record], Any]] = None,
        warn: bool = True, window: int = 1, warmup: int = 0) -> FitResult:
    """Run a fit: steps, records, convergence, stop requests, checkpoints, the warning.

    Two kinds of step are supported:

    * *deferred* (``commit`` given): ``step(i, measure)`` computes the update of step ``i``
      and, when ``measure``, the objective of the point before it; the engine calls
      ``commit()`` to apply it unless the fit ends there. The last point is measured
      (step ``max_iter`` is evaluated, never committed), so the history ends at the
      returned factors. Used by the multiplicative NMF updates, whose objective comes
      free with the first half-update.
    * *immediate* (no ``commit``): ``step(i, measure)`` applies the update and returns the
      objective it measured on the way (a CAVI sweep returns the ELBO it reached, an SVI
      step its estimate on the batch, a gradient epoch the mean over its batches).

    Parameters
    ----------
    step : callable ``(int, bool) -> float, ELBO or None``
    max_iter : int
        Steps to do at most, counting those before ``start``.
    tol : float
        Tolerance of the stop rule; 0 runs ``max_iter`` steps and never warns.
    history : History
        Receives every measured objective (with step, wall time and relative change);
        its stop flag ends the fit after the current step.
    model : str
        Name used in the warning and errors (e.g. ``'NMF.fit'``).
    check_every : int, default 1
        Measure (and test convergence, stop requests, progress) every this many steps.
    commit : callable, optional
        See above.
    start : int, default 0
        First step (after a :func:`resume`).
    dtype : torch.dtype, optional
        The fit's dtype, for the noise floor of the stop rule.
    rule : {'relative', 'sklearn'}, default 'relative'
    checkpoint : torchnmf.distributed.Checkpointer, optional
        ``checkpoint.maybe_save(i, state())`` after each step ``i`` for which
        ``checkpoint.due(i)`` (with the records so far).
    state : callable, optional
        The model's state for checkpoints (a dict; the engine adds ``'records'``).
    agree : callable ``bool -> bool``, optional
        Combines a decision across processes (``any`` over the process group): stop
        requests and convergence are then the same on every process.
    callback : callable ``(int, record) -> bool or None``, optional
        Called after each measurement; returning ``False`` stops the fit.
    warn : bool, default True
        Warn with :class:`ConvergenceWarning` when ``max_iter`` is reached with ``tol > 0``.
    window : int, default 1
        Read the change between the means of the last ``window`` measurements and of the
        ``window`` before them (per step); no convergence before ``2 * window``
        measurements. For stochastic fits, whose objective is noisy from step to step.
    warmup : int, default 0
        No convergence before this many steps are done (a learning-rate warm-up).

    Returns
    -------
    FitResult
    """
    if rule not in STOP_RULES:
        raise ValueError(f"stop_rule must be one of {STOP_RULES}, got {rule!r}")
    history.tol = float(tol)
    history.stop_rule = rule
    deferred = commit is not None
    last = history.snapshot()
    prev: Optional[float] = float(last[-1]) if last else None
    prev_step: Optional[int] = history.steps[-1] if last else None
    first: Optional[float] = float(last[0]) if last else None
    change, converged, stopped = float("nan"), False, False
    elapsed = history.times[-1] if last else 0.0  # a resumed fit's clock goes on (nan: records without times)
    t0 = time.perf_counter() - (elapsed if math.isfinite(elapsed) else 0.0)
    window, warmup = max(int(window), 1), max(int(warmup), 0)
    values, steps_ = [float(r) for r in last], list(history.steps) if last else []  # for the window
    i = start
    while True:
        end = i >= max_iter
        if end and not deferred:
            break
        measure = end or i % check_every == 0
        record = step(i, measure)
        if measure:
            _check_finite(record, model, i)
            value = float(record)
            if first is None:
                first = value
            values.append(value)
            steps_.append(i)
            if window > 1:
                if len(values) >= 2 * window:
                    change = relative_change(sum(values[-2 * window:-window]) / window,
                                             sum(values[-window:]) / window, i - steps_[-1 - window],
                                             rule=rule, first=first, maximize=history.maximize)
            elif prev is not None:
                change = relative_change(prev, value, i - prev_step, rule=rule, first=first,
                                         maximize=history.maximize)
            history.annotate_next(step=i, change=change, time=time.perf_counter() - t0,
                                  done=i if deferred else i + 1)
            go_on = history.append(record)
            if callback is not None and callback(i, record) is False:
                go_on = False
            go_on = go_on and not history.stop_requested  # a callback may have asked through the history
            prev, prev_step = value, i
            done = i if deferred else i + 1
            converged = _agree_flag(has_converged(change, tol, dtype, rule) and done >= warmup, agree)
            stopped = _agree_flag(not go_on, agree)
            if end or converged or stopped:
                if not deferred:
                    i += 1  # the step was applied before its objective was read
                break
        if deferred:
            commit()
        if checkpoint is not None and checkpoint.due(i):  # build the state only when it is saved
            extra = state() if state is not None else {}
            checkpoint.maybe_save(i, {**extra, "records": history.state_dict()["records"],
                                      "meta": history.meta_state()})
        i += 1
    history.converged_ = converged
    history.n_iter_ = i
    if warn and not converged and not stopped and tol > 0:
        last_change = (f"last relative change {change:.3g} > tol={tol:g}" if math.isfinite(change) else
                       f"fewer than {2 * window} measurements to read the change over windows of {window}")
        warnings.warn(f"{model} reached max_iter={max_iter} before converging: {last_change} ({rule} rule). "
                      "Increase max_iter, or raise tol.",
                      ConvergenceWarning, stacklevel=_user_stacklevel())
    return FitResult(n_iter=i, converged=converged, change=change, stopped=stopped)


def resume(checkpoint, history: History, restore: Callable[[Dict[str, Any]], None],
           map_location: Union[None, str, torch.device] = None) -> int:
    """Load the last complete checkpoint: ``restore(state)``, records back into ``history``.

    Returns
    -------
    int
        The step to start from (0 when there is no checkpoint).
    """
    if checkpoint is None:
        return 0
    resumed = checkpoint.load(map_location=map_location)
    if resumed is None:
        return 0
    start, state = resumed
    restore(state)
    history.load_records(state.get("records", []), state.get("meta"))
    return start


def run_stateful(layer, trainer, step: Step, *, max_iter: int, tol: float, history: History, model: str,
                 checkpoint=None, agree: Optional[Callable[[bool], bool]] = None,
                 callback: Optional[Callable[[int, Record], Any]] = None, warn: bool = True,
                 window: int = 1, warmup: int = 0) -> FitResult:
    """:func:`run` for a layer and its trainer (CAVI sweeps, SVI steps, gradient epochs).

    Resumes ``layer`` and ``trainer`` (their ``state_dict``) from ``checkpoint`` when it holds
    one, and saves them with the records every ``checkpoint.every`` steps.

    Parameters
    ----------
    layer : nn.Module
        Must have ``dtype`` and ``device`` attributes.
    trainer : torch.optim.Optimizer
    step, max_iter, tol, history, model, checkpoint, agree, callback, warn, window, warmup
        As :func:`run` (immediate steps).

    Returns
    -------
    FitResult
    """
    def restore(state):
        layer.load_state_dict(state["layer"])
        trainer.load_state_dict(state["trainer"])

    start = resume(checkpoint, history, restore, map_location=layer.device)
    return run(step, max_iter=max_iter, start=start, tol=tol, history=history, model=model, dtype=layer.dtype,
               checkpoint=checkpoint, agree=agree, callback=callback, warn=warn, window=window, warmup=warmup,
               state=lambda: {"layer": layer.state_dict(), "trainer": trainer.state_dict()})
