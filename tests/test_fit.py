"""Tests for the generic fitting driver `actsteer.core.fit` (ACT_SPEC.md sections 1 and 5).

Known answers come from hand computations with `actsteer.estimate` on the pooled activations: the
sequential map of a later site is estimated on source activations produced with the EARLIER sites'
maps applied (in execution order), against target activations of the unsteered model.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.testing import assert_close

import actsteer
from actsteer import Transport, UnitMap
from actsteer.core import ForwardContext, fit
from actsteer.core.pooling import pool
from actsteer.core.sites import resolve_sites

TIGHT = dict(rtol=1e-5, atol=1e-5)
FIELDS = ("omega", "beta", "lo", "hi", "target_lo", "target_hi")

SOURCE = [
    "the cat sat on the mat", "a dog ran in the park", "we ate some bread today", "she reads a long book",
    "it is a sunny morning", "they play games at night", "my tea is cold now", "birds sing in trees",
]
TARGET = [s.upper() + "!" for s in SOURCE]
HELD_OUT = ["our bus was late again", "he fixed the old bike", "rain fell all day long"]
NORMS = {
    "gpt2": r"transformer\.h\.\d\.ln_\d|transformer\.ln_f",
    "llama": r"model\.layers\.\d\.\w+norm|model\.norm",
    "gemma2": r"model\.layers\.\d\.\w+norm|model\.norm",
}


# ---------------------------------------------------------------------------------------------- helpers
def lm_runner(model, tok):
    """Tokenise, tell the hooks the padding mask, run; positions count real tokens only (left padding)."""

    def run(texts, ctx: ForwardContext):
        enc = tok(list(texts), padding=True, return_tensors="pt")
        ctx.mask = enc.attention_mask
        model(**enc, position_ids=(enc.attention_mask.cumsum(-1) - 1).clamp(min=0))

    return run


def tensor_runner(model):
    return lambda items, ctx: model(torch.stack(list(items)))


def pooled_at(model, tok, site: str, texts: list[str]) -> torch.Tensor:
    """Mean-pooled ``(N, D)`` output of ``site`` (hooked after any steering hooks, so it sees them)."""
    seen = {}
    handle = model.get_submodule(site).register_forward_hook(lambda mod, args, out: seen.setdefault("x", out))
    try:
        with torch.no_grad():
            lm_runner(model, tok)(texts, ForwardContext())
    finally:
        handle.remove()
    enc = tok(texts, padding=True, return_tensors="pt")
    return pool(seen["x"], mask=enc.attention_mask)


def assert_maps_close(a: Transport, b: Transport, **tol) -> None:
    assert a.sites == b.sites
    for site in a:
        for field in FIELDS:
            assert_close(getattr(a[site], field), getattr(b[site], field), **tol, msg=lambda m: f"{site}.{field}: {m}")


def maps_differ(a: UnitMap, b: UnitMap, atol: float = 1e-3) -> bool:
    return not (torch.allclose(a.omega, b.omega, atol=atol) and torch.allclose(a.beta, b.beta, atol=atol))


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------------------------------------- toy models
class Swapped(torch.nn.Module):
    """Registers ``b`` before ``a`` but runs ``a`` first: registration order != execution order."""

    def __init__(self) -> None:
        super().__init__()
        self.b = torch.nn.Linear(3, 3)
        self.a = torch.nn.Linear(3, 3)
        self.seen_training: list[bool] = []

    def forward(self, x):
        self.seen_training.append(self.training)
        return self.b(torch.tanh(self.a(x)))


class Shared(torch.nn.Module):
    """Runs the same submodule twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(3, 3)
        self.out = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.out(self.inner(torch.tanh(self.inner(x))))


class Unused(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = torch.nn.Linear(3, 3)
        self.spare = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.used(x)


class Log(torch.nn.Module):
    def forward(self, x):
        return torch.log(x)  # NaN for negative inputs


@pytest.fixture
def swapped() -> Swapped:
    torch.manual_seed(5)
    return Swapped().eval()


@pytest.fixture
def data() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(6)
    source = torch.randn(12, 3, generator=g)
    target = 0.5 + 2.0 * torch.randn(10, 3, generator=g)  # unequal counts use the quantile grid
    return list(source), list(target)


@pytest.fixture
def convnet() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.SiLU(), torch.nn.Conv2d(4, 4, 1),
        torch.nn.GroupNorm(2, 4),
    ).eval()


