"""Helpers for data-parallel fitting with :mod:`torch.distributed`.

Rows of the data are sharded over processes; each process computes the sufficient
statistics of the shared factors on its own rows, :func:`all_reduce_stats` sums them, and
every process applies the same update. A fit in ``P`` processes therefore equals the
one-process fit of the same data up to floating-point summation order.

Everything here also works without an initialised process group: the world is then one
process of rank 0, reductions return their input and barriers return at once.

Collectives wait at most ``timeout`` seconds. A peer that died or stopped responding turns
into a :class:`DistributedTimeoutError` naming the operation, instead of a hang;
:class:`Checkpointer` lets the restarted job resume from the last complete checkpoint.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import socket
import time
import warnings
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .data import check_positive, check_rank

__all__ = [
    "DistributedTimeoutError",
    "DEFAULT_TIMEOUT",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "init",
    "find_free_port",
    "shard_range",
    "shard_rows",
    "check_shards",
    "all_reduce_stats",
    "stats_reducer",
    "broadcast_",
    "barrier",
    "Checkpointer",
    "CheckpointError",
    "rng_state",
    "set_rng_state",
]

#: Seconds a collective waits for its peers before :class:`DistributedTimeoutError`.
DEFAULT_TIMEOUT = 300.0


class DistributedTimeoutError(RuntimeError, TimeoutError):
    """A collective did not complete: a peer process died, hung or lost its connection.

    Raised by every helper of :mod:`torchnmf.distributed` instead of hanging; it is both a
    :class:`RuntimeError` and a :class:`TimeoutError`.
    """


# -- world ---------------------------------------------------------------------
def is_distributed(group=None) -> bool:
    """Whether a process group with more than one process is initialised."""
    return get_world_size(group) > 1


def get_rank(group=None) -> int:
    """This process's rank in ``group`` (0 without an initialised process group)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group)
    return 0


