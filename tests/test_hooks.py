"""Tests for the hook engine (`actsteer.attach`, `actsteer.steer`, `SteeringHandle`, `core.validate`).

Every engine test compares against closed forms written here in float64 (ACT_SPEC.md section 4):
``T_s(x) = x + s((omega - 1) x + beta)`` on ``lo <= x <= hi``, the identity elsewhere; for ``(B, C, H, W)``
outputs only the spatial mean per channel is transported (ACT_SPEC.md section 6).
"""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch
from torch.testing import assert_close

import actsteer
from actsteer import Steering, Transport, UnitMap
from actsteer.core import validate

F32 = dict(rtol=1e-5, atol=1e-5)
# bf16/fp16 keep 8/11 mantissa bits; the folded weight and bias are rounded to the activation dtype too.
HALF = {torch.bfloat16: dict(rtol=2e-2, atol=3e-2), torch.float16: dict(rtol=3e-3, atol=3e-3)}

# (site, upstream site, final norm) per tiny architecture; the upstream module runs before the site.
LM_SITES = {
    "gpt2": ("transformer.h.1.ln_2", "transformer.h.1.ln_1", "transformer.ln_f"),
    "llama": ("model.layers.1.post_attention_layernorm", "model.layers.1.input_layernorm", "model.norm"),
    "gemma2": ("model.layers.1.post_feedforward_layernorm", "model.layers.1.pre_feedforward_layernorm", "model.norm"),
}
TEXTS = ["hello world, steer me", "hi"]


# ---------------------------------------------------------------------------------------------- helpers
def unit_map(d: int, *, seed: int, support: str = "range", shift: float = 1.0) -> UnitMap:
    """A random per-unit map; the range support [-1, 1] is exact in bf16/fp16, so masks agree in any dtype."""
    g = torch.Generator().manual_seed(seed)
    omega = 0.5 + 1.5 * torch.rand(d, generator=g)
    beta = shift * torch.randn(d, generator=g)
    if support == "all":
        return UnitMap(omega, beta)
    return UnitMap(omega, beta, lo=torch.full((d,), -1.0), hi=torch.full((d,), 1.0))


def closed_form(x: torch.Tensor, m: UnitMap, strength: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``x + s((omega - 1) x + beta)`` on ``lo <= x <= hi`` over the last dim, in float64."""
    x = x.double()
    s = torch.as_tensor(strength, dtype=torch.float64)
    if s.dim() == 1:  # one strength per row
        s = s.view(-1, *([1] * (x.dim() - 1)))
    moved = x + s * ((m.omega.double() - 1) * x + m.beta.double())
    inside = (x >= m.lo.double()) & (x <= m.hi.double())
    return torch.where(inside, moved, x)


def closed_form_spatial(x: torch.Tensor, m: UnitMap, strength: float = 1.0) -> torch.Tensor:
    """(B, C, H, W): transport the spatial mean per channel, keep the deviations from it."""
    mu = x.double().mean(dim=(2, 3))
    return x.double() + (closed_form(mu, m, strength) - mu)[:, :, None, None]


def _clone(output):
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    return type(output)(_clone(o) for o in output)


@contextlib.contextmanager
def tap(model: torch.nn.Module, names: list[str]):
    """Record a clone of each named module's output (last call wins). A tap registered before `attach`
    sees the raw output of a steered site; one registered after sees the steered output.
    """
    seen: dict[str, object] = {}

    def make(name):
        def hook(module, args, output):
            seen[name] = _clone(output)

        return hook

    handles = [model.get_submodule(n).register_forward_hook(make(n)) for n in names]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- toy models
class Pair(torch.nn.Module):
    """Returns a tuple ``(left(x), right(x))``, like FLUX blocks return (text, image) streams."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = torch.nn.Linear(6, 4), torch.nn.Linear(6, 5)

    def forward(self, x):
        return self.left(x), self.right(x)


class TwoStream(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Pair()
        self.head = torch.nn.Linear(9, 2)

    def forward(self, x):
        left, right = self.block(x)
        return self.head(torch.cat([left, right], dim=-1))


@pytest.fixture
def mlp() -> torch.nn.Module:
    torch.manual_seed(1)
    nn = torch.nn
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).eval()


@pytest.fixture
def convnet() -> torch.nn.Module:
    torch.manual_seed(2)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.GroupNorm(3, 6), torch.nn.SiLU(), torch.nn.Conv2d(6, 2, 1)
    ).eval()


