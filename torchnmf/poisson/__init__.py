"""Probabilistic Poisson factorization layers sharing one ELBO interface."""
from .elbo import ELBO  # noqa: F401
from .lognormal import Counts, FactorPosterior, IndependentNormal, LogNormalPoisson  # noqa: F401
from .kernels import Matern32, MultiGroupKernel  # noqa: F401
from .spatial import LCGP, SVGP  # noqa: F401
from .gamma import CountMatrix, GammaPoisson  # noqa: F401
from .spfa import SparsePoissonFA  # noqa: F401
from .chain import FactorChain, GammaNMF, chain_elbo  # noqa: F401
from .deep import GammaChain  # noqa: F401
