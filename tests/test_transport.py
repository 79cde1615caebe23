"""`UnitMap` strength semantics and folding, `FoldedMap.apply_spatial`, and the `Transport` container
(ACT_SPEC.md sections 3-4)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from actsteer import Transport, UnitMap

INF = float("inf")


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def ranged_map() -> UnitMap:
    """Four units with a support range; bounds are exact in bf16/fp16. The last unit has omega 0."""
    return UnitMap(
        omega=torch.tensor([2.0, 0.5, 1.0, 0.0]),
        beta=torch.tensor([1.0, -1.0, 3.0, 2.0]),
        lo=torch.tensor([-1.0, 0.0, -INF, -2.0]),
        hi=torch.tensor([1.0, 2.0, INF, 2.0]),
        target_lo=torch.tensor([-1.0, -1.0, -INF, 2.0]),  # T(lo)
        target_hi=torch.tensor([3.0, 0.0, INF, 2.0]),  # T(hi)
    )


@pytest.fixture
def global_map() -> UnitMap:
    """Support = all reals, every unit invertible."""
    return UnitMap(omega=torch.tensor([2.0, 0.5, 1.0, 3.0]), beta=torch.tensor([1.0, -1.0, 3.0, -0.5]))


@pytest.fixture
def x(gen) -> torch.Tensor:
    """(B, T, D) = (3, 5, 4), spread so that some values fall outside `ranged_map`'s support."""
    return 2.0 * torch.randn(3, 5, 4, generator=gen)


def _forward(m: UnitMap, x: torch.Tensor, s: float) -> torch.Tensor:
    """The closed form T_s(x) = x + s((omega - 1) x + beta) on [lo, hi], x elsewhere (float64)."""
    x64 = x.double()
    moved = x64 + s * ((m.omega.double() - 1) * x64 + m.beta.double())
    inside = (x64 >= m.lo.double()) & (x64 <= m.hi.double())
    return torch.where(inside, moved, x64)


# UnitMap.__call__ -----------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.0, 0, -0.0, torch.zeros(3)])
def test_unitmap_strength_zero_is_bit_identical(ranged_map, global_map, x, strength):
    for m in (ranged_map, global_map):
        out = m(x, strength)
        assert torch.equal(out, x)
        assert out.data_ptr() != x.data_ptr()  # a new tensor, not the input


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unitmap_strength_zero_is_bit_identical_in_half_precision(ranged_map, x, dtype):
    xh = x.to(dtype)
    assert torch.equal(ranged_map(xh, 0.0), xh)


def test_unitmap_strength_one_is_affine_map(global_map, x):
    expected = global_map.omega * x + global_map.beta
    assert_close(global_map(x, 1.0), expected, rtol=1e-6, atol=1e-6)
    assert_close(global_map(x), expected, rtol=1e-6, atol=1e-6)  # 1 is the default


def test_unitmap_values_outside_support_untouched_bounds_inclusive(ranged_map):
    # one column per unit: below lo, at lo, inside, at hi, above hi
    x = torch.tensor(
        [
            [-1.5, -0.5, -5.0, -3.0],
            [-1.0, 0.0, -1.0, -2.0],
            [0.25, 1.0, 0.0, 0.5],
            [1.0, 2.0, 1.0, 2.0],
            [1.5, 2.5, 5.0, 3.0],
        ]
    )
    out = ranged_map(x, 1.0)
    inside = (x >= ranged_map.lo) & (x <= ranged_map.hi)
    assert inside[1:4, [0, 1, 3]].all() and not inside[[0, 4]][:, [0, 1, 3]].any()  # bounds count as inside
    assert torch.equal(out[~inside], x[~inside])
    assert_close(out[inside], (ranged_map.omega * x + ranged_map.beta)[inside], rtol=0.0, atol=0.0)
    assert_close(out, _forward(ranged_map, x, 1.0).float(), rtol=0.0, atol=0.0)


@pytest.mark.parametrize("strength", [0.25, 0.5, 0.8])
def test_unitmap_fractional_strength_interpolates_linearly(ranged_map, x, strength):
    full = ranged_map(x, 1.0)
    assert_close(ranged_map(x, strength), (1 - strength) * x + strength * full, rtol=1e-6, atol=1e-6)
    assert_close(ranged_map(x, strength), _forward(ranged_map, x, strength).float(), rtol=1e-6, atol=1e-6)