@pytest.fixture
def two_stream() -> torch.nn.Module:
    torch.manual_seed(3)
    return TwoStream().eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randn(3, 7, 5)  # (B, T, D_in)


# ---------------------------------------------------------------------------------------------- tiny LMs
@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_steer_tiny_lm_matches_closed_form_and_restores(tiny_lm_factory, arch):
    model, tok = tiny_lm_factory(arch)
    site, upstream, _ = LM_SITES[arch]
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    ids = enc.input_ids.clone()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    m = unit_map(64, seed=10)
    t = Transport({site: m})
    with torch.no_grad(), tap(model, [upstream, site]) as base:
        base_logits = model(**enc).logits
    base = dict(base)

    with torch.no_grad(), tap(model, [site]) as raw, actsteer.steer(model, t, strength=0.7), tap(
        model, [upstream, site]
    ) as got:
        logits = model(**enc).logits

    assert torch.equal(got[upstream], base[upstream])
    assert torch.equal(raw[site], base[site])
    inside = (base[site] >= -1) & (base[site] <= 1)
    assert 0.2 < inside.float().mean() < 0.9  # both branches of the support are exercised
    assert_close(got[site].double(), closed_form(base[site], m, 0.7), **F32)
    assert not torch.allclose(logits, base_logits, atol=1e-3)
    assert torch.equal(enc.input_ids, ids)
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, base_logits)
    assert hook_count(model) == 0
    assert state_equal(model.state_dict(), params)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_steer_tiny_lm_keeps_half_dtype(tiny_lm_factory, dtype):
    model, tok = tiny_lm_factory("llama", dtype=dtype)
    site, upstream, _ = LM_SITES["llama"]
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    m = unit_map(64, seed=11)
    with torch.no_grad(), tap(model, [upstream, site]) as base:
        base_logits = model(**enc).logits
    base = dict(base)
    with torch.no_grad(), actsteer.steer(model, Transport({site: m})), tap(model, [upstream, site]) as got:
        logits = model(**enc).logits

    assert logits.dtype == dtype and got[site].dtype == dtype
    assert torch.equal(got[upstream], base[upstream])
    assert_close(got[site].double(), closed_form(base[site], m), **HALF[dtype])
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, base_logits)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_steer_generate_changes_tokens_at_full_strength_only(tiny_lm_factory, arch):
    model, tok = tiny_lm_factory(arch)
    final = LM_SITES[arch][2]
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    params = {k: v.clone() for k, v in model.state_dict().items()}
    shift = UnitMap(torch.ones(64), 8.0 * torch.randn(64, generator=torch.Generator().manual_seed(12)))
    t = Transport({final: shift})
    kw = dict(max_new_tokens=8, do_sample=False)
    plain = model.generate(**enc, **kw)
    with actsteer.steer(model, t, strength=0.0):
        at_zero = model.generate(**enc, **kw)
    with actsteer.steer(model, t, strength=1.0) as handle:
        at_one = model.generate(**enc, **kw)

    assert torch.equal(at_zero, plain)
    assert at_one.shape[0] == plain.shape[0]
    assert not torch.equal(at_one, plain)
    assert handle.calls[final] >= 8  # one call per decoding step at least
    assert hook_count(model) == 0
    assert state_equal(model.state_dict(), params)


