"""archs/comfy_names.py: diffusers <-> ComfyUI site names, checked against ComfyUI's own key maps."""

from __future__ import annotations

import logging

import pytest
import torch
from support.tiny_pipelines import (  # noqa: F401  (one_thread, sdxl, flux: fixtures)
    SDXL_UNET_CONFIG,
    make_sdxl_pipeline,
    make_sdxl_unet,
    one_thread,
    sdxl_call_kwargs,
)

from actsteer.core import Transport, UnitMap
from actsteer.archs.comfy_names import from_comfy, to_comfy
from actsteer.hf_integration.pipeline_fit import fit_pipeline
from actsteer.hf_integration.pipelines import steer_pipeline

# ComfyUI's unet_config for the SDXL base UNet and for the tiny test UNet (comfy.utils.unet_to_diffusers input)
COMFY_SDXL = {"num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
              "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10}
COMFY_TINY = {"num_res_blocks": [2, 2], "channel_mult": [1, 2], "transformer_depth": [0, 0, 2, 2],
              "transformer_depth_output": [0, 0, 0, 2, 2, 2], "transformer_depth_middle": 2}


@pytest.fixture(scope="module")
def comfy_utils():
    """ComfyUI's ``comfy.utils`` (test-only reference for the key maps; actsteer never imports ComfyUI)."""
    from support.comfy import setup_comfy

    setup_comfy()  # a real ComfyUI tree, imported offline (the test skips, and the tier fails, without one)
    import comfy.utils

    return comfy.utils


def _maps(names, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: UnitMap(torch.rand(dim, generator=g) + 0.5, torch.randn(dim, generator=g)) for n in names}


def _check_against_comfy(unet, key_map, layout):
    """Every parameter of every UNet module maps to the ComfyUI key that ComfyUI's own table gives."""
    maps = _maps([f"unet.{n}" for n, m in unet.named_modules() if n and any(True for _ in m.parameters(recurse=False))])
    comfy = to_comfy(Transport(maps, model={"arch": "sdxl", "unet_layout": layout}))
    checked = 0
    for (site, _), comfy_site in zip(maps.items(), comfy.sites):
        name = site[len("unet."):]
        for param, _ in unet.get_submodule(name).named_parameters(recurse=False):
            if f"{name}.{param}" in key_map:
                assert key_map[f"{name}.{param}"] == f"{comfy_site}.{param}", site
                checked += 1
    return comfy, checked


def test_to_comfy_sdxl_names_match_comfyui_key_map(comfy_utils):
    with torch.device("meta"):  # the real SDXL layout, no memory
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    norms = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert len(norms) == 256  # ACT_SPEC.md section 6
    key_map = comfy_utils.unet_to_diffusers(COMFY_SDXL)
    comfy, checked = _check_against_comfy(unet, key_map, layout={})  # empty layout: SDXL base default
    params = {n for n, _ in unet.named_parameters()}
    assert checked == len(params & set(key_map)) == 1680  # every key of ComfyUI's table that the UNet has
    assert comfy.model["naming"] == "comfyui"
    assert "input_blocks.4.1.transformer_blocks.1.norm3" in comfy and "out.0" in comfy


def test_to_comfy_tiny_unet_uses_recorded_layout(comfy_utils):
    from actsteer.hf_integration.diffusion_presets import unet_layout

    unet = make_sdxl_unet()
    key_map = comfy_utils.unet_to_diffusers(COMFY_TINY)
    comfy, checked = _check_against_comfy(unet, key_map, unet_layout(unet))
    assert checked > 100
    # back, with the ComfyUI unet_config a transport fitted in ComfyUI records (as the Learn node does)
    back = from_comfy(comfy.replace(model={"naming": "comfyui", "unet_config": COMFY_TINY}), "sdxl")
    with_params = [n for n, m in unet.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    assert back.sites == [f"unet.{n}" for n in with_params]


def test_from_comfy_inverts_to_comfy_on_sdxl():
    sites = ["unet.down_blocks.1.resnets.0.norm1", "unet.down_blocks.1.attentions.1.transformer_blocks.0.norm2",
             "unet.down_blocks.1.attentions.1:0", "unet.down_blocks.0.downsamplers.0.conv", "unet.mid_block.resnets.1",
             "unet.up_blocks.0.upsamplers.0", "unet.up_blocks.0.resnets.2.norm2", "unet.conv_norm_out"]
    layout = {"layers_per_block": 2, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}
    original = Transport(_maps(sites), model={"arch": "sdxl", "unet_layout": layout})
    comfy = to_comfy(original)
    assert comfy.sites == ["input_blocks.4.0.in_layers.0", "input_blocks.5.1.transformer_blocks.0.norm2",
                           "input_blocks.5.1", "input_blocks.3.0.op", "middle_block.2", "output_blocks.2.2",
                           "output_blocks.2.0.out_layers.0", "out.0"]
    back = from_comfy(comfy, "sdxl")
    assert back.sites == original.sites
    assert all(torch.equal(back[s].beta, original[s].beta) for s in sites)
    assert back.model["naming"] == "diffusers"


def test_to_comfy_flux_swaps_streams_and_warns_on_single_blocks(caplog):
    sites = [f"transformer.transformer_blocks.0:{k}" for k in (0, 1)]
    sites += [f"transformer.single_transformer_blocks.1:{k}" for k in (0, 1)]
    original = Transport(_maps(sites), model={"arch": "flux", "flux_single_block_output": "tuple(text, image)"})
    with caplog.at_level(logging.WARNING, logger="actsteer.archs.comfy_names"):
        comfy = to_comfy(original)
    assert comfy.sites == ["double_blocks.0:1", "double_blocks.0:0", "single_blocks.1"]
    assert torch.equal(comfy["double_blocks.0:1"].beta, original["transformer.transformer_blocks.0:0"].beta)  # text
    assert torch.equal(comfy["single_blocks.1"].beta, original["transformer.single_transformer_blocks.1:1"].beta)
    assert "cat([text; image])" in caplog.text and "256 tokens" in caplog.text
    assert len(comfy.extra["comfy_translation"]["warnings"]) == 3  # text stream, dropped text map, image map


def test_from_comfy_flux_single_block_follows_diffusers_version(caplog):
    comfy = Transport(_maps(["double_blocks.2:0", "single_blocks.3"]), model={"naming": "comfyui"})
    with caplog.at_level(logging.WARNING):
        new = from_comfy(comfy, "flux", diffusers_version="0.42.1")
    assert new.sites == ["transformer.transformer_blocks.2:1", "transformer.single_transformer_blocks.3:0",
                         "transformer.single_transformer_blocks.3:1"]
    assert "cat([text; image])" in caplog.text
    caplog.clear()
    old = from_comfy(comfy, "flux", diffusers_version="0.34.0")
    assert old.sites == ["transformer.transformer_blocks.2:1", "transformer.single_transformer_blocks.3"]
    assert old.model["flux_single_block_output"] == "tensor cat(text, image)" and caplog.text == ""


def test_to_comfy_drops_text_encoder_sites_and_refuses_unmappable_ones(caplog):
    t = Transport(_maps(["text_encoder.encoder.layers.0.layer_norm1", "unet.mid_block.attentions.0.norm"]),
                  model={"arch": "sdxl"})
    with caplog.at_level(logging.WARNING):
        comfy = to_comfy(t)
    assert comfy.sites == ["middle_block.1.norm"] and "text-encoder" in caplog.text
    assert comfy.extra["comfy_translation"]["dropped"] == ["text_encoder.encoder.layers.0.layer_norm1"]
    with pytest.raises(KeyError, match="no known ComfyUI equivalent"):
        to_comfy(Transport(_maps(["unet.down_blocks.0"]), model={"arch": "sdxl"}))
    with pytest.raises(KeyError, match="double block"):
        to_comfy(Transport(_maps(["transformer.transformer_blocks.0.attn.to_q"]), model={"arch": "flux"}))


def test_comfy_round_trip_through_a_file_steers_identically(tmp_path):
    pipe = make_sdxl_pipeline()
    source = ["a cat", "a dog", "a car"]
    target = [f"watercolor, {p}" for p in source]
    transport = fit_pipeline(pipe, source, target, steps="first", progress=False, height=32, width=32)
    loaded = Transport.load(to_comfy(transport).save(tmp_path / "comfy"))
    assert loaded.model["naming"] == "comfyui" and loaded.sites[0] == "input_blocks.1.0.in_layers.0"
    back = from_comfy(loaded, "sdxl")
    with steer_pipeline(pipe, transport, strength=0.8):
        expected = pipe("a cat", **sdxl_call_kwargs()).images
    with steer_pipeline(pipe, back, strength=0.8):
        assert torch.equal(pipe("a cat", **sdxl_call_kwargs()).images, expected)
