"""The per-call path (`actsteer.core.apply`, `masked_affine`, `FoldedMap` per-row tables): bit for bit the plain
``where(lo <= x <= hi, x * w + b, x)`` form, on every path (fast, general, per-row, half precision, a whole model)."""

from __future__ import annotations

import pytest
import torch

import actsteer
from actsteer.core.apply import make_applier, transport_traced
from actsteer.core.folding import masked_affine

INF = float("inf")


def _where_form(x, w, b, lo, hi):
    """The reference formula (the per-call path before the float-only rewrite): addcmul inside a where."""
    moved = torch.where(torch.clamp(x, lo, hi) == x, torch.addcmul(b, x, w), x)
    return moved.to(x.dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns (so -0.0 differs from 0.0), with every NaN as one pattern (payloads carry no meaning)."""
    as_int = t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])
    return torch.where(t.isnan(), torch.full_like(as_int, -1), as_int)


@pytest.fixture
def unit_map() -> actsteer.UnitMap:
    g = torch.Generator().manual_seed(0)
    d = 16
    lo, hi = torch.full((d,), -1.5), torch.full((d,), 1.5)
    lo[:3], hi[3:6] = -INF, INF  # some units unbounded on one side
    return actsteer.UnitMap(1 + torch.randn(d, generator=g), torch.randn(d, generator=g), lo=lo, hi=hi,
                            target_lo=lo - 0.5, target_hi=hi + 0.5)


def _x(shape, dtype=torch.float32, seed=1, nan=True):
    x = 2.0 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    flat = x.view(-1)
    flat[:4], flat[4:8] = 0.0, -0.0  # signed zeros
    if nan:
        flat[8] = float("nan")
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 16), (3, 7, 16), (5, 16)])
def test_masked_affine_is_the_where_form_bit_for_bit(unit_map, dtype, shape):
    fm = unit_map.fold(0.7).to("cpu", dtype)
    x = _x(shape, dtype)
    out = masked_affine(x, fm.weight, fm.bias, fm.lo, fm.hi)
    assert out.dtype == dtype
    assert torch.equal(_bits(out), _bits(_where_form(x, fm.weight, fm.bias, fm.lo, fm.hi)))  # NaN and -0.0 too
    assert torch.equal(_bits(masked_affine(x, fm.weight, fm.bias, None, None)),
                       _bits(torch.addcmul(fm.bias, x, fm.weight).to(dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0, 2.0])
@pytest.mark.parametrize("shape", [(2, 5, 16), (6, 16), (2, 16, 3, 4)])
def test_make_applier_fast_path_equals_folded_map(unit_map, dtype, strength, shape):
    base = unit_map.fold(strength)
    x = _x(shape, dtype)
    calls: dict[str, int] = {}
    apply = make_applier(base, x, site="s", dim=16, apply_to="all", positions=lambda: None, calls=calls)
    fm = base.to("cpu", dtype)
    expected = fm.apply_spatial(x) if x.dim() == 4 else fm.apply_last(x)
    for _ in range(2):
        assert torch.equal(_bits(apply(x)), _bits(expected))
    assert calls == {"s": 2}
    traced = transport_traced(base, x, site="s", dim=16, apply_to="all", where=None)
    assert torch.equal(_bits(traced), _bits(expected))


def test_make_applier_names_the_site_on_a_wrong_width(unit_map):
    x = torch.zeros(2, 3, 16)
    apply = make_applier(unit_map.fold(1.0), x, site="blocks.3", dim=16, apply_to="all", positions=lambda: None,
                         calls={})
    with pytest.raises(ValueError, match="Site 'blocks.3': the transport has 16 units but .* shape \\(2, 3, 8\\)"):
        apply(torch.zeros(2, 3, 8))
    with pytest.raises(TypeError, match="Site 'blocks.3' returned a torch.int64 tensor"):
        make_applier(unit_map.fold(1.0), torch.zeros(2, 16, dtype=torch.long), site="blocks.3", dim=16,
                     apply_to="all", positions=lambda: None, calls={})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [[0.0, 1.0, 0.0, 0.5], [1.0, -1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
@pytest.mark.parametrize("shape", [(4, 3, 16), (4, 16), (4, 16, 2, 2)])
def test_per_row_fold_gives_each_row_its_scalar_result_bit_for_bit(unit_map, dtype, rows, shape):
    x = _x(shape, dtype, nan=False)
    fm = unit_map.fold(torch.tensor(rows)).to("cpu", dtype)
    out = fm.apply_spatial(x) if x.dim() == 4 else fm.apply_last(x)
    for r, s in enumerate(rows):
        one = unit_map.fold(s).to("cpu", dtype)
        alone = one.apply_spatial(x[r : r + 1]) if x.dim() == 4 else one.apply_last(x[r : r + 1])
        assert torch.equal(out[r : r + 1], alone), f"row {r} (strength {s})"  # (the sign of a zero may differ)
        if s == 0.0:
            assert torch.equal(out[r], x[r])  # strength 0 rows are untouched


def test_per_row_fold_keeps_one_table_row_per_distinct_strength(unit_map):
    strengths = torch.zeros(512)
    strengths[100:300] = 1.0
    fm = unit_map.fold(strengths)
    assert fm.weight.shape == (2, 16) and fm.lo.shape == (16,)  # no (512, 16) work; one support for all rows
    assert fm.rows.tolist() == [0] * 100 + [1] * 200 + [0] * 212
    again = unit_map.fold(strengths.roll(7))  # new rows, same values: the same folded tables, nothing refolded
    assert again.weight is fm.weight and again.bias is fm.bias
    mixed = unit_map.fold(torch.tensor([1.0, -1.0]))  # different supports: bounds per table row
    assert torch.equal(mixed.lo[1], unit_map.target_lo) and torch.equal(mixed.lo[0], unit_map.lo)


def test_handle_per_row_set_strength_refolds_tables_not_rows(unit_map):
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    transport = actsteer.Transport({"0": unit_map})
    x = _x((8, 16), nan=False)
    with torch.no_grad():
        plain = model(x)
    full = unit_map.fold(1.0).apply_last(plain)
    handle = actsteer.attach(model, transport, strength=torch.zeros(8))
    try:
        for step in range(3):
            s = torch.zeros(8)
            s[step : step + 3] = 1.0
            handle.set_strength(s)
            with torch.no_grad():
                out = model(x)
            assert handle._folded[(0, "0")].weight.shape == (2, 16)
            assert torch.equal(out[step : step + 3], full[step : step + 3])
            assert torch.equal(out[s == 0], plain[s == 0])
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_steered_model_equals_reference_where_hooks_bit_for_bit(tiny_lm_factory, arch):
    """The whole model, greedy tokens included, is what the where-form hooks give (today's results kept)."""
    model, tok = tiny_lm_factory(arch)
    g = torch.Generator().manual_seed(3)
    sites = [n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm) or n.endswith("norm")]
    d = model.config.hidden_size
    maps = {s: actsteer.UnitMap(1 + 0.5 * torch.rand(d, generator=g), torch.randn(d, generator=g),
                                lo=torch.full((d,), -0.8), hi=torch.full((d,), 0.8)) for s in sites}
    transport = actsteer.Transport(maps)
    ids = torch.randint(0, 256, (2, 6), generator=g)

    def reference_hook(fm):
        return lambda module, args, out: _where_form(out, fm.weight, fm.bias, fm.lo, fm.hi)

    handles = [model.get_submodule(s).register_forward_hook(reference_hook(m.fold(0.8))) for s, m in maps.items()]
    with torch.no_grad():
        ref_logits = model(ids).logits
        ref_tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=256)
    for h in handles:
        h.remove()
    with torch.no_grad(), actsteer.steer(model, transport, strength=0.8):
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=256)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, ref_logits)  # the steering did something
