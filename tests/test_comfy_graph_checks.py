"""Queue-time checks that need the queued graph (issue 21, item 13): a layer group or a transport of the other model
family is refused when the prompt is queued, from the checkpoint's safetensors header, before anything loads.

The server hands each graph to `graph.remember_prompt` (an on-prompt handler); here the test does what the server
does, then runs ComfyUI's own validation. tests/test_comfy_server.py checks the same through a real server.
"""

from __future__ import annotations

import contextvars

import pytest
import torch
from support.comfy import (  # noqa: F401  (fixtures)
    Session,
    comfy_dirs,
    one_thread,
    pack,
)

SOURCE = "a photo of a cat\na photo of a dog"
TARGET = "a watercolor of a cat\na watercolor of a dog"


@pytest.fixture
def model_files(tmp_path, monkeypatch, pack):
    """A checkpoint and a diffusion model file whose headers say SDXL and FLUX (tiny tensors, never loaded)."""
    import folder_paths
    from safetensors.torch import save_file

    folders = {}
    for folder, name, keys in (
        ("checkpoints", "sdxl_base.safetensors", ["model.diffusion_model.input_blocks.0.0.weight",
                                                  "model.diffusion_model.middle_block.1.norm.weight",
                                                  "first_stage_model.encoder.down.0.block.0.conv1.weight"]),
        ("diffusion_models", "flux_dev.safetensors", ["double_blocks.0.img_attn.qkv.weight",
                                                      "single_blocks.0.linear1.weight"]),
    ):
        path = tmp_path / folder
        path.mkdir()
        save_file({k: torch.zeros(1) for k in keys}, str(path / name))
        folders[folder] = path
        monkeypatch.setitem(folder_paths.folder_names_and_paths, folder, ([str(path)], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return folders


def _transport(pack, arch: str):
    core = pack.core
    site, width = ("middle_block.1.norm", 64) if arch == "sdxl" else ("double_blocks.0:0", 64)
    model = {"framework": "comfyui", "naming": "comfyui", "arch": arch, "class": {"sdxl": "SDXL", "flux": "Flux"}[arch]}
    return core.Transport({site: core.UnitMap(torch.ones(width), torch.zeros(width))}, support="all", model=model)


def _loader(kind: str) -> dict:
    if kind == "sdxl":
        return {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl_base.safetensors"}}
    return {"class_type": "UNETLoader", "inputs": {"unet_name": "flux_dev.safetensors", "weight_dtype": "default"}}


def _learn(layers: str = "auto") -> dict:
    return {"class_type": "ActSteerLearn", "inputs": {
        "model": ["1", 0], "clip": ["9", 0], "source_prompts": SOURCE, "target_prompts": TARGET, "method": "linear-act",
        "layers": layers, "layer_regex": "", "steps": 4, "seed": 0, "cfg": 1.0, "width": 64, "height": 64,
        "samples_per_prompt": 1, "collect_steps": 1, "fit_mode": "sequential", "support": "observed", "batch_size": 0}}


def _validate_as_the_server_does(pack, prompt: dict) -> dict:
    """The server's on-prompt handlers run first (the pack's keeps the graph), then ComfyUI validates it."""

    def queue():
        pack.comfy_nodes.graph.remember_prompt({"prompt": prompt, "client_id": "test"})
        return Session.validate(prompt)[2]

    return contextvars.copy_context().run(queue)


def _messages(node_errors: dict, node_id: str) -> set[str]:
    return {e["details"].split(" - ", 1)[1] for e in node_errors.get(node_id, {}).get("errors", [])}


def _graph(model: str, node: dict, transport: dict | None = None) -> dict[str, dict]:
    prompt = {"1": _loader(model), "9": {"class_type": "ActSteerTestTinyCLIP", "inputs": {}}, "2": node}
    if node["class_type"] == "ActSteerLearn":
        prompt["3"] = {"class_type": "ActSteerSave", "inputs": {"transport": ["2", 0], "filename": "x",
                                                                "if_exists": "add number"}}
    else:
        prompt.update(transport or {})
        prompt["4"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["9", 0], "text": "a cat"}}
        prompt["5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
        prompt["6"] = {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": 0, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["4", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}}
        prompt["7"] = {"class_type": "ActSteerTestTinyVAE", "inputs": {"vae_name": "tiny"}}
        prompt["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["7", 0]}}
        prompt["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    return prompt


def _apply(layer_group: str = "all") -> dict:
    return {"class_type": "ActSteerApply", "inputs": {"model": ["1", 0], "transport": ["11", 0], "strength": 1.0,
                                                      "start_percent": 0.0, "end_percent": 1.0, "layers": "",
                                                      "layer_group": layer_group}}


def test_learn_refuses_a_layer_group_of_the_other_family_when_queued(pack, comfy_dirs, model_files):
    errors = _validate_as_the_server_does(pack, _graph("sdxl", _learn("blocks")))
    assert _messages(errors, "2") == {
        "layers: 'blocks' is a layer group of FLUX, and the MODEL is SDXL (sdxl_base.safetensors); choose one of: "
        "auto, fast, all-norms, input-blocks, middle-block, output-blocks, attention-norms, resnet-norms, regex"}
    errors = _validate_as_the_server_does(pack, _graph("flux", _learn("input-blocks")))
    assert "and the MODEL is FLUX (flux_dev.safetensors)" in _messages(errors, "2").pop()
    for model, layers in (("sdxl", "input-blocks"), ("flux", "image-stream"), ("sdxl", "auto"), ("flux", "fast")):
        assert _validate_as_the_server_does(pack, _graph(model, _learn(layers))) == {}, (model, layers)
    # validated outside a server (no graph to read): nothing is known, the node checks when it runs
    assert Session.validate(_graph("sdxl", _learn("blocks")))[2] == {}


def test_apply_refuses_a_group_or_a_transport_of_the_other_family_when_queued(pack, comfy_dirs, model_files):
    _transport(pack, "sdxl").save(comfy_dirs / "sdxl_style.safetensors")
    _transport(pack, "flux").save(comfy_dirs / "flux_style.safetensors")

    def load(name: str) -> dict:
        return {"11": {"class_type": "ActSteerLoad", "inputs": {"transport_name": name}}}

    errors = _validate_as_the_server_does(pack, _graph("sdxl", _apply("image-stream"), load("sdxl_style.safetensors")))
    assert _messages(errors, "2") == {
        "layer_group: 'image-stream' is a layer group of FLUX, and the MODEL is SDXL (sdxl_base.safetensors); choose "
        "one of: all, fast, all-norms, input-blocks, middle-block, output-blocks, attention-norms, resnet-norms"}
    errors = _validate_as_the_server_does(pack, _graph("sdxl", _apply(), load("flux_style.safetensors")))
    assert _messages(errors, "2") == {
        "The transport was learned on FLUX (flux_style.safetensors) and the MODEL is SDXL (sdxl_base.safetensors): a "
        "transport steers only the model family it was learned on; connect a matching MODEL or transport"}
    assert _validate_as_the_server_does(pack, _graph("sdxl", _apply("input-blocks"), load("sdxl_style.safetensors"))) == {}
    # a transport learned in the same graph: its family is that of the MODEL AcT Learn gets (through AcT Save)
    learned_on_flux = {"11": {"class_type": "ActSteerSave", "inputs": {"transport": ["12", 0], "filename": "y",
                                                                       "if_exists": "add number"}},
                       "12": {**_learn(), "inputs": {**_learn()["inputs"], "model": ["13", 0]}}, "13": _loader("flux")}
    prompt = _graph("sdxl", _apply(), learned_on_flux)
    prompt["2"]["inputs"]["transport"] = ["11", 1]
    errors = _validate_as_the_server_does(pack, prompt)
    assert _messages(errors, "2") == {
        "The transport was learned on FLUX (flux_dev.safetensors) and the MODEL is SDXL (sdxl_base.safetensors): a "
        "transport steers only the model family it was learned on; connect a matching MODEL or transport"}


def test_unknown_models_are_not_guessed(pack, comfy_dirs, model_files):
    (model_files["checkpoints"] / "empty.safetensors").write_bytes(b"")  # a placeholder: unreadable header
    prompt = _graph("sdxl", _learn("blocks"))
    prompt["1"]["inputs"]["ckpt_name"] = "empty.safetensors"
    assert _validate_as_the_server_does(pack, prompt) == {}
    checkpoint_arch = pack.archs.detect.checkpoint_arch
    assert checkpoint_arch(["joint_blocks.0.x_block.attn.qkv.weight"]) is None  # SD3: not SDXL, not FLUX
    assert checkpoint_arch(["transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.norm.linear.weight"]) == "flux"
    assert checkpoint_arch(["down_blocks.0.resnets.0.norm1.weight", "mid_block.resnets.0.norm1.weight"]) == "sdxl"
