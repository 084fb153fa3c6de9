"""One rank of a consensus study as a file: ``k{K}.npz``, the CLI's output and its checkpoint.

The file holds the rank's consensus components and usages with the feature and sample
names (what a user reads), the clustering (to redraw it) and the scores, plus a fingerprint
of everything that determined it: the parameters and a hash of the prepared matrix. A run
started again loads a rank only when the fingerprint matches.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import numpy as np

from ..io import atomic_write
from .cluster import Clustering
from .rank import RankResult

__all__ = ["fingerprint", "save_rank", "load_rank"]


def fingerprint(params: dict, X) -> str:
    """A JSON string of the parameters that determine a rank's result and the prepared data's hash.

    Parameters
    ----------
    params : dict
        JSON-serialisable parameters (replicates, beta, seed, ...).
    X : ndarray or scipy.sparse.csr_matrix
        The prepared matrix.

    Returns
    -------
    str
    """
    h = hashlib.sha1()
    h.update(repr(X.shape).encode())
    if hasattr(X, "indptr"):
        for part in (X.indptr, X.indices, X.data):
            h.update(np.ascontiguousarray(part).tobytes())
    else:
        h.update(np.ascontiguousarray(X).tobytes())
    return json.dumps(dict(params, data_sha1=h.hexdigest()), sort_keys=True)


def save_rank(path: str, res: RankResult, feature_names, sample_names, fp: str) -> None:
    """Write ``res`` to ``path`` (atomically: a temporary file renamed)."""
    c = res.clustering
    arrays = dict(components=res.clustering.consensus, usages=res.usages,
                  feature_names=np.asarray(feature_names, dtype=str), sample_names=np.asarray(sample_names, dtype=str),
                  stability=res.stability, error=res.error, cophenetic=res.cophenetic, kept=res.kept,
                  n_converged=res.n_converged, replicate_components=c.components, density=c.density,
                  kept_mask=c.kept, labels=c.labels, density_threshold=c.density_threshold,
                  fingerprint=np.asarray(fp))
    with atomic_write(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def load_rank(path: str, k: int, fp: str) -> Optional[RankResult]:
    """The rank saved at ``path`` if it exists and was made with fingerprint ``fp``, else ``None``.

    Raises
    ------
    ValueError
        The file exists but was made with other parameters or data (its differences named).
    """
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            saved = str(z["fingerprint"])
            a = {name: z[name] for name in z.files}
    except Exception as err:  # a damaged file is recomputed, not trusted
        raise ValueError(f"{path} cannot be read ({err}); delete it to recompute rank {k}") from None
    if saved != fp:
        old, new = json.loads(saved), json.loads(fp)
        diff = ", ".join(f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
                         if old.get(key) != new.get(key))
        raise ValueError(f"{path} was computed with other settings ({diff}); use another output "
                         f"directory, delete it, or pass --overwrite")
    c = Clustering(k, a["replicate_components"], a["density"], a["kept_mask"], a["labels"], float(a["stability"]),
                   a["components"], float(a["density_threshold"]))
    return RankResult(a["usages"], float(a["stability"]), float(a["error"]), float(a["cophenetic"]),
                      int(a["kept"]), int(a["n_converged"]), c)
