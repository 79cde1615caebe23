"""AcT Apply on real ComfyUI models (tiny SDXL and FLUX): clone-only patching, strength 0, windows, composition."""

from __future__ import annotations

import pytest
import torch
from support.comfy import (  # noqa: F401  (fixtures)
    clip,
    encode,
    flux,
    forward_hook_count,
    ksample,
    one_thread,
    pack,
    sdxl,
    state_fingerprint,
    tiny_flux,
    tiny_sdxl,
)

FAMILIES = ("sdxl", "flux")


def _model(kind: str):
    return tiny_sdxl(0) if kind == "sdxl" else tiny_flux(0)


def _random_transport(pack, model, sites, *, seed: int = 0, scale: float = 0.5):
    """A transport with random but sane maps (omega ~ 1 +- scale/2, support = all reals) on ``sites``."""
    core = pack.core
    dm = model.model.diffusion_model
    g = torch.Generator().manual_seed(seed)
    maps = {}
    for site in sites:
        module = dm.get_submodule(site.split(":")[0])
        width = pack.core.infer_width(module)
        omega = 1 + scale * (torch.rand(width, generator=g) - 0.5)
        beta = scale * torch.randn(width, generator=g)
        maps[site] = core.UnitMap(omega, beta)
    return core.Transport(maps, method="linear-act", support="all",
                          model={"framework": "comfyui", "class": type(model.model).__name__})


def _sites(kind: str) -> tuple[list[str], list[str]]:
    """Two disjoint site sets per family (two concepts)."""
    if kind == "sdxl":
        return (["input_blocks.1.0.in_layers.0", "input_blocks.3.1.transformer_blocks.0.norm1", "middle_block.1.norm"],
                ["output_blocks.1.1.transformer_blocks.0.norm2", "out.0"])
    return ["double_blocks.0:0", "double_blocks.1:1", "single_blocks.0"], ["double_blocks.0:1", "single_blocks.1"]


def _conds(clip, kind: str):
    flux_ = kind == "flux"
    return encode(clip, "a photo of a cat", flux=flux_), encode(clip, "blurry", flux=flux_)


def _apply(pack, model, transport, strength=1.0, start=0.0, end=1.0, layers=""):
    import nodes

    node = nodes.NODE_CLASS_MAPPINGS["ActSteerApply"]
    # "both": these tests compare with references that steer every row (the placements: test_comfy_cfg_placement.py)
    return node.execute(model=model, transport=transport, strength=strength, start_percent=start, end_percent=end,
                        layers=layers, cfg_placement="both")[0]


@pytest.mark.parametrize("kind", FAMILIES)
def test_apply_steers_clone_and_leaves_original_bit_identical(pack, clip, kind):
    model = _model(kind)
    pos, neg = _conds(clip, kind)
    weights = state_fingerprint(model)
    base = ksample(model, pos, neg)
    transport = _random_transport(pack, model, _sites(kind)[0])
    steered_model = _apply(pack, model, transport, 1.0)
    assert steered_model is not model and steered_model.model is model.model  # a clone sharing the weights
    steered = ksample(steered_model, pos, neg)
    assert not torch.equal(steered, base)
    # the steered result is exactly core steering applied around plain sampling of the original
    with pack.core.steer(model.model.diffusion_model, transport, strength=1.0):
        reference = ksample(model, pos, neg)
    assert torch.equal(steered, reference)
    # afterwards: no hook left, same weights, and the original MODEL samples bit-identically
    assert forward_hook_count(model) == 0
    assert all(torch.equal(v, weights[k]) for k, v in state_fingerprint(model).items())
    assert torch.equal(ksample(model, pos, neg), base)
    assert pack.comfy_nodes.patching.steering_patch(model) is None


@pytest.mark.parametrize("kind", FAMILIES)
def test_apply_strength_zero_is_no_patch(pack, clip, kind):
    model = _model(kind)
    pos, neg = _conds(clip, kind)
    base = ksample(model, pos, neg)
    patched = _apply(pack, model, _random_transport(pack, model, _sites(kind)[0]), 0.0)
    assert torch.equal(ksample(patched, pos, neg), base)
    run = pack.comfy_nodes.patching.steering_patch(patched).last_run
    assert run.calls == [] and run.site_calls == {}  # no hooks were even attached


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("window", [(0.5, 1.0), (0.0, 0.4)])
def test_apply_percent_window_steers_only_inside(pack, clip, kind, window):
    import comfy.sample

    model = _model(kind)
    pos, neg = _conds(clip, kind)
    transport = _random_transport(pack, model, _sites(kind)[0], scale=1.0)
    start, end = window
    patched = _apply(pack, model, transport, 1.0, start, end)
    sampling = model.get_model_object("model_sampling")
    sigma_start, sigma_end = sampling.percent_to_sigma(start), sampling.percent_to_sigma(end)

    def denoised(m):
        x0s = []
        latent = torch.zeros(1, m.model.latent_format.latent_channels, 8, 8)
        noise = comfy.sample.prepare_noise(latent, 0)
        comfy.sample.sample(m, noise, 4, 4.0, "euler", "simple", pos, neg, latent, seed=0,
                            callback=lambda step, x0, x, total: x0s.append(x0.clone()), disable_pbar=True)
        return x0s

    plain, steered = denoised(model), denoised(patched)
    run = pack.comfy_nodes.patching.steering_patch(patched).last_run
    assert len(run.calls) == 4  # one model call per step (cond and uncond share one batch here)
    expected = [sigma_end <= sigma <= sigma_start for sigma, _ in run.calls]
    assert [on for _, on in run.calls] == expected and any(expected) and not all(expected)
    first = expected.index(True)
    assert all(torch.equal(a, b) for a, b in zip(plain[:first], steered[:first]))  # untouched before the window
    assert not torch.equal(plain[first], steered[first])
    assert set(run.site_calls) == set(transport.sites)  # every site hooked, each once per steered call
    assert all(count == sum(expected) for count in run.site_calls.values())