# ---------------------------------------------------------------------------------------------- output kinds
def test_steer_token_output_matches_closed_form(mlp, tokens):
    m = unit_map(8, seed=20)
    x = tokens.clone()
    with torch.no_grad(), tap(mlp, ["0", "1"]) as base:
        base_out = mlp(x)
    base = dict(base)
    with torch.no_grad(), actsteer.steer(mlp, Transport({"1": m}), strength=0.8), tap(mlp, ["0", "1"]) as got:
        out = mlp(x)

    assert torch.equal(got["0"], base["0"])
    assert_close(got["1"].double(), closed_form(base["1"], m, 0.8), **F32)
    expected = mlp[3](torch.tanh(closed_form(base["1"], m, 0.8).float()))
    assert_close(out, expected, **F32)
    assert not torch.allclose(out, base_out, atol=1e-3)
    assert torch.equal(x, tokens)
    assert torch.equal(mlp(x), base_out) and hook_count(mlp) == 0


def test_steer_flat_output_matches_closed_form(mlp):
    x = torch.randn(6, 5)  # (B, D)
    m = unit_map(8, seed=21)
    with torch.no_grad(), tap(mlp, ["0", "1"]) as base:
        base_out = mlp(x)
    base = dict(base)
    with torch.no_grad(), actsteer.steer(mlp, Transport({"1": m})), tap(mlp, ["0", "1"]) as got:
        mlp(x)

    assert torch.equal(got["0"], base["0"])
    assert_close(got["1"].double(), closed_form(base["1"], m), **F32)
    assert torch.equal(mlp(x), base_out) and hook_count(mlp) == 0


def test_steer_spatial_output_transports_channel_means_only(convnet):
    x = torch.randn(2, 3, 5, 4)  # (B, C, H, W)
    m = unit_map(6, seed=22, shift=0.5)
    with torch.no_grad(), tap(convnet, ["0", "1"]) as base:
        base_out = convnet(x)
    base = dict(base)
    with torch.no_grad(), actsteer.steer(convnet, Transport({"1": m}), strength=0.9), tap(convnet, ["0", "1"]) as got:
        out = convnet(x)

    steered = got["1"]
    assert torch.equal(got["0"], base["0"])
    assert_close(steered.double(), closed_form_spatial(base["1"], m, 0.9), **F32)
    mu, mu0 = steered.mean(dim=(2, 3), keepdim=True), base["1"].mean(dim=(2, 3), keepdim=True)
    assert_close(steered - mu, base["1"] - mu0, **F32)  # spatial deviations kept
    assert_close(mu.squeeze(), closed_form(mu0.squeeze(), m, 0.9).float(), **F32)
    assert not torch.allclose(out, base_out, atol=1e-4)
    assert torch.equal(convnet(x), base_out) and hook_count(convnet) == 0


def test_steer_tuple_output_transports_selected_element(two_stream):
    x = torch.randn(4, 3, 6)
    m = unit_map(5, seed=23)
    with torch.no_grad(), tap(two_stream, ["block"]) as base:
        base_out = two_stream(x)
    base = dict(base)
    with torch.no_grad(), tap(two_stream, ["block"]) as raw, actsteer.steer(
        two_stream, Transport({"block:1": m})
    ), tap(two_stream, ["block"]) as got:
        out = two_stream(x)

    left, right = got["block"]
    assert isinstance(got["block"], tuple)
    assert torch.equal(left, base["block"][0])
    assert_close(right.double(), closed_form(base["block"][1], m), **F32)
    assert torch.equal(raw["block"][1], base["block"][1])
    expected = two_stream.head(torch.cat([left, closed_form(base["block"][1], m).float()], dim=-1))
    assert_close(out, expected, **F32)
    assert torch.equal(two_stream(x), base_out) and hook_count(two_stream) == 0


def test_steer_tuple_site_without_index_raises_naming_the_syntax(two_stream):
    t = Transport({"block": unit_map(5, seed=24)})
    with pytest.raises(TypeError, match=r"'block:k'"), actsteer.steer(two_stream, t):
        two_stream(torch.randn(2, 6))
    assert hook_count(two_stream) == 0