# ---------------------------------------------------------------------------------------------- hand computations
@pytest.mark.parametrize("batch_size", [None, 5])
@pytest.mark.parametrize("support", ["all", "observed"])
def test_fit_sequential_maps_match_hand_computation(swapped, data, batch_size, support):
    source, target = data
    t = fit(swapped, ["b", "a"], source, target, run=tensor_runner(swapped), support=support,
            batch_size=batch_size, progress=False)

    xs, xt = torch.stack(source), torch.stack(target)
    with torch.no_grad():
        ha_s, ha_t = swapped.a(xs), swapped.a(xt)
        map_a = actsteer.estimate(ha_s, ha_t, support=support)
        hb_s = swapped.b(torch.tanh(map_a(ha_s)))  # source rows carry the map of the earlier site
        hb_t = swapped.b(torch.tanh(ha_t))  # target rows are never transported
        hb_t_steered = swapped.b(torch.tanh(map_a(ha_t)))
    map_b = actsteer.estimate(hb_s, hb_t, support=support)
    wrong_b = actsteer.estimate(hb_s, hb_t_steered, support=support)

    assert t.sites == ["a", "b"]  # execution order, not the registration order (b, a) nor the given one
    assert [n for n, _ in swapped.named_children()] == ["b", "a"]
    for field in FIELDS:
        assert_close(getattr(t["a"], field), getattr(map_a, field), **TIGHT)
        assert_close(getattr(t["b"], field), getattr(map_b, field), **TIGHT)
    assert maps_differ(t["b"], wrong_b)
    assert (t.mode, t.n_source, t.n_target) == ("sequential", 12, 10)


def test_fit_at_once_maps_match_hand_computation(swapped, data):
    source, target = data
    t = fit(swapped, resolve_sites(swapped, ".*"), source, target, run=tensor_runner(swapped),
            sequential=False, progress=False)
    xs, xt = torch.stack(source), torch.stack(target)
    with torch.no_grad():
        map_b = actsteer.estimate(swapped(xs), swapped(xt))
    assert t.sites == ["a", "b"] and t.mode == "at-once"
    assert_close(t["b"].omega, map_b.omega, **TIGHT)
    assert_close(t["b"].beta, map_b.beta, **TIGHT)


def test_fit_honours_context_rows(swapped, data):
    source, target = data

    def doubled(items, ctx):  # like classifier-free guidance: the batch's items are the first half
        x = torch.stack(list(items))
        ctx.rows = torch.arange(x.shape[0])
        swapped(torch.cat([x, torch.zeros_like(x)]))

    plain = fit(swapped, ["a", "b"], source, target, run=tensor_runner(swapped), progress=False)
    for batch_size in (None, 7):
        got = fit(swapped, ["a", "b"], source, target, run=doubled, batch_size=batch_size, progress=False)
        assert_maps_close(got, plain, **TIGHT)


# ---------------------------------------------------------------------------------------------- batching and modes
def test_fit_one_batch_equals_several_batches_on_tiny_lm(tiny_llama):
    model, tok = tiny_llama
    sites = resolve_sites(model, NORMS["llama"])
    one = fit(model, sites, SOURCE, TARGET, run=lm_runner(model, tok), progress=False)
    several = fit(model, sites, SOURCE, TARGET, run=lm_runner(model, tok), batch_size=6, progress=False)

    assert_maps_close(one, several, rtol=1e-4, atol=1e-5)
    assert one.extra["fit"]["forward_calls"] == 1
    batches = several.extra["fit"]["batches"]
    assert batches == 3
    assert several.extra["fit"]["forward_calls"] == batches * len(sites)  # one pass, then one per later site
    assert several.extra["fit"]["forward_equivalents"] < several.extra["fit"]["forward_calls"]  # early stops


def test_fit_one_batch_equals_several_batches_on_spatial_outputs(convnet):
    g = torch.Generator().manual_seed(8)
    source = list(torch.randn(8, 2, 5, 5, generator=g))
    target = list(1.0 + torch.randn(8, 2, 5, 5, generator=g))
    sites = ["1", "4"]
    one = fit(convnet, sites, source, target, run=tensor_runner(convnet), progress=False)
    several = fit(convnet, sites, source, target, run=tensor_runner(convnet), batch_size=3, progress=False)
    assert_maps_close(one, several, **TIGHT)
    assert (one.extra["fit"]["forward_calls"], several.extra["fit"]["forward_calls"]) == (1, 6 * 2)


