"""Where the steer enters classifier-free guidance (hf_integration/cfg.py, `SteeringHandle.set_rows`), on tiny
random SDXL and FLUX pipelines: ``cfg="conditional"`` (the default) steers the prompt's branch only, ``"both"``
every row and every call, ``"guidance-aware"`` every row at guidance x strength; without guidance the three are the
same."""

from __future__ import annotations

import pytest
import torch
from support.tiny_pipelines import (  # noqa: F401  (one_thread, sdxl, flux: fixtures)
    flux_call_kwargs,
    make_flux_pipeline,
    make_sdxl_pipeline,
    one_thread,
    sdxl_call_kwargs,
)

import actsteer
from actsteer.hf_integration.cfg import DEFAULT_CFG, check_cfg
from actsteer.hf_integration.pipeline_fit import fit_pipeline
from actsteer.hf_integration.pipelines import (
    attach_pipeline,
    disable_pipeline_steering,
    enable_pipeline_steering,
    is_pipeline_steered,
    steer_pipeline,
)

SOURCE = ["a cat", "a dog on grass", "a red car", "a small house"]
TARGET = [f"watercolor, {s}, soft watercolor painting" for s in SOURCE]
PROMPTS = ["a horse", "a boat on a lake"]
SIZE_KW = dict(height=32, width=32)
FLUX_KW = dict(height=32, width=32, max_sequence_length=48)


@pytest.fixture(scope="module")
def sdxl():
    pipe = make_sdxl_pipeline()
    unet = fit_pipeline(pipe, SOURCE, TARGET, modules="fast", support="all", steps="first", progress=False, **SIZE_KW)
    text = fit_pipeline(pipe, SOURCE, TARGET, modules="text_encoders", support="all", progress=False, **SIZE_KW)
    return pipe, [text, unet]


@pytest.fixture(scope="module")
def flux():
    pipe = make_flux_pipeline()
    transport = fit_pipeline(pipe, SOURCE, TARGET, modules="fast", support="all", guidance_scale=0.0, steps="first",
                             progress=False, **FLUX_KW)
    return pipe, transport


