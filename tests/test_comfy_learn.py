"""AcT Learn through ComfyUI's own encoder and sampler, end to end with Save -> Load -> Apply -> sample."""

from __future__ import annotations

import importlib

import pytest
import torch
from support.comfy import (  # noqa: F401  (fixtures)
    clip,
    comfy_dirs,
    encode,
    flux,
    forward_hook_count,
    ksample,
    one_thread,
    pack,
    sdxl,
    state_fingerprint,
    tiny_flux,
    tiny_sdxl,
)

SOURCE = "a photo of a cat\na photo of a dog\na photo of a house\na photo of a tree"
TARGET = "a watercolor of a cat\na watercolor of a dog\na watercolor of a house\na watercolor of a tree"


def _node(name: str):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[name]


def _learn(model, clip, **overrides):
    inputs = dict(
        model=model, clip=clip, source_prompts=SOURCE, target_prompts=TARGET, method="linear-act", layers="auto",
        layer_regex="", steps=3, seed=0, cfg=1.0, width=64, height=64, samples_per_prompt=2, collect_steps=1,
        fit_mode="sequential", support="observed", batch_size=0, per_step=False,
    )
    inputs.update(overrides)
    if inputs["per_step"] is None:  # the node's own default
        del inputs["per_step"]
    return _node("ActSteerLearn").execute(**inputs)[0]


@pytest.mark.parametrize("kind", ["sdxl", "flux"])
def test_learn_save_load_apply_sample_end_to_end(pack, comfy_dirs, clip, kind):
    model = tiny_sdxl(0) if kind == "sdxl" else tiny_flux(0)
    weights = state_fingerprint(model)
    pos, neg = encode(clip, "a photo of a cat", flux=kind == "flux"), encode(clip, "", flux=kind == "flux")
    base = ksample(model, pos, neg)

    transport = _learn(model, clip, per_step=None)  # the default: one map per step of Learn's 3-step schedule
    expected_sites = 33 if kind == "sdxl" else 6  # every norm of the tiny UNet / both streams + single blocks
    assert len(transport) == 3 * expected_sites and transport.mode == "sequential"
    assert transport.extra["comfy"]["per_step"] is True
    assert (transport.n_source, transport.n_target) == (8, 8)  # 4 prompts x 2 samples each
    assert transport.model["naming"] == "comfyui" and transport.model["class"] == type(model.model).__name__
    # the metadata lets actsteer's diffusers API translate it (and back) without knowing the model
    names = importlib.import_module(pack.__name__ + ".archs.comfy_names")
    as_diffusers = names.from_comfy(transport, kind)
    assert all(s.startswith("unet." if kind == "sdxl" else "transformer.") for s in as_diffusers.sites)
    if kind == "sdxl":  # FLUX single blocks change layout between the two frameworks (one tensor vs a tuple)
        layout = {**as_diffusers.model, "unet_layout": transport.model["unet_config"]}  # to_comfy reads unet_layout
        assert names.to_comfy(as_diffusers.replace(model=layout)).sites == transport.sites
    assert transport.extra["fit"]["forward_calls"] == 3  # one batched model call per step for the sequential fit
    assert forward_hook_count(model) == 0 and all(torch.equal(v, weights[k]) for k, v in state_fingerprint(model).items())

    saved = _node("ActSteerSave").execute(transport=transport, filename=f"{kind}_style", if_exists="error")
    assert saved[0] == f"{kind}_style.safetensors" and (comfy_dirs / saved[0]).is_file()
    assert f"{kind}_style.safetensors" in _node("ActSteerLoad").INPUT_TYPES()["required"]["transport_name"][1]["options"]
    loaded = _node("ActSteerLoad").execute(transport_name=saved[0])[0]
    assert loaded == transport

    steered_model = _node("ActSteerApply").execute(model=model, transport=loaded, strength=1.0, start_percent=0.0,
                                                   end_percent=1.0, layers="")[0]
    steered = ksample(steered_model, pos, neg)
    assert torch.isfinite(steered).all() and not torch.equal(steered, base)
    assert torch.equal(ksample(model, pos, neg), base)  # the original MODEL is untouched


