"""Tests of torchnmf._special (a faster float32 digamma for the variational updates)."""
import torch

from torchnmf._special import digamma_positive, digamma_series


def _wide(dtype):
    x = torch.logspace(-8, 30, 20001, dtype=torch.float64)
    root = torch.tensor([1.4616321449683622, 0.3, 1.0, 2.0, 5.999, 6.0], dtype=torch.float64)
    return torch.cat([x, root]).to(dtype)


def test_series_equals_torch_digamma_in_float64():
    """The recurrence + asymptotic series is the same function: float64 to 1e-12 (absolute
    where digamma is near its root, relative elsewhere)."""
    x = _wide(torch.float64)
    ref = torch.digamma(x)
    err = (digamma_series(x) - ref).abs() / ref.abs().clamp_min(1.0)
    assert float(err.max()) < 1e-12


def test_float32_as_accurate_as_torch():
    x = _wide(torch.float32).reshape(-1, 3)  # numel >= 4096: the series path
    exact = torch.digamma(x.double())
    ours = digamma_positive(x)
    assert ours.dtype == torch.float32 and ours.shape == x.shape
    err = ((ours.double() - exact).abs() / exact.abs().clamp_min(1.0)).max()
    err_torch = ((torch.digamma(x).double() - exact).abs() / exact.abs().clamp_min(1.0)).max()
    assert float(err) < 2e-6 and float(err) <= 2 * float(err_torch)


def test_float64_and_small_inputs_are_torch_exactly():
    x = torch.rand(100, 50, dtype=torch.float64) + 0.1
    assert torch.equal(digamma_positive(x), torch.digamma(x))
    small = torch.rand(10, 3) + 0.1
    assert torch.equal(digamma_positive(small), torch.digamma(small))
    y = torch.rand(100, 50) + 0.1
    kept = y.clone()
    digamma_positive(y)
    assert torch.equal(y, kept)  # the input is not modified


def test_special_values():
    x = torch.tensor([0.0, float("inf"), float("nan")] + [1.0] * 5000)
    out = digamma_positive(x)
    assert out[0] == -float("inf") and out[1] == float("inf") and bool(torch.isnan(out[2]))
    torch.testing.assert_close(out[3:], torch.full((5000,), -0.5772156649015329), rtol=1e-6, atol=1e-6)


def test_parameters_under_no_grad_take_the_series_and_autograd_still_works():
    p = torch.nn.Parameter(torch.rand(100, 50) + 0.1)
    with torch.no_grad():
        fast = digamma_positive(p)
    torch.testing.assert_close(fast, digamma_series(p.detach()), rtol=0, atol=0)
    out = digamma_positive(p)  # recorded by autograd: torch's, with its derivative
    out.sum().backward()
    torch.testing.assert_close(p.grad, torch.polygamma(1, p.detach()))
