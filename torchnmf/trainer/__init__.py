"""Trainers: :class:`torch.optim.Optimizer` subclasses whose ``step(closure)`` takes a closure.

One trainer per file; they see parameters, a closure and (for conjugate layers) the layer's
statistics method, never a layer's class.
"""
# -- each trainer's owner adds its import line below --
from .gaussian_natural import GaussianNatural  # noqa: F401
from .beta_mu import BetaMu  # noqa: F401
from .sparsity import SparsityProj  # noqa: F401
from .cavi import CAVI  # noqa: F401
from .natural import NaturalGradient  # noqa: F401
from .online import OnlineMU  # noqa: F401
