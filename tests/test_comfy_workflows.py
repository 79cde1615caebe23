"""Every ``example_workflows/*.json`` loads and runs through ComfyUI's own validator and executor (tiny models), and
carries what the template browser and an artist need: a title (its file name), a thumbnail and a cost note."""

from __future__ import annotations

import json
from pathlib import Path

from support.comfy import (  # noqa: F401  (fixtures)
    REPO,
    comfy_dirs,
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
    assert texts["ActSteerSave"] == "saved sdxl_watercolor.safetensors (33 layers)"  # shown on the node
    assert texts["ActSteerLearn"].startswith("learned 33 layers from 16 + 16 samples: encode ")
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
    images = {}
    for out in outputs["outputs"].values():
        for item in out.get("images", []):
            path = f"{folder_paths.get_output_directory()}/{item['subfolder']}/{item['filename']}"
            images[item["filename"].split("_0")[0]] = np.asarray(Image.open(path))
    assert set(images) == {"flux_without_dog", "flux_original"}
    assert images["flux_without_dog"].shape == images["flux_original"].shape == (64, 64, 3)
    assert not np.array_equal(images["flux_without_dog"], images["flux_original"])  # steered vs untouched branch