def test_unitmap_strength_above_one_extrapolates(ranged_map, x):
    out = ranged_map(x, 2.0)
    assert_close(out, 2 * ranged_map(x, 1.0) - x, rtol=1e-6, atol=1e-5)
    outside = (x < ranged_map.lo) | (x > ranged_map.hi)
    assert outside.any() and torch.equal(out[outside], x[outside])  # never clamped, never spilled


def test_unitmap_negative_strength_is_inverse_on_target_range(ranged_map):
    # unit 0: omega 2, beta 1, target range [-1, 3]; unit 1: omega 0.5, beta -1, target range [-1, 0]
    z = torch.tensor(
        [[-2.0, -1.5, 0.0, 9.0], [-1.0, -1.0, 1.0, 2.0], [0.5, -0.5, 2.0, 2.0], [3.0, 0.0, 3.0, 3.0],
         [4.0, 0.5, 4.0, 1.0]]
    )
    out = ranged_map(z, -1.0)
    expected = z.clone()
    for unit in (0, 1, 2):
        omega, beta = ranged_map.omega[unit], ranged_map.beta[unit]
        inside = (z[:, unit] >= ranged_map.target_lo[unit]) & (z[:, unit] <= ranged_map.target_hi[unit])
        expected[inside, unit] = (z[inside, unit] - beta) / omega
    assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[[0, 4], :2], z[[0, 4], :2])  # outside the target range: untouched
    half = ranged_map(z, -0.5)
    assert_close(half, z + 0.5 * (expected - z), rtol=1e-6, atol=1e-6)


def test_unitmap_forward_then_reverse_recovers_input(global_map, x):
    there = global_map(x, 1.0)
    back = global_map(there, -1.0)
    assert_close(back, x, rtol=1e-6, atol=1e-5)
    assert_close(global_map(global_map(x, -1.0), 1.0), x, rtol=1e-6, atol=1e-5)


def test_unitmap_reverse_leaves_uninvertible_units_identity(gen):
    m = UnitMap(omega=torch.tensor([0.0, 1e-9, 2.0]), beta=torch.tensor([2.0, 1.0, 1.0]))
    z = torch.randn(6, 3, generator=gen)
    for strength in (-1.0, -0.5, -2.0):
        out = m(z, strength)
        assert torch.equal(out[:, :2], z[:, :2])
        assert torch.isfinite(out).all()
    assert_close(m(z, -1.0)[:, 2], (z[:, 2] - 1.0) / 2.0, rtol=1e-6, atol=1e-6)


def test_unitmap_per_row_strengths_apply_per_row(ranged_map, x):
    strength = torch.tensor([0.0, 1.0, -0.5])
    out = ranged_map(x, strength)  # (3, 5, 4) with one strength per row
    assert out.shape == x.shape
    assert torch.equal(out[0], x[0])
    for row, s in enumerate(strength.tolist()):
        assert_close(out[row], ranged_map(x[row], s), rtol=1e-6, atol=1e-6)
    flat = ranged_map(x[:, 0], strength)  # (R, D) inputs too
    for row, s in enumerate(strength.tolist()):
        assert_close(flat[row], ranged_map(x[row, 0], s), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
def test_unitmap_keeps_half_precision_dtype(ranged_map, x, dtype, tol, strength):
    xh = x.to(dtype)
    out = ranged_map(xh, strength)
    assert out.dtype == dtype
    assert_close(out.float(), ranged_map(xh.float(), strength), rtol=tol, atol=tol)


def test_unitmap_never_modifies_input(ranged_map, x):
    before = x.clone()
    for strength in (0.0, 1.0, 0.5, 2.0, -1.0, torch.tensor([1.0, -1.0, 0.5])):
        ranged_map(x, strength)
        ranged_map.fold(strength).apply_last(x)
    assert torch.equal(x, before)


def test_unitmap_fold_is_weight_and_bias(ranged_map, global_map):
    folded = ranged_map.fold(0.5)
    assert_close(folded.weight, torch.tensor([1.5, 0.75, 1.0, 0.5]), rtol=0.0, atol=0.0)
    assert_close(folded.bias, torch.tensor([0.5, -0.5, 1.5, 1.0]), rtol=0.0, atol=0.0)
    assert torch.equal(folded.lo, ranged_map.lo) and torch.equal(folded.hi, ranged_map.hi)
    assert folded.masked and not global_map.fold(0.5).masked
    reverse = ranged_map.fold(-1.0)  # bounds switch to the target's
    assert torch.equal(reverse.lo, ranged_map.target_lo) and torch.equal(reverse.hi, ranged_map.target_hi)
    per_row = ranged_map.fold(torch.tensor([1.0, -1.0]))
    assert per_row.weight.shape == (2, 4) and torch.equal(per_row.lo[1], ranged_map.target_lo)


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), torch.ones(2, 2)])
def test_unitmap_fold_rejects_bad_strength(ranged_map, strength):
    with pytest.raises(ValueError, match="`strength` must be"):
        ranged_map.fold(strength)


