"""Per-step transports (``fit_pipeline(steps="each")``, `actsteer.core.split_stages`): the file, the refusals, and
steering on tiny real SDXL pipelines checked against an independent per-step reference."""

from __future__ import annotations

import pytest
import torch
import actsteer
from support.tiny_lm import make_tiny_lm
from support.tiny_pipelines import (  # noqa: F401  (one_thread, sdxl, flux: fixtures)
    make_sdxl_pipeline,
    one_thread,
    sdxl,
    sdxl_call_kwargs,
)

from actsteer.archs.comfy_names import from_comfy, to_comfy
from actsteer.core import check_transport, join_stages, split_stages, stage_windows
from actsteer.core.sites import parse_site
from actsteer.hf_integration.diffusion_presets import component_view
from actsteer.hf_integration.pipeline_fit import fit_pipeline
from actsteer.hf_integration.pipelines import disable_pipeline_steering, enable_pipeline_steering, steer_pipeline

SOURCE = ["a cat", "a dog on grass", "a red car", "a small house", "a tall tree", "a bird in the sky"]
TARGET = [f"watercolor, {s}, soft watercolor painting" for s in SOURCE]
FIT_KW = dict(height=32, width=32, guidance_scale=0.0, progress=False)
TE_SITE = "text_encoder.final_layer_norm"


@pytest.fixture(scope="module")
def each(sdxl):
    """A per-step transport over 4 steps, all-reals support (so the reference below is the plain affine map)."""
    return fit_pipeline(sdxl, SOURCE, TARGET, modules=[TE_SITE, "unet.mid_block.resnets.0.norm1",
                                                       "unet.up_blocks.1.resnets.0.norm2"],
                        steps="each", num_inference_steps=4, support="all", **FIT_KW)


def _map(n: int, value: float) -> actsteer.UnitMap:
    return actsteer.UnitMap(torch.ones(n), torch.full((n,), value))


# The transport and its file -----------------------------------------------------------------------------------
def test_fit_each_holds_one_map_per_step_for_the_unet_and_one_for_the_text_encoder(each):
    assert stage_windows(each) == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    assert TE_SITE in each  # runs once per call: fitted once, with the first step, and not marked
    for name in ("unet.mid_block.resnets.0.norm1", "unet.up_blocks.1.resnets.0.norm2"):
        assert [f"{name}@{k}" in each for k in range(4)] == [True] * 4
    assert len(each) == 1 + 2 * 4
    # stage k is fitted on step k's responses: the maps differ from step to step
    assert not torch.equal(each["unet.mid_block.resnets.0.norm1@0"].beta, each["unet.mid_block.resnets.0.norm1@3"].beta)
    assert each.extra["diffusion"]["steps"] == "each"
    assert each.extra["fit"]["denoiser_calls"] == 1 + 2 + 3 + 4  # stage k runs steps 0..k, then stops