@pytest.mark.parametrize("kind", FAMILIES)
def test_two_apply_nodes_compose_like_one_list(pack, clip, kind):
    model = _model(kind)
    pos, neg = _conds(clip, kind)
    sites_a, sites_b = _sites(kind)
    a = _random_transport(pack, model, sites_a, seed=1)
    b = _random_transport(pack, model, sites_b + sites_a[:1], seed=2)  # overlapping site: applied in node order
    first = _apply(pack, model, a, 1.0)
    both = _apply(pack, first, b, 0.5)
    patching = pack.comfy_nodes.patching
    assert [e.strength for e in patching.steering_patch(both).entries] == [1.0, 0.5]
    assert len(patching.steering_patch(first).entries) == 1  # the first node's MODEL is unchanged
    steered = ksample(both, pos, neg)
    core = pack.core
    with core.steer(model.model.diffusion_model, [core.Steering(a, 1.0), core.Steering(b, 0.5)]):
        reference = ksample(model, pos, neg)
    assert torch.equal(steered, reference)
    assert not torch.equal(steered, ksample(first, pos, neg))
    assert forward_hook_count(model) == 0


@pytest.mark.parametrize("kind", FAMILIES)
def test_negative_strength_is_reverse_transport(pack, clip, kind):
    model = _model(kind)
    pos, neg = _conds(clip, kind)
    transport = _random_transport(pack, model, _sites(kind)[0])
    steered = ksample(_apply(pack, model, transport, -0.75), pos, neg)
    with pack.core.steer(model.model.diffusion_model, transport, strength=-0.75):
        reference = ksample(model, pos, neg)
    assert torch.equal(steered, reference)
    assert not torch.equal(steered, ksample(_apply(pack, model, transport, 0.75), pos, neg))


def test_apply_composes_with_a_lora_style_weight_patch(pack, clip, sdxl):
    pos, neg = _conds(clip, "sdxl")
    base = ksample(sdxl, pos, neg)
    key = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    weight = sdxl.model.state_dict()[key]
    diff = 0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(3))
    transport = _random_transport(pack, sdxl, _sites("sdxl")[0])

    lora = sdxl.clone()
    assert lora.add_patches({key: (diff,)}, 1.0) == [key]
    lora_then_act = _apply(pack, lora, transport)
    act_then_lora = _apply(pack, sdxl, transport).clone()
    act_then_lora.add_patches({key: (diff,)}, 1.0)

    only_lora, only_act = ksample(lora, pos, neg), ksample(_apply(pack, sdxl, transport), pos, neg)
    x, y = ksample(lora_then_act, pos, neg), ksample(act_then_lora, pos, neg)
    assert torch.equal(x, y)  # order of the LoRA and the Apply node does not matter
    assert not torch.equal(x, only_lora) and not torch.equal(x, only_act)
    assert torch.equal(ksample(sdxl, pos, neg), base)  # weights restored, hooks gone
    assert torch.equal(sdxl.model.state_dict()[key], weight)


def test_apply_layer_filter_selects_sites(pack, clip, sdxl):
    transport = _random_transport(pack, sdxl, _sites("sdxl")[0] + _sites("sdxl")[1])
    patched = _apply(pack, sdxl, transport, layers=r"^(input_blocks|out\.)")
    (entry,) = pack.comfy_nodes.patching.steering_patch(patched).entries
    assert entry.transport.sites == ["input_blocks.1.0.in_layers.0", "input_blocks.3.1.transformer_blocks.0.norm1", "out.0"]
    with pytest.raises(ValueError, match="matches none of the transport's 5 sites"):
        _apply(pack, sdxl, transport, layers="double_blocks")


def test_apply_rejects_a_transport_for_another_model(pack, sdxl, flux):
    sdxl_transport = _random_transport(pack, sdxl, _sites("sdxl")[0])
    with pytest.raises(ValueError, match=r"fitted on SDXL \(ComfyUI\), the MODEL is Flux") as err:
        _apply(pack, flux, sdxl_transport)
    assert "\n" not in str(err.value)
    # right names, wrong widths (e.g. a FLUX transport from a bigger FLUX)
    flux_transport = _random_transport(pack, flux, _sites("flux")[0])
    core = pack.core
    wide = core.Transport({s: core.UnitMap(torch.ones(128), torch.zeros(128)) for s in flux_transport.sites},
                          model={"framework": "comfyui", "class": "Flux"})
    with pytest.raises(ValueError, match="'double_blocks.0:0' has 128 units, the model 64"):
        _apply(pack, flux, wide)
    narrow = core.Transport({"input_blocks.1.0.in_layers.0": core.UnitMap(torch.ones(8), torch.zeros(8))})
    with pytest.raises(ValueError, match="does not match the MODEL.*8 units"):
        _apply(pack, sdxl, narrow)
    with pytest.raises(ValueError, match="start_percent <= end_percent"):
        _apply(pack, sdxl, sdxl_transport, 1.0, 0.8, 0.2)


def test_model_options_deepcopy_shares_transports(pack, sdxl):
    import copy

    transport = _random_transport(pack, sdxl, _sites("sdxl")[0])
    patched = _apply(pack, sdxl, transport)
    clone = patched.clone()
    patching = pack.comfy_nodes.patching
    assert patching.steering_patch(clone) is patching.steering_patch(patched)
    entry = patching.steering_patch(patched).entries[0]
    assert copy.deepcopy({"x": entry})["x"] is entry and entry.transport is transport
