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


# Overflow of the steered output (issue 21, item 3): refused at the first call, naming the site ----------------------
def _all_reals(d: int, omega: float, beta: float) -> UnitMap:
    return UnitMap(torch.full((d,), omega), torch.full((d,), beta))


@pytest.fixture
def half_llama(tiny_lm_factory):
    model, tok = tiny_lm_factory("llama", dtype=torch.float16)
    return model, tok(["hello there", "steer me"], return_tensors="pt", padding=True)


@pytest.mark.parametrize(("omega", "beta", "strength", "static"), [
    (1.0, 1e5, 1.0, True),  # an all-reals map whose offset alone leaves float16 (found before any output)
    (40.0, 0.0, 1000.0, False),  # an accepted strength whose slope sends the prefill's activations past 65504
], ids=["offset-beyond-range", "strength-1000"])
@pytest.mark.parametrize("scope", ["steer", "attach", "generate"])
def test_overflow_in_half_precision_is_refused_naming_the_site(half_llama, omega, beta, strength, static, scope):
    model, ids = half_llama
    t = Transport({"model.norm": _all_reals(64, omega, beta)})
    plain = model.generate(**ids, max_new_tokens=4, do_sample=False)
    match = r"Site 'model\.norm': .*beyond the range of torch\.float16.*float32.*smaller strength"
    with pytest.raises(ValueError, match=match):
        if scope == "steer":
            with actsteer.steer(model, t, strength=strength), torch.no_grad():
                model(**ids)
        elif scope == "attach":
            with actsteer.attach(model, t, strength=strength), torch.no_grad():
                for _ in range(2):  # refused at every call, not only the first (nothing cached)
                    with pytest.raises(ValueError, match=match):
                        model(**ids)
                model(**ids)
        else:
            actsteer.enable_steering(model)
            model.generate(**ids, max_new_tokens=4, do_sample=False, steering=actsteer.Steering(t, strength))
    assert _hooks(model) == 0 and torch.equal(model.generate(**ids, max_new_tokens=4, do_sample=False), plain)


def test_overflow_between_two_steered_sites_is_refused_naming_both(half_llama):
    """Steered values that each fit float16 can overflow the layers between two sites: here the MLP multiplies its
    steered gate and up projections (fit_lm's default sites), and the down projection receives inf. The issue's
    case: an all-reals map at an accepted strength gave NaN logits and token 0 repeated, without a word."""
    model, ids = half_llama
    sites = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    widths = {s: getattr(model.get_submodule(s), "out_features") for s in sites}
    t = Transport({s: _all_reals(widths[s], 60.0, 0.0) for s in sites})
    plain = model.generate(**ids, max_new_tokens=4, do_sample=False)
    match = (r"Site 'model\.layers\.0\.mlp\.down_proj': at strength 1000 the activations reaching it are inf/NaN: "
             r"steering at 'model\.layers\.0\.mlp\.up_proj' \(upstream\).*float32.*smaller strength")
    actsteer.enable_steering(model)
    with pytest.raises(ValueError, match=match):
        model.generate(**ids, max_new_tokens=4, do_sample=False, steering=actsteer.Steering(t, 1000.0))
    with actsteer.attach(model, t, strength=1000.0), torch.no_grad():
        for _ in range(2):  # every call, not only the first
            with pytest.raises(ValueError, match=match):
                model(**ids)
    with actsteer.steer(model, t, strength=0.001), torch.no_grad():  # a strength that fits runs, finite
        assert torch.isfinite(model(**ids).logits).all()
    assert _hooks(model) == 0 and torch.equal(model.generate(**ids, max_new_tokens=4, do_sample=False), plain)


def test_overflow_of_a_float32_map_with_a_huge_omega_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    t = Transport({"1": UnitMap(torch.full((8,), 1.5), torch.zeros(8))})
    path = t.save(tmp_path / "t")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["maps.0.omega"] = torch.full((8,), 1e38)  # finite float32: passed the NaN/Inf check
    save_file(tensors, str(path), metadata={k: v for k, v in meta.items() if k != "tensors_sha256"})
    with pytest.raises(ValueError, match=r"site '1' is unusable: `omega` has values of magnitude up to 1e\+38"):
        Transport.load(path)
    # built in memory (never loaded or saved): refused at the first call that overflows, naming the site
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Identity()).eval()
    with actsteer.steer(model, Transport({"1": UnitMap(torch.full((8,), 1e38), torch.zeros(8))})), torch.no_grad():
        with pytest.raises(ValueError, match=r"Site '1': .*beyond the range of torch\.float32"):
            model(torch.randn(4, 5) * 100)


def test_overflow_check_does_not_blame_steering_for_a_model_that_already_overflowed():
    model = torch.nn.Sequential(torch.nn.Identity())
    x = torch.tensor([[1.0, float("inf")], [float("nan"), 2.0]])
    with actsteer.steer(model, Transport({"0": _all_reals(2, 2.0, 1.0)})):
        out = model(x)
    assert out[0, 0] == 3.0 and out[1, 1] == 5.0 and torch.isinf(out[0, 1]) and torch.isnan(out[1, 0])


def test_overflow_check_runs_once_per_fold_not_per_call(monkeypatch, mlp, transport):
    from actsteer.core import engine

    seen = []
    check = engine._check_finite
    monkeypatch.setattr(engine, "_check_finite", lambda *a, **k: (seen.append(1), check(*a, **k))[1])
    with actsteer.steer(mlp, transport) as handle, torch.no_grad():
        for _ in range(5):
            mlp(torch.randn(3, 5))
        assert len(seen) == 1  # the first call checks; the next ones run the bound formula only (no host sync)
        handle.strength = 0.5
        for _ in range(3):
            mlp(torch.randn(3, 5))
        assert len(seen) == 2  # a new strength is a new fold: checked once again
        mlp(torch.randn(3, 5, dtype=torch.float64).float())