def test_unitmap_rejects_width_mismatch(ranged_map):
    with pytest.raises(ValueError, match="last dim is 4 units, got shape \\(2, 3\\)"):
        ranged_map(torch.zeros(2, 3))


def test_unitmap_constructor_validates_and_defaults():
    m = UnitMap(omega=torch.ones(3, dtype=torch.float64), beta=[0.0, 1.0, 2.0])
    assert m.dim == 3 and m.omega.dtype == torch.float32 and m.beta.dtype == torch.float32
    assert torch.equal(m.lo, torch.full((3,), -INF)) and torch.equal(m.target_hi, torch.full((3,), INF))
    assert m.dead.dtype == torch.bool and not m.dead.any() and not m.has_support
    with pytest.raises(ValueError, match="`beta` must have shape \\(3,\\) like `omega`, got \\(2,\\)"):
        UnitMap(omega=torch.ones(3), beta=torch.ones(2))
    with pytest.raises(ValueError, match="`omega` must have shape \\(D,\\)"):
        UnitMap(omega=torch.ones(2, 3), beta=torch.ones(3))
    with pytest.raises(ValueError, match="`dead` must have shape \\(3,\\)"):
        UnitMap(omega=torch.ones(3), beta=torch.ones(3), dead=torch.zeros(2, dtype=torch.bool))


def test_unitmap_repr_summarises(ranged_map):
    assert repr(ranged_map) == "UnitMap(D=4, omega=[0, 2], mean|beta|=1.75, support=range, dead=0)"


# FoldedMap.apply_spatial (the 4-D rule) --------------------------------------------------------------


@pytest.fixture
def spatial_map() -> UnitMap:
    # dyadic values: every step below is exact in float32
    return UnitMap(
        omega=torch.tensor([2.0, 0.5, 1.0]),
        beta=torch.tensor([0.5, -1.0, 0.25]),
        lo=torch.tensor([-4.0, -4.0, -4.0]),
        hi=torch.tensor([4.0, 4.0, 1.0]),
    )


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_folded_map_apply_spatial_moves_mean_keeps_deviations(spatial_map, gen, strength):
    x = torch.randint(-8, 9, (2, 3, 2, 2), generator=gen).float()  # (B, C, H, W)
    x[1, 2] += 6.0  # sample 1, channel 2: spatial mean above hi, so it is left alone
    mu = x.mean(dim=(2, 3))
    assert mu[1, 2] > 1.0 and (mu[0] <= 4.0).all() and (mu[0] >= -4.0).all()
    before = x.clone()
    out = spatial_map.fold(strength).apply_spatial(x)
    assert torch.equal(x, before)
    deviations = lambda t: t - t.mean(dim=(2, 3), keepdim=True)  # noqa: E731
    assert torch.equal(deviations(out), deviations(x))
    expected_mu = torch.where(
        (mu >= spatial_map.lo) & (mu <= spatial_map.hi),
        mu + strength * ((spatial_map.omega - 1) * mu + spatial_map.beta),
        mu,
    )
    assert torch.equal(out.mean(dim=(2, 3)), expected_mu)
    assert torch.equal(out[1, 2], x[1, 2])


def test_folded_map_apply_spatial_per_row_strengths(spatial_map, gen):
    x = torch.randn(2, 3, 4, 4, generator=gen)
    out = spatial_map.fold(torch.tensor([1.0, 0.0])).apply_spatial(x)
    assert torch.equal(out[1], x[1])
    assert_close(out[0:1], spatial_map.fold(1.0).apply_spatial(x[0:1]), rtol=1e-6, atol=1e-6)


# Transport ------------------------------------------------------------------------------------------


def _map(d: int, seed: int) -> UnitMap:
    g = torch.Generator().manual_seed(seed)
    return UnitMap(omega=torch.rand(d, generator=g) + 0.5, beta=torch.randn(d, generator=g))


@pytest.fixture
def transport() -> Transport:
    maps = {"z.b": _map(4, 1), "a.c:1": _map(3, 2), "m": _map(2, 3), "layers.10.mlp": _map(5, 4)}
    return Transport(
        maps, method="mean-act", pooling="last", support=(0.01, 0.99), mode="at-once", n_source=7, n_target=9,
        model={"class": "Toy", "name_or_path": "tiny/toy"}, description="test", extra={"seed": 0},
    )


