"""Shared helpers of the Gamma-Poisson tests: simulated counts, seeded layers, parameter snapshots.

Imported as ``from gamma_helpers import ...`` (pytest puts ``tests/`` on ``sys.path`` for
its ``conftest.py``).
"""
import torch

from torchnmf.poisson import GammaPoisson

DT = torch.float64


def simulate_gamma(n, m, K, a=0.6, b=0.6, scale=3.0, seed=0):
    """Counts ``X ~ Poisson(U Aᵀ)`` with ``U ~ Gamma(a, 1)``, ``A ~ scale * Gamma(b, 1)``: returns (X, U, A)."""
    g = torch.Generator().manual_seed(seed)
    U = torch._standard_gamma(torch.full((n, K), a, dtype=DT), generator=g)
    A = torch._standard_gamma(torch.full((m, K), b, dtype=DT), generator=g) * scale
    return torch.poisson(U @ A.T, generator=g), U, A


def make_gamma(X, K, seed=0, **kw):
    """A float64 (by default) GammaPoisson for ``X`` with a seeded initialisation."""
    kw.setdefault("dtype", DT)
    return GammaPoisson(X.shape[0], X.shape[1], K, generator=torch.Generator().manual_seed(seed), **kw)


def gamma_params(layer):
    """Numpy copies of ``U_shape, U_rate, alpha_shape, alpha_rate``."""
    return [getattr(layer, n).detach().cpu().numpy().copy() for n in ("U_shape", "U_rate", "alpha_shape", "alpha_rate")]


def huge_float32(kind: str = "one", n: int = 6, m: int = 5) -> torch.Tensor:
    """Finite float32 counts (n, m) too large for float32 arithmetic (issue 22 item 5): every entry
    times 1e20 (``kind='scaled'``), or one entry of 3e38 (``'one'``)."""
    X = torch.poisson(torch.full((n, m), 3.0), generator=torch.Generator().manual_seed(0))
    if kind == "scaled":
        return X * 1e20
    X[1, 2] = 3e38
    return X
