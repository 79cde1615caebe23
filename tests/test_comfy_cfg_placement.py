"""AcT Apply's ``cfg_placement`` on real ComfyUI models (tiny SDXL and FLUX): ``both`` (the default) steers every
row of the sampler's CFG batch, ``conditional`` only the rows flagged positive in ``cond_or_uncond``,
``guidance-aware`` every row at CFG x strength; at CFG 1 (no negative pass) the three are the same."""

from __future__ import annotations

import pytest
import torch
from support.comfy import clip, encode, flux, ksample, one_thread, pack, sdxl, tiny_flux, tiny_sdxl  # noqa: F401

FAMILIES = ("sdxl", "flux")
SITES = {"sdxl": ["input_blocks.1.0.in_layers.0", "middle_block.1.norm", "out.0"],
         "flux": ["double_blocks.0:0", "double_blocks.1:1", "single_blocks.0"]}


def _model(kind: str):
    return tiny_sdxl(0) if kind == "sdxl" else tiny_flux(0)


def _transport(pack, model, kind: str):
    core = pack.core
    g = torch.Generator().manual_seed(0)
    maps = {}
    for site in SITES[kind]:
        width = core.infer_width(model.model.diffusion_model.get_submodule(site.split(":")[0]))
        omega = 1 + 0.5 * (torch.rand(width, generator=g) - 0.5)
        maps[site] = core.UnitMap(omega, 0.5 * torch.randn(width, generator=g))
    return core.Transport(maps, method="linear-act", support="all",
                          model={"framework": "comfyui", "class": type(model.model).__name__})


def _apply(model, transport, strength=1.0, **extra):
    import nodes

    node = nodes.NODE_CLASS_MAPPINGS["ActSteerApply"]
    return node.execute(model=model, transport=transport, strength=strength, start_percent=0.0, end_percent=1.0,
                        **extra)[0]


def _first_call(model, pos, neg, cfg):
    """The diffusion model's output and ``cond_or_uncond`` flags of the sampler's first model call."""
    seen = []

    def hook(module, args, kwargs, out):
        if not seen:
            seen.append((out.detach().clone(), list(kwargs["transformer_options"]["cond_or_uncond"])))

    h = model.model.diffusion_model.register_forward_hook(hook, with_kwargs=True)
    try:
        ksample(model, pos, neg, cfg=cfg, steps=2)
    finally:
        h.remove()
    return seen[0]


def _conds(clip, kind):
    return encode(clip, "a photo of a cat", flux=kind == "flux"), encode(clip, "blurry", flux=kind == "flux")


@pytest.mark.parametrize("kind", FAMILIES)
def test_conditional_steers_only_the_positive_rows(pack, clip, kind):
    model = _model(kind)
    pos, neg = _conds(clip, kind)
    transport = _transport(pack, model, kind)
    plain, flags = _first_call(model, pos, neg, 4.0)
    assert sorted(flags) == [0, 1]  # one batch holds the positive and the negative chunk
    cond, _ = _first_call(_apply(model, transport), pos, neg, 4.0)  # the default
    both, _ = _first_call(_apply(model, transport, cfg_placement="both"), pos, neg, 4.0)
    chunk = plain.shape[0] // 2
    for j, flag in enumerate(flags):
        rows = slice(j * chunk, (j + 1) * chunk)
        assert torch.equal(cond[rows], plain[rows]) == (flag == 1)
        assert not torch.allclose(both[rows], plain[rows])


@pytest.mark.parametrize("kind", FAMILIES)
def test_guidance_aware_is_both_at_cfg_times_strength(pack, clip, kind):
    model = _model(kind)
    pos, neg = _conds(clip, kind)
    transport = _transport(pack, model, kind)
    aware = ksample(_apply(model, transport, 0.25, cfg_placement="guidance-aware"), pos, neg, cfg=4.0)
    assert torch.equal(aware, ksample(_apply(model, transport, 1.0, cfg_placement="both"), pos, neg, cfg=4.0))
    assert not torch.equal(aware, ksample(_apply(model, transport, 0.25), pos, neg, cfg=4.0))


@pytest.mark.parametrize("kind", FAMILIES)
def test_without_cfg_all_placements_are_the_same(pack, clip, kind):
    model = _model(kind)
    pos, neg = _conds(clip, kind)
    transport = _transport(pack, model, kind)
    out = [ksample(_apply(model, transport, 0.7, cfg_placement=p), pos, neg, cfg=1.0)
           for p in ("both", "conditional", "guidance-aware")]
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert not torch.equal(out[0], ksample(model, pos, neg, cfg=1.0))


def test_placement_checks(pack, sdxl):
    import nodes

    node = nodes.NODE_CLASS_MAPPINGS["ActSteerApply"]
    assert "cfg_placement: 'half'" in node.validate_inputs(cfg_placement="half")
    assert node.validate_inputs(cfg_placement="conditional") is True
    transport = _transport(pack, sdxl, "sdxl")
    first = _apply(sdxl, transport, cfg_placement="both")
    with pytest.raises(ValueError, match="cfg_placement 'conditional' differs from the 'both'"):
        _apply(first, transport)  # the default