def test_transport_behaves_as_ordered_mapping(transport):
    assert len(transport) == 4
    assert list(transport) == ["z.b", "a.c:1", "m", "layers.10.mlp"] == transport.sites
    assert list(transport.keys()) == transport.sites
    assert "a.c:1" in transport and "a.c" not in transport
    assert transport.get("nope") is None
    assert [m.dim for m in transport.values()] == [4, 3, 2, 5]
    assert dict(transport.items())["m"] is transport["m"]


def test_transport_getitem_missing_site_lists_sites(transport):
    with pytest.raises(KeyError) as info:
        transport["a.c"]
    assert info.value.args[0] == "Site 'a.c' is not in this transport; it has: z.b, a.c:1, m, layers.10.mlp"


def test_transport_metadata_round_trips_arguments(transport):
    assert transport.metadata() == {
        "method": "mean-act", "pooling": "last", "support": [0.01, 0.99], "mode": "at-once",
        "sites": ["z.b", "a.c:1", "m", "layers.10.mlp"], "n_source": 7, "n_target": 9,
        "model": {"class": "Toy", "name_or_path": "tiny/toy"}, "description": "test", "extra": {"seed": 0},
    }


def test_transport_constructor_rejects_bad_input():
    with pytest.raises(TypeError, match="Transport values must be UnitMap, got Tensor for site 's'"):
        Transport({"s": torch.ones(3)})
    with pytest.raises(ValueError, match="Site 's' appears twice"):
        Transport([("s", _map(2, 0)), ("s", _map(2, 1))])
    with pytest.raises(TypeError, match="not JSON serializable"):
        Transport({"s": _map(2, 0)}, extra={"bad": object()})


def test_transport_select_list_keeps_only_named_sites(transport):
    picked = transport.select(["z.b", "m"])
    assert picked.sites == ["z.b", "m"] and picked["m"] is transport["m"]
    assert picked.method == "mean-act" and picked.support == [0.01, 0.99]
    assert len(transport) == 4  # the original is unchanged


def test_transport_select_regex_matches_in_full(transport):
    assert transport.select(r"[a-z]\.[a-z](:\d)?").sites == ["z.b", "a.c:1"]
    assert transport.select(r"layers\.\d+\.mlp").sites == ["layers.10.mlp"]
    assert transport.select("m").sites == ["m"]  # full match: 'layers.10.mlp' is not picked


def test_transport_select_bad_names_raise(transport):
    with pytest.raises(KeyError, match="Site 'nope' is not in this transport; it has: z.b"):
        transport.select(["m", "nope"])
    with pytest.raises(ValueError, match=r"Pattern 'blocks\\\\..\*' matches no site of this transport \(4 sites\)"):
        transport.select(r"blocks\..*")


def test_transport_replace_returns_new_object_original_unchanged(transport):
    before = transport.metadata()
    other = transport.replace(method="caa", description="changed")
    assert other is not transport and isinstance(other, Transport)
    assert other.method == "caa" and other.description == "changed" and other.sites == transport.sites
    assert transport.metadata() == before
    fewer = transport.replace({"m": transport["m"]})
    assert fewer.sites == ["m"] and len(transport) == 4
    assert fewer.method == "mean-act" and fewer.n_source == 7


def test_transport_equality_compares_tensors_and_metadata(transport):
    copy = Transport(
        {s: UnitMap(**{k: v.clone() for k, v in m.to_tensors().items()}) for s, m in transport.items()},
        **{k: v for k, v in transport.metadata().items() if k != "sites"},
    )
    assert copy == transport and copy is not transport
    assert transport.replace(description="other") != transport
    tweaked = dict(transport.items())
    tweaked["m"] = UnitMap(omega=transport["m"].omega, beta=transport["m"].beta + 1e-6)
    assert transport.replace(tweaked) != transport
    reordered = transport.replace(dict(reversed(list(transport.items()))))
    assert reordered != transport  # order is part of the transport
    assert transport != "not a transport"
    with pytest.raises(TypeError):
        hash(transport)


def test_transport_repr_summarises(transport):
    assert repr(transport) == (
        "Transport(method='mean-act', sites=4 [z.b, a.c:1, m, ...], units=14, pooling='last', "
        "support=[0.01, 0.99], mode='at-once', n_source=7, n_target=9, model='tiny/toy')"
    )
