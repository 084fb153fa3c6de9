"""torchnmf: non-negative and Poisson matrix factorization for PyTorch.

Layers are :class:`torch.nn.Module` s, trainers are :class:`torch.optim.Optimizer` s,
estimators follow the scikit-learn API.

The public names below are imported on first use (PEP 562), so ``import torchnmf`` and the
command line's ``--help`` do not pay for importing torch and scikit-learn; ``torchnmf.NMF``,
``from torchnmf import NMF`` and ``from torchnmf import *`` work as with eager imports.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, List

__version__ = "0.4.0.dev0"

#: public attribute -> the submodule that defines it (each line added by the module's owner)
_ATTRS: Dict[str, str] = {
    "ELBO": "poisson.elbo",
    "History": "history",
    "FactorPosterior": "poisson.lognormal", "IndependentNormal": "poisson.lognormal",
    "LogNormalPoisson": "poisson.lognormal",
    "BaseComponent": "nmf", "NMF": "nmf", "NMFD": "nmf", "NMF2D": "nmf", "NMF3D": "nmf",
    "PLCA": "plca", "SIPLCA": "plca", "SIPLCA2": "plca", "SIPLCA3": "plca",
    "LCGP": "poisson.spatial", "SVGP": "poisson.spatial",
    "GammaPoisson": "poisson.gamma",
    "CAVI": "trainer.cavi",
    "NaturalGradient": "trainer.natural",
    "OnlineMU": "trainer.online",
    "fit_gamma_cavi": "parallel", "fit_gamma_svi": "parallel", "fit_nmf": "parallel",
    "fit_nmf_online": "parallel",
    "SparseRows": "streaming", "row_loader": "streaming",
    "ReplicateFit": "replicates", "fit_replicates": "replicates",
    "SparsePoissonFA": "poisson.spfa",
    "GammaNMF": "poisson.chain",
    # every trainer at top level (pytorch-NMF 0.3.5's BetaMu and SparsityProj too), as well as in torchnmf.trainer
    "BetaMu": "trainer", "GaussianNatural": "trainer", "SparsityProj": "trainer",
}
#: public submodules reachable as attributes of the package
_SUBMODULES = ("constraints", "metrics", "init", "kernels", "trainer", "distributed", "parallel", "streaming",
               "replicates")

__all__ = ["__version__", *_SUBMODULES, *_ATTRS]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _ATTRS:
        value = getattr(importlib.import_module(f"{__name__}.{_ATTRS[name]}"), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from . import constraints, distributed, init, kernels, metrics, parallel, replicates, streaming, trainer  # noqa: F401
    from .history import History  # noqa: F401
    from .nmf import NMF, NMF2D, NMF3D, NMFD, BaseComponent  # noqa: F401
    from .parallel import fit_gamma_cavi, fit_gamma_svi, fit_nmf, fit_nmf_online  # noqa: F401
    from .replicates import ReplicateFit, fit_replicates  # noqa: F401
    from .plca import PLCA, SIPLCA, SIPLCA2, SIPLCA3  # noqa: F401
    from .poisson.chain import GammaNMF  # noqa: F401
    from .poisson.elbo import ELBO  # noqa: F401
    from .poisson.gamma import GammaPoisson  # noqa: F401
    from .poisson.lognormal import FactorPosterior, IndependentNormal, LogNormalPoisson  # noqa: F401
    from .poisson.spatial import LCGP, SVGP  # noqa: F401
    from .poisson.spfa import SparsePoissonFA  # noqa: F401
    from .streaming import SparseRows, row_loader  # noqa: F401
    from .trainer import BetaMu, GaussianNatural, SparsityProj  # noqa: F401
    from .trainer.cavi import CAVI  # noqa: F401
    from .trainer.natural import NaturalGradient  # noqa: F401
    from .trainer.online import OnlineMU  # noqa: F401