def test_fit_sequential_differs_from_at_once_after_first_site(tiny_gpt2):
    model, tok = tiny_gpt2
    sites = resolve_sites(model, NORMS["gpt2"])
    seq = fit(model, sites, SOURCE, TARGET, run=lm_runner(model, tok), support="all", progress=False)
    once = fit(model, sites, SOURCE, TARGET, run=lm_runner(model, tok), support="all", sequential=False, progress=False)

    first, *later = seq.sites
    assert seq.sites == once.sites == ["transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1",
                                       "transformer.h.1.ln_2", "transformer.ln_f"]
    for field in FIELDS:
        assert_close(getattr(seq[first], field), getattr(once[first], field), **TIGHT)
    assert all(maps_differ(seq[s], once[s]) for s in later)
    assert once.extra["fit"]["forward_calls"] == 1


def test_fit_mean_pooling_ignores_left_and_right_padding(tiny_lm_factory):
    fitted = {}
    for side, batch_size in (("left", None), ("right", None), ("alone", 1)):
        model, tok = tiny_lm_factory("gpt2", padding_side="left" if side == "alone" else side)
        sites = ["transformer.h.0.ln_2", "transformer.ln_f"]
        fitted[side] = fit(model, sites, SOURCE[:5], TARGET[:5], run=lm_runner(model, tok), batch_size=batch_size,
                           sequential=False, progress=False)
    assert fitted["alone"].extra["fit"]["forward_calls"] == 10  # each text ran on its own, without padding
    assert_maps_close(fitted["left"], fitted["alone"], rtol=1e-4, atol=1e-5)
    assert_maps_close(fitted["right"], fitted["alone"], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- steering with the fit
@pytest.mark.parametrize("support, ratio", [("all", 0.6), ("observed", 0.9)])
def test_fit_transport_moves_held_out_source_toward_target(tiny_gpt2, support, ratio):
    model, tok = tiny_gpt2
    t = fit(model, resolve_sites(model, NORMS["gpt2"]), SOURCE, TARGET, run=lm_runner(model, tok), support=support,
            progress=False)
    last = t.sites[-1]
    target_mean = pooled_at(model, tok, last, [s.upper() + "!" for s in HELD_OUT]).mean(0)
    before = pooled_at(model, tok, last, HELD_OUT).mean(0)
    with actsteer.steer(model, t):
        after = pooled_at(model, tok, last, HELD_OUT).mean(0)
    assert (after - target_mean).norm() < ratio * (before - target_mean).norm()
    assert hook_count(model) == 0


# ---------------------------------------------------------------------------------------------- model state
@pytest.mark.parametrize("batch_size", [None, 4])
def test_fit_restores_mode_and_hooks(swapped, data, batch_size):
    source, target = data
    params = {k: v.clone() for k, v in swapped.state_dict().items()}
    swapped.train()
    fit(swapped, ["a", "b"], source, target, run=tensor_runner(swapped), batch_size=batch_size, progress=False)
    assert swapped.training and swapped.a.training and swapped.b.training
    assert swapped.seen_training and not any(swapped.seen_training)  # fitting ran in eval mode
    assert hook_count(swapped) == 0
    assert all(torch.equal(v, params[k]) for k, v in swapped.state_dict().items())

    swapped.eval()
    fit(swapped, ["a", "b"], source, target, run=tensor_runner(swapped), batch_size=batch_size, progress=False)
    assert not swapped.training


# ---------------------------------------------------------------------------------------------- errors
def test_fit_rejects_fewer_than_two_inputs(swapped, data):
    source, target = data
    with pytest.raises(ValueError, match="at least 2 source inputs.*got 1"):
        fit(swapped, ["a"], source[:1], target, run=tensor_runner(swapped), progress=False)
    with pytest.raises(ValueError, match="at least 2 target inputs.*got 0"):
        fit(swapped, ["a"], source, [], run=tensor_runner(swapped), progress=False)


def test_fit_unknown_site_names_near_misses(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(KeyError, match=r"'model\.layers\.0\.post_attention_layernom'.*closest: "
                                       r"'model\.layers\.0\.post_attention_layernorm'"):
        fit(model, ["model.layers.0.post_attention_layernom"], SOURCE, TARGET, run=lm_runner(model, tok),
            progress=False)
    assert hook_count(model) == 0


@pytest.mark.parametrize("batch_size", [None, 4])
def test_fit_site_that_never_runs_raises(data, batch_size):
    model = Unused().train()
    source, target = data
    with pytest.raises(RuntimeError, match=r"'spare' did not run"):
        fit(model, ["used", "spare"], source, target, run=tensor_runner(model), batch_size=batch_size, progress=False)
    assert hook_count(model) == 0 and model.training


@pytest.mark.parametrize("batch_size", [None, 4])
def test_fit_nan_activations_raise_naming_the_site(data, batch_size):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), Log(), torch.nn.Linear(3, 3)).train()
    source, target = data
    with pytest.raises(ValueError, match=r"Site '1'.*NaN"):
        fit(model, ["0", "1", "2"], source, target, run=tensor_runner(model), batch_size=batch_size, progress=False)
    assert hook_count(model) == 0 and model.training