# ---------------------------------------------------------------------------------------------- identity and cleanup
@pytest.mark.parametrize(
    "model_name, shape, site",
    [("mlp", (3, 7, 5), "1"), ("convnet", (2, 3, 5, 4), "1"), ("two_stream", (4, 6), "block:1")],
)
def test_steer_strength_zero_is_bit_identical(request, model_name, shape, site):
    model = request.getfixturevalue(model_name)
    x = torch.randn(*shape)
    d = {"mlp": 8, "convnet": 6, "two_stream": 5}[model_name]
    t = Transport({site: unit_map(d, seed=25)})
    base = model(x)
    with actsteer.steer(model, t, strength=0.0):
        assert torch.equal(model(x), base)
    with actsteer.steer(model, t, strength={"*": 0.0}):
        assert torch.equal(model(x), base)


def test_steer_restores_model_when_body_raises(mlp, tokens):
    base = mlp(tokens)
    with pytest.raises(ZeroDivisionError):
        with actsteer.steer(mlp, Transport({"1": unit_map(8, seed=26)})):
            assert not torch.allclose(mlp(tokens), base)
            1 / 0
    assert hook_count(mlp) == 0
    assert torch.equal(mlp(tokens), base)
    with actsteer.steer(mlp, Transport({"1": unit_map(8, seed=26)})):  # the model is free to steer again
        assert not torch.allclose(mlp(tokens), base)


def test_handle_remove_is_idempotent(mlp, tokens):
    base = mlp(tokens)
    handle = actsteer.attach(mlp, Transport({"1": unit_map(8, seed=27), "3": unit_map(3, seed=28)}))
    assert handle.is_attached and hook_count(mlp) == 2
    handle.remove()
    handle.remove()
    assert not handle.is_attached and hook_count(mlp) == 0
    assert torch.equal(mlp(tokens), base)
    again = actsteer.attach(mlp, Transport({"1": unit_map(8, seed=27)}))
    handle.remove()  # removing a stale handle must not detach the newer one
    assert again.is_attached and not torch.equal(mlp(tokens), base)
    again.remove()


def test_steer_does_not_edit_inputs_or_outputs_in_place():
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(4, 4))  # site "0" returns its input object
    x = torch.randn(3, 4)
    x_before = x.clone()
    raw: list[torch.Tensor] = []
    seen = model[0].register_forward_hook(lambda mod, args, out: raw.append(out))  # keeps the raw object
    m = unit_map(4, seed=29, support="all")
    with torch.no_grad(), actsteer.steer(model, Transport({"0": m})):
        out = model(x)
    seen.remove()

    assert raw[0] is x and torch.equal(x, x_before)
    assert_close(out, model[1](closed_form(x, m).float()), **F32)


def test_steer_keeps_no_reference_to_outputs(mlp, tokens):
    refs: list[weakref.ref] = []
    seen = mlp[1].register_forward_hook(lambda mod, args, out: refs.append(weakref.ref(out)))
    with torch.no_grad(), actsteer.steer(mlp, Transport({"1": unit_map(8, seed=30)})):
        mlp(tokens)
        gc.collect()
        assert refs[0]() is None
    seen.remove()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_steer_keeps_half_dtype_on_modules(mlp, convnet, dtype):
    m8, m6 = unit_map(8, seed=31), unit_map(6, seed=32, shift=0.5)
    cases = ((mlp, torch.randn(3, 7, 5), m8, closed_form), (convnet, torch.randn(2, 3, 5, 4), m6, closed_form_spatial))
    for model, x, m, rule in cases:
        model = model.to(dtype)
        x = x.to(dtype)
        with torch.no_grad(), tap(model, ["1"]) as base:
            model(x)
        base = dict(base)
        with torch.no_grad(), actsteer.steer(model, Transport({"1": m})), tap(model, ["1"]) as got:
            out = model(x)
        assert out.dtype == dtype and got["1"].dtype == dtype
        assert_close(got["1"].double(), rule(base["1"], m), **HALF[dtype])


