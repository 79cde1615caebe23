"""The node pack as ComfyUI sees it: registration through its loader, schemas, files, errors, the Sweep node."""

from __future__ import annotations

import pytest
import torch
from comfy_harness import (  # noqa: F401  (fixtures)
    REPO,
    clip,
    comfy_dirs,
    empty_latent,
    encode,
    flux,
    ksample,
    one_thread,
    pack,
    sdxl,
    tiny_vae,
)

NODE_IDS = ["ActSteerLearn", "ActSteerSave", "ActSteerLoad", "ActSteerApply", "ActSteerSweep"]


def _node(name: str):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[name]


def _transport(pack, sites_widths: dict[str, int], seed: int = 0, **meta):
    core = pack.core
    g = torch.Generator().manual_seed(seed)
    maps = {s: core.UnitMap(1 + 0.5 * torch.rand(d, generator=g), torch.randn(d, generator=g)) for s, d in sites_widths.items()}
    return core.Transport(maps, support="all", **meta)


def test_pack_registers_through_comfyui_loader(pack):
    import folder_paths
    import nodes

    assert not hasattr(pack, "NODE_CLASS_MAPPINGS")  # V1 mappings would make ComfyUI skip the V3 entrypoint
    for node_id in NODE_IDS:
        cls = nodes.NODE_CLASS_MAPPINGS[node_id]
        assert cls.RELATIVE_PYTHON_MODULE == f"custom_nodes.{REPO.name}"
        assert cls.CATEGORY == "model_patches/steering (AcT)"
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("AcT ")
    assert "act_transports" in folder_paths.folder_names_and_paths
    assert ".safetensors" in folder_paths.folder_names_and_paths["act_transports"][1]


def test_node_inputs_and_outputs(pack):
    spec = {node_id: _node(node_id).INPUT_TYPES() for node_id in NODE_IDS}
    learn = spec["ActSteerLearn"]["required"]
    assert list(learn)[:4] == ["model", "clip", "source_prompts", "target_prompts"]
    assert learn["source_prompts"][1]["multiline"] and learn["target_prompts"][1]["multiline"]
    assert "linear-act" in learn["method"][1]["options"] and learn["method"][1]["default"] == "linear-act"
    assert learn["layers"][1]["options"] == ["auto", "all-norms", "fast", "blocks", "regex"]
    for name in ("steps", "seed", "cfg", "width", "height", "samples_per_prompt", "layer_regex"):
        assert name in learn
    assert list(_node("ActSteerLearn").RETURN_TYPES) == ["ACT_TRANSPORT"]

    apply = spec["ActSteerApply"]
    assert list(apply["required"]) == ["model", "transport", "strength", "start_percent", "end_percent"]
    assert apply["required"]["transport"][0] == "ACT_TRANSPORT"
    strength = apply["required"]["strength"][1]
    assert strength["default"] == 1.0 and strength["min"] < 0 and strength["display"] == "slider"
    assert list(apply["optional"]) == ["layers"]
    assert list(_node("ActSteerApply").RETURN_TYPES) == ["MODEL"]

    assert list(spec["ActSteerSave"]["required"]) == ["transport", "filename", "if_exists"]
    assert _node("ActSteerSave").OUTPUT_NODE is True
    assert list(spec["ActSteerLoad"]["required"]) == ["transport_name"]
    assert list(_node("ActSteerLoad").RETURN_TYPES) == ["ACT_TRANSPORT"]
    sweep = spec["ActSteerSweep"]["required"]
    assert {"model", "transport", "vae", "positive", "negative", "latent_image", "strengths", "seed"} <= set(sweep)
    assert list(_node("ActSteerSweep").RETURN_TYPES) == ["IMAGE"]


def test_save_refuses_unsafe_names_and_silent_overwrites(pack, comfy_dirs):
    transport = _transport(pack, {"a": 4})
    save = _node("ActSteerSave").execute
    for bad in ("../escape", "/abs/path", "a/../../b", ".hidden", "", "x\\..\\y", "C:/x", "sub//x", "a\nb"):
        with pytest.raises(ValueError, match="Unsafe transport file name"):
            save(transport=transport, filename=bad, if_exists="error")
    assert list(comfy_dirs.rglob("*")) == []
    assert save(transport=transport, filename="style/water color", if_exists="error")[0] == "style/water color.safetensors"
    with pytest.raises(ValueError, match="already exists; choose another name"):
        save(transport=transport, filename="style/water color", if_exists="error")
    assert save(transport=transport, filename="style/water color", if_exists="add number")[0] == "style/water color_00001.safetensors"
    other = _transport(pack, {"b": 2}, seed=1)
    assert save(transport=other, filename="style/water color.safetensors", if_exists="overwrite")[0] == "style/water color.safetensors"
    assert _node("ActSteerLoad").execute(transport_name="style/water color.safetensors")[0] == other
    assert _node("ActSteerLoad").execute(transport_name="style/water color_00001.safetensors")[0] == transport


