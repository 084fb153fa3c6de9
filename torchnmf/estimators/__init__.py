"""scikit-learn estimators over one layer and one trainer."""
# -- each estimator's owner adds its import line below --
from ._base import NotFittedError, TorchFactorization  # noqa: F401
from .nmf import BetaNMF  # noqa: F401
from .pnmf import PNMF  # noqa: F401
from .gamma import GammaPoissonFactorization  # noqa: F401
from .spatial import SpatialPNMF  # noqa: F401