def get_world_size(group=None) -> int:
    """Number of processes in ``group`` (1 without an initialised process group)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def _timedelta(timeout: Optional[float]) -> datetime.timedelta:
    seconds = DEFAULT_TIMEOUT if timeout is None else check_positive(timeout, "timeout")
    return datetime.timedelta(seconds=seconds)


def init(
    backend: Optional[str] = None,
    *,
    timeout: Optional[float] = None,
    init_method: Optional[str] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> Tuple[int, int]:
    """Initialise the default process group, from ``torchrun``'s environment by default.

    Parameters
    ----------
    backend : {'gloo', 'nccl'}, optional
        Default ``'nccl'`` when CUDA is available and ``LOCAL_RANK`` is set, else ``'gloo'``.
    timeout : float, optional
        Seconds any collective may wait for its peers (default :data:`DEFAULT_TIMEOUT`).
    init_method : str, optional
        e.g. ``'tcp://10.0.0.1:29500'``; default ``'env://'`` (``MASTER_ADDR``, ``MASTER_PORT``).
    rank, world_size : int, optional
        Default ``RANK`` and ``WORLD_SIZE`` from the environment.

    Returns
    -------
    (rank, world_size) : tuple of int
        Also when the group was already initialised (then nothing changes).

    Notes
    -----
    With NCCL, the CUDA device of the process is set to ``LOCAL_RANK``.
    """
    dist = torch.distributed
    if not dist.is_available():  # pragma: no cover - torch built without distributed
        raise RuntimeError("this torch build has no torch.distributed")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    local_rank = os.environ.get("LOCAL_RANK")
    if backend is None:
        backend = "nccl" if (torch.cuda.is_available() and local_rank is not None) else "gloo"
    if backend not in ("gloo", "nccl", "mpi", "ucc"):
        raise ValueError(f"backend must be one of 'gloo', 'nccl', 'mpi', 'ucc'; got {backend!r}")
    if backend == "nccl" and local_rank is not None:
        torch.cuda.set_device(int(local_rank))
    kwargs: Dict[str, Any] = {"timeout": _timedelta(timeout)}
    if init_method is not None:
        kwargs["init_method"] = init_method
    if rank is not None:
        kwargs["rank"] = rank
    if world_size is not None:
        kwargs["world_size"] = check_rank(world_size, "world_size")
    try:
        dist.init_process_group(backend, **kwargs)
    except RuntimeError as err:  # the store's rendezvous timed out or could not connect
        raise DistributedTimeoutError(
            f"init_process_group({backend!r}) failed: not every process joined within "
            f"{kwargs['timeout'].total_seconds():g} s or the rendezvous address is unreachable ({err})"
        ) from err
    return dist.get_rank(), dist.get_world_size()


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for single-machine process groups)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- sharding ------------------------------------------------------------------
def shard_range(n_rows: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> range:
    """The contiguous rows a process owns when ``n_rows`` rows are split over the world.

    Shards differ in size by at most one row and, in rank order, cover ``range(n_rows)``.

    Parameters
    ----------
    n_rows : int
    rank, world_size : int, optional
        Default: this process's.

    Returns
    -------
    range
    """
    n_rows = int(n_rows)
    world_size = get_world_size() if world_size is None else check_rank(world_size, "world_size")
    rank = get_rank() if rank is None else int(rank)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if n_rows < world_size:
        raise ValueError(f"cannot shard {n_rows} rows over {world_size} processes: every process needs a row")
    return range(n_rows * rank // world_size, n_rows * (rank + 1) // world_size)


def shard_rows(X, rank: Optional[int] = None, world_size: Optional[int] = None):
    """This process's rows of ``X`` and their global indices.

    Parameters
    ----------
    X : Tensor (dense, COO or CSR), numpy array or scipy.sparse matrix, shape (n_rows, ...)
    rank, world_size : int, optional
        Default: this process's.

    Returns
    -------
    X_local : same kind as ``X``, shape (n_local, ...)
        A view where the format allows (dense tensors, numpy arrays); never ``X`` modified.
    rows : range
        Global indices of the local rows.
    """
    rows = shard_range(X.shape[0], rank, world_size)
    if isinstance(X, Tensor) and X.layout != torch.strided:
        idx = torch.arange(rows.start, rows.stop, device=X.device)
        part = X.to_sparse_coo().index_select(0, idx).coalesce()
        return (part if X.layout == torch.sparse_coo else part.to_sparse(layout=X.layout)), rows
    if hasattr(X, "tocsr") and hasattr(X, "nnz"):  # scipy.sparse
        return X.tocsr()[rows.start:rows.stop], rows
    return X[rows.start:rows.stop], rows


def check_shards(
    n_rows: int,
    n_cols: int,
    *,
    shard_index: Optional[int] = None,
    n_shards: Optional[int] = None,
    group=None,
    timeout: Optional[float] = None,
) -> Tuple[int, int]:
    """Check the shards held by the processes fit together, on every process at once.

    Each process passes the size of its own shard; they are gathered so that every process
    raises the same ``ValueError`` (and none waits forever for the others) when the
    shards do not match the world.

    Parameters
    ----------
    n_rows, n_cols : int
        Shape of this process's shard.
    shard_index : int, optional
        Which shard this process holds (default its rank); shards are ordered by it.
    n_shards : int, optional
        How many shards the data were split into; must equal the world size.
    group : ProcessGroup, optional
    timeout : float, optional
        Seconds to wait for the peers (default :data:`DEFAULT_TIMEOUT`).

    Returns
    -------
    (offset, n_total) : tuple of int
        Global index of this shard's first row and the number of rows over all shards.

    Raises
    ------
    ValueError
        ``n_shards`` differs from the world size, two processes hold the same shard, the
        shards disagree on ``n_cols``, or a shard is empty.
    DistributedTimeoutError
        A peer did not answer within ``timeout``.
    """
    world, rank = get_world_size(group), get_rank(group)
    shard_index = rank if shard_index is None else int(shard_index)
    mine = torch.tensor([int(n_rows), int(n_cols), shard_index, -1 if n_shards is None else int(n_shards)],
                        dtype=torch.int64)
    table = torch.zeros(world, 4, dtype=torch.int64)
    table[rank] = mine
    table = all_reduce_stats({"t": table}, group=group, timeout=timeout)["t"]
    declared = {int(s) for s in table[:, 3].tolist() if s >= 0}
    if declared and declared != {world}:
        raise ValueError(
            f"the data are split into {sorted(declared)[0] if len(declared) == 1 else sorted(declared)} shards "
            f"but the job runs {world} processes: launch one process per shard "
            f"(e.g. torchrun --nproc-per-node ... with a total of {sorted(declared)[0]}) or re-shard the data"
        )
    indices = sorted(table[:, 2].tolist())
    if indices != list(range(world)):
        raise ValueError(
            f"shard indices of the {world} processes are {table[:, 2].tolist()}; each of 0..{world - 1} "
            "must be held by exactly one process"
        )
    cols = set(table[:, 1].tolist())
    if len(cols) != 1:
        raise ValueError(f"shards disagree on the number of columns: {table[:, 1].tolist()} (by rank)")
    if bool((table[:, 0] <= 0).any()):
        raise ValueError(f"every shard needs at least one row; rows per rank: {table[:, 0].tolist()}")
    order = table[:, 2]
    offset = int(table[order < shard_index, 0].sum())
    return offset, int(table[:, 0].sum())


# -- collectives ---------------------------------------------------------------
def _wait(work, timeout: Optional[float], what: str, group=None) -> None:
    limit = _timedelta(timeout).total_seconds()
    start = time.monotonic()
    try:
        ok = work.wait(timeout=_timedelta(timeout))
    except Exception as err:  # gloo raises RuntimeError/DistBackendError for both cases
        raise DistributedTimeoutError(_failure_message(group, what, limit, time.monotonic() - start, err)) from err
    if ok is False:  # pragma: no cover - backends that report instead of raising
        raise DistributedTimeoutError(_failure_message(group, what, limit, time.monotonic() - start, None))


def _failure_message(group, what: str, limit: float, elapsed: float, err: Optional[BaseException]) -> str:
    """Say what ended a collective: the full timeout ran out, or the connection broke early."""
    who = f"rank {get_rank(group)} of {get_world_size(group)}: {what}"
    detail = f" ({err})" if err is not None else ""
    # the backend's own deadline fires at ``limit``; anything clearly earlier was a broken connection
    if elapsed < 0.9 * limit:
        what_happened = (f"failed after {elapsed:.2g} s, before the {limit:g} s timeout: the connection to a "
                         f"peer was closed or reset, so a peer process died or lost its connection{detail}")
    else:
        what_happened = (f"did not complete within {limit:g} s: a peer process died, hung or lost its "
                         f"connection{detail}")
    return f"{who} {what_happened}. Restart the job; with checkpoints it resumes from the last one."


def _comm_device(group=None) -> Optional[torch.device]:
    """The device tensors must be on for the group's backend (NCCL: this process's GPU), else None."""
    if torch.distributed.get_backend(group) == "nccl":  # pragma: no cover - needs GPUs
        return torch.device("cuda", torch.cuda.current_device())
    return None


def all_reduce_stats(
    stats: Mapping[str, Tensor],
    *,
    group=None,
    timeout: Optional[float] = None,
    op: str = "sum",
) -> Dict[str, Tensor]:
    """Sum (or max/min) a dict of statistics over all processes, in one collective per dtype.

    Parameters
    ----------
    stats : mapping of str to Tensor
        Dense tensors of any shapes; those of one dtype and device travel in one buffer.
    group : ProcessGroup, optional
    timeout : float, optional
        Seconds to wait for the peers (default :data:`DEFAULT_TIMEOUT`).
    op : {'sum', 'max', 'min'}

    Returns
    -------
    dict of str to Tensor
        New tensors with the reduced values (the input tensors themselves with one process);
        ``stats`` is never modified.

    Raises
    ------
    DistributedTimeoutError
        A peer did not take part within ``timeout``.
    """
    if op not in ("sum", "max", "min"):
        raise ValueError(f"op must be one of 'sum', 'max', 'min'; got {op!r}")
    for key, value in stats.items():
        if not isinstance(value, Tensor) or value.layout != torch.strided:
            raise TypeError(f"stats[{key!r}] must be a dense tensor, got {type(value).__name__}")
    if not is_distributed(group):
        return dict(stats)
    dist = torch.distributed
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    buckets: Dict[Tuple[torch.dtype, torch.device], list] = {}
    for key, value in stats.items():
        buckets.setdefault((value.dtype, value.device), []).append(key)
    out: Dict[str, Tensor] = {}
    comm = _comm_device(group)
    for (_, device), keys in buckets.items():
        flat = torch.cat([stats[k].detach().reshape(-1) for k in keys])  # a copy: input untouched
        if comm is not None and device != comm:  # e.g. CPU bookkeeping under NCCL
            flat = flat.to(comm)
        _wait(dist.all_reduce(flat, op=reduce_op, group=group, async_op=True), timeout,
              f"all_reduce of {', '.join(keys)}", group)
        flat = flat.to(device)
        start = 0
        for k in keys:
            n = stats[k].numel()
            out[k] = flat[start:start + n].view(stats[k].shape)
            start += n
    return {k: out[k] for k in stats}


def stats_reducer(keys: Optional[Sequence[str]] = None, *, group=None, timeout: Optional[float] = None):
    """A ``reduce(stats) -> stats`` callable summing the named statistics over processes.

    Pass it as ``reduce=`` to a conjugate trainer (:class:`torchnmf.trainer.CAVI`,
    :class:`torchnmf.trainer.NaturalGradient`) for data-parallel fitting; entries not
    named (local statistics, row indices, scales) pass through unchanged.

    Parameters
    ----------
    keys : sequence of str, optional
        Statistics to sum, e.g. a layer's ``global_statistics``; default every tensor entry.
    group : ProcessGroup, optional
    timeout : float, optional
        Seconds to wait for the peers.

    Returns
    -------
    callable
        ``reduce(stats: dict) -> dict``; the input dict is not modified.
    """
    keys = None if keys is None else tuple(keys)

    def reduce(stats: Mapping[str, Any]) -> Dict[str, Any]:
        names = [k for k in (stats if keys is None else keys)
                 if k in stats and isinstance(stats[k], Tensor) and stats[k].layout == torch.strided]
        out = dict(stats)
        out.update(all_reduce_stats({k: stats[k] for k in names}, group=group, timeout=timeout))
        return out

    return reduce


@torch.no_grad()
def broadcast_(tensors, src: int = 0, *, group=None, timeout: Optional[float] = None) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (nothing with one process).

    Parameters
    ----------
    tensors : iterable of Tensor
        Dense tensors of the same shapes on every process (e.g. a model's shared parameters).
    src : int
    group : ProcessGroup, optional
    timeout : float, optional
    """
    tensors = list(tensors)
    if not is_distributed(group):
        return
    dist = torch.distributed
    comm = _comm_device(group)
    for t in tensors:
        buf = t.detach().contiguous()
        if comm is not None and buf.device != comm:
            buf = buf.to(comm)
        _wait(dist.broadcast(buf, src, group=group, async_op=True), timeout, "broadcast", group)
        if buf.data_ptr() != t.data_ptr():
            t.copy_(buf)


