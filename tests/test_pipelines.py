"""hf_integration/pipelines.py on tiny random SDXL and FLUX pipelines: fitting, steering windows, cleanup, grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import actsteer
from support.tiny_pipelines import (  # noqa: F401  (one_thread, sdxl, flux: fixtures)
    flux,
    flux_call_kwargs,
    make_flux_pipeline,
    make_sdxl_pipeline,
    one_thread,
    sdxl,
    sdxl_call_kwargs,
)

from actsteer.core import Steering, Transport
from actsteer.core.sites import parse_site
from actsteer.hf_integration.diffusion_presets import component_view, pipeline_sites, site_components
from actsteer.hf_integration.pipeline_fit import fit_pipeline, strength_grid
from actsteer.hf_integration.pipelines import (
    attach_pipeline,
    disable_pipeline_steering,
    enable_pipeline_steering,
    is_pipeline_steering_enabled,
    steer_pipeline,
)

SOURCE = ["a cat", "a dog on grass", "a red car", "a small house", "a tall tree", "a bird in the sky"]
TARGET = [f"watercolor, {s}, soft watercolor painting" for s in SOURCE]
HELD_OUT = ["a horse", "a boat on a lake", "a cup of tea", "a mountain", "an old bridge", "a green field"]
HELD_OUT_TARGET = [f"watercolor, {s}, soft watercolor painting" for s in HELD_OUT]
SIZE_KW = dict(height=32, width=32)
FLUX_FIT_KW = dict(height=32, width=32, max_sequence_length=48)


@pytest.fixture(scope="module")
def sdxl_transport(sdxl):
    return fit_pipeline(sdxl, SOURCE, TARGET, steps="first", progress=False, **SIZE_KW)  # per-step: test_stages.py


@pytest.fixture(scope="module")
def flux_transport(flux):
    return fit_pipeline(flux, SOURCE, TARGET, steps="first", progress=False, **FLUX_FIT_KW)


def _hooks(pipe) -> set[tuple[str, str, int]]:
    """Every forward (pre-)hook on the pipeline's site components. transformers installs its own output-capturing
    hooks on the first forward pass, so compare with a snapshot taken after a call."""
    return {
        (f"{c}.{n}", kind, key)
        for c, component in site_components(pipe).items() for n, m in component.named_modules()
        for kind, hooks in (("post", m._forward_hooks), ("pre", m._forward_pre_hooks)) for key in hooks
    }


def _first_step_responses(pipe, prompts, sites, call_kwargs, seed=100):
    """Pooled outputs of ``sites`` at the first denoising step, one row per prompt (guidance 0)."""
    view = component_view(pipe)
    out = {s: [] for s in sites}
    handles = []
    for site in sites:
        name, k = parse_site(site)

        def hook(module, args, output, site=site, k=k):
            x = output if k is None else output[k]
            out[site].append(x.float().mean((2, 3) if x.dim() == 4 else (1,)))

        handles.append(view.get_submodule(name).register_forward_hook(hook))

    def stop(p, i, t, kw):
        p._interrupt = True
        return {}

    generators = [torch.Generator().manual_seed(seed + j) for j in range(len(prompts))]
    try:
        pipe(prompts, generator=generators, callback_on_step_end=stop, output_type="latent", **call_kwargs)
    finally:
        for h in handles:
            h.remove()
    return {s: torch.cat(v) for s, v in out.items()}


def _distance_ratios(pipe, transport, call_kwargs):
    """Per site: |steered held-out source mean - target mean| / |unsteered source mean - target mean|."""
    before = _first_step_responses(pipe, HELD_OUT, transport.sites, call_kwargs)
    target = _first_step_responses(pipe, HELD_OUT_TARGET, transport.sites, call_kwargs)
    with steer_pipeline(pipe, transport, strength=1.0):
        after = _first_step_responses(pipe, HELD_OUT, transport.sites, call_kwargs)
    ratios = []
    for s in transport.sites:
        gap = (before[s].mean(0) - target[s].mean(0)).abs().mean()
        if gap > 1e-6:  # sites upstream of any text input see the same noise for both prompt sets
            ratios.append(((after[s].mean(0) - target[s].mean(0)).abs().mean() / gap).item())
    return torch.tensor(ratios)


# Fitting ------------------------------------------------------------------------------------------------
def test_fit_pipeline_sdxl_fits_every_unet_norm_in_execution_order(sdxl, sdxl_transport):
    import diffusers

    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    norms = [f"unet.{n}" for n, m in sdxl.unet.named_modules() if isinstance(m, norm_types)]
    sites = sdxl_transport.sites
    assert sorted(sites) == sorted(norms) and len(sites) == 67
    # inside a CrossAttnDownBlock2D, attentions are registered before resnets but run interleaved after them
    assert norms.index("unet.down_blocks.1.attentions.0.norm") < norms.index("unet.down_blocks.1.resnets.0.norm1")
    assert sites.index("unet.down_blocks.1.resnets.0.norm2") < sites.index("unet.down_blocks.1.attentions.0.norm")
    last_attention_norm = sites.index("unet.down_blocks.1.attentions.0.transformer_blocks.1.norm3")
    assert last_attention_norm < sites.index("unet.down_blocks.1.resnets.1.norm1")
    assert sites[-1] == "unet.conv_norm_out"
    # steps="first" with one batch: one sequential pass, one UNet call
    assert sdxl_transport.extra["fit"]["forward_calls"] == 1
    assert sdxl_transport.extra["fit"]["denoiser_calls"] == 1
    assert sdxl_transport.mode == "sequential" and sdxl_transport.n_source == len(SOURCE)
    model = sdxl_transport.model
    assert model["class"] == "StableDiffusionXLPipeline" and model["arch"] == "sdxl"
    assert model["diffusers_version"] == diffusers.__version__
    assert model["unet_layout"]["layers_per_block"] == 2
    assert sdxl_transport.extra["diffusion"]["steps"] == "first"


def test_fit_pipeline_cfg_keeps_conditional_half(sdxl):
    # At the first step the conditional rows of a [uncond, cond] CFG batch see exactly what a guidance-free
    # batch sees; had the unconditional rows been pooled, the maps would differ completely.
    with_cfg = fit_pipeline(sdxl, SOURCE, TARGET, modules="fast", guidance_scale=5.0, steps="first", progress=False,
                            **SIZE_KW)
    without = fit_pipeline(sdxl, SOURCE, TARGET, modules="fast", guidance_scale=0.0, steps="first", progress=False,
                           **SIZE_KW)
    assert with_cfg.sites == without.sites and len(with_cfg) == 8
    for site in with_cfg:
        torch.testing.assert_close(with_cfg[site].beta, without[site].beta, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(with_cfg[site].omega, without[site].omega, rtol=1e-4, atol=1e-5)


def test_fit_pipeline_multi_step_responses_use_passes(flux):
    kw = dict(modules="fast", num_inference_steps=2, progress=False, **FLUX_FIT_KW)
    seq = fit_pipeline(flux, SOURCE, TARGET, steps="all", **kw)
    # 2 steps per prompt: each site runs twice per call, so the sequential fit re-runs the prompts per site
    assert seq.extra["fit"]["batches"] == 1
    assert seq.extra["fit"]["pipeline_calls"] == len(seq)
    assert seq.extra["fit"]["denoiser_calls"] == 2 * seq.extra["fit"]["pipeline_calls"]
    at_once = fit_pipeline(flux, SOURCE, TARGET, steps="all", sequential=False, **kw)
    assert at_once.extra["fit"]["pipeline_calls"] == 1 and at_once.extra["fit"]["denoiser_calls"] == 2
    first_site = seq.sites[0]  # nothing runs before it, so both modes see the same (step-averaged) activations
    torch.testing.assert_close(seq[first_site].beta, at_once[first_site].beta, rtol=1e-5, atol=1e-6)
    last = fit_pipeline(flux, SOURCE, TARGET, steps=(0.5, 1.0), **kw)  # the second step only: one pass
    first = fit_pipeline(flux, SOURCE, TARGET, steps="first", **kw)
    assert last.extra["fit"]["pipeline_calls"] == 1 and last.extra["fit"]["denoiser_calls"] == 2
    assert first.extra["fit"]["denoiser_calls"] == 1  # later steps are skipped once the window is done
    site = "transformer.transformer_blocks.0:1"
    assert not torch.equal(last[site].beta, first[site].beta)
    assert last.extra["diffusion"]["steps"] == [0.5, 1.0]


def test_pipeline_sites_presets_cover_flux_streams_and_text_encoders(flux, sdxl):
    view = component_view(flux)
    auto = pipeline_sites(flux, view, "auto")
    assert auto == [f"transformer.{b}.{i}:{k}" for b in ("transformer_blocks", "single_transformer_blocks")
                    for i in range(2) for k in (0, 1)]
    assert pipeline_sites(flux, view, "fast") == auto[:4]
    text = pipeline_sites(flux, view, "text_encoders")
    assert "text_encoder.encoder.layers.0.layer_norm1" in text  # transformers 5: no `text_model.` prefix
    assert "text_encoder_2.encoder.block.1.layer.1.layer_norm" in text  # T5
    sdxl_text = pipeline_sites(sdxl, component_view(sdxl), "text_encoders")
    assert "text_encoder_2.text_model.encoder.layers.1.layer_norm2" in sdxl_text
    with pytest.raises(ValueError, match="fast"):
        pipeline_sites(flux, view, "norms")


# Steering -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["sdxl", "flux"])
def test_steer_pipeline_strength_zero_is_bit_exact(arch, request):
    pipe = request.getfixturevalue(arch)
    transport = request.getfixturevalue(f"{arch}_transport")
    call = sdxl_call_kwargs if arch == "sdxl" else flux_call_kwargs
    base = pipe("a cat", **call()).images
    with steer_pipeline(pipe, transport, strength=0.0):
        zero = pipe("a cat", **call()).images
    with steer_pipeline(pipe, transport, strength=1.0):
        full = pipe("a cat", **call()).images
    assert torch.equal(zero, base)
    assert (full - base).abs().max() > 1e-3


def test_steer_pipeline_sdxl_moves_held_out_source_toward_target(sdxl):
    transport = fit_pipeline(sdxl, SOURCE, TARGET, support="all", steps="first", progress=False, **SIZE_KW)
    ratios = _distance_ratios(sdxl, transport, dict(SIZE_KW, num_inference_steps=4, guidance_scale=0.0))
    assert len(ratios) > 50
    assert (ratios < 1).float().mean() > 0.9
    assert ratios.median() < 0.35


def test_steer_pipeline_flux_moves_held_out_source_toward_target(flux, flux_transport):
    ratios = _distance_ratios(flux, flux_transport, dict(FLUX_FIT_KW, num_inference_steps=4, guidance_scale=0.0))
    assert len(ratios) == len(flux_transport)  # every block output depends on the prompt
    assert (ratios < 1).all() and ratios.median() < 0.7  # observed support: out-of-range values stay


def test_steer_pipeline_flux_tuple_streams_are_separate(flux, flux_transport):
    def block_outputs():
        # registered after any steering hooks, so it sees what the next block receives
        out = {}
        blocks = {"double": flux.transformer.transformer_blocks[0],
                  "single": flux.transformer.single_transformer_blocks[0]}
        handles = [b.register_forward_hook(lambda m, a, o, tag=tag: out.setdefault(tag, tuple(x.clone() for x in o)))
                   for tag, b in blocks.items()]
        try:
            flux("a cat", **flux_call_kwargs(num_inference_steps=1))
        finally:
            for h in handles:
                h.remove()
        return out

    base = block_outputs()
    only = flux_transport.select(["transformer.transformer_blocks.0:1", "transformer.single_transformer_blocks.0:0"])
    with steer_pipeline(flux, only):
        steered = block_outputs()
    (base_txt, base_img), (txt, img) = base["double"], steered["double"]
    assert torch.equal(txt, base_txt) and not torch.equal(img, base_img)  # ':1' is the image stream
    (base_txt, base_img), (txt, img) = base["single"], steered["single"]
    assert not torch.equal(txt, base_txt) and txt.shape[1] == 48  # (text, image) tuple since diffusers 0.35
    assert img.shape[1] == 256
    assert flux_transport.model["flux_single_block_output"] == "tuple(text, image)"


def test_steer_pipeline_timestep_window_fires_only_inside(sdxl, sdxl_transport):
    site = "unet.mid_block.resnets.0.norm1"
    seen = []

    def user_callback(pipe, i, t, callback_kwargs):
        seen.append(handle.calls.get(site, 0))
        return callback_kwargs

    with steer_pipeline(sdxl, sdxl_transport, steps=(0.25, 0.75)) as handle:
        sdxl("a cat", **sdxl_call_kwargs(num_inference_steps=4, callback_on_step_end=user_callback))
    assert seen == [0, 1, 2, 2]  # steps 1 and 2 of 4 (fractions 0.25, 0.5); the user's callback still runs
    assert set(handle.calls.values()) == {2}
    with steer_pipeline(sdxl, sdxl_transport, steps=(0.5, 1.0)) as handle:
        sdxl("a cat", **sdxl_call_kwargs(num_inference_steps=4))
    assert handle.calls[site] == 2


def test_steer_pipeline_leaves_pipeline_unmodified_even_on_error(sdxl, sdxl_transport):
    cls = type(sdxl)
    base = sdxl("a cat", **sdxl_call_kwargs()).images
    hooks = _hooks(sdxl)
    with pytest.raises(ZeroDivisionError):
        with steer_pipeline(sdxl, sdxl_transport, steps=(0.0, 0.5)):
            assert type(sdxl) is cls and len(_hooks(sdxl)) > len(hooks)  # hooks only: the class is never swapped
            sdxl("a cat", **sdxl_call_kwargs())
            1 / 0
    assert type(sdxl) is cls
    assert _hooks(sdxl) == hooks
    assert torch.equal(sdxl("a cat", **sdxl_call_kwargs()).images, base)


def test_steer_pipeline_window_counts_the_full_schedule_with_a_shared_unet(sdxl, sdxl_transport):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(sdxl)
    image = sdxl("a cat", **sdxl_call_kwargs(output_type="pil")).images[0]
    hooks = _hooks(sdxl)
    kw = dict(image=image, strength=0.5, num_inference_steps=4, guidance_scale=0.0, output_type="pt")
    with steer_pipeline(img2img, sdxl_transport, steps=(0.5, 0.75)) as handle:
        img2img("a cat", generator=torch.Generator().manual_seed(0), **kw)
        # strength 0.5 runs steps 2 and 3 of the 4-step schedule; the window (0.5, 0.75) holds step 2 only
        assert handle.calls["unet.conv_norm_out"] == 1
        sdxl("a cat", **sdxl_call_kwargs())  # same UNet through the other pipeline, in this block: steered too
        assert handle.calls["unet.conv_norm_out"] == 2  # step 2 of its 4 steps
    assert _hooks(sdxl) == hooks and type(img2img) is StableDiffusionXLImg2ImgPipeline


def test_fit_pipeline_window_counts_the_full_schedule_like_steering(sdxl):
    """img2img at strength 0.5 runs steps 2 and 3 of a 4-step schedule: fitting locates them in the full schedule,
    as steering does, so the window (0.5, 0.75) records step 2, the first step the call runs (it recorded step 3)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(sdxl)
    image = sdxl("a cat", **sdxl_call_kwargs(output_type="pil")).images[0]
    kw = dict(modules="fast", image=image, strength=0.5, num_inference_steps=4, guidance_scale=0.0, sequential=False,
              progress=False)
    window = fit_pipeline(img2img, SOURCE, TARGET, steps=(0.5, 0.75), **kw)
    first = fit_pipeline(img2img, SOURCE, TARGET, steps="first", **kw)
    assert window.sites == first.sites
    for site in window:
        assert torch.equal(window[site].beta, first[site].beta) and torch.equal(window[site].omega, first[site].omega)
    with steer_pipeline(img2img, window, steps=(0.5, 0.75)) as handle:  # steering holds the same one step
        img2img("a cat", generator=torch.Generator().manual_seed(0), strength=0.5, num_inference_steps=4, image=image,
                guidance_scale=0.0, output_type="pt")
    assert set(handle.calls.values()) == {1}
    with pytest.raises(ValueError, match=r"holds none of the steps this call ran"):
        fit_pipeline(img2img, SOURCE, TARGET, steps=(0.0, 0.5), **kw)