# ---------------------------------------------------------------------------------------------- strengths
def test_handle_strength_setter_changes_output_live(mlp, tokens):
    m = unit_map(8, seed=33)
    base = mlp(tokens)
    with torch.no_grad(), tap(mlp, ["1"]) as raw:
        mlp(tokens)
    raw = dict(raw)
    handle = actsteer.attach(mlp, Transport({"1": m}), strength=0.0)
    try:
        assert torch.equal(mlp(tokens), base)
        for s in (1.0, 0.25, -0.5):
            handle.strength = s
            assert handle.strength == s
            with torch.no_grad(), tap(mlp, ["1"]) as got:
                mlp(tokens)
            if s >= 0:
                assert_close(got["1"].double(), closed_form(raw["1"], m, s), **F32)
            else:  # the reverse map (z - beta) / omega at |s|, on the target range (all reals here)
                inverse = UnitMap(1 / m.omega, -m.beta / m.omega)
                assert_close(got["1"].double(), closed_form(raw["1"], inverse, 0.5), **F32)
        handle.strength = 0.0
        assert torch.equal(mlp(tokens), base)
    finally:
        handle.remove()


def test_steer_per_site_strength_mapping(mlp, tokens):
    m1, m3 = unit_map(8, seed=34), unit_map(3, seed=35, support="all")
    t = Transport({"1": m1, "3": m3})
    with torch.no_grad(), tap(mlp, ["1", "3"]) as raw, actsteer.steer(mlp, t, strength={"1": 0.5, "*": 0.0}), tap(
        mlp, ["1", "3"]
    ) as got:
        mlp(tokens)
    assert_close(got["1"].double(), closed_form(raw["1"], m1, 0.5), **F32)
    assert torch.equal(got["3"], raw["3"])  # '*' = 0 leaves site 3 alone

    with torch.no_grad(), tap(mlp, ["1", "3"]) as raw, actsteer.steer(mlp, t, strength={"3": 0.25}), tap(
        mlp, ["1", "3"]
    ) as got:
        mlp(tokens)
    assert_close(got["1"].double(), closed_form(raw["1"], m1, 1.0), **F32)  # no '*': others default to 1
    assert_close(got["3"].double(), closed_form(raw["3"], m3, 0.25), **F32)


def test_steer_per_row_strength(mlp, tokens):
    m = unit_map(8, seed=36)
    s = torch.tensor([0.0, 0.5, 1.0])
    with torch.no_grad(), tap(mlp, ["1"]) as raw, actsteer.steer(mlp, Transport({"1": m}), strength=s), tap(
        mlp, ["1"]
    ) as got:
        mlp(tokens)
    assert torch.equal(got["1"][0], raw["1"][0])
    assert_close(got["1"].double(), closed_form(raw["1"], m, s), **F32)
    with pytest.raises(ValueError, match=r"3 per-row strengths .* 2 rows"), actsteer.steer(
        mlp, Transport({"1": m}), strength=s
    ):
        mlp(tokens[:2])
    assert hook_count(mlp) == 0


def test_bind_interleaved_rows_spread_per_row_strengths(mlp, tokens):
    """``rows="interleaved"``: R strengths over a batch of k*R rows, k consecutive rows each (generate's layout)."""
    from actsteer.core import bind

    m = unit_map(8, seed=36)
    s = torch.tensor([0.0, 1.0])
    batch = tokens[:2].repeat_interleave(2, dim=0)  # rows 0, 0, 1, 1
    with torch.no_grad():
        with tap(mlp, ["1"]) as raw:
            mlp(batch)
        handle = bind(mlp, Transport({"1": m}), s, rows="interleaved")
        try:
            with tap(mlp, ["1"]) as got:
                mlp(batch)
            with pytest.raises(ValueError, match=r"2 per-row strengths .* 3 rows or a multiple"):
                mlp(tokens[:3])
        finally:
            handle.remove()
    assert torch.equal(got["1"][:2], raw["1"][:2])  # strength 0 for the first two rows
    assert_close(got["1"][2:].double(), closed_form(raw["1"][2:], m, 1.0), **F32)
    assert hook_count(mlp) == 0


