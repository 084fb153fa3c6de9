"""torchnmf: non-negative and Poisson matrix factorization for PyTorch.

Layers are :class:`torch.nn.Module` s, trainers are :class:`torch.optim.Optimizer` s,
estimators follow the scikit-learn API.
"""
__version__ = "0.4.0.dev0"

from . import constraints, metrics  # noqa: F401
from .poisson.elbo import ELBO  # noqa: F401
from .history import History  # noqa: F401

# -- public layers, trainers and estimators (each line added by the module's owner) --
from .poisson.lognormal import FactorPosterior, IndependentNormal, LogNormalPoisson  # noqa: F401
from . import init  # noqa: F401
from . import kernels  # noqa: F401 - registers the optional fused GPU path with torchnmf.updates
from .nmf import BaseComponent, NMF, NMFD, NMF2D, NMF3D  # noqa: F401
from .plca import PLCA, SIPLCA, SIPLCA2, SIPLCA3  # noqa: F401
from . import trainer  # noqa: F401
from .poisson.spatial import LCGP, SVGP  # noqa: F401
from .poisson.gamma import GammaPoisson  # noqa: F401
from .trainer.cavi import CAVI  # noqa: F401
from .trainer.natural import NaturalGradient  # noqa: F401
from .trainer.online import OnlineMU  # noqa: F401
from . import distributed, parallel, streaming  # noqa: F401
from .parallel import fit_gamma_cavi, fit_gamma_svi, fit_nmf, fit_nmf_online  # noqa: F401
from .streaming import SparseRows, row_loader  # noqa: F401
from . import replicates  # noqa: F401
from .replicates import ReplicateFit, fit_replicates  # noqa: F401
from .poisson.spfa import SparsePoissonFA  # noqa: F401
from .poisson.chain import GammaNMF  # noqa: F401
# every trainer at top level (pytorch-NMF 0.3.5's BetaMu and SparsityProj too), as well as in torchnmf.trainer
from .trainer import BetaMu, GaussianNatural, SparsityProj  # noqa: F401