def test_enable_pipeline_steering_adds_steering_keyword(flux, flux_transport):
    from diffusers import FluxPipeline

    base = flux("a cat", **flux_call_kwargs()).images
    hooks = _hooks(flux)
    with steer_pipeline(flux, flux_transport, strength=0.7, steps=(0.0, 0.5)):
        expected = flux("a cat", **flux_call_kwargs()).images
    enable_pipeline_steering(flux)
    enable_pipeline_steering(flux)  # idempotent
    try:
        assert is_pipeline_steering_enabled(flux) and isinstance(flux, FluxPipeline)
        assert torch.equal(flux("a cat", **flux_call_kwargs()).images, base)
        zero = flux("a cat", steering=Steering(flux_transport, 0.0), **flux_call_kwargs()).images
        assert torch.equal(zero, base)
        steered = flux("a cat", steering=Steering(flux_transport, 0.7), steering_steps=(0.0, 0.5),
                       **flux_call_kwargs()).images
        assert torch.equal(steered, expected)
        assert _hooks(flux) == hooks
    finally:
        disable_pipeline_steering(flux)
    assert type(flux) is FluxPipeline and not is_pipeline_steering_enabled(flux)
    with pytest.raises(TypeError, match="steering"):
        flux("a cat", steering=flux_transport, **flux_call_kwargs())


