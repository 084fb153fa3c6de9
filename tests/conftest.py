"""Shared fixtures: keep this file small; add fixtures others need at the end."""
import pytest
import torch


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same random state."""
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled digits: a (1797, 64) float64 tensor of counts 0..16."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    X = sklearn_datasets.load_digits().data
    return torch.as_tensor(X, dtype=torch.float64)


@pytest.fixture(autouse=True)
def single_thread():
    """Run every test on one intra-op thread, then restore.

    The suite's problems are small, and CI's 2 cores are shared: OpenMP threads there cost far
    more in contention than they gain.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