def test_set_active_under_pauses_only_this_thread(mlp, tokens):
    """A step window belongs to one call: a model-wide handle paused in one thread still steers another's calls."""
    import threading

    m = unit_map(8, seed=36, support="all")
    with torch.no_grad():
        plain = mlp(tokens)
        handle = actsteer.attach(mlp, Transport({"1": m}))
        try:
            steered = mlp(tokens)
            handle.set_active(False, under="1")
            here = mlp(tokens)
            there = {}
            worker = threading.Thread(target=lambda: there.update(out=mlp(tokens)))
            worker.start()
            worker.join()
            handle.set_active(True, under="1")
            again = mlp(tokens)
        finally:
            handle.remove()
    assert not torch.equal(steered, plain)
    assert torch.equal(here, plain) and torch.equal(there["out"], steered) and torch.equal(again, steered)
    assert hook_count(mlp) == 0


# ---------------------------------------------------------------------------------------------- composition
def test_steer_list_composes_in_order(mlp, tokens):
    a, b = unit_map(8, seed=37, support="all"), unit_map(8, seed=38)
    ta, tb = Transport({"1": a}), Transport({"1": b})
    with torch.no_grad(), tap(mlp, ["1"]) as raw:
        mlp(tokens)
    x = raw["1"]
    results = {}
    for name, steering in {"ab": [ta, Steering(tb, 0.5)], "ba": [Steering(tb, 0.5), ta]}.items():
        with torch.no_grad(), actsteer.steer(mlp, steering), tap(mlp, ["1"]) as got:
            mlp(tokens)
        results[name] = got["1"]
    assert_close(results["ab"].double(), closed_form(closed_form(x, a, 1.0), b, 0.5), **F32)
    assert_close(results["ba"].double(), closed_form(closed_form(x, b, 0.5), a, 1.0), **F32)
    assert not torch.allclose(results["ab"], results["ba"], atol=1e-3)
    assert hook_count(mlp) == 0


def test_handle_set_strength_of_one_composed_transport(mlp, tokens):
    a, b = unit_map(8, seed=37, support="all"), unit_map(8, seed=38)
    with torch.no_grad(), tap(mlp, ["1"]) as raw, actsteer.steer(mlp, [Transport({"1": a}), Transport({"1": b})]) as h:
        h.set_strength(0.0, index=1)
        with tap(mlp, ["1"]) as only_a:
            mlp(tokens)
        h.set_strength(0.5, index=1)
        with tap(mlp, ["1"]) as both:
            mlp(tokens)
        assert h.strength == [1.0, 0.5]
    assert_close(only_a["1"].double(), closed_form(raw["1"], a, 1.0), **F32)
    assert_close(both["1"].double(), closed_form(closed_form(raw["1"], a, 1.0), b, 0.5), **F32)


def test_steer_nested_on_one_model_raises(mlp, two_stream, tokens):
    t = Transport({"1": unit_map(8, seed=39)})
    with actsteer.steer(mlp, t):
        with pytest.raises(RuntimeError, match="pass a list"):
            with actsteer.steer(mlp, t):
                pass
        assert hook_count(mlp) == 1
        with actsteer.steer(two_stream, Transport({"block:0": unit_map(4, seed=40)})):  # another model is fine
            assert hook_count(two_stream) == 1
    assert hook_count(mlp) == 0 and hook_count(two_stream) == 0


# ---------------------------------------------------------------------------------------------- validation
def test_attach_missing_site_fails_before_hooking(tiny_gpt2):
    model, _ = tiny_gpt2
    t = Transport({"transformer.h.0.ln_1": unit_map(64, seed=41), "transformer.h.1.ln_3": unit_map(64, seed=42)})
    with pytest.raises(KeyError, match=r"'transformer\.h\.1\.ln_3'.*closest: 'transformer\.h\.1\.ln_\d'"):
        actsteer.attach(model, t)
    assert hook_count(model) == 0
    actsteer.attach(model, Transport({"transformer.h.0.ln_1": unit_map(64, seed=41)})).remove()  # not marked steered


