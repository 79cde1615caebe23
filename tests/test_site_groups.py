"""One vocabulary of site groups for diffusers and ComfyUI: the same layers under both namings, on the real
SDXL and FLUX.1 layouts (built on the meta device: names only, no memory), and the diffusers presets on it."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

from actsteer.core.transport import Transport, UnitMap
from support.comfy import setup_comfy

from actsteer.archs import comfy_names, site_groups
from actsteer.hf_integration.diffusion_presets import component_view, pipeline_sites, preset_names

SDXL_GROUPS = site_groups.group_names("sdxl")
FLUX_GROUPS = site_groups.group_names("flux")


def _modules(model: torch.nn.Module, prefix: str = "") -> list[tuple[str, bool]]:
    return [(prefix + n, isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))) for n, m in model.named_modules() if n]


@pytest.fixture(scope="module")
def sdxl_both():
    """The SDXL base UNet in both implementations, on the meta device: (diffusers modules, ComfyUI modules)."""
    from support.tiny_pipelines import SDXL_UNET_CONFIG
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    setup_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = dict(
        image_size=32, use_spatial_transformer=True, legacy=False, num_classes="sequential", model_channels=320,
        in_channels=4, out_channels=4, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
        transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
        transformer_depth_middle=10, context_dim=2048, adm_in_channels=2816, use_linear_in_transformer=True,
        num_head_channels=64, use_temporal_attention=False, dtype=torch.float32,
    )
    ours = UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init)
    return _modules(unet, "unet."), _modules(ours)


@pytest.fixture(scope="module")
def flux_both():
    """FLUX.1's block layout (19 double, 38 single blocks) in both implementations, on the meta device."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(num_layers=19, num_single_layers=38, attention_head_dim=16,
                                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32)
    setup_comfy()
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    ours = Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=64,
                mlp_ratio=2.0, num_heads=4, depth=19, depth_single_blocks=38, axes_dim=[4, 6, 6], theta=10000,
                patch_size=2, qkv_bias=True, guidance_embed=True, device="meta", operations=comfy.ops.disable_weight_init)
    return _modules(transformer, "transformer."), _modules(ours)


def _as_comfy(sites: list[str], arch: str) -> list[str]:
    """diffusers site names -> ComfyUI names with actsteer's own translation tables (`comfy_names`)."""
    transport = Transport({s: UnitMap(torch.ones(1), torch.zeros(1)) for s in sites}, model={"naming": "diffusers"})
    return comfy_names.to_comfy(transport, arch).sites


def test_site_groups_module_imports_neither_torch_nor_comfy():
    code = ("import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('site_groups', sys.argv[1])\n"
            "module = sys.modules['site_groups'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'comfy', 'diffusers', 'transformers'}))\n")
    path = importlib.import_module("actsteer.archs.site_groups").__file__
    res = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


@pytest.mark.parametrize("group", SDXL_GROUPS)
def test_sdxl_group_names_the_same_layers_in_both_namings(sdxl_both, group):
    diffusers, comfy = sdxl_both
    ours = site_groups.select(group, "sdxl", "comfyui", comfy)
    theirs = site_groups.select(group, "sdxl", "diffusers", diffusers)
    assert ours and sorted(_as_comfy(theirs, "sdxl")) == sorted(ours)


def test_sdxl_groups_partition_the_papers_256_norms(sdxl_both):
    _, comfy = sdxl_both
    count = {g: len(site_groups.select(g, "sdxl", "comfyui", comfy)) for g in SDXL_GROUPS}
    assert count["all-norms"] == 256 and site_groups.select("auto", "sdxl", "comfyui", comfy) == \
        site_groups.select("all-norms", "sdxl", "comfyui", comfy)
    assert count["input-blocks"] + count["middle-block"] + count["output-blocks"] == 256
    assert count["attention-norms"] + count["resnet-norms"] == 255  # and the final norm, out.0
    assert count["fast"] == 12  # 3 down levels x 2 resnets x 2 norms


@pytest.mark.parametrize("group", FLUX_GROUPS)
def test_flux_group_names_the_same_layers_in_both_namings(flux_both, group):
    diffusers, comfy = flux_both
    ours = site_groups.select(group, "flux", "comfyui", comfy)
    theirs = site_groups.select(group, "flux", "diffusers", diffusers)
    # ComfyUI's single block is one [text; image] tensor where diffusers has two streams: compare modules there
    assert ours and sorted(set(_as_comfy(theirs, "flux"))) == sorted(ours)


def test_flux_streams_swap_their_tuple_index_between_namings(flux_both):
    diffusers, comfy = flux_both
    assert site_groups.select("image-stream", "flux", "comfyui", comfy)[:2] == ["double_blocks.0:0", "double_blocks.1:0"]
    assert site_groups.select("image-stream", "flux", "diffusers", diffusers)[0] == "transformer.transformer_blocks.0:1"
    blocks = site_groups.select("blocks", "flux", "comfyui", comfy)
    assert len(blocks) == 19 * 2 + 38  # 76 block outputs, as the Learn node's auto choice
    old = site_groups.select("single-blocks", "flux", "diffusers", diffusers, flux_single_tuple=False)
    assert old[0] == "transformer.single_transformer_blocks.0"  # diffusers < 0.35: one tensor, no ':k'


def test_site_groups_errors_name_the_family_and_the_choices():
    with pytest.raises(ValueError, match="'double-blocks' is a FLUX layer group; for this SDXL model choose one of: "
                                         "auto, all-norms, fast"):
        site_groups.get_group("double-blocks", "sdxl")
    with pytest.raises(ValueError, match="Unknown layer group 'everything'"):
        site_groups.get_group("everything", "flux")
    sites = ["input_blocks.1.0.in_layers.0", "output_blocks.2.0.out_layers.0"]
    with pytest.raises(ValueError, match="it has layers in: all-norms, fast, input-blocks, output-blocks, resnet-norms"):
        site_groups.filter_sites(sites, "middle-block", "sdxl", "comfyui")
    assert site_groups.filter_sites(sites, "all", "sdxl", "comfyui") == sites


def test_pipeline_presets_take_every_group_and_the_old_names(sdxl_both):
    from support.tiny_pipelines import make_flux_pipeline, make_sdxl_pipeline

    sdxl, flux = make_sdxl_pipeline(), make_flux_pipeline()
    for pipe, arch in ((sdxl, "sdxl"), (flux, "flux")):
        view = component_view(pipe)
        for name in preset_names(arch):
            assert pipeline_sites(pipe, view, name), name
    view = component_view(sdxl)
    assert pipeline_sites(sdxl, view, "norms") == pipeline_sites(sdxl, view, "all-norms") == pipeline_sites(sdxl, view, "auto")
    assert all(".mid_block." in s for s in pipeline_sites(sdxl, view, "middle-block"))
    assert pipeline_sites(flux, component_view(flux), "text-stream") == [
        "transformer.transformer_blocks.0:0", "transformer.transformer_blocks.1:0"]
    with pytest.raises(ValueError, match="Unknown preset `modules='blocks'`.*choose one of: auto, norms, all-norms"):
        pipeline_sites(sdxl, view, "blocks")
