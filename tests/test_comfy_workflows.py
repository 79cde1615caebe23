"""Every ``example_workflows/*.json`` loads and runs through ComfyUI's own validator and executor (tiny models), and
carries what the template browser and an artist need: a title (its file name), a thumbnail and a cost note."""

from __future__ import annotations

import json
from pathlib import Path

from support.comfy import (  # noqa: F401  (fixtures)
    REPO,
    comfy_dirs,
    fresh_learn_cache,
    load_workflow,
    one_thread,
    pack,
    run_prompt,
    workflow_to_prompt,
)

SMALL = {"width": 64, "height": 64, "steps": 2}  # real sizes and step counts, shrunk for tiny models on CPU
STYLE = "AcT SDXL learn and apply style.json"
SWEEP = "AcT SDXL strength sweep.json"
FLUX = "AcT FLUX remove a concept.json"
NOTES = ("Note", "MarkdownNote")


def _classes(prompt: dict) -> list[str]:
    return [node["class_type"] for node in prompt.values()]


def test_example_workflows_are_wellformed_ui_graphs(pack):
    import nodes

    files = sorted(p.name for p in (REPO / "example_workflows").glob("*.json"))
    assert files == sorted([FLUX, STYLE, SWEEP])
    for name in files:
        workflow = json.loads((REPO / "example_workflows" / name).read_text())
        ids = {node["id"] for node in workflow["nodes"]}
        for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
            assert src in ids and dst in ids
            target = next(n for n in workflow["nodes"] if n["id"] == dst)
            assert target["inputs"][dst_slot]["link"] == link_id and target["inputs"][dst_slot]["type"] == kind
        for node in workflow["nodes"]:
            assert node["type"] in nodes.NODE_CLASS_MAPPINGS or node["type"] in NOTES
        # as a user opens it: real loader nodes and real file names, full sizes
        prompt = workflow_to_prompt(workflow, swap_loaders=False)
        assert any(c.startswith("ActSteer") for c in _classes(prompt))


def test_example_workflows_have_thumbnails_titles_and_cost_notes():
    from PIL import Image

    for path in sorted((REPO / "example_workflows").glob("*.json")):
        # the frontend titles a pack's template by its file name and describes it by the same name with '-'/'_' as
        # spaces: a readable name with neither reads the same in both places
        assert path.stem.startswith("AcT ") and not set("-_") & set(path.stem), path.name
        assert len(path.stem) <= 30, path.name  # longer titles are cut on the template cards
        thumbnail = path.with_suffix(".jpg")  # served as /api/workflow_templates/<pack>/<name>.jpg
        with Image.open(thumbnail) as image:
            assert image.format == "JPEG" and image.size[0] >= 256
        notes = [n["widgets_values"][0] for n in json.loads(path.read_text())["nodes"] if n["type"] == "MarkdownNote"]
        assert any(note.startswith("## Cost on your GPU") for note in notes), path.name


def test_sdxl_style_then_strength_sweep_workflows_run(pack, comfy_dirs):
    import folder_paths

    style = workflow_to_prompt(load_workflow(STYLE), overrides=SMALL)
    assert {"ActSteerLearn", "ActSteerSave", "ActSteerApply", "KSampler"} <= set(_classes(style))
    outputs = run_prompt(style, "style")
    assert (comfy_dirs / "sdxl_watercolor.safetensors").is_file()
    texts = {style[i]["class_type"]: out["text"][0] for i, out in outputs["outputs"].items() if "text" in out}
    assert texts["ActSteerSave"] == "saved sdxl_watercolor.safetensors (33 layers x 2 steps)"  # shown on the node
    assert texts["ActSteerLearn"].startswith("learned 33 layers x 2 steps from 16 + 16 samples: encode ")
    saved_images = [i for out in outputs["outputs"].values() for i in out.get("images", [])]
    assert len(saved_images) == 1 and saved_images[0]["type"] == "output"
    assert (Path(folder_paths.get_output_directory()) / saved_images[0]["subfolder"] / saved_images[0]["filename"]).is_file()

    sweep = workflow_to_prompt(load_workflow(SWEEP), overrides=SMALL)
    outputs = run_prompt(sweep, "sweep")
    previews = [i for out in outputs["outputs"].values() for i in out.get("images", [])]
    assert len(previews) == 5  # one image per strength in "0, 0.25, 0.5, 0.75, 1"


def test_flux_concept_negation_workflow_runs(pack, comfy_dirs):
    import folder_paths
    import numpy as np
    from PIL import Image

    prompt = workflow_to_prompt(load_workflow(FLUX), overrides=SMALL)
    assert "ActSteerTestTinyUNET" in _classes(prompt)
    outputs = run_prompt(prompt, "flux")
    assert (comfy_dirs / "flux_no_dog.safetensors").is_file()
    images = [np.asarray(Image.open(f"{folder_paths.get_output_directory()}/{i['subfolder']}/{i['filename']}"))
              for out in outputs["outputs"].values() for i in out.get("images", [])]
    assert len(images) == 2  # the Sweep's strengths "0, 1": the original, then without the concept
    assert images[0].shape == images[1].shape == (64, 64, 3)
    assert not np.array_equal(images[0], images[1])