def test_copies_and_pickles_of_an_enabled_pipeline_are_plain(flux, flux_transport):
    import copy
    import pickle

    from diffusers import FluxPipeline

    base = flux("a cat", **flux_call_kwargs()).images
    enable_pipeline_steering(flux)
    try:
        for clone in (copy.deepcopy(flux), pickle.loads(pickle.dumps(flux))):
            assert type(clone) is FluxPipeline and not is_pipeline_steering_enabled(clone)
            assert torch.equal(clone("a cat", **flux_call_kwargs()).images, base)
        assert is_pipeline_steering_enabled(flux)  # the original keeps its class while being copied
        assert torch.equal(flux("a cat", steering=Steering(flux_transport, 0.0), **flux_call_kwargs()).images, base)
    finally:
        disable_pipeline_steering(flux)


def test_steer_pipeline_negative_strength_undoes_a_composed_forward_map(flux):
    transport = fit_pipeline(flux, SOURCE, TARGET, support="all", steps="first", progress=False, **FLUX_FIT_KW)
    base = flux("a cat", **flux_call_kwargs()).images
    with steer_pipeline(flux, [Steering(transport, 1.0), Steering(transport, -1.0)]) as handle:
        round_trip = flux("a cat", **flux_call_kwargs()).images
    with steer_pipeline(flux, transport, strength=-1.0):
        reverse = flux("a cat", **flux_call_kwargs()).images
    assert handle.strength == [1.0, -1.0]
    torch.testing.assert_close(round_trip, base, rtol=0, atol=1e-4)  # T^-1(T(a)) = a at every site
    assert (reverse - base).abs().max() > 1e-3


