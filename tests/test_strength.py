"""Strengths are validated where they enter, and half precision keeps large slopes exact (issue 10, engine side)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import actsteer
from actsteer import Steering, Transport, UnitMap
from actsteer.core.steering import MAX_STRENGTH, check_strength


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def mlp():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)).eval()


@pytest.fixture
def transport():
    g = torch.Generator().manual_seed(0)
    return Transport({"1": UnitMap(0.5 + torch.rand(8, generator=g), torch.randn(8, generator=g))})


BAD_STRENGTHS = [
    ("1.0", TypeError, r"number, got str '1\.0'; pass the number itself, e\.g\. strength=1\.0"),
    ("strong", TypeError, "number, got str"),
    (None, TypeError, "got NoneType None; 0 switches steering off"),
    (True, TypeError, "got bool"),
    ([1.0, 0.5], TypeError, r"torch\.tensor\(\[1\.0, 0\.5\]\)"),
    ((1.0,), TypeError, "got a tuple"),
    (float("nan"), ValueError, "must be finite, got nan"),
    (float("inf"), ValueError, "must be finite, got inf"),
    (-float("inf"), ValueError, "must be finite"),
    (1e30, ValueError, "far outside any useful range"),
    (torch.tensor([0.0, float("nan")]), ValueError, "must be finite"),
    (torch.ones(2, 2), TypeError, r"shape \(2, 2\)"),
    (torch.tensor([], dtype=torch.float32), ValueError, "empty tensor"),
    (np.array(["a", "b"]), TypeError, "could not be read as numbers|must be a number"),
    ({"1": float("nan")}, ValueError, r"strength\['1'\]"),
    ({"O": 1.0}, KeyError, r"\['O'\]"),
]


@pytest.mark.parametrize("value, error, message", BAD_STRENGTHS)
def test_bad_strength_is_refused_before_anything_is_attached(mlp, transport, value, error, message):
    with pytest.raises(error, match=message):
        Steering(transport, value)
    with pytest.raises(error, match=message):
        actsteer.attach(mlp, transport, strength=value)
    assert _hooks(mlp) == 0


GOOD_STRENGTHS = [
    (0.5, 0.5),
    (2, 2.0),
    (np.float32(0.25), 0.25),
    (np.float64(-1.0), -1.0),
    (torch.tensor(0.75), 0.75),
    (MAX_STRENGTH, MAX_STRENGTH),
]


@pytest.mark.parametrize("value, expected", GOOD_STRENGTHS)
def test_numbers_of_every_kind_are_accepted_as_floats(value, expected):
    out = check_strength(value)
    assert isinstance(out, float) and out == expected


def test_arrays_become_per_row_strengths(mlp, transport):
    x = torch.randn(3, 5)
    as_numpy = Steering(transport, np.array([0.0, 0.5, 1.0]))
    assert isinstance(as_numpy.strength, torch.Tensor) and as_numpy.strength.tolist() == [0.0, 0.5, 1.0]
    with torch.no_grad(), actsteer.steer(mlp, as_numpy):
        from_numpy = mlp(x)
    with torch.no_grad(), actsteer.steer(mlp, transport, strength=torch.tensor([0.0, 0.5, 1.0])):
        from_tensor = mlp(x)
    assert torch.equal(from_numpy, from_tensor)


def test_refused_strength_leaves_the_handle_unchanged(mlp, transport):
    x = torch.randn(4, 5)
    with torch.no_grad():
        handle = actsteer.attach(mlp, transport, strength=0.5)
        try:
            half = mlp(x)
            for bad in (float("nan"), "0.7", None, 1e30):
                with pytest.raises((TypeError, ValueError)):
                    handle.strength = bad
                assert handle.strength == 0.5
                assert torch.equal(mlp(x), half)
            with pytest.raises(KeyError):
                handle.set_strength({"typo": 1.0})
            assert handle.strength == 0.5
        finally:
            handle.remove()


def test_strength_list_sets_one_per_composed_transport(mlp, transport):
    other = Transport({"1": UnitMap(torch.full((8,), 1.5), torch.zeros(8))})
    x = torch.randn(4, 5)
    with torch.no_grad(), actsteer.steer(mlp, [transport, other]) as handle:
        handle.strength = [0.25, 0.0]
        assert handle.strength == [0.25, 0.0]
        got = mlp(x)
        with pytest.raises(ValueError, match="3 strengths for 2 composed"):
            handle.strength = [1.0, 1.0, 1.0]
        with pytest.raises(IndexError, match="composes 2"):
            handle.set_strength(1.0, index=5)
    with torch.no_grad(), actsteer.steer(mlp, transport, strength=0.25):
        assert torch.equal(got, mlp(x))


def test_set_enabled_switches_one_entry_without_refolding(mlp, transport):
    other = Transport({"1": UnitMap(torch.full((8,), 1.5), torch.zeros(8))})
    x = torch.randn(4, 5)
    with torch.no_grad():
        with actsteer.steer(mlp, transport):
            only_first = mlp(x)
        with actsteer.steer(mlp, [transport, other]) as handle:
            handle.set_enabled(1, False)
            folded = dict(handle._folded)
            assert torch.equal(mlp(x), only_first)
            handle.set_enabled(1, True)
            both = mlp(x)
            assert handle._folded == folded  # nothing was re-folded
    assert not torch.equal(both, only_first)


# Half precision ---------------------------------------------------------------------------------------------
def _steep_map(omega: float, lo: float, hi: float) -> UnitMap:
    """A unit map with slope ``omega`` that sends [lo, hi] near 0: a large slope and offset that cancel."""
    d = 4
    mid = (lo + hi) / 2
    return UnitMap(torch.full((d,), omega), torch.full((d,), -omega * mid),
                   lo=torch.full((d,), lo), hi=torch.full((d,), hi))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_large_slopes_exact(dtype):
    m = _steep_map(4000.0, 0.99, 1.01)
    x = torch.linspace(0.985, 1.015, 64).repeat(4, 1).T.contiguous()  # (64, 4), inside and outside the range
    x_half = x.to(dtype)
    xd = x_half.double()
    inside = (xd >= m.lo.double()) & (xd <= m.hi.double())
    exact = torch.where(inside, m.omega.double() * xd + m.beta.double(), xd)
    model = torch.nn.Sequential(torch.nn.Identity())
    with actsteer.steer(model, Transport({"0": m})):
        got = model(x_half)
    assert got.dtype == dtype
    # only the final rounding to the half dtype remains (the old path, rounding weights first, was off by ~0.4)
    tol = 2 * torch.finfo(dtype).eps * exact.abs().max().item() + 1e-3
    assert_close(got.double(), exact, rtol=0, atol=tol)
    kept = ~inside
    assert torch.equal(got[kept], x_half[kept])  # outside the support: untouched, bit for bit


def test_half_precision_refuses_a_map_beyond_the_dtype_range():
    m = UnitMap(torch.full((2,), 1e5), torch.zeros(2), lo=torch.full((2,), -1.0), hi=torch.full((2,), 1.0))
    model = torch.nn.Sequential(torch.nn.Identity())
    with actsteer.steer(model, Transport({"0": m})):
        with pytest.raises(ValueError, match=r"Site '0': .*beyond the range of torch\.float16.*float32"):
            model(torch.zeros(3, 2, dtype=torch.float16))
        assert torch.isfinite(model(torch.zeros(3, 2, dtype=torch.float32))).all()  # float32 is fine


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_bounds_agree_with_float32_membership(dtype):
    # bounds that are not representable in the half dtype: rounding them to nearest would admit or drop values
    lo, hi = 0.1234567, 0.5432109
    m = UnitMap(torch.full((1,), 2.0), torch.full((1,), 0.5), lo=torch.tensor([lo]), hi=torch.tensor([hi]))
    values = torch.arange(-2000, 2000, dtype=torch.float32)[:, None] / 2000  # every half value near the bounds
    x = values.to(dtype)
    inside = (x.float() >= torch.tensor(lo)) & (x.float() <= torch.tensor(hi))
    model = torch.nn.Sequential(torch.nn.Identity())
    with actsteer.steer(model, Transport({"0": m})):
        got = model(x)
    assert torch.equal(got != x, inside & (got != x))  # nothing outside the float32 range moved
    assert bool((got[inside] != x[inside]).float().mean() > 0.99)  # (nearly) everything inside moved