def _main_output(out):
    for name in ("sample", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out[0] if isinstance(out, tuple) else out


def _record(pipe, names, call, steering=None, **options):
    """Every output of the components ``names`` during one pipeline call (in call order)."""
    seen = {name: [] for name in names}
    handles = [getattr(pipe, name).register_forward_hook(
        lambda m, a, out, name=name: seen[name].append(_main_output(out).detach().clone()))
        for name in names]
    try:
        if steering is None:
            call()
        else:
            with steer_pipeline(pipe, steering, strength=1.0, **options):
                call()
    finally:
        for h in handles:
            h.remove()
    return seen


def test_check_cfg_names_the_choices():
    assert check_cfg(None) == DEFAULT_CFG == "conditional" and check_cfg("both") == "both"
    with pytest.raises(ValueError, match="'conditional'.*'both'.*'guidance-aware'"):
        check_cfg("uncond")


def test_the_default_placement_is_conditional(sdxl):
    pipe, steering = sdxl
    default = _images(pipe, steering)
    assert torch.equal(default, _images(pipe, steering, cfg="conditional"))
    assert not torch.allclose(default, _images(pipe, steering, cfg="both"))


def test_sdxl_conditional_steers_the_prompt_branch_only(sdxl):
    pipe, steering = sdxl
    n = len(PROMPTS)

    def call():
        pipe(PROMPTS, negative_prompt=["blurry"] * n, **sdxl_call_kwargs(0, **SIZE_KW))

    names = ["unet", "text_encoder", "text_encoder_2"]
    plain = _record(pipe, names, call)
    cond = _record(pipe, names, call, steering, cfg="conditional")
    both = _record(pipe, names, call, steering, cfg="both")
    # the first step's UNet batch is [uncond; cond] and its inputs are the same in every run
    assert plain["unet"][0].shape[0] == 2 * n
    assert torch.equal(cond["unet"][0][:n], plain["unet"][0][:n])
    assert not torch.allclose(cond["unet"][0][n:], plain["unet"][0][n:])
    assert not torch.allclose(both["unet"][0][:n], plain["unet"][0][:n])
    # each text encoder: the prompt first (steered), then the negative prompt (steered by "both" only)
    for name in ("text_encoder", "text_encoder_2"):
        assert len(plain[name]) == 2
        assert not torch.allclose(cond[name][0], plain[name][0])
        assert torch.equal(cond[name][1], plain[name][1])
        assert not torch.allclose(both[name][1], plain[name][1])


def _images(pipe, steering=None, strength=1.0, **kw):
    call = sdxl_call_kwargs(0, **SIZE_KW, **kw)
    if steering is None:
        return pipe(PROMPTS, **call).images
    placement = {"cfg": call.pop("cfg")} if "cfg" in call else {}  # none: the default
    with steer_pipeline(pipe, steering, strength=strength, **placement):
        return pipe(PROMPTS, **call).images


def test_sdxl_without_guidance_all_placements_are_the_same(sdxl):
    pipe, steering = sdxl
    a, b, c = (_images(pipe, steering, cfg=cfg, guidance_scale=0.0)
               for cfg in ("conditional", "both", "guidance-aware"))
    plain = _images(pipe, guidance_scale=0.0)
    assert torch.equal(a, b) and torch.equal(b, c) and not torch.allclose(a, plain)


def test_sdxl_guidance_aware_is_both_at_guidance_times_strength(sdxl):
    pipe, steering = sdxl
    g = sdxl_call_kwargs(0)["guidance_scale"]
    assert g > 1
    aware = _images(pipe, steering, 0.5, cfg="guidance-aware")
    both = _images(pipe, steering, 0.5 * g, cfg="both")
    assert torch.equal(aware, both)
    assert not torch.allclose(aware, _images(pipe, steering, 0.5, cfg="both"))
    # the next call at other guidance re-folds; the handle's own strength is back where it was after the block
    with steer_pipeline(pipe, steering, strength=0.5, cfg="guidance-aware") as handle:
        pipe(PROMPTS, **sdxl_call_kwargs(0, guidance_scale=2.0, **SIZE_KW))
        assert handle.strength == [1.0, 1.0]
        pipe(PROMPTS, **sdxl_call_kwargs(0, guidance_scale=0.0, **SIZE_KW))
        assert handle.strength == [0.5, 0.5]


def test_guidance_aware_refusals(sdxl, flux):
    pipe, steering = sdxl
    with pytest.raises(ValueError, match="request-scoped"):
        attach_pipeline(pipe, steering, cfg="guidance-aware")
    assert not is_pipeline_steered(pipe)
    fpipe, transport = flux
    with pytest.raises(ValueError, match="FluxPipeline.*'conditional'"):
        with steer_pipeline(fpipe, transport, cfg="guidance-aware"):
            pass


def test_pipe_steering_cfg_keyword_and_checks(sdxl):
    pipe, steering = sdxl
    enable_pipeline_steering(pipe)
    try:
        kw = sdxl_call_kwargs(0, **SIZE_KW)
        a = pipe(PROMPTS, steering=steering, steering_cfg="both", **kw).images
        kw["generator"] = torch.Generator("cpu").manual_seed(0)
        with steer_pipeline(pipe, steering, cfg="both"):
            b = pipe(PROMPTS, **kw).images
        assert torch.equal(a, b)
        with pytest.raises(ValueError, match="steering_cfg.*without `steering=`"):
            pipe(PROMPTS, steering_cfg="both", **kw)
        with pytest.raises(ValueError, match="Unknown `cfg='half'`"):
            pipe(PROMPTS, steering=steering, steering_cfg="half", **kw)
    finally:
        disable_pipeline_steering(pipe)
    with pytest.raises(ValueError, match="Unknown `cfg="):
        with actsteer.steer(pipe, steering, cfg="negative"):
            pass


def test_two_pipeline_calls_in_one_block_each_steer_their_own_prompt(sdxl):
    pipe, steering = sdxl

    def call():
        for _ in range(2):
            pipe(PROMPTS, negative_prompt=["blurry"] * len(PROMPTS), **sdxl_call_kwargs(0, **SIZE_KW))

    plain = _record(pipe, ["text_encoder"], call)["text_encoder"]
    cond = _record(pipe, ["text_encoder"], call, steering, cfg="conditional")["text_encoder"]
    assert len(cond) == 4  # prompt, negative, prompt, negative
    assert [torch.equal(c, p) for c, p in zip(cond, plain)] == [False, True, False, True]


def test_flux_true_cfg_conditional_steers_the_positive_call_only(flux):
    pipe, transport = flux

    def call():
        pipe(PROMPTS, negative_prompt=["blurry"] * len(PROMPTS), true_cfg_scale=2.0, **flux_call_kwargs(0))

    plain = _record(pipe, ["transformer"], call)["transformer"]
    cond = _record(pipe, ["transformer"], call, transport, cfg="conditional")["transformer"]
    both = _record(pipe, ["transformer"], call, transport, cfg="both")["transformer"]
    assert len(plain) == 4  # 2 steps x (positive, negative)
    # the first step's inputs are the same in every run: positive steered, negative not (conditional)
    assert not torch.allclose(cond[0], plain[0]) and torch.equal(cond[1], plain[1])
    assert not torch.allclose(both[1], plain[1])


def test_flux_without_true_cfg_steers_every_call(flux):
    pipe, transport = flux
    kw = flux_call_kwargs(0)
    with steer_pipeline(pipe, transport, cfg="conditional"):
        a = pipe(PROMPTS, **kw).images
    kw["generator"] = torch.Generator("cpu").manual_seed(0)
    with steer_pipeline(pipe, transport, cfg="both"):
        b = pipe(PROMPTS, **kw).images
    assert torch.equal(a, b)