def test_steer_pipeline_nested_on_same_pipeline_raises(flux, flux_transport):
    hooks = _hooks(flux)
    with steer_pipeline(flux, flux_transport):
        with pytest.raises(RuntimeError, match="list of transports"):
            with steer_pipeline(flux, flux_transport):
                pass
    handle = attach_pipeline(flux, flux_transport)
    try:
        with pytest.raises(RuntimeError, match="list of transports"):
            attach_pipeline(flux, flux_transport)
    finally:
        handle.remove()
    assert _hooks(flux) == hooks


def test_steer_pipeline_text_encoder_sites_ignore_the_window(flux):
    flux.text_encoder_2.train()  # fitting runs in eval mode, then gives every module its own mode back
    try:
        transport = fit_pipeline(flux, SOURCE, TARGET, modules="text_encoders", progress=False, **FLUX_FIT_KW)
        assert flux.text_encoder_2.training and flux.text_encoder_2.encoder.block[0].training
        assert not flux.text_encoder.training and not flux.transformer.training
    finally:
        flux.text_encoder_2.eval()
    assert {s.split(".")[0] for s in transport} == {"text_encoder", "text_encoder_2"}
    assert transport.extra["fit"]["forward_calls"] == 1
    both = transport.sites + ["transformer.transformer_blocks.0:1"]
    combined = fit_pipeline(flux, SOURCE, TARGET, modules=both, progress=False, **FLUX_FIT_KW)
    with steer_pipeline(flux, combined, steps=(0.5, 1.0)) as handle:
        flux("a cat", **flux_call_kwargs(num_inference_steps=4))
    calls = handle.calls
    assert calls["transformer.transformer_blocks.0:1"] == 2
    assert all(calls[s] == 1 for s in transport.sites)  # encoded once, before the denoising loop