def test_per_step_transport_saves_loads_and_splits(each, tmp_path):
    path = each.save(tmp_path / "each.safetensors")
    loaded = actsteer.Transport.load(path)
    assert loaded == each
    parts = split_stages(loaded)
    assert [w for w, _ in parts] == ["all", (0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    assert list(parts[0][1]) == [TE_SITE]
    assert all(list(p) == ["unet.mid_block.resnets.0.norm1", "unet.up_blocks.1.resnets.0.norm2"] for _, p in parts[1:])
    assert join_stages(parts[0][1], parts[1:]).sites == each.sites


@pytest.mark.parametrize("extra, sites, says", [
    ({}, ["unet.a@0"], "no extra['stages'] windows"),
    ({"stages": [[0, 0.5], [0.25, 1]]}, ["unet.a@0"], "in order and not overlap"),
    ({"stages": [[0, 0.5]]}, ["unet.a@0", "unet.a@1"], "names stage 1, but the transport has 1 stage windows"),
    ({"stages": [[0.5, 0.2]]}, ["unet.a@0"], "0 <= start < end <= 1"),
    ({"stages": "first"}, ["unet.a@0"], "non-empty list"),
])
def test_inconsistent_stages_are_refused_on_save_and_load(tmp_path, extra, sites, says):
    t = actsteer.Transport({s: _map(2, 1.0) for s in sites}, extra=extra)
    with pytest.raises(ValueError, match="fit the transport again") as err:
        check_transport(t, "crafted")
    assert says in str(err.value)
    with pytest.raises(ValueError, match="crafted|stage"):
        t.save(tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_per_step_transport_is_refused_where_no_step_is_known(sdxl, each):
    with pytest.raises(ValueError, match="one map per denoising step .* steer the whole diffusers pipeline"):
        actsteer.attach(sdxl.unet, each.select([s for s in each.sites if s.startswith("unet.")]))
    model, tokenizer = make_tiny_lm("llama")
    t = actsteer.Transport({"model.layers.0.mlp@0": _map(model.config.hidden_size, 1.0)}, extra={"stages": [[0, 1]]})
    with pytest.raises(ValueError, match="one map per denoising step"):
        with actsteer.steer(model, t):
            pass


def test_stage_marks_on_text_encoder_sites_are_refused(sdxl):
    t = actsteer.Transport({f"{TE_SITE}@0": _map(32, 1.0)}, extra={"stages": [[0, 1]]})
    with pytest.raises(ValueError, match="runs outside the unet"):
        with steer_pipeline(sdxl, t):
            pass


def test_fit_each_needs_denoiser_sites(sdxl):
    with pytest.raises(ValueError, match="steps='each' fits the unet's sites"):
        fit_pipeline(sdxl, SOURCE, TARGET, modules=[TE_SITE], steps="each", **FIT_KW)


def test_comfy_names_translate_stage_by_stage(each):
    unet_only = each.select([s for s in each.sites if s.startswith("unet.")])
    comfy = to_comfy(unet_only, arch="sdxl")
    assert stage_windows(comfy) == stage_windows(each) and len(comfy) == len(unet_only)
    assert all("@" in s and not s.startswith("unet.") for s in comfy.sites)
    back = from_comfy(comfy, "sdxl", layout=each.model.get("unet_layout"))
    assert back.sites == unet_only.sites


# Steering ----------------------------------------------------------------------------------------------------
def _reference(pipe, transport, strength, window=(0.0, 1.0), **call):
    """The image with stage k's affine maps applied at step k only, by plain hooks (not actsteer's engine); 4-D
    outputs move their spatial mean (ACT_SPEC.md section 6)."""
    parts = split_stages(transport)
    view = component_view(pipe)
    schedule: list[torch.Tensor] = []
    handles = [pipe.unet.register_forward_pre_hook(
        lambda m, args, kw: schedule.append(kw.get("timestep", args[1] if len(args) > 1 else None)), with_kwargs=True)]

    def hook(site, maps):
        def apply(module, args, output):
            if site.startswith("unet."):
                ts = pipe.scheduler.timesteps
                i = int((ts.double() - float(torch.as_tensor(schedule[-1]).reshape(-1)[0])).abs().argmin())
                n = ts.numel()
                unit = next((m for w, m in maps if w == "all" or w[0] <= i / n < w[1]), None)
                if unit is None or not window[0] <= i / n < window[1]:
                    return output
            else:
                unit = maps[0][1]
            w = 1 + strength * (unit.omega - 1)
            b = strength * unit.beta
            if output.dim() == 4:  # ACT_SPEC.md section 6: move the spatial mean per channel, keep the deviations
                mu = output.mean((2, 3))
                return output + (mu * w + b - mu)[:, :, None, None]
            return output * w + b
        return apply

    by_site: dict[str, list] = {}
    for w, part in parts:
        for site, unit in part.items():
            by_site.setdefault(site, []).append((w, unit))
    for site, maps in by_site.items():
        handles.append(view.get_submodule(parse_site(site)[0]).register_forward_hook(hook(site, maps)))
    try:
        return pipe("a horse", **call).images
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("window", [(0.0, 1.0), (0.5, 1.0)])
def test_steer_per_step_transport_equals_per_step_reference(sdxl, each, window):
    call = lambda: sdxl_call_kwargs(num_inference_steps=4, guidance_scale=0.0)  # noqa: E731
    plain = sdxl("a horse", **call()).images
    with steer_pipeline(sdxl, each, strength=0.8, steps=window) as handle:
        steered = sdxl("a horse", **call()).images
    expected = _reference(sdxl, each, 0.8, window, **call())
    assert not torch.equal(steered, plain)  # (late steps of a tiny random UNet move the image very little)
    torch.testing.assert_close(steered, expected, atol=2e-5, rtol=1e-4)
    steps_in = 4 if window == (0.0, 1.0) else 2
    assert handle.calls["unet.mid_block.resnets.0.norm1"] == steps_in  # one stage per step, never two
    assert handle.calls[TE_SITE] == 1
    # pipe(steering=) takes it the same way
    enable_pipeline_steering(sdxl)
    try:
        again = sdxl("a horse", steering=actsteer.Steering(each, 0.8), steering_steps=window, **call()).images
    finally:
        disable_pipeline_steering(sdxl)
    torch.testing.assert_close(again, steered, atol=0, rtol=0)


def test_per_step_transport_over_a_longer_schedule_spans_its_fractions(sdxl, each):
    """Fitted over 4 steps, sampled with 8: each stage covers two steps (fractions of the schedule)."""
    call = lambda: sdxl_call_kwargs(num_inference_steps=8, guidance_scale=0.0)  # noqa: E731
    with steer_pipeline(sdxl, each, strength=1.0) as handle:
        steered = sdxl("a horse", **call()).images
    torch.testing.assert_close(steered, _reference(sdxl, each, 1.0, **call()), atol=2e-5, rtol=1e-4)
    assert handle.calls["unet.mid_block.resnets.0.norm1"] == 8


def test_fit_each_on_img2img_fits_the_steps_the_call_runs(sdxl):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(**sdxl.components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32)
    t = fit_pipeline(pipe, SOURCE, TARGET, modules=["unet.mid_block.resnets.0.norm1"], steps="each",
                     num_inference_steps=4, image=image, strength=0.5, **FIT_KW)
    assert stage_windows(t) == [(0.5, 0.75), (0.75, 1.0)]
    assert t.sites == ["unet.mid_block.resnets.0.norm1@0", "unet.mid_block.resnets.0.norm1@1"]


def test_fit_pipeline_defaults_to_per_step_where_it_applies(sdxl):
    t = fit_pipeline(sdxl, SOURCE, TARGET, modules="fast", **FIT_KW)
    assert len(stage_windows(t)) == 4 and t.extra["diffusion"]["steps"] == "each"
    text = fit_pipeline(sdxl, SOURCE, TARGET, modules="text_encoders", **FIT_KW)  # run once per call: first step
    assert stage_windows(text) == [] and text.extra["diffusion"]["steps"] == "first"
    with pytest.raises(ValueError, match="trains through the model"):
        fit_pipeline(sdxl, SOURCE, TARGET, modules="fast", method="lineas", steps="each", **FIT_KW)


def test_per_site_strengths_name_a_layer_for_every_stage_or_one_stage(sdxl, each):
    site = "unet.mid_block.resnets.0.norm1"
    call = lambda: sdxl_call_kwargs(num_inference_steps=4, guidance_scale=0.0)  # noqa: E731
    with steer_pipeline(sdxl, actsteer.Steering(each, {"*": 0.0, site: 1.0})) as handle:
        sdxl("a horse", **call())
    assert handle.calls == {site: 4}  # the unmarked name: every stage; the rest at 0 (not computed)
    with steer_pipeline(sdxl, actsteer.Steering(each, {"*": 0.0, f"{site}@2": 1.0})) as handle:
        sdxl("a horse", **call())
    assert handle.calls == {site: 1}
    with pytest.raises(KeyError, match="not in the transport"):
        actsteer.Steering(each, {"unet.nowhere": 1.0})


def test_one_map_under_several_sites_saves_and_loads(tmp_path):
    m = _map(3, 0.5)
    t = actsteer.Transport({"a": m, "b": m})  # the same tensors twice (join_stages of one part does this too)
    assert actsteer.Transport.load(t.save(tmp_path / "shared.safetensors")) == t


def test_attach_steers_every_call_stage_by_stage_like_steer(sdxl, each):
    call = lambda: sdxl_call_kwargs(num_inference_steps=4, guidance_scale=0.0)  # noqa: E731
    with steer_pipeline(sdxl, each, strength=0.8):
        expected = sdxl("a horse", **call()).images
    handle = actsteer.attach(sdxl, each, strength=0.8)
    try:
        assert torch.equal(sdxl("a horse", **call()).images, expected)
        assert handle.calls["unet.mid_block.resnets.0.norm1"] == 4
    finally:
        handle.remove()


def test_cli_inspect_shows_the_stages(each, tmp_path, capsys):
    from actsteer.hf_integration.cli import main

    path = each.save(tmp_path / "each.safetensors")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "per-step transport: 3 layers x 4 steps" in out and "0: 0-0.25, 1: 0.25-0.5" in out
