"""The node pack as ComfyUI sees it: registration through its loader, schemas, files, errors, the Sweep node."""

from __future__ import annotations

import pytest
import torch
from support.comfy import (  # noqa: F401  (fixtures)
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
    layers = learn["layers"][1]["options"]
    assert layers[:2] == ["auto", "fast"] and layers[-1] == "regex"
    assert {"all-norms", "input-blocks", "middle-block", "output-blocks", "attention-norms", "resnet-norms", "blocks",
            "double-blocks", "single-blocks", "image-stream", "text-stream"} <= set(layers)
    for name in ("steps", "seed", "cfg", "width", "height", "samples_per_prompt", "layer_regex"):
        assert name in learn
    assert learn["seed"][1]["control_after_generate"] is False  # a new Learn node must not relearn on every queue
    assert list(_node("ActSteerLearn").RETURN_TYPES) == ["ACT_TRANSPORT"]

    apply = spec["ActSteerApply"]
    assert list(apply["required"]) == ["model", "transport", "strength", "start_percent", "end_percent"]
    assert apply["required"]["transport"][0] == "ACT_TRANSPORT"
    strength = apply["required"]["strength"][1]
    assert strength["default"] == 1.0 and strength["min"] < 0 and strength["display"] == "slider"
    # new inputs last: saved workflows keep their values
    assert list(apply["optional"]) == ["layers", "layer_group", "cfg_placement"]
    placement = apply["optional"]["cfg_placement"][1]
    assert placement["options"] == ["both", "conditional", "guidance-aware"] and placement["default"] == "conditional"
    assert apply["optional"]["layer_group"][1]["options"][:2] == ["all", "fast"]
    assert list(_node("ActSteerApply").RETURN_TYPES) == ["MODEL"]

    assert list(spec["ActSteerSave"]["required"]) == ["transport", "filename", "if_exists"]
    assert _node("ActSteerSave").OUTPUT_NODE is True
    assert list(spec["ActSteerLoad"]["required"]) == ["transport_name"]
    assert list(_node("ActSteerLoad").RETURN_TYPES) == ["ACT_TRANSPORT"]
    sweep = spec["ActSteerSweep"]["required"]
    assert {"model", "transport", "vae", "positive", "negative", "latent_image", "strengths", "seed"} <= set(sweep)
    assert list(_node("ActSteerSweep").RETURN_TYPES) == ["IMAGE"]


def test_every_input_and_output_has_a_tooltip(pack):
    for node_id in NODE_IDS:
        cls = _node(node_id)
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                assert entry[1].get("tooltip"), f"{node_id}.{name}"
        assert all(cls.OUTPUT_TOOLTIPS), node_id
    assert "all-norms" in _node("ActSteerLearn").INPUT_TYPES()["required"]["layers"][1]["tooltip"]


def test_save_refuses_unsafe_names_and_silent_overwrites(pack, comfy_dirs):
    transport = _transport(pack, {"a": 4})
    save = _node("ActSteerSave").execute
    for bad in ("../escape", "/abs/path", "a/../../b", ".hidden", "", "x\\..\\y", "C:/x", "sub//x", "a\nb", "a\n/b",
                "con", "NUL", "aux/x", "styles/com1.old", "lpt9", "trailing.", "folder./x", "a /b", "a/ b", "x" * 201,
                "é" * 101):
        with pytest.raises(ValueError, match="^Unsafe transport file name .*change filename on the AcT Save node$"):
            save(transport=transport, filename=bad, if_exists="error")
        assert _node("ActSteerSave").validate_inputs(filename=bad) != True  # noqa: E712  (refused when queued)
    assert list(comfy_dirs.rglob("*")) == []
    assert _node("ActSteerSave").validate_inputs(filename="styles/console") is True  # only the exact device names
    assert save(transport=transport, filename="style/water color", if_exists="error")[0] == "style/water color.safetensors"
    other, third = _transport(pack, {"b": 2}, seed=1), _transport(pack, {"c": 3}, seed=2)
    with pytest.raises(ValueError, match="already exists; change filename"):
        save(transport=other, filename="style/water color", if_exists="error")
    assert save(transport=other, filename="style/water color", if_exists="add number")[0] == "style/water color_00001.safetensors"
    assert save(transport=third, filename="style/water color.safetensors", if_exists="overwrite")[0] == "style/water color.safetensors"
    assert _node("ActSteerLoad").execute(transport_name="style/water color.safetensors")[0] == third
    assert _node("ActSteerLoad").execute(transport_name="style/water color_00001.safetensors")[0] == other
    assert save(transport=transport, filename="style/water color", if_exists="add number")[0] == "style/water color_00002.safetensors"


def test_save_writes_no_duplicate_and_says_why(pack, comfy_dirs):
    transport, other = _transport(pack, {"a": 4}), _transport(pack, {"a": 4}, seed=1)
    save = _node("ActSteerSave").execute
    first = save(transport=transport, filename="ocean", if_exists="add number")
    assert first.result[0] == "ocean.safetensors" and first.ui.as_dict() == {"text": ("saved ocean.safetensors (1 layers)",)}
    assert first.result[1] is transport  # passed on, for AcT Apply (so a bad file name stops the graph early)
    again = save(transport=transport, filename="ocean", if_exists="add number")  # the same transport, queued again
    assert again.result == ("ocean.safetensors", transport)
    assert again.ui.as_dict()["text"][0].startswith("not saved again: ocean.safetensors already holds this transport")
    for mode in ("error", "overwrite"):  # neither errors nor rewrites for the same transport
        assert save(transport=transport, filename="ocean", if_exists=mode).ui.as_dict()["text"][0].startswith("not saved")
    assert save(transport=other, filename="ocean", if_exists="add number")[0] == "ocean_00001.safetensors"
    assert save(transport=other, filename="ocean", if_exists="add number")[0] == "ocean_00001.safetensors"  # the last copy
    with pytest.raises(ValueError, match="A different transport named 'ocean.safetensors' already exists; change "
                                         "filename, or set if_exists to 'add number' or 'overwrite'"):
        save(transport=other, filename="ocean", if_exists="error")
    assert sorted(p.name for p in comfy_dirs.iterdir()) == ["ocean.safetensors", "ocean_00001.safetensors"]


def test_save_explains_folders_and_files_in_the_way(pack, comfy_dirs):
    transport = _transport(pack, {"a": 4})
    save = _node("ActSteerSave").execute
    (comfy_dirs / "taken.safetensors").mkdir()
    for mode in ("overwrite", "add number", "error"):
        with pytest.raises(ValueError, match="^'taken.safetensors' is a folder in act_transports; change filename"):
            save(transport=transport, filename="taken", if_exists=mode)
    (comfy_dirs / "plain").write_text("a file where a folder is wanted")
    with pytest.raises(ValueError, match="^Cannot write 'plain/x.safetensors' in act_transports: .*; change filename"):
        save(transport=transport, filename="plain/x", if_exists="add number")


def test_load_lists_files_and_reports_unreadable_ones(pack, comfy_dirs):
    (comfy_dirs / "garbage.safetensors").write_bytes(b"\x00\x01 definitely not safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(comfy_dirs / "foreign.safetensors"))
    load = _node("ActSteerLoad")
    assert load.INPUT_TYPES()["required"]["transport_name"][1]["options"] == ["foreign.safetensors", "garbage.safetensors"]
    for name, problem in (("garbage.safetensors", "not a readable safetensors"),
                          ("foreign.safetensors", "not an actsteer transport")):
        with pytest.raises(ValueError, match=f"Cannot read transport file '{name}'.*{problem}") as err:
            load.execute(transport_name=name)
        assert str(comfy_dirs) not in str(err.value) and "\n" not in str(err.value)  # one line, no server path
        assert load.validate_inputs(transport_name=name) == str(err.value)  # the same line when queued
    with pytest.raises(ValueError, match="No transport file 'missing.safetensors' in models/act_transports; pick one"):
        load.execute(transport_name="missing.safetensors")
    assert load.validate_inputs(transport_name="missing.safetensors").startswith("No transport file")
    assert load.validate_inputs(transport_name=None) is True  # a linked input is checked when the graph runs
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
    assert pack.archs.is_diffusers_transport(fitted) and not pack.archs.is_diffusers_transport(same)
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
        pack.comfy_nodes.inputs.parse_strengths("0, strong")


def test_sweep_rejects_mismatched_transport_before_sampling(pack, clip, flux):
    transport = _transport(pack, {"input_blocks.1.0.in_layers.0": 32}, model={"framework": "comfyui", "class": "SDXL"})
    with pytest.raises(ValueError, match="fitted on SDXL \\(ComfyUI\\), the MODEL is Flux"):
        _node("ActSteerSweep").execute(
            model=flux, transport=transport, vae=None, positive=None, negative=None, latent_image=None,
            strengths="0, 1", seed=0, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple",
            start_percent=0.0, end_percent=1.0, layers="",
        )


def test_apply_layer_group_steers_only_that_part_of_the_model(pack, sdxl, flux):
    patching = pack.comfy_nodes.patching
    apply = _node("ActSteerApply").execute
    widths = {"input_blocks.1.0.in_layers.0": 32, "input_blocks.3.1.transformer_blocks.0.norm1": 64,
              "middle_block.1.norm": 64, "middle_block.2.out_layers.0": 64, "out.0": 32}
    transport = _transport(pack, widths, model={"framework": "comfyui", "class": "SDXL"})

    def steered(model, transport, group):
        patched = apply(model=model, transport=transport, strength=1.0, start_percent=0.0, end_percent=1.0, layers="",
                        layer_group=group)[0]
        return patching.steering_patch(patched).entries[0].transport.sites

    assert steered(sdxl, transport, "all") == list(widths)
    assert steered(sdxl, transport, "middle-block") == ["middle_block.1.norm", "middle_block.2.out_layers.0"]
    assert steered(sdxl, transport, "attention-norms") == ["input_blocks.3.1.transformer_blocks.0.norm1", "middle_block.1.norm"]
    assert steered(sdxl, transport, "output-blocks") == ["out.0"]
    with pytest.raises(ValueError, match="layer_group: None of the transport's 2 layers is in the group 'input-blocks'; "
                                         "it has layers in: .*middle-block.*; pick another layer_group, or 'all'"):
        steered(sdxl, transport.select(["middle_block.1.norm", "middle_block.2.out_layers.0"]), "input-blocks")
    # the choices offered are Apply's own (its list has "all", not Learn's "auto" or "regex")
    with pytest.raises(ValueError, match=r"^layer_group: 'image-stream' is a layer group of FLUX, and the MODEL is SDXL "
                                         r"\(UNetModel\); choose one of: all, fast, all-norms, input-blocks, "
                                         r"middle-block, output-blocks, attention-norms, resnet-norms$"):
        steered(sdxl, transport, "image-stream")

    streams = _transport(pack, {"double_blocks.0:0": 64, "double_blocks.0:1": 64, "single_blocks.1": 64},
                         model={"framework": "comfyui", "class": "Flux"})
    assert steered(flux, streams, "image-stream") == ["double_blocks.0:0"]
    assert steered(flux, streams, "single-blocks") == ["single_blocks.1"]
    # a transport fitted with diffusers is translated first: its text stream (:0 there) is ComfyUI's :1
    fitted = _transport(pack, {"transformer.transformer_blocks.1:0": 64, "transformer.transformer_blocks.1:1": 64},
                        model={"naming": "diffusers", "arch": "flux"})
    assert steered(flux, fitted, "text-stream") == ["double_blocks.1:1"]


def test_sweep_reports_one_progress_bar_for_all_strengths(pack, clip, sdxl):
    import comfy.utils

    transport = _transport(pack, {"middle_block.1.norm": 64}, model={"framework": "comfyui", "class": "SDXL"})
    updates = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    try:
        images = _node("ActSteerSweep").execute(
            model=sdxl, transport=transport, vae=tiny_vae(4), positive=encode(clip, "a cat"), negative=encode(clip, ""),
            latent_image=empty_latent(sdxl), strengths="0, 1, -1", seed=0, steps=3, cfg=4.0, sampler_name="euler",
            scheduler="simple", start_percent=0.0, end_percent=1.0, layers="", layer_group="middle-block",
        )[0]
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert images.shape[0] == 3
    assert {total for _, total in updates} == {9}  # 3 strengths x 3 steps, one bar
    values = [value for value, _ in updates]
    assert values == sorted(values) and values[-1] == 9  # never restarts


def test_errors_tell_an_artist_what_to_change_in_the_graph(pack, clip, sdxl, flux):
    apply = _node("ActSteerApply").execute
    sdxl_transport = _transport(pack, {"input_blocks.1.0.in_layers.0": 32}, model={"framework": "comfyui", "class": "SDXL"})
    with pytest.raises(ValueError) as err:
        apply(model=flux, transport=sdxl_transport, strength=1.0, start_percent=0.0, end_percent=1.0, layers="")
    message = str(err.value)
    assert "list_sites" not in message and "\n" not in message
    assert message.startswith("This transport does not match the MODEL: it was fitted on SDXL (ComfyUI), the MODEL is Flux")
    assert message.endswith("connect the MODEL this transport was learned on (same family and size), or learn a new "
                            "transport on this MODEL with AcT Learn Transport")
    learn = _node("ActSteerLearn").execute
    kw = dict(source_prompts="a\nb", target_prompts="c\nd", method="linear-act", steps=2, seed=0, cfg=1.0, width=64,
              height=64, samples_per_prompt=1, collect_steps=1, fit_mode="sequential", support="observed", batch_size=0)
    with pytest.raises(ValueError, match=r"^layer_regex: Site pattern .* matches no module of Flux.*; "
                                         "change layer_regex .*or pick a named layer group in layers$") as err:
        learn(model=flux, clip=clip, layers="regex", layer_regex=r"input_blocks\..*", **kw)
    assert "list_sites" not in str(err.value)
    nan = pack.core.Transport({"middle_block.1.norm": pack.core.UnitMap(torch.full((64,), float("nan")), torch.zeros(64))})
    with pytest.raises(ValueError, match="^The transport: site 'middle_block.1.norm' is unusable: `omega` has 64 NaN/Inf "
                                         "value.*learn it again with AcT Learn Transport$"):
        apply(model=sdxl, transport=nan, strength=1.0, start_percent=0.0, end_percent=1.0, layers="")
    for_artist = pack.comfy_nodes.checks.for_artist
    assert for_artist("Site 'x' not found in Flux (9 submodules); see actsteer.list_sites(model) (fitted on 'SDXL')",
                      "do this") == "Site 'x' not found in Flux (9 submodules) (fitted on 'SDXL'); do this"