def test_strength_grid_one_labelled_tile_per_strength(flux, flux_transport):
    kw = dict(flux_call_kwargs())
    kw.pop("generator"), kw.pop("output_type")
    hooks = _hooks(flux)
    grid = strength_grid(flux, "a cat", flux_transport, strengths=[0, 0.5, 1], seed=3, **kw)
    base = flux("a cat", generator=torch.Generator().manual_seed(3), output_type="pil", **kw).images[0]
    w, h = base.size
    assert grid.size[0] == 3 * w and grid.size[1] > h
    assert grid.info["strengths"] == [0.0, 0.5, 1.0]
    tiles = [np.asarray(grid.crop((c * w, grid.size[1] - h, (c + 1) * w, grid.size[1]))) for c in range(3)]
    assert np.array_equal(tiles[0], np.asarray(base))
    assert not np.array_equal(tiles[0], tiles[2])
    assert np.asarray(grid.crop((0, 0, w, grid.size[1] - h))).min() < 128  # the label strip has text in it
    assert _hooks(flux) == hooks


def test_fit_pipeline_transport_save_load_round_trip(tmp_path, flux, flux_transport):
    path = flux_transport.save(tmp_path / "watercolor")
    loaded = Transport.load(path)
    assert loaded == flux_transport
    assert loaded.model["flux_single_block_output"] == "tuple(text, image)"
    assert loaded.extra["diffusion"]["num_inference_steps"] == 4
    with steer_pipeline(flux, flux_transport, strength=0.5):
        a = flux("a cat", **flux_call_kwargs()).images
    with steer_pipeline(flux, loaded, strength=0.5):
        b = flux("a cat", **flux_call_kwargs()).images
    assert torch.equal(a, b)


