"""Probabilistic Poisson factorization layers sharing one ELBO interface."""
from .elbo import ELBO  # noqa: F401