def test_load_lists_files_and_reports_unreadable_ones(pack, comfy_dirs):
    (comfy_dirs / "garbage.safetensors").write_bytes(b"\x00\x01 definitely not safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(comfy_dirs / "foreign.safetensors"))
    load = _node("ActSteerLoad")
    assert load.INPUT_TYPES()["required"]["transport_name"][1]["options"] == ["foreign.safetensors", "garbage.safetensors"]
    with pytest.raises(ValueError, match="Cannot read transport file 'garbage.safetensors'.*not a readable safetensors"):
        load.execute(transport_name="garbage.safetensors")
    with pytest.raises(ValueError, match="Cannot read transport file 'foreign.safetensors'.*not an actsteer transport"):
        load.execute(transport_name="foreign.safetensors")
    with pytest.raises(ValueError, match="No transport file 'missing.safetensors'"):
        load.execute(transport_name="missing.safetensors")
    before = load.fingerprint_inputs(transport_name="garbage.safetensors")
    (comfy_dirs / "garbage.safetensors").write_bytes(b"changed, and longer than before")
    assert load.fingerprint_inputs(transport_name="garbage.safetensors") != before


def test_apply_translates_diffusers_transports(pack, clip, sdxl, flux, caplog):
    """A transport fitted with actsteer's diffusers API steers exactly like the same maps under ComfyUI names."""
    patching, checks = pack.comfy_nodes.patching, pack.comfy_nodes.checks
    config = sdxl.model.model_config.unet_config
    layout = {k: config[k] for k in ("num_res_blocks", "channel_mult", "transformer_depth",
                                     "transformer_depth_output", "transformer_depth_middle")}
    names = {  # diffusers name -> ComfyUI name, for the tiny UNet's layout
        "unet.down_blocks.0.resnets.0.norm1": "input_blocks.1.0.in_layers.0",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.norm1": "input_blocks.3.1.transformer_blocks.0.norm1",
        "unet.mid_block.attentions.0.norm": "middle_block.1.norm",
        "unet.conv_norm_out": "out.0",
    }
    widths = {"unet.down_blocks.0.resnets.0.norm1": 32, "unet.down_blocks.1.attentions.0.transformer_blocks.0.norm1": 64,
              "unet.mid_block.attentions.0.norm": 64, "unet.conv_norm_out": 32}
    fitted = _transport(pack, widths, model={"naming": "diffusers", "arch": "sdxl", "unet_layout": layout})
    same = pack.core.Transport({names[s]: fitted[s] for s in fitted}, support="all")
    assert checks.is_diffusers_transport(fitted) and not checks.is_diffusers_transport(same)
    apply = _node("ActSteerApply").execute
    patched = apply(model=sdxl, transport=fitted, strength=1.0, start_percent=0.0, end_percent=1.0, layers="")[0]
    assert patching.steering_patch(patched).entries[0].transport.sites == list(names.values())
    reference = apply(model=sdxl, transport=same, strength=1.0, start_percent=0.0, end_percent=1.0, layers="")[0]
    pos, neg = encode(clip, "a photo of a cat"), encode(clip, "")
    assert torch.equal(ksample(patched, pos, neg), ksample(reference, pos, neg))

    # FLUX: the tuple order swaps ((text, image) in diffusers), with a warning where distributions differ
    flux_fitted = _transport(pack, {"transformer.transformer_blocks.0:0": 64, "transformer.transformer_blocks.1:1": 64},
                             model={"naming": "diffusers", "arch": "flux"})
    with caplog.at_level("WARNING"):
        patched = apply(model=flux, transport=flux_fitted, strength=1.0, start_percent=0.0, end_percent=1.0, layers="")[0]
    assert patching.steering_patch(patched).entries[0].transport.sites == ["double_blocks.0:1", "double_blocks.1:0"]
    assert "different activation distributions" in caplog.text
    with pytest.raises(ValueError, match="Cannot translate this diffusers transport"):
        apply(model=flux, transport=_transport(pack, {"transformer.norm_out": 64}, model={"naming": "diffusers"}),
              strength=1.0, start_percent=0.0, end_percent=1.0, layers="")


def test_sweep_returns_one_image_per_strength(pack, clip, sdxl):
    transport = _transport(pack, {"input_blocks.1.0.in_layers.0": 32, "middle_block.1.norm": 64, "out.0": 32},
                           model={"framework": "comfyui", "class": "SDXL"})
    vae = tiny_vae(4)
    pos, neg = encode(clip, "a photo of a cat"), encode(clip, "")
    latent = empty_latent(sdxl)
    images = _node("ActSteerSweep").execute(
        model=sdxl, transport=transport, vae=vae, positive=pos, negative=neg, latent_image=latent,
        strengths="0, 0.5; 1  -1", seed=7, steps=3, cfg=4.0, sampler_name="euler", scheduler="simple",
        start_percent=0.0, end_percent=1.0, layers="",
    )[0]
    assert images.shape == (4, 64, 64, 3)
    unsteered = vae.decode(ksample(sdxl, pos, neg, seed=7, steps=3, cfg=4.0, latent=latent))
    assert torch.equal(images[0:1], unsteered)  # strength 0 is the plain sample, same seed
    assert all(not torch.equal(images[i], images[0]) for i in (1, 2, 3))
    with pytest.raises(ValueError, match="Bad strength 'strong'"):
        pack.comfy_nodes.nodes.parse_strengths("0, strong")


def test_sweep_rejects_mismatched_transport_before_sampling(pack, clip, flux):
    transport = _transport(pack, {"input_blocks.1.0.in_layers.0": 32}, model={"framework": "comfyui", "class": "SDXL"})
    with pytest.raises(ValueError, match="fitted on SDXL \\(ComfyUI\\), the MODEL is Flux"):
        _node("ActSteerSweep").execute(
            model=flux, transport=transport, vae=None, positive=None, negative=None, latent_image=None,
            strengths="0, 1", seed=0, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple",
            start_percent=0.0, end_percent=1.0, layers="",
        )