def _bounds(node: dict) -> tuple[float, float, float, float]:
    title = 30  # LiteGraph draws a node's title bar above its position
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - title, x + w, y + h


def test_example_workflows_open_fitted_to_the_window_without_overlaps():
    # with a saved view (extra.ds) the 1.32 frontend restores it as is: offset [0, 0] put nodes under its menus;
    # without one it fits every node into the window (scripts/comfy_browser_check.mjs checks it in a browser)
    for path in sorted((REPO / "example_workflows").glob("*.json")):
        workflow = json.loads(path.read_text())
        assert "ds" not in workflow.get("extra", {}), path.name
        boxes = [(n["id"], _bounds(n)) for n in workflow["nodes"]]
        for i, (a, (ax0, ay0, ax1, ay1)) in enumerate(boxes):
            for b, (bx0, by0, bx1, by1) in boxes[i + 1:]:
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"{path.name}: nodes {a} and {b} overlap"
        x0, y0 = min(b[0] for _, b in boxes), min(b[1] for _, b in boxes)
        x1, y1 = max(b[2] for _, b in boxes), max(b[3] for _, b in boxes)
        # wide enough that fitting it into a 1280-pixel-wide window keeps the top rows below the menus, narrow
        # enough that the fitted zoom (0.75 x 1280 / width) stays above the frontend's low-detail threshold (0.571)
        assert 0.75 * 1280 / (x1 - x0) >= 0.572, path.name
        assert (x1 - x0) / (y1 - y0) >= 1.8, path.name


def test_example_workflows_fail_fast_on_a_bad_file_name(pack, comfy_dirs):
    # a bad name on the node that writes or reads the transport must refuse the WHOLE graph when it is queued:
    # ComfyUI runs every output that does not depend on a failing node (Learn for minutes, nothing saved)
    from support.comfy import Session

    for name, node_type, inputs in ((STYLE, "ActSteerSave", {"filename": "../outside"}),
                                    (FLUX, "ActSteerSave", {"filename": "con"}),
                                    (SWEEP, "ActSteerLoad", {"transport_name": "missing.safetensors"})):
        prompt = workflow_to_prompt(load_workflow(name), overrides=SMALL)
        valid, _, errors = Session.validate(prompt)
        if node_type == "ActSteerLoad":  # the template's file is missing here too: save one for the valid case
            _transport_file(pack, comfy_dirs / "sdxl_watercolor.safetensors")
            valid, _, errors = Session.validate(prompt)
        assert valid, (name, errors)
        (node_id,) = [i for i, n in prompt.items() if n["class_type"] == node_type]
        prompt[node_id]["inputs"].update(inputs)
        valid, error, errors = Session.validate(prompt)
        assert not valid and error["type"] == "prompt_outputs_failed_validation", name
        assert list(errors) == [node_id], name


def _transport_file(pack, path):
    import torch

    core = pack.core
    maps = {"input_blocks.1.0.in_layers.0": core.UnitMap(torch.ones(32), torch.zeros(32))}
    core.Transport(maps, support="all", model={"framework": "comfyui", "class": "SDXL", "arch": "sdxl"}).save(path)


def test_example_workflow_notes_say_what_to_change_on_small_hardware():
    for path in sorted((REPO / "example_workflows").glob("*.json")):
        notes = "\n".join(n["widgets_values"][0] for n in json.loads(path.read_text())["nodes"] if n["type"] in NOTES)
        assert "## On a CPU or an 8 GB card" in notes and "512×512" in notes, path.name
        assert "20%" not in notes, path.name  # the steering overhead measured since is about 1% (README, Speed)
        workflow = workflow_to_prompt(json.loads(path.read_text()), swap_loaders=False)
        sizes = [n["inputs"] for n in workflow.values() if n["class_type"] in ("EmptyLatentImage", "ActSteerLearn")]
        assert all(s["width"] == s["height"] == 1024 for s in sizes), path.name  # the defaults stay GPU-sized


def test_strength_sweep_template_follows_a_relearned_transport(pack, comfy_dirs):
    style = load_workflow(STYLE)
    run_prompt(workflow_to_prompt(style, overrides=SMALL), "style")
    learn = next(n for n in style["nodes"] if n["type"] == "ActSteerLearn")
    learn["widgets_values"][0] += "\na photo of a red barn"  # learn something new: Save adds a numbered copy
    learn["widgets_values"][1] += "\na watercolor painting of a red barn"
    run_prompt(workflow_to_prompt(style, overrides=SMALL), "style again")
    assert sorted(p.name for p in comfy_dirs.iterdir()) == ["sdxl_watercolor.safetensors",
                                                            "sdxl_watercolor_00001.safetensors"]
    sweep = workflow_to_prompt(load_workflow(SWEEP), overrides=SMALL)
    outputs = run_prompt(sweep, "sweep")
    (load_id,) = [i for i, n in sweep.items() if n["class_type"] == "ActSteerLoad"]
    assert outputs["outputs"][load_id]["text"][0].startswith("newest copy: sdxl_watercolor_00001.safetensors\n")