def test_attach_wrong_width_fails_before_hooking(mlp, tokens):
    good = Transport({"1": unit_map(8, seed=43)})
    bad = Transport({"0": unit_map(8, seed=44), "3": unit_map(5, seed=45)})
    bad = bad.replace(model={"name_or_path": "other-model"})
    with pytest.raises(ValueError, match=r"'3': transport has 5 units, Linear outputs 3.*other-model"):
        actsteer.attach(mlp, [good, bad])
    assert hook_count(mlp) == 0
    with pytest.raises(ValueError, match=r"'3'"):
        validate(mlp, bad)
    assert validate(mlp, good) is None
    with actsteer.steer(mlp, good):  # nothing half-attached was left behind
        assert hook_count(mlp) == 1


def test_steer_width_unknown_until_run_fails_at_forward(two_stream):
    t = Transport({"block:1": unit_map(7, seed=46)})  # tuple elements have no static width
    with pytest.raises(ValueError, match=r"'block:1'.*7 units.*\(4, 5\)"), actsteer.steer(two_stream, t):
        two_stream(torch.randn(4, 6))
    assert hook_count(two_stream) == 0


# ---------------------------------------------------------------------------------------------- handle state
def test_handle_active_false_pauses_and_calls_count(mlp, tokens):
    m = unit_map(8, seed=47)
    base = mlp(tokens)
    with actsteer.steer(mlp, Transport({"1": m, "3": unit_map(3, seed=48)})) as handle:
        steered = mlp(tokens)
        mlp(tokens)
        handle.active = False
        assert torch.equal(mlp(tokens), base)
        handle.active = True
        assert torch.equal(mlp(tokens), steered)
        assert handle.calls == {"1": 3, "3": 3}
    assert not torch.allclose(steered, base, atol=1e-3)


def test_attach_rejects_unknown_per_site_strength_keys(mlp):
    t = Transport({"1": unit_map(8, seed=3)})
    with pytest.raises(KeyError, match=r"\['O'\]"):
        actsteer.attach(mlp, t, strength={"O": 0.0})
    assert hook_count(mlp) == 0


def test_attach_refuses_nesting_through_a_submodule():
    torch.manual_seed(4)
    inner = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    outer = torch.nn.Sequential(inner, torch.nn.Linear(3, 2))
    t_outer = Transport({"0.1": unit_map(3, seed=5)})
    t_inner = Transport({"1": unit_map(3, seed=6)})
    handle = actsteer.attach(outer, t_outer)
    try:
        with pytest.raises(RuntimeError, match="already steered model-wide by another handle"):
            actsteer.attach(inner, t_inner)  # the same LayerNorm, reached through the inner module
        with actsteer.steer(outer, t_outer):  # nesting request-scoped steering through a submodule: refused too
            with pytest.raises(RuntimeError, match="pass a list"):
                with actsteer.steer(inner, t_inner):
                    pass
    finally:
        handle.remove()
    with actsteer.steer(inner, t_inner):  # fine once the first handle is gone
        pass
    assert hook_count(outer) == 0


def test_model_wide_and_request_steering_compose_model_wide_first(mlp, tokens):
    a, b = unit_map(8, seed=37, support="all"), unit_map(8, seed=38)
    with torch.no_grad(), tap(mlp, ["1"]) as raw:
        mlp(tokens)
    handle = actsteer.attach(mlp, Transport({"1": a}))
    try:
        with torch.no_grad(), actsteer.steer(mlp, Transport({"1": b}), strength=0.5), tap(mlp, ["1"]) as both:
            mlp(tokens)
        with torch.no_grad(), tap(mlp, ["1"]) as only_model_wide:
            mlp(tokens)
    finally:
        handle.remove()
    assert_close(both["1"].double(), closed_form(closed_form(raw["1"], a, 1.0), b, 0.5), **F32)
    assert_close(only_model_wide["1"].double(), closed_form(raw["1"], a, 1.0), **F32)
    assert hook_count(mlp) == 0
