"""The quantile map and LinEAS through ComfyUI: AcT Learn (its own encoder and sampler, under ComfyUI's inference
mode in the executor), Save -> Load -> Apply, on tiny real SDXL and FLUX models."""

from __future__ import annotations

import importlib

import pytest
import torch
from support.comfy import (  # noqa: F401  (fixtures)
    clip,
    comfy_dirs,
    encode,
    forward_hook_count,
    ksample,
    load_workflow,
    one_thread,
    pack,
    run_prompt,
    state_fingerprint,
    tiny_flux,
    tiny_sdxl,
    workflow_to_prompt,
)

SOURCE = "a photo of a cat\na photo of a dog\na photo of a house\na photo of a tree"
TARGET = "a watercolor of a cat\na watercolor of a dog\na watercolor of a house\na watercolor of a tree"


def _node(name: str):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[name]


@pytest.mark.parametrize("kind", ["sdxl", "flux"])
def test_learn_quantile_save_load_apply(pack, comfy_dirs, clip, kind):
    model = tiny_sdxl(0) if kind == "sdxl" else tiny_flux(0)
    transport = _node("ActSteerLearn").execute(
        model=model, clip=clip, source_prompts=SOURCE, target_prompts=TARGET, method="quantile", layers="auto",
        layer_regex="", steps=3, seed=0, cfg=1.0, width=64, height=64, samples_per_prompt=2, collect_steps=1,
        fit_mode="sequential", support="method default", batch_size=0)[0]
    core = importlib.import_module(pack.__name__ + ".core")
    assert transport.method == "quantile" and all(isinstance(m, core.QuantileMap) for m in transport.values())
    saved = _node("ActSteerSave").execute(transport=transport, filename=f"{kind}_q", if_exists="error")
    loaded = _node("ActSteerLoad").execute(transport_name=saved[0])[0]
    assert loaded == transport
    pos, neg = encode(clip, "a photo of a cat", flux=kind == "flux"), encode(clip, "", flux=kind == "flux")
    base = ksample(model, pos, neg)
    steered_model = _node("ActSteerApply").execute(model=model, transport=loaded, strength=1.0, start_percent=0.0,
                                                   end_percent=1.0, layers="")[0]
    steered = ksample(steered_model, pos, neg)
    assert torch.isfinite(steered).all() and not torch.equal(steered, base)
    assert torch.equal(ksample(model, pos, neg), base) and forward_hook_count(model) == 0


def test_learn_lineas_trains_through_comfys_sampler(pack, clip):
    learn = importlib.import_module(pack.__name__ + ".comfy_nodes.learn")
    model = tiny_sdxl(0)
    weights = state_fingerprint(model)
    transport, timing = learn.learn(model, clip, SOURCE.splitlines(), TARGET.splitlines(), sites=_sites(pack, model),
                                    method="lineas", options={"steps": 3, "eval_every": 3},
                                    settings=learn.CollectSettings(steps=3, width=64, height=64))
    assert transport.method == "lineas" and transport.mode == "end-to-end"
    assert transport.extra["fit"]["backward_calls"] == 3 and timing.model_calls == transport.extra["fit"]["forward_calls"]
    assert forward_hook_count(model) == 0
    assert all(torch.equal(v, weights[k]) for k, v in state_fingerprint(model).items())
    assert all(p.grad is None for p in model.model.parameters())


def test_learn_lineas_refuses_comfys_flux_clearly(pack, clip):
    """ComfyUI's FLUX blocks update their inputs in place (``img += ...``): no backpropagation through them."""
    learn = importlib.import_module(pack.__name__ + ".comfy_nodes.learn")
    model = tiny_flux(0)
    weights = state_fingerprint(model)
    with pytest.raises(RuntimeError, match="updates activations in place.*fit_pipeline"):
        learn.learn(model, clip, SOURCE.splitlines(), TARGET.splitlines(), sites=_sites(pack, model),
                    method="lineas", options={"steps": 2}, settings=learn.CollectSettings(steps=3, width=64, height=64))
    assert forward_hook_count(model) == 0
    assert all(torch.equal(v, weights[k]) for k, v in state_fingerprint(model).items())


def _sites(pack, model):
    presets = importlib.import_module(pack.__name__ + ".comfy_nodes.presets")
    checks = importlib.import_module(pack.__name__ + ".comfy_nodes.checks")
    return presets.preset_sites(checks.diffusion_model(model), "fast", "")


def test_learn_lineas_in_the_executor_under_inference_mode(pack, comfy_dirs):
    """The SDXL example workflow with method = lineas, run by ComfyUI's executor: weights and inputs are made under
    torch.inference_mode() there, and LinEAS must still backpropagate (ordinary copies where they enter)."""
    prompt = workflow_to_prompt(load_workflow("AcT SDXL learn and apply style.json"),
                                overrides={"method": "lineas", "width": 64, "height": 64, "steps": 3,
                                           "samples_per_prompt": 1})
    outputs = run_prompt(prompt)
    assert outputs  # executed without error; the Learn node's summary is among the UI outputs