def test_steer_pipeline_rejects_bad_windows_and_foreign_names(flux, flux_transport):
    hooks = _hooks(flux)
    with pytest.raises(ValueError, match="start < end"):
        attach_pipeline(flux, flux_transport, steps=(0.5, 0.5))
    comfy_named = flux_transport.replace({"double_blocks.0:0": flux_transport["transformer.transformer_blocks.0:1"]},
                                         model=dict(flux_transport.model, naming="comfyui"))
    with pytest.raises(KeyError, match="from_comfy"):
        attach_pipeline(flux, comfy_named)
    site = "transformer.single_transformer_blocks.0:1"  # as fitted with diffusers < 0.35: one tensor, no ':k'
    old = flux_transport.replace({"transformer.single_transformer_blocks.0": flux_transport[site]},
                                 model=dict(flux_transport.model, diffusers_version="0.34.0"))
    with pytest.raises(ValueError, match="0.34.0"):
        attach_pipeline(flux, old)
    assert _hooks(flux) == hooks and type(flux).__name__ == "FluxPipeline"


def test_top_level_api_dispatches_pipelines(flux, flux_transport):
    plain = flux("a cat", **flux_call_kwargs()).images
    with actsteer.steer(flux, flux_transport, strength=0.0, steps=(0.0, 1.0)):
        assert torch.equal(flux("a cat", **flux_call_kwargs()).images, plain)
    handle = actsteer.attach(flux, flux_transport, strength=1.0, steps=(0.5, 1.0))
    try:
        steered = flux("a cat", **flux_call_kwargs()).images
    finally:
        handle.remove()
    assert not torch.equal(steered, plain)
    assert not handle.calls or all(v > 0 for v in handle.calls.values())
    with pytest.raises(TypeError, match="unexpected options"):
        actsteer.attach(torch.nn.Linear(2, 2), flux_transport, steps=(0, 1))
    comfy = actsteer.to_comfy(flux_transport)
    assert all(s.startswith(("double_blocks.", "single_blocks.")) for s in comfy.sites)
    back = actsteer.from_comfy(comfy, "flux")
    assert set(back.sites) <= set(flux_transport.sites)
