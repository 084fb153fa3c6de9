"""torchnmf: non-negative and Poisson matrix factorization for PyTorch.

Layers are :class:`torch.nn.Module` s, trainers are :class:`torch.optim.Optimizer` s,
estimators follow the scikit-learn API.
"""
__version__ = "0.4.0.dev0"

from . import constraints, metrics  # noqa: F401
from .poisson.elbo import ELBO  # noqa: F401
from .history import History  # noqa: F401

# -- public layers, trainers and estimators (each line added by the module's owner) --
