"""The pack through ComfyUI's own queue-time validation and its caching executor, as a browser tab sees it:
errors before any model loads, ui outputs on the nodes, and a Save that runs again when queued again."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from support.comfy import (  # noqa: F401  (fixtures)
    Session,
    comfy_dirs,
    fresh_learn_cache,
    one_thread,
    pack,
)

SOURCE = "a photo of a cat\na photo of a dog\na photo of a house"
TARGET = "a watercolor of a cat\na watercolor of a dog\na watercolor of a house"


def _transport(pack, seed: int = 0, sites: dict[str, int] | None = None):
    core = pack.core
    g = torch.Generator().manual_seed(seed)
    sites = sites or {"input_blocks.1.0.in_layers.0": 32, "middle_block.1.norm": 64}
    maps = {s: core.UnitMap(1 + 0.5 * torch.rand(d, generator=g), torch.randn(d, generator=g)) for s, d in sites.items()}
    return core.Transport(maps, support="all", model={"framework": "comfyui", "class": "SDXL"})


def _steer_graph(transport_name: str = "style.safetensors", **apply) -> dict[str, dict]:
    """Load -> Apply on a tiny SDXL -> KSampler -> VAE Decode -> Preview Image (API format)."""
    return {
        "1": {"class_type": "ActSteerLoad", "inputs": {"transport_name": transport_name}},
        "2": {"class_type": "ActSteerTestTinyCheckpoint", "inputs": {"ckpt_name": "tiny"}},
        "3": {"class_type": "ActSteerApply", "inputs": {"model": ["2", 0], "transport": ["1", 0], "strength": 1.0,
                                                        "start_percent": 0.0, "end_percent": 1.0, **apply}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a cat"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "seed": 0, "steps": 2, "cfg": 4.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "positive": ["4", 0],
                                                   "negative": ["5", 0], "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["2", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }


def _node_error(node_errors: dict, node_id: str) -> list[str]:
    return [e["details"] for e in node_errors[node_id]["errors"] if e["type"] == "custom_validation_failed"]


def test_queue_rejects_a_missing_transport_name_before_any_model_loads(pack, comfy_dirs):
    valid, error, node_errors = Session.validate(_steer_graph("missing.safetensors"))
    assert not valid and error["type"] == "prompt_outputs_failed_validation"
    assert list(node_errors) == ["1"]  # the Load node, marked in the browser; nothing ran, no checkpoint loaded
    assert node_errors["1"]["dependent_outputs"] == ["9"]
    assert _node_error(node_errors, "1") == [
        "transport_name - No transport file 'missing.safetensors' in models/act_transports; pick one in transport_name "
        "(press R to refresh the list), or save one with AcT Save Transport"]


@pytest.mark.parametrize(
    ("node", "inputs", "message"),
    [
        ("ActSteerApply", {"strength": float("nan")}, "strength - strength is nan; set a number between -3 and 3"),
        ("ActSteerApply", {"strength": float("inf")}, "strength - strength is inf; set a number between -3 and 3"),
        ("ActSteerApply", {"strength": 7.0}, "strength - strength = 7 is outside -3 to 3; set a number in that range"),
        ("ActSteerSweep", {"strengths": "0, nan, 1"}, "strengths - strength 'nan' in strengths is nan"),
        ("ActSteerSweep", {"strengths": "0, strong"}, "strengths - Bad strength 'strong' in strengths"),
        ("ActSteerSave", {"filename": "con"}, "filename - Unsafe transport file name 'con': it uses 'con', a name "
                                              "Windows reserves for devices; change filename on the AcT Save node"),
        ("ActSteerLearn", {"source_prompts": "just one"}, "source_prompts - Need at least 2 source prompts"),
        # checked when queued, not after the checkpoint loaded (issue 21)
        ("ActSteerLearn", {"steps": 20, "collect_steps": 30}, "source_prompts - collect_steps (30) is more than steps (20)"),
        ("ActSteerLearn", {"layers": "regex", "layer_regex": "input_blocks.("},
         "source_prompts - layer_regex: 'input_blocks.(' is not a valid regex"),
        ("ActSteerLearn", {"layers": "regex", "layer_regex": "  "}, "source_prompts - layers = regex needs a pattern in layer_regex"),
        ("ActSteerLearn", {"steps": 0}, "source_prompts - steps = 0 is outside 1 to 1000"),
        ("ActSteerApply", {"start_percent": 0.8, "end_percent": 0.2},
         "strength - start_percent (0.8) is after end_percent (0.2), so no step would be steered"),
        ("ActSteerApply", {"layers": "input_blocks.("}, "strength - layers: 'input_blocks.(' is not a valid regex"),
        ("ActSteerApply", {"layer_group": "everything"}, "strength - layer_group: 'everything' is not one of its choices"),
        ("ActSteerApply", {"end_percent": 1.5}, "strength - end_percent = 1.5 is outside 0 to 1"),
        # a strength typed as text over the API: ComfyUI's own conversion fails and calls validate_inputs anyway
        ("ActSteerApply", {"strength": "1,5"}, "strength - strength is '1,5', not a number"),
        ("ActSteerSweep", {"start_percent": 0.9, "end_percent": 0.1}, "strengths - start_percent (0.9) is after"),
    ],
)
def test_queue_rejects_bad_values_with_one_clear_line(pack, comfy_dirs, node, inputs, message):
    _transport(pack).save(comfy_dirs / "style.safetensors")
    prompt = _steer_graph()
    prompt["10"] = {"class_type": "ActSteerSweep", "inputs": {
        "model": ["2", 0], "transport": ["1", 0], "vae": ["2", 2], "positive": ["4", 0], "negative": ["5", 0],
        "latent_image": ["6", 0], "strengths": "0, 1", "seed": 0, "steps": 2, "cfg": 4.0, "sampler_name": "euler",
        "scheduler": "simple", "start_percent": 0.0, "end_percent": 1.0}}
    prompt["11"] = {"class_type": "ActSteerSave", "inputs": {"transport": ["1", 0], "filename": "copy",
                                                             "if_exists": "add number"}}
    prompt["12"] = {"class_type": "ActSteerLearn", "inputs": {
        "model": ["2", 0], "clip": ["2", 1], "source_prompts": SOURCE, "target_prompts": TARGET, "method": "linear-act",
        "layers": "auto", "layer_regex": "", "steps": 2, "seed": 0, "cfg": 1.0, "width": 64, "height": 64,
        "samples_per_prompt": 1, "collect_steps": 1, "fit_mode": "sequential", "support": "observed", "batch_size": 0}}
    prompt["14"] = {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}}
    prompt["13"] = {"class_type": "ActSteerSave", "inputs": {"transport": ["12", 0], "filename": "learned",
                                                             "if_exists": "add number"}}
    node_id = {"ActSteerApply": "3", "ActSteerSweep": "10", "ActSteerSave": "11", "ActSteerLearn": "12"}[node]
    valid, *_ = Session.validate(prompt)
    assert valid  # the graph itself is fine
    prompt[node_id]["inputs"].update(inputs)
    _, _, node_errors = Session.validate(prompt)  # other outputs of the graph stay valid
    assert list(node_errors) == [node_id]
    # ComfyUI repeats a validate_inputs message once per input it checked (Learn: six, so the first copy is under
    # source_prompts); the message itself names the input to fix
    details = _node_error(node_errors, node_id)
    assert details[0].startswith(message) and len({d.split(" - ", 1)[1] for d in details}) == 1
    assert "\n" not in details[0] and "list_sites" not in details[0]
    assert all(not e["details"].startswith("exception") for e in node_errors[node_id]["errors"])


def _named_inputs(message: str, node: str) -> set[str]:
    """The inputs of ``node`` a message names as words (what web/js/node_errors.js keeps it on)."""
    import nodes

    spec = nodes.NODE_CLASS_MAPPINGS[node].INPUT_TYPES()
    names = [n for section in ("required", "optional") for n in spec.get(section, {})]
    return {n for n in names if re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message, re.IGNORECASE)}


@pytest.mark.parametrize(
    ("node", "inputs", "named"),
    [
        ("ActSteerLearn", {"source_prompts": "just one"}, {"source_prompts"}),
        ("ActSteerLearn", {"target_prompts": "just one"}, {"target_prompts"}),
        ("ActSteerLearn", {"steps": 4, "collect_steps": 5}, {"steps", "collect_steps"}),
        ("ActSteerLearn", {"layers": "regex", "layer_regex": "("}, {"layer_regex", "layers"}),
        ("ActSteerApply", {"start_percent": 0.8, "end_percent": 0.2}, {"start_percent", "end_percent"}),
        ("ActSteerApply", {"strength": 9.0}, {"strength"}),
    ],
)
def test_each_queue_time_message_names_the_inputs_it_is_about(pack, comfy_dirs, node, inputs, named):
    # ComfyUI 0.3.75 attaches a validate_inputs message to every input the check reads (Learn: six); the message
    # itself must name the input(s) to change, so that the frontend extension keeps it there (issue 21, item 12)
    _transport(pack).save(comfy_dirs / "style.safetensors")
    prompt = _steer_graph()
    prompt["12"] = _learn_node()
    prompt["13"] = {"class_type": "ActSteerSave", "inputs": {"transport": ["12", 0], "filename": "x", "if_exists": "add number"}}
    node_id = {"ActSteerApply": "3", "ActSteerLearn": "12"}[node]
    prompt[node_id]["inputs"].update(inputs)
    _, _, node_errors = Session.validate(prompt)
    messages = {e["details"].split(" - ", 1)[1] for e in node_errors[node_id]["errors"]}
    assert len(messages) == 1
    assert _named_inputs(messages.pop(), node) == named


def _learn_node(**inputs) -> dict:
    return {"class_type": "ActSteerLearn", "inputs": {
        "model": ["2", 0], "clip": ["2", 1], "source_prompts": SOURCE, "target_prompts": TARGET, "method": "linear-act",
        "layers": "auto", "layer_regex": "", "steps": 2, "seed": 0, "cfg": 1.0, "width": 64, "height": 64,
        "samples_per_prompt": 1, "collect_steps": 1, "fit_mode": "sequential", "support": "observed", "batch_size": 0,
        **inputs}}


def test_save_is_reused_until_its_files_change_and_says_what_it_did(pack, comfy_dirs):
    _transport(pack, seed=0).save(comfy_dirs / "a.safetensors")
    _transport(pack, seed=1).save(comfy_dirs / "b.safetensors")
    session = Session()

    def save_graph(source: str) -> dict[str, dict]:
        return {"1": {"class_type": "ActSteerLoad", "inputs": {"transport_name": source}},
                "2": {"class_type": "ActSteerSave", "inputs": {"transport": ["1", 0], "filename": "copy",
                                                               "if_exists": "add number"}}}

    def shown() -> str:  # the text the Save node shows in the browser
        (event,) = [e for e in session.events("executed") if e["node"] == "2"]
        return event["output"]["text"][0]

    session.run(save_graph("a.safetensors"))
    assert shown() == "saved copy.safetensors (2 layers)"
    # queued again, nothing changed: Save is reused like any node (its own new file is no change), and so is what
    # follows it (a graph that takes the transport from Save does not sample again)
    session.run(save_graph("a.safetensors"))
    (cached,) = session.events("execution_cached")
    assert sorted(cached["nodes"]) == ["1", "2"]
    assert shown() == "saved copy.safetensors (2 layers)"  # ComfyUI sends a cached output node's text again
    assert sorted(p.name for p in comfy_dirs.glob("copy*")) == ["copy.safetensors"]
    session.run(save_graph("b.safetensors"))  # another transport: "add number" adds
    assert shown() == "saved copy_00001.safetensors (2 layers)"
    (comfy_dirs / "copy_00001.safetensors").unlink()  # deleted by hand: queuing again saves it again
    session.run(save_graph("b.safetensors"))
    assert shown() == "saved copy_00001.safetensors (2 layers)"
    assert sorted(p.name for p in comfy_dirs.glob("copy*")) == ["copy.safetensors", "copy_00001.safetensors"]
    session = Session()  # ComfyUI's cache gone (e.g. another workflow ran): Save runs and writes no duplicate
    session.run(save_graph("b.safetensors"))
    assert shown().startswith("not saved again: copy_00001.safetensors already holds this transport")
    assert sorted(p.name for p in comfy_dirs.glob("copy*")) == ["copy.safetensors", "copy_00001.safetensors"]


def test_learn_shows_its_split_timing_on_the_node(pack, comfy_dirs, caplog):
    session = Session()
    prompt = {
        "1": {"class_type": "ActSteerTestTinyCheckpoint", "inputs": {"ckpt_name": "tiny"}},
        "2": {"class_type": "ActSteerLearn", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "source_prompts": SOURCE, "target_prompts": TARGET,
            "method": "linear-act", "layers": "middle-block", "layer_regex": "", "steps": 3, "seed": 0, "cfg": 1.0,
            "width": 64, "height": 64, "samples_per_prompt": 1, "collect_steps": 1, "fit_mode": "sequential",
            "support": "observed", "batch_size": 0}},
        "3": {"class_type": "ActSteerSave", "inputs": {"transport": ["2", 0], "filename": "learned",
                                                       "if_exists": "add number"}},
    }
    with caplog.at_level(logging.INFO):
        session.run(prompt)
    texts = {e["node"]: e["output"]["text"][0] for e in session.events("executed")}
    # the middle block's 8 norms, one map per step of Learn's 3-step schedule (per_step, the default)
    assert texts["2"].startswith("learned 8 layers x 3 steps from 3 + 3 samples: encode ")
    assert " s · sample " in texts["2"] and "(3 model calls) · fit " in texts["2"]
    assert texts["3"] == "saved learned.safetensors (8 layers x 3 steps)"
    assert "actsteer: learned 8 layers x 3 steps from 3 source + 3 target samples in" in caplog.text
    assert "actsteer: fitted" not in caplog.text  # the core's all-in-one figure would credit sampling to fitting


def test_apply_layer_group_through_the_executor(pack, comfy_dirs):
    _transport(pack).save(comfy_dirs / "style.safetensors")  # input_blocks.1.0.in_layers.0 and middle_block.1.norm
    session = Session()
    session.run(_steer_graph(layer_group="middle-block"))
    (preview,) = [e for e in session.events("executed") if e["node"] == "9"]
    assert len(preview["output"]["images"]) == 1
    only_middle = _transport(pack, sites={"middle_block.1.norm": 64})
    only_middle.save(comfy_dirs / "middle.safetensors")
    with pytest.raises(AssertionError, match="layer_group: None of the transport's 1 layers is in the group "
                                             "'input-blocks'; it has layers in: all-norms, middle-block"):
        session.run(_steer_graph("middle.safetensors", layer_group="input-blocks"))