def test_fit_site_running_twice_raises_in_one_pass_mode(data):
    torch.manual_seed(9)
    model = Shared().eval()
    source, target = data
    with pytest.raises(RuntimeError, match=r"'inner' ran more than once in one forward pass.*sequential=False"):
        fit(model, ["inner", "out"], source, target, run=tensor_runner(model), progress=False)
    assert hook_count(model) == 0

    once = fit(model, ["inner", "out"], source, target, run=tensor_runner(model), sequential=False, progress=False)
    xs, xt = torch.stack(source), torch.stack(target)
    with torch.no_grad():  # the site is pooled over its two calls: the mean of both outputs per input
        two_calls = lambda x: (model.inner(x) + model.inner(torch.tanh(model.inner(x)))) / 2  # noqa: E731
        expected = actsteer.estimate(two_calls(xs), two_calls(xt))
    assert_close(once["inner"].omega, expected.omega, **TIGHT)
    assert_close(once["inner"].beta, expected.beta, **TIGHT)


def test_fit_one_pass_false_averages_repeated_sites_sequentially(data):
    # one batch, a site that runs twice per forward: one_pass=False fits it from both calls, sequentially
    torch.manual_seed(9)
    model = Shared().eval()
    source, target = data
    seq = fit(model, ["inner", "out"], source, target, run=tensor_runner(model), one_pass=False, progress=False)
    once = fit(model, ["inner", "out"], source, target, run=tensor_runner(model), sequential=False, progress=False)
    assert_close(seq["inner"].omega, once["inner"].omega, **TIGHT)  # the first site is the same in both modes
    assert seq.extra["fit"]["forward_calls"] == 2  # a recording pass, then one pass for the second site


def test_fit_keeps_each_submodules_mode(data):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    model.train()
    model[1].eval()
    source, target = data
    fit(model, ["0", "2"], source, target, run=tensor_runner(model), progress=False)
    assert model.training and model[0].training and not model[1].training and model[2].training


def test_fit_runner_with_extra_rows_asks_for_ctx_rows(swapped, data):
    source, target = data
    doubled = lambda items, ctx: swapped(torch.cat([torch.stack(items)] * 2))  # noqa: E731
    with pytest.raises(ValueError, match=r"set ctx\.rows"):
        fit(swapped, ["a", "b"], source, target, run=doubled, progress=False)
    assert hook_count(swapped) == 0


@pytest.mark.parametrize("how", ["steer", "attach"])
def test_fit_refuses_a_model_that_is_being_steered(tiny_llama, how):
    """Fitting inside steer()/attach() would record steered activations without a word (issue 21, item 7)."""
    model, tok = tiny_llama
    t = actsteer.fit_lm(model, tok, SOURCE, TARGET, progress=False)
    with contextlib.ExitStack() as stack:
        if how == "steer":
            stack.enter_context(actsteer.steer(model, t))
        else:
            stack.callback(actsteer.attach(model, t).remove)
        hooks = hook_count(model)
        with pytest.raises(RuntimeError, match=rf"being steered \(model\..*: {how}\(\)\); remove its steering.*before fitting"):
            actsteer.fit_lm(model, tok, SOURCE, TARGET, progress=False)
        assert hook_count(model) == hooks
    assert actsteer.fit_lm(model, tok, SOURCE, TARGET, progress=False) == t  # after the block: the same fit