def test_learn_pools_the_positive_branch_only(pack, clip, sdxl):
    # at the first step the positive rows see the same input whatever the CFG: with the uncond rows
    # excluded, cfg 1 (no negative pass) and cfg 6 (negative rows in the same batch) give the same maps
    plain = _learn(sdxl, clip, layers="fast", cfg=1.0)
    with_negative = _learn(sdxl, clip, layers="fast", cfg=6.0)
    for site in plain:
        torch.testing.assert_close(plain[site].omega, with_negative[site].omega, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(plain[site].beta, with_negative[site].beta, rtol=1e-4, atol=1e-4)


def test_learn_at_once_pools_several_steps_and_reports_progress(pack, clip, flux):
    import comfy.utils

    updates = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    try:
        transport = _learn(flux, clip, fit_mode="at-once", collect_steps=2, steps=4, batch_size=3, samples_per_prompt=1)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert transport.mode == "at-once" and len(transport) == 6
    assert transport.extra["fit"]["forward_calls"] == 3  # 8 items in batches of 3
    assert transport.extra["comfy"]["collect_steps"] == 2
    encodes = 1 + 4 + 4  # the negative prompt and every prompt, once each
    assert updates[-1] == (encodes + 6, encodes + 6)  # then 3 batches x 2 pooled steps
    one_step = _learn(flux, clip, fit_mode="at-once", collect_steps=1, steps=4, batch_size=3, samples_per_prompt=1)
    assert not torch.equal(one_step["double_blocks.0:0"].beta, transport["double_blocks.0:0"].beta)


def test_learn_progress_moves_while_prompts_are_encoded(pack, clip, sdxl, monkeypatch):
    import comfy.utils
    import nodes

    updates, seen_by_encode = [], []
    encode = nodes.CLIPTextEncode.encode

    def counting_encode(self, clip, text):
        seen_by_encode.append(len(updates))  # progress updates the bar had received when this prompt was encoded
        return encode(self, clip, text)

    monkeypatch.setattr(nodes.CLIPTextEncode, "encode", counting_encode)
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    try:
        _learn(sdxl, clip, layers="fast", samples_per_prompt=1)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    encodes = 1 + 4 + 4  # the negative prompt and 4 + 4 distinct prompts
    assert seen_by_encode == list(range(encodes))  # one step of the bar per encoded prompt, as it happens
    total = encodes + 1  # then the one batched model call of the sequential fit
    assert updates == [(i, total) for i in range(1, total + 1)]


def test_learn_sequential_pools_several_steps_with_one_call_per_site(pack, clip, flux):
    kw = dict(collect_steps=2, steps=4, samples_per_prompt=1)
    seq = _learn(flux, clip, fit_mode="sequential", **kw)
    at_once = _learn(flux, clip, fit_mode="at-once", **kw)
    assert seq.mode == "sequential" and seq.extra["fit"]["forward_calls"] == len(seq)
    first = seq.sites[0]  # nothing is steered before the first site: both modes agree there
    torch.testing.assert_close(seq[first].beta, at_once[first].beta, rtol=1e-4, atol=1e-5)
    assert not torch.equal(seq[seq.sites[-1]].beta, at_once[seq.sites[-1]].beta)


def test_learn_honours_cancel(pack, clip, sdxl):
    import comfy.model_management
    import comfy.utils

    def cancel_after_first_batch(value, total, preview, node_id=None):
        comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(cancel_after_first_batch)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _learn(sdxl, clip, fit_mode="at-once", batch_size=2)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert forward_hook_count(sdxl) == 0


def test_learn_sequential_with_small_batches_uses_site_passes(pack, clip, flux):
    transport = _learn(flux, clip, batch_size=4, samples_per_prompt=1)
    fit = transport.extra["fit"]
    assert transport.mode == "sequential" and fit["batches"] == 2
    assert fit["forward_calls"] == 2 * len(transport)  # per batch: one recording call + one call per further site
    assert fit["forward_equivalents"] < fit["forward_calls"]  # passes stop right after their site


def test_learn_errors_are_one_line_and_actionable(pack, clip, sdxl, flux):
    with pytest.raises(ValueError, match="Need at least 2 source prompts"):
        _learn(sdxl, clip, source_prompts="  \n\n")
    with pytest.raises(ValueError, match="Need at least 2 target prompts .* got 1"):
        _learn(sdxl, clip, target_prompts="only one\n")
    with pytest.raises(ValueError, match="^layers: 'blocks' is a FLUX layer group; for this SDXL model choose one of: "
                                         "auto, all-norms, fast, input-blocks"):
        _learn(sdxl, clip, layers="blocks")
    with pytest.raises(ValueError, match="matches no module of Flux.*change layer_regex"):
        _learn(flux, clip, layers="regex", layer_regex=r"input_blocks\..*")
    with pytest.raises(ValueError, match="different token lengths"):
        _learn(sdxl, clip, source_prompts=SOURCE + "\n" + " ".join(["word"] * 90))
    with pytest.raises(ValueError, match="needs a CLIP"):
        _learn(sdxl, None)


@pytest.mark.parametrize("method, support, pooling", [("linear-act", "observed", "mean"), ("aura", "all", "max")])
def test_learn_method_default_support_and_pooling(pack, comfy_dirs, clip, method, support, pooling):
    transport = _learn(tiny_sdxl(0), clip, method=method, support="method default", layers="fast", steps=2,
                       samples_per_prompt=1)
    assert (transport.method, transport.support, transport.pooling) == (method, support, pooling)
    explicit = _learn(tiny_sdxl(0), clip, method=method, support="observed", layers="fast", steps=2,
                      samples_per_prompt=1)
    assert explicit.support == "observed"  # an explicit choice wins over the method's default


def test_learn_per_step_fits_one_map_per_step_and_apply_switches_them_by_step(pack, clip, sdxl):
    core = importlib.import_module(pack.__name__ + ".core")
    patching = importlib.import_module(pack.__name__ + ".comfy_nodes.patching")
    first = _learn(sdxl, clip, layers="fast", samples_per_prompt=1, per_step=False)
    each = _learn(sdxl, clip, layers="fast", samples_per_prompt=1, per_step=None)  # the default: per step, steps=3
    assert core.stage_windows(each) == [(0.0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.0)]
    assert len(each) == 3 * len(first) and each.extra["comfy"]["per_step"] is True
    parts = core.split_stages(each)
    for site in first:  # stage 0 is the first-step fit; later stages are fitted on their own step's activations
        torch.testing.assert_close(parts[0][1][site].beta, first[site].beta)
    assert any(not torch.allclose(parts[2][1][s].beta, first[s].beta) for s in first)

    pos, neg = encode(clip, "a photo of a cat"), encode(clip, "blurry")
    base = ksample(sdxl, pos, neg, steps=6)
    steered_model = _node("ActSteerApply").execute(model=sdxl, transport=each, strength=1.0, start_percent=0.0,
                                                   end_percent=1.0, layers="")[0]
    steered = ksample(steered_model, pos, neg, steps=6)
    assert torch.isfinite(steered).all() and not torch.equal(steered, base)
    log = patching.steering_patch(steered_model).last_run
    assert all(len(on) == 1 for on in log.entries_on)  # one stage per model call, never two
    stages = [on[0] for on in log.entries_on]
    per_step = len(stages) // 6  # model calls per step (cond and uncond may run in one call or two)
    assert stages == [k for k in (0, 0, 1, 1, 2, 2) for _ in range(per_step)]  # 6 steps: each stage spans two
    pooled = _learn(sdxl, clip, layers="fast", samples_per_prompt=1, collect_steps=2, per_step=None)  # pools: one map
    assert not core.stage_windows(pooled) and pooled.extra["comfy"]["per_step"] is False
