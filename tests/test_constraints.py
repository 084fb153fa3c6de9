import copy
import io
import pickle

import pytest
import torch
from torch import nn

from torchnmf.constraints import (MODES, PositiveParameter, assign_, attach_projection, gradient_parameters,
                                  mode_of, multiplicative_parameters, positive, positive_parameters, project_,
                                  value_of)


class Box(nn.Module):
    def __init__(self, mode, value=None):
        super().__init__()
        self.A = torch.rand(4, 3, dtype=torch.float64) if value is None else value
        positive(self, "A", mode)


def raw_of(m):
    return m.parametrizations.A.original if hasattr(m, "parametrizations") else m.A


@pytest.mark.parametrize("mode", MODES)
def test_value_roundtrip_and_raw(mode):
    v = torch.rand(4, 3, dtype=torch.float64)
    m = Box(mode, v.clone())
    raw = raw_of(m)
    assert isinstance(raw, PositiveParameter) and mode_of(raw) == mode
    torch.testing.assert_close(m.A, v)
    torch.testing.assert_close(value_of(raw), v)
    new = torch.rand(4, 3, dtype=torch.float64)
    assign_(raw, new)
    torch.testing.assert_close(m.A, new)


@pytest.mark.parametrize("mode", MODES)
def test_deepcopy_pickle_to_dtype_state_dict(mode):
    m = Box(mode)
    c = copy.deepcopy(m)
    assert mode_of(raw_of(c)) == mode and torch.equal(c.A, m.A)
    raw = pickle.loads(pickle.dumps(raw_of(m)))
    assert mode_of(raw) == mode and torch.equal(raw, raw_of(m))
    if mode in ("projected", "multiplicative"):
        # torch pickles whole modules only without parametrizations (softplus/exp: use state_dict)
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert mode_of(raw_of(loaded)) == mode and torch.equal(loaded.A, m.A)
    f = copy.deepcopy(m).float()
    assert f.A.dtype == torch.float32 and mode_of(raw_of(f)) == mode
    other = Box(mode)
    other.load_state_dict(m.state_dict())
    assert torch.equal(other.A, m.A)


def test_convert_mode_keeps_value_and_flags():
    m = Box("softplus")
    v = m.A.detach().clone()
    positive(m, "A", "exp", requires_grad=False)
    torch.testing.assert_close(m.A, v)
    assert mode_of(raw_of(m)) == "exp" and not raw_of(m).requires_grad
    positive(m, "A", "projected")
    torch.testing.assert_close(m.A, v)
    assert not raw_of(m).requires_grad


def test_parameter_selectors():
    a, b = Box("multiplicative"), Box("softplus")
    seq = nn.Sequential(a, b)
    assert [mode_of(p) for p in positive_parameters(seq)] == ["multiplicative", "softplus"]
    assert [mode_of(p) for p in gradient_parameters(seq)] == ["softplus"]
    assert [mode_of(p) for p in multiplicative_parameters(seq)] == ["multiplicative"]


def test_projection_with_adam():
    m = Box("projected")
    target = torch.zeros(4, 3, dtype=torch.float64) - 1.0  # pulls values below zero
    opt = torch.optim.Adam(gradient_parameters(m), lr=0.5)
    handle = attach_projection(opt)
    for _ in range(5):
        opt.zero_grad()
        ((m.A - target) ** 2).sum().backward()
        opt.step()
        assert bool((m.A >= 0).all())
    handle.remove()
    opt.zero_grad()
    ((m.A - target) ** 2).sum().backward()
    opt.step()
    assert bool((m.A < 0).any())
    project_(m)
    assert bool((m.A >= 0).all())


@pytest.mark.parametrize("mode", ["softplus", "exp"])
def test_transformed_modes_with_adam_stay_positive(mode):
    m = Box(mode)
    opt = torch.optim.Adam(gradient_parameters(m), lr=0.3)
    for _ in range(10):
        opt.zero_grad()
        (m.A.sum()).backward()
        opt.step()
    assert bool((m.A > 0).all())


def test_errors():
    with pytest.raises(ValueError, match="mode"):
        Box("relu")
    with pytest.raises(ValueError, match="non-negative"):
        Box("softplus", -torch.ones(2, 2))
    m = nn.Module()
    m.x = 3.0
    with pytest.raises(TypeError, match="x must be a tensor"):
        positive(m, "x")
