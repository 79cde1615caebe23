"""AcT Learn keeps what it fitted across workflows (issue 21, item 9): ComfyUI's executor, tiny real models."""

from __future__ import annotations

import pytest
from support.comfy import (  # noqa: F401  (fixtures)
    Session,
    comfy_dirs,
    fresh_learn_cache,
    one_thread,
    pack,
)

SOURCE = "a photo of a cat\na photo of a dog\na photo of a house"
TARGET = "a watercolor of a cat\na watercolor of a dog\na watercolor of a house"


def _learn_graph(ckpt: str = "tiny", clip_layer: int | None = None, **learn) -> dict[str, dict]:
    """Tiny checkpoint (-> CLIP Set Last Layer) -> AcT Learn (middle block) -> AcT Save."""
    clip = ["1", 1]
    graph = {"1": {"class_type": "ActSteerTestTinyCheckpoint", "inputs": {"ckpt_name": ckpt}}}
    if clip_layer is not None:
        graph["4"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["1", 1], "stop_at_clip_layer": clip_layer}}
        clip = ["4", 0]
    graph["2"] = {"class_type": "ActSteerLearn", "inputs": {
        "model": ["1", 0], "clip": clip, "source_prompts": SOURCE, "target_prompts": TARGET, "method": "linear-act",
        "layers": "middle-block", "layer_regex": "", "steps": 3, "seed": 0, "cfg": 1.0, "width": 64, "height": 64,
        "samples_per_prompt": 1, "collect_steps": 1, "fit_mode": "sequential", "support": "observed", "batch_size": 0,
        "per_step": False,
        **learn}}
    graph["3"] = {"class_type": "ActSteerSave", "inputs": {"transport": ["2", 0], "filename": "learned",
                                                           "if_exists": "add number"}}
    return graph


class Counted(Session):
    """A session that counts sampler runs (each Learn run samples once here)."""

    def __init__(self, monkeypatch) -> None:
        super().__init__()
        import comfy.sample

        self.samples = 0
        sample = comfy.sample.sample

        def counting(*args, **kwargs):
            self.samples += 1
            return sample(*args, **kwargs)

        monkeypatch.setattr(comfy.sample, "sample", counting)

    def learn_text(self) -> str:
        (event,) = [e for e in self.events("executed") if e["node"] == "2"]
        return event["output"]["text"][0]


def test_learn_reuses_what_it_learned_after_another_workflow_ran(pack, comfy_dirs, monkeypatch):
    session = Counted(monkeypatch)
    session.run(_learn_graph())
    assert session.learn_text().startswith("learned 8 layers") and session.samples == 1
    (comfy_dirs / "other.safetensors").write_bytes((comfy_dirs / "learned.safetensors").read_bytes())
    session.run({"1": {"class_type": "ActSteerLoad", "inputs": {"transport_name": "other.safetensors"}},
                 "2": {"class_type": "ActSteerSave", "inputs": {"transport": ["1", 0], "filename": "copy",
                                                                "if_exists": "add number"}}})
    session.run(_learn_graph())  # the first workflow again: ComfyUI forgot Learn's output, the pack did not
    assert not [e for e in session.events("execution_cached") if "2" in e["nodes"]]  # Learn ran...
    assert session.learn_text().startswith("reused what was learned at ")  # ...and sampled nothing
    assert "(same MODEL, prompts and settings); learned 8 layers" in session.learn_text()
    assert session.samples == 1
    (save,) = [e for e in session.events("executed") if e["node"] == "3"]
    assert save["output"]["text"][0].startswith("not saved again: learned.safetensors")  # the same transport


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"seed": 1}, "a Learn setting"),
        ({"target_prompts": TARGET + "\na watercolor of a tree", "source_prompts": SOURCE + "\na photo of a tree"},
         "the prompts"),
        ({"ckpt": "tiny-other"}, "the checkpoint's name upstream"),
        ({"clip_layer": -2}, "a node that patches the CLIP upstream"),
    ],
)
def test_learn_learns_again_when_anything_that_shapes_the_result_changes(pack, comfy_dirs, monkeypatch, change, why):
    base = {"clip_layer": -1} if "clip_layer" in change else {}
    Session().run(_learn_graph(**base))
    session = Counted(monkeypatch)  # a fresh executor each time: ComfyUI's own cache is empty
    session.run(_learn_graph(**base))
    assert session.learn_text().startswith("reused") and session.samples == 0, why
    session = Counted(monkeypatch)
    session.run(_learn_graph(**{**base, **change}))
    assert session.learn_text().startswith("learned 8 layers") and session.samples == 1, why


def test_learn_cache_is_bounded(pack, comfy_dirs, monkeypatch):
    monkeypatch.setattr(pack.comfy_nodes.learn_cache, "MAX_ENTRIES", 2)
    for seed in (0, 1, 2):
        Session().run(_learn_graph(seed=seed))
    for seed, expected in ((2, "reused"), (0, "learned")):  # seed 0 was the least recently used: dropped
        session = Counted(monkeypatch)
        session.run(_learn_graph(seed=seed))
        assert session.learn_text().startswith(expected), seed


def test_learn_cache_skips_graphs_whose_upstream_can_change_by_itself(pack, comfy_dirs, monkeypatch):
    # a MODEL steered by a transport file upstream (AcT Load has its own change check): always learned again
    Session().run(_learn_graph())
    graph = _learn_graph()
    graph["5"] = {"class_type": "ActSteerLoad", "inputs": {"transport_name": "learned.safetensors"}}
    graph["6"] = {"class_type": "ActSteerApply", "inputs": {"model": ["1", 0], "transport": ["5", 0], "strength": 0.5,
                                                            "start_percent": 0.0, "end_percent": 1.0}}
    graph["2"]["inputs"]["model"] = ["6", 0]
    for _ in range(2):
        session = Counted(monkeypatch)
        session.run(graph)
        assert session.learn_text().startswith("learned 8 layers")
    assert pack.comfy_nodes.learn_cache.graph_signature(graph, "2") is None
    assert pack.comfy_nodes.learn_cache.graph_signature(_learn_graph(), "2") is not None
