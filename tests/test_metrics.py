import math

import numpy as np
import pytest
import torch

from torchnmf.metrics import beta_div, euclidean, is_div, kl_div, poisson_nll, sparseness

pytestmark = [pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")]


def ref_beta(x, y, beta):
    """numpy beta-divergence d(y | x) summed, with the KL / IS limits."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if beta == 1:
        return float(np.sum(np.where(y > 0, y * np.log(np.where(y > 0, y, 1) / x), 0) - y + x))
    if beta == 0:
        return float(np.sum(y / x - np.log(y / x) - 1))
    return float(np.sum(y ** beta + (beta - 1) * x ** beta - beta * y * x ** (beta - 1)) / (beta * (beta - 1)))


def pair(shape=(5, 4)):
    return (torch.rand(shape, dtype=torch.float64) + 0.1).requires_grad_(), torch.rand(shape, dtype=torch.float64) + 0.1


@pytest.mark.parametrize("beta", [0, 0.5, 1, 1.5, 2, 3])
def test_beta_div_values_and_gradcheck(beta):
    x, y = pair()
    assert float(beta_div(x, y, beta)) == pytest.approx(ref_beta(x.detach(), y, beta), rel=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: beta_div(a, b, beta), (x, y.requires_grad_()))


def test_special_cases_agree():
    x, y = pair()
    assert float(beta_div(x, y, 2)) == pytest.approx(float(euclidean(x, y)))
    assert float(beta_div(x, y, 1)) == pytest.approx(float(kl_div(x, y)))
    assert float(beta_div(x, y, 0)) == pytest.approx(float(is_div(x, y)))
    # the general formula tends to the limits
    assert float(beta_div(x, y, 1 + 1e-6)) == pytest.approx(float(kl_div(x, y)), rel=1e-4)
    assert float(beta_div(x, y, 1e-6)) == pytest.approx(float(is_div(x, y)), rel=1e-4)


@pytest.mark.parametrize("f", [kl_div, is_div, euclidean, poisson_nll])
def test_gradcheck_named(f):
    x, y = pair((3, 4))
    assert torch.autograd.gradcheck(f, (x, y.requires_grad_()) if f is not poisson_nll else (x, y))


def test_zero_targets():
    x = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    y = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    for beta in (0.5, 1, 1.5, 2, 3):
        v = float(beta_div(x, y, beta))
        assert math.isfinite(v) and v == pytest.approx(ref_beta(x.clamp_min(1e-300), y, beta), rel=1e-9)


def test_sparseness():
    assert float(sparseness(torch.ones(10))) == pytest.approx(0.0, abs=1e-7)
    e = torch.zeros(10)
    e[3] = 2.0
    assert float(sparseness(e)) == pytest.approx(1.0)
    x = torch.rand(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sparseness, (x,))
    with pytest.raises(ValueError, match="2 entries"):
        sparseness(torch.ones(1))


def test_poisson_nll_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rate = torch.rand(6, dtype=torch.float64) + 0.5
    k = torch.tensor([0.0, 1, 2, 5, 0, 3], dtype=torch.float64)
    ref = -stats.poisson.logpmf(k.numpy(), rate.numpy()).sum()
    assert float(poisson_nll(rate, k)) == pytest.approx(ref, rel=1e-12)


def test_sparseness_of_zero_vector_is_an_error():
    with pytest.raises(ValueError, match="all-zero"):
        sparseness(torch.zeros(5))


def test_overflowing_divergences_raise_naming_the_arguments():
    # issue 22 item 5: inf/NaN returned without an error for finite float32 arguments
    pred = torch.rand(6, 5, generator=torch.Generator().manual_seed(0)) + 0.1
    big = torch.poisson(torch.full((6, 5), 3.0), generator=torch.Generator().manual_seed(0)) + 1
    one = big.clone()
    one[1, 2] = 3e38
    cases = [(euclidean, big * 1e20), (lambda x, y: beta_div(x, y, 3), big * 1e20),
             (poisson_nll, one), (lambda x, y: is_div(x / 100, y), one), (kl_div, one),
             (lambda x, y: beta_div(x, y, 1.5), one)]
    for fn, target in cases:
        with pytest.raises(ValueError, match="overflow float32.*input and target|overflow float32.*rate and counts"):
            fn(pred, target)
        assert torch.isfinite(fn(pred.double(), target.double()))  # float64 has the range
    with pytest.raises(ValueError, match="zero in input and target"):
        is_div(pred, torch.zeros(6, 5))  # a zero target: the divergence is infinite
    # NaN or inf in, NaN or inf out (documented)
    assert torch.isnan(euclidean(pred, torch.full((6, 5), math.nan)))


# -- issue 22.10: arguments that are not tensors -------------------------------------------------
@pytest.mark.parametrize("beta", [2, 1, 0.5, 0, 1.5, 3, -1])
@pytest.mark.parametrize("which", ["input", "target"])
def test_beta_div_refuses_scipy_by_name_without_touching_it(beta, which):
    import scipy.sparse as sp

    A = sp.csr_matrix((np.array([5.0, 7.0, 1.0, 2.0]), np.array([2, 0, 1, 0]), np.array([0, 2, 3, 4])), shape=(3, 3))
    assert not A.has_sorted_indices
    indices, data = A.indices.copy(), A.data.copy()
    T = torch.ones(3, 3, dtype=torch.float64)
    args = (A, T) if which == "input" else (T, A)
    with pytest.raises(TypeError, match=rf"^{which} must be a torch.Tensor, got csr_matrix"):
        beta_div(*args, beta=beta)
    # scipy's own operators (target == 0) sorted the caller's indices in place
    np.testing.assert_array_equal(A.indices, indices)
    np.testing.assert_array_equal(A.data, data)


def test_metrics_name_non_tensor_arguments():

    T = torch.ones(2, 2)
    for fn in (kl_div, is_div, euclidean):
        with pytest.raises(TypeError, match="target must be a torch.Tensor, got ndarray"):
            fn(T, np.ones((2, 2)))
    with pytest.raises(TypeError, match="counts must be a torch.Tensor, got list"):
        poisson_nll(T, [[1.0, 2.0], [0.0, 1.0]])
