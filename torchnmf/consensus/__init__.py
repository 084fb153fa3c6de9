"""Consensus NMF and rank selection, with cNMF's algorithm (Kotliar et al., eLife 2019).

:class:`ConsensusNMF` is the front door: many restarts per rank (as one tensor program,
:func:`torchnmf.replicates.fit_replicates`), their components clustered into stable
consensus programs, and a k-selection table to choose the rank. The parts, one per module:

- :mod:`~torchnmf.consensus.prepare`: cNMF's preparation (over-dispersed features, unit variance);
- :mod:`~torchnmf.consensus.cluster`: outlier filter, k-means, consensus components, stability;
- :mod:`~torchnmf.consensus.cophenetic`: the samples' consensus matrix (Brunet et al. 2004);
- :mod:`~torchnmf.consensus.refit`: usages with the components fixed, and the error;
- :mod:`~torchnmf.consensus.rank`: one rank end to end;
- :mod:`~torchnmf.consensus.plot`: the k-selection plot and the clustered distance matrix;
- :mod:`~torchnmf.consensus.cli`: ``torchnmf consensus``.

scikit-learn (for k-means and the silhouette score) is needed to fit; pandas is optional.
"""
from typing import Any

__all__ = ["ConsensusNMF", "k_selection_table"]


def __getattr__(name: str) -> Any:  # lazy: ``torchnmf --help`` loads the CLI part only, not scikit-learn
    if name in ("ConsensusNMF", "k_selection_table"):
        from . import estimator

        return getattr(estimator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
