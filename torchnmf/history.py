"""Objective history of a fit: thread-safe records, a stop flag, a progress bar, a plot."""
from __future__ import annotations

import math
import threading
import time as _time
from typing import Any, List, Optional, Union

from .poisson.elbo import ELBO

__all__ = ["History", "plot_history"]

Record = Union[float, ELBO]


class History:
    """Records of an objective, one per step, safe to read from another thread.

    A fit appends a record after each step and stops cleanly after the step in which
    :meth:`request_stop` was called (from a callback, a signal handler or another thread).

    Parameters
    ----------
    verbose : bool, default False
        Show a tqdm progress bar with the latest objective.
    total : int, optional
        Expected number of steps, for the progress bar.
    desc : str, optional
        Progress bar label.
    name : str, default 'objective'
        What the records are (``'elbo'``, ``'beta-divergence'``...), used by plots.
    maximize : bool, default False
        Whether larger is better (True for an ELBO), used by :meth:`converged`.

    Attributes
    ----------
    records : list of float or ELBO
        A copy of the records so far (see :meth:`snapshot`).
    """

    def __init__(self, verbose: bool = False, total: Optional[int] = None, desc: Optional[str] = None,
                 name: str = "objective", maximize: bool = False):
        self._records: List[Record] = []
        self._meta: List[tuple] = []  # (step, wall time, relative change) of each record
        #: tolerance and stop rule of the last fit that used this history (set by the engine)
        self.tol: Optional[float] = None
        self.stop_rule: Optional[str] = None
        #: whether that fit met its tolerance, and its number of steps (set by the engine)
        self.converged_: Optional[bool] = None
        self.n_iter_: Optional[int] = None
        self._t0 = _time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.name = name
        self.maximize = maximize
        self._bar = None
        if verbose:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm is an optional dependency
                raise ImportError("verbose progress bars need tqdm: pip install tqdm") from None
            self._bar = tqdm(total=total, desc=desc or name, leave=False)

    # -- records ---------------------------------------------------------------
    def annotate_next(self, step: Optional[int] = None, change: float = math.nan,
                      time: Optional[float] = None, done: Optional[int] = None) -> None:
        """Describe the record the next :meth:`append` adds (the fit engine calls this).

        Parameters
        ----------
        step : int, optional
            The fit's step the record measures (default: the record's index).
        change : float, optional
            The relative change the stop rule read (see :mod:`torchnmf.engine`).
        time : float, optional
            Seconds since the fit started (default: since the history was made).
        done : int, optional
            Steps done so far, shown by the progress bar (default: one more per record).
        """
        self._next = (step, float(change), time, done)

    def append(self, record: Record) -> bool:
        """Add one record (an ELBO is detached first); return ``False`` once a stop was requested.

        Its step, wall time and relative change come from :meth:`annotate_next`, if called.
        """
        if isinstance(record, ELBO):
            record = record.detach()
        step, change, elapsed, done = self.__dict__.pop("_next", None) or (None, math.nan, None, None)
        elapsed = _time.perf_counter() - self._t0 if elapsed is None else float(elapsed)
        with self._lock:
            self._meta.append((len(self._records) if step is None else int(step), elapsed, change))
            self._records.append(record)
        if self._bar is not None:
            # the value first: update() draws the bar, which would otherwise show the previous record's
            self._bar.set_postfix({self.name: f"{float(record):.6g}"}, refresh=False)
            self._bar.update(1 if done is None else max(0, int(done) - self._bar.n))
        return not self._stop.is_set()

    def snapshot(self) -> List[Record]:
        """A copy of the records, consistent even while another thread appends."""
        with self._lock:
            return list(self._records)

    @property
    def records(self) -> List[Record]:
        return self.snapshot()

    @property
    def values(self) -> List[float]:
        """The records as floats (an ELBO's total)."""
        return [float(r) for r in self.snapshot()]

    @property
    def steps(self) -> List[int]:
        """The step each record measures."""
        with self._lock:
            return [m[0] for m in self._meta]

    @property
    def times(self) -> List[float]:
        """Wall time of each record, in seconds since the fit started."""
        with self._lock:
            return [m[1] for m in self._meta]

    @property
    def changes(self) -> List[float]:
        """The relative change the stop rule read at each record (``nan`` for the first)."""
        with self._lock:
            return [m[2] for m in self._meta]

    @property
    def elbos(self) -> List[ELBO]:
        """The ELBO records (empty for a history of plain floats)."""
        return [r for r in self.snapshot() if isinstance(r, ELBO)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def __getitem__(self, i):
        with self._lock:
            return self._records[i]

    def __iter__(self):
        return iter(self.snapshot())

    # -- control ---------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the fit to end after its current step."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def converged(self, tol: float, window: int = 1) -> bool:
        """Whether the change per step over the last ``window`` records meets ``tol``.

        The ``'relative'`` rule of :mod:`torchnmf.engine`: ``|new - old| / |new| / window``.
        """
        from .engine import has_converged, relative_change  # the engine owns the rule

        with self._lock:  # only the two records compared: no pass over the whole history per step
            recs = self._records[-1 - window:]
        if len(recs) <= window or tol <= 0:
            return False
        return has_converged(relative_change(float(recs[0]), float(recs[-1]), window), tol)

    def close(self) -> None:
        """Close the progress bar, if any."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -- persistence -----------------------------------------------------------
    def __getstate__(self) -> dict:
        # Locks, events and progress bars do not pickle: keep the records and the flags.
        state = {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_stop", "_bar")}
        state["_records"] = self.snapshot()
        state["_stop_set"] = self._stop.is_set()
        return state

    def __setstate__(self, state: dict) -> None:
        stop_set = state.pop("_stop_set", False)
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if stop_set:
            self._stop.set()
        self._bar = None

    def state_dict(self) -> dict:
        """Records as plain data (ELBOs as dicts of floats), for checkpoints and JSON."""
        return {"name": self.name, "maximize": self.maximize, "tol": self.tol, "stop_rule": self.stop_rule,
                "converged": self.converged_, "n_iter": self.n_iter_,
                "records": [r.to_dict() if isinstance(r, ELBO) else float(r) for r in self.snapshot()],
                "meta": self.meta_state()}

    def meta_state(self) -> List[List[float]]:
        """``[step, wall time, relative change]`` of each record, as plain data."""
        with self._lock:
            return [list(m) for m in self._meta]

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` gave (records, their steps/times/changes, the fit's outcome)."""
        self.load_records(state["records"], state.get("meta"), replace=True)
        self.name = state.get("name", self.name)
        self.maximize = state.get("maximize", self.maximize)
        self.tol = state.get("tol", self.tol)
        self.stop_rule = state.get("stop_rule", self.stop_rule)
        self.converged_ = state.get("converged", self.converged_)
        self.n_iter_ = state.get("n_iter", self.n_iter_)

    def load_records(self, records, meta=None, replace: bool = False) -> None:
        """Append (or with ``replace``, set) records saved by :meth:`state_dict`.

        Parameters
        ----------
        records : list of float or dict
            Objectives, ELBOs as dicts of floats.
        meta : list of [step, time, change], optional
            As :meth:`meta_state`; default: steps numbered from the current length.
        replace : bool, default False
        """
        import torch

        recs: List[Any] = []
        for r in records:
            if isinstance(r, dict):
                data = torch.tensor(r["data"], dtype=torch.float64)
                kls = {k: torch.tensor(v, dtype=torch.float64) for k, v in r.items() if k not in ("data", "total")}
                recs.append(ELBO(data, kls))
            else:
                recs.append(float(r))
        with self._lock:
            base = 0 if replace else len(self._records)
            if meta is None or len(meta) != len(recs):
                meta = [(base + k, math.nan, math.nan) for k in range(len(recs))]
            meta = [(int(m[0]), float(m[1]), float(m[2])) for m in meta]
            if replace:
                self._records, self._meta = recs, meta
            else:
                self._records.extend(recs)
                self._meta.extend(meta)

    def plot(self, ax=None, parts: bool = False):
        """Plot the history; see :func:`plot_history`."""
        return plot_history(self, ax=ax, parts=parts)

    def __repr__(self) -> str:
        last = f", last={float(self[-1]):.6g}" if len(self) else ""
        return f"History({self.name}, steps={len(self)}{last})"


def plot_history(history, ax=None, parts: bool = False, logy: Optional[bool] = None):
    """Plot an objective history with matplotlib.

    Parameters
    ----------
    history : History or sequence of float or ELBO
    ax : matplotlib Axes, optional
        Drawn into; a new figure otherwise.
    parts : bool, default False
        For ELBO records, also draw each term on its own axis.
    logy : bool, optional
        Log scale; default for positive, non-ELBO objectives.

    Returns
    -------
    matplotlib.axes.Axes
    """
    try:
        import matplotlib

        matplotlib.use(matplotlib.get_backend())
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - optional dependency
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from None
    from .plotting import plot_objective

    records = history.snapshot() if isinstance(history, History) else list(history)
    name = history.name if isinstance(history, History) else "objective"
    values = [float(r) for r in records]
    steps = history.steps if isinstance(history, History) else list(range(len(values)))
    elbo = bool(records) and isinstance(records[0], ELBO)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    if logy is None:
        logy = bool(values) and not elbo and min(values) > 0
    tol = getattr(history, "tol", None) if isinstance(history, History) else None
    # the stop rule's view (relative change per step against the tolerance) on its own right axis
    plot_objective(ax, steps, values, name="total" if parts else name, logy=logy,
                   changes=history.changes if tol and not parts else None, tol=None if parts else tol,
                   maximize=bool(getattr(history, "maximize", False)) or elbo)
    ax.set_ylabel(name)
    if parts and elbo:
        twin = ax.twinx()
        for key in records[0].to_dict():
            if key == "total":
                continue
            twin.plot(steps, [r.to_dict()[key] for r in records], "--", label=key, alpha=0.6)
        twin.legend(loc="center right")
    if getattr(history, "converged_", None) is False:
        ax.set_title(f"{name}: max_iter reached before tol", fontsize="medium")
    return ax