def barrier(*, group=None, timeout: Optional[float] = None) -> None:
    """Wait until every process reaches this point (or raise :class:`DistributedTimeoutError`)."""
    if not is_distributed(group):
        return
    # an all_reduce rather than dist.barrier: the latter cannot be given a timeout on gloo
    all_reduce_stats({"barrier": torch.zeros(1)}, group=group, timeout=timeout)


# -- checkpoints ---------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint file or the ``latest.json`` manifest cannot be read (truncated, empty or garbage).

    The message names the file. :meth:`Checkpointer.load` skips such files with a warning and
    falls back to the newest checkpoint that every process can read; it raises this error only
    when none is left (or with ``fallback=False``).
    """


_CKPT_NAME = re.compile(r"^epoch(\d{8})-rank(\d{5})\.pt$")


class Checkpointer:
    """Save a fit's state every ``every`` epochs and resume from the last complete one.

    Each process writes its own file (its rows' factors differ); once every process has
    written, rank 0 records the epoch in ``latest.json``. A job killed at any moment
    therefore resumes from an epoch every process saved, and a deterministic fit resumed
    this way ends with exactly the result of an uninterrupted one.

    Nothing a killed job leaves behind stops the next one: temporary files (``*.tmp<pid>``)
    and checkpoints no manifest lists are deleted by the next :meth:`save`; a truncated,
    empty or garbage checkpoint file or manifest is skipped by :meth:`load` with a warning
    naming it, falling back to the newest checkpoint every process can read.

    Parameters
    ----------
    directory : str or os.PathLike
        Shared by all processes (a network file system on a cluster); created if missing.
    every : int, default 1
        Save after epochs ``every - 1``, ``2 * every - 1``, ... (0-based).
    keep : int, default 2
        Complete checkpoints kept on disk; older ones are deleted.
    group : ProcessGroup, optional
    timeout : float, optional
        Seconds the processes wait for each other when saving.

    Examples
    --------
    >>> ckpt = Checkpointer("ckpt", every=10)                           # doctest: +SKIP
    >>> start, state = ckpt.load() or (0, None)                         # doctest: +SKIP
    >>> for epoch in range(start, n_epochs):                            # doctest: +SKIP
    ...     ...
    ...     ckpt.maybe_save(epoch, {"W": W, "H": H})
    """

    MANIFEST = "latest.json"

    def __init__(self, directory: Union[str, os.PathLike], every: int = 1, keep: int = 2, *,
                 group=None, timeout: Optional[float] = None):
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path, got {type(directory).__name__}")
        self.directory = os.fspath(directory)
        self.every = check_rank(every, "every")
        self.keep = check_rank(keep, "keep")
        self.group = group
        self.timeout = timeout
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise ValueError(f"directory {self.directory!r} exists and is not a directory")
        os.makedirs(self.directory, exist_ok=True)

    def _file(self, epoch: int, rank: int) -> str:
        return os.path.join(self.directory, f"epoch{epoch:08d}-rank{rank:05d}.pt")

    def _manifest_path(self) -> str:
        return os.path.join(self.directory, self.MANIFEST)

    def _on_disk(self) -> Dict[int, set]:
        """Checkpoint files present: epoch -> set of ranks."""
        found: Dict[int, set] = {}
        for name in os.listdir(self.directory):
            m = _CKPT_NAME.match(name)
            if m:
                found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        return found

    def _read_manifest(self) -> Optional[Dict[str, Any]]:
        """The manifest's content, ``None`` when there is none; :class:`CheckpointError` if unreadable."""
        path = self._manifest_path()
        try:
            with open(path) as f:
                info = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CheckpointError(f"checkpoint manifest {path!r} is unreadable ({type(err).__name__}: {err}); "
                                  "it was probably cut short by a killed job") from err
        try:
            complete = [int(e) for e in info["complete"]]
            world = int(info["world_size"])
            if any(e < 0 for e in complete) or world < 1:
                raise ValueError("negative epoch or world size")
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint manifest {path!r} is not a torchnmf manifest "
                                  f"({type(err).__name__}: {err})") from err
        return {"complete": sorted(set(complete)), "world_size": world}

    def _manifest_or_scan(self) -> Optional[Dict[str, Any]]:
        """The manifest, or (when it is corrupt) one rebuilt from the files every rank wrote."""
        try:
            return self._read_manifest()
        except CheckpointError as err:
            warnings.warn(f"{err}; using the checkpoint files every process wrote instead", RuntimeWarning,
                          stacklevel=3)
        world = get_world_size(self.group)
        complete = [e for e, ranks in self._on_disk().items() if ranks >= set(range(world))]
        return {"complete": sorted(complete), "world_size": world}

    def due(self, epoch: int) -> bool:
        """Whether :meth:`maybe_save` saves after 0-based ``epoch``."""
        return (epoch + 1) % self.every == 0

    def maybe_save(self, epoch: int, state: Mapping[str, Any]) -> bool:
        """:meth:`save` if :meth:`due`; return whether it saved. Collective when it saves."""
        if self.due(epoch):
            self.save(epoch, state)
            return True
        return False

    def _remove_stale(self, rank: int, keep: Sequence[int], tmp: bool) -> None:
        """Delete this rank's temporary files and its checkpoints not in ``keep`` (only this rank writes them)."""
        if tmp:
            self._remove_tmp(rank)
        for name in os.listdir(self.directory):
            m = _CKPT_NAME.match(name)
            if m is not None and int(m.group(2)) == rank and int(m.group(1)) not in keep:
                try:
                    os.remove(os.path.join(self.directory, name))
                except FileNotFoundError:  # pragma: no cover - removed concurrently
                    pass

    def _remove_tmp(self, rank: int) -> None:
        """Delete the temporary files killed saves of this rank (and, on rank 0, of the manifest) left."""
        mine = f"-rank{rank:05d}.pt.tmp"
        for name in os.listdir(self.directory):
            if mine in name or (rank == 0 and name.startswith(self.MANIFEST + ".tmp")):
                try:
                    os.remove(os.path.join(self.directory, name))
                except FileNotFoundError:  # pragma: no cover - removed concurrently
                    pass

    def save(self, epoch: int, state: Mapping[str, Any]) -> None:
        """Write this process's ``state`` after 0-based ``epoch``; collective.

        ``state`` holds tensors, numbers, strings and (nested) dicts/lists of them, as
        :func:`torch.load` with ``weights_only=True`` reads back. Saving epoch ``e`` drops the
        checkpoints of epochs ``>= e`` a previous run left (the fit went back to before
        them), temporary files of killed saves and checkpoints no manifest lists.
        """
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        rank, world = get_rank(self.group), get_world_size(self.group)
        path = self._file(epoch, rank)
        payload = {"epoch": epoch, "rank": rank, "world_size": world, "state": dict(state)}
        # read before the barrier: rank 0 rewrites the manifest after it
        info = self._manifest_or_scan()
        listed = info["complete"] if info is not None else []
        previous = [e for e in listed if e < epoch] if info is not None and info["world_size"] == world else []
        kept = (previous + [epoch])[-self.keep:]
        # leftovers of killed saves go before writing, so they never pile up; listed files stay
        # until the new manifest no longer names them
        self._remove_stale(rank, listed, tmp=True)
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(payload, tmp)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
        barrier(group=self.group, timeout=self.timeout)
        if rank == 0:
            manifest = self._manifest_path()
            tmp = f"{manifest}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"epoch": epoch, "world_size": world, "complete": kept}, f)
            os.replace(tmp, manifest)
        barrier(group=self.group, timeout=self.timeout)
        self._remove_stale(rank, kept, tmp=False)

    def epochs(self) -> list:
        """The complete checkpoints on disk (0-based epochs), oldest first.

        With a corrupt manifest (warned about), the epochs whose files every process wrote.
        """
        info = self._manifest_or_scan()
        return [] if info is None else list(info["complete"])

    def _read(self, epoch: int, rank: int, map_location) -> Dict[str, Any]:
        path = self._file(epoch, rank)
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError as err:
            raise CheckpointError(f"checkpoint file {path!r} is missing") from err
        except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ... on damaged files
            size = os.path.getsize(path) if os.path.exists(path) else 0
            raise CheckpointError(f"checkpoint file {path!r} ({size} bytes) is truncated, empty or not a "
                                  f"checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                                  ) from err
        if (not isinstance(payload, dict) or not isinstance(payload.get("state"), dict)
                or payload.get("epoch") != epoch or payload.get("rank") != rank):
            raise CheckpointError(f"checkpoint file {path!r} does not hold epoch {epoch} of rank {rank}")
        return payload

    def load(self, map_location=None, *, fallback: bool = True) -> Optional[Tuple[int, Dict[str, Any]]]:
        """This process's newest complete checkpoint every process can read, or ``None``.

        Collective in a process group (the processes agree on one epoch).

        Parameters
        ----------
        map_location : optional
            As for :func:`torch.load`.
        fallback : bool, default True
            Skip unreadable checkpoint files and a corrupt manifest with a
            :class:`RuntimeWarning` naming them, and resume from an older checkpoint. With
            ``False``, the first unreadable file raises :class:`CheckpointError`.

        Returns
        -------
        (next_epoch, state) : tuple or None
            The epoch to continue from (one past the saved one) and the saved ``state``;
            ``None`` when the directory holds no complete checkpoint.

        Raises
        ------
        ValueError
            The checkpoint was written by a job with another number of processes.
        CheckpointError
            Checkpoints exist but none can be read by every process (or one cannot, with
            ``fallback=False``); the message names the files.
        """
        if fallback:
            info = self._manifest_or_scan()
        else:
            info = self._read_manifest()
        world, rank = get_world_size(self.group), get_rank(self.group)
        self._remove_tmp(rank)
        if info is not None and info["world_size"] != world:
            raise ValueError(
                f"the checkpoint in {self.directory!r} was written by {info['world_size']} processes but this "
                f"job has {world}: rows are sharded by process, so resume with {info['world_size']} processes "
                "or start afresh in another directory"
            )
        candidates = sorted(info["complete"], reverse=True) if info is not None else []
        failures: list = []
        bound = None  # the processes agree on the newest epoch all of them could read
        while True:
            chosen, payload = -1, None
            for epoch in candidates:
                if bound is not None and epoch > bound:
                    continue
                try:
                    payload = self._read(epoch, rank, map_location)
                except CheckpointError as err:
                    if not fallback:
                        raise
                    warnings.warn(f"{err}; falling back to an older checkpoint", RuntimeWarning, stacklevel=2)
                    failures.append(str(err))
                    continue
                chosen = epoch
                break
            if not is_distributed(self.group):
                break
            agreed = all_reduce_stats({"lo": torch.tensor([chosen])}, group=self.group, timeout=self.timeout,
                                      op="min")["lo"]
            highest = all_reduce_stats({"hi": torch.tensor([chosen])}, group=self.group, timeout=self.timeout,
                                       op="max")["hi"]
            if int(agreed) == int(highest):
                break
            bound = int(agreed)
        if chosen < 0:
            if not candidates:
                return None
            raise CheckpointError(
                f"no checkpoint in {self.directory!r} can be read by every process"
                + (": " + "; ".join(failures) if failures else " (another process found its files damaged)")
                + ". Delete the damaged files or the directory to start afresh."
            )
        return chosen + 1, payload["state"]


def rng_state() -> Dict[str, Tensor]:
    """Torch's CPU (and CUDA, when initialised) random states, for a checkpoint."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # pragma: no cover - needs cuda
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Tensor]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():  # pragma: no cover - needs cuda
        torch.cuda.set_rng_state(state["cuda"])
