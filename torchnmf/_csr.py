"""CSR tensors built by torchnmf for its own kernels, without torch's beta notice.

A leaf module (torch only): :mod:`torchnmf.updates`, :mod:`torchnmf.streaming` and
:mod:`torchnmf.kernels` all build CSR tensors, and the updates must not import the kernels
package (which imports the updates to register its fast path).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Tuple

import torch
from torch import Tensor

__all__ = ["quiet_csr", "to_csr", "csr_tensor"]


@contextlib.contextmanager
def quiet_csr():
    """Silence torch's "sparse CSR tensor support is in beta" UserWarning inside the block only.

    torch emits it once per process at the first CSR tensor. torchnmf makes CSR tensors for
    its own kernels (the user did not ask for one), so it filters the notice around those calls
    only, never process-wide.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        yield


def to_csr(X: Tensor) -> Tensor:
    """``X.to_sparse_csr()`` (dense or sparse ``X``, shape ``(N, M)``) inside :func:`quiet_csr`."""
    with quiet_csr():
        return X.to_sparse_csr()


def csr_tensor(crow: Tensor, col: Tensor, values: Tensor, shape: Tuple[int, int]) -> Tensor:
    """A CSR tensor of shape ``shape`` from trusted parts (no invariant checks) inside :func:`quiet_csr`."""
    with quiet_csr():
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)
