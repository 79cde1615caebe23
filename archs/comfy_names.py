"""Translate transport site names between diffusers pipelines and ComfyUI's ``diffusion_model`` (SDXL, FLUX).

diffusers sites carry a component prefix (``"unet.down_blocks.1.resnets.0.norm1"``); ComfyUI sites are
relative to ``model.diffusion_model`` (``"input_blocks.4.0.in_layers.0"``, ``"double_blocks.3:1"``). The tables
restate what ComfyUI's ``comfy.utils.unet_to_diffusers`` / ``flux_to_diffusers`` do for parameter keys, at
module level; ComfyUI itself is never imported. Where the two implementations produce different
activation distributions at a site, the translation logs a warning and records it in ``extra``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import functools

from ..core import Transport, UnitMap, join_stages, naming_of, parse_site, split_stages
from .detect import transport_arch
from .flux import FLUX_SINGLE_CONCAT, FLUX_SINGLE_TUPLE, flux_single_block_output
from .site_groups import Arch

logger = logging.getLogger(__name__)


# The SDXL base UNet, used when a transport does not record its UNet layout.
SDXL_LAYOUT = {
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}

_RESNET = {  # diffusers ResnetBlock2D child -> ComfyUI ResBlock child (its `nonlinearity` is shared: no equivalent)
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "dropout": "out_layers.2", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_DOWNSAMPLER = {"conv": "op"}
_UNET_TOP = [
    ("conv_in", "input_blocks.0.0"), ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.act", "time_embed.1"), ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.act", "label_emb.0.1"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_norm_out", "out.0"), ("conv_act", "out.1"), ("conv_out", "out.2"),
]
_FLUX_DOUBLE = {
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2", "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
}
_FLUX_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_FLUX_TOP = [
    ("x_embedder", "img_in"), ("context_embedder", "txt_in"), ("proj_out", "final_layer.linear"),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
]
_DENOISER_PREFIX = {"sdxl": "unet", "flux": "transformer"}
_TEXT_PADDING = (
    "the text stream is mean-pooled over padded T5 tokens and ComfyUI pads prompts to 256 tokens "
    "(diffusers to `max_sequence_length`, 512 by default), so its distribution differs"
)


def _layout_from(layout: Mapping[str, Any]) -> tuple[list[int], list[bool], list[bool]]:
    """(res blocks per level, down level has attention, up level has attention) from a diffusers layout or a
    ComfyUI ``unet_config`` (``num_res_blocks``, ``channel_mult``, ``transformer_depth``)."""
    if "down_block_types" not in layout:  # a ComfyUI unet_config
        depth = list(layout.get("transformer_depth", []))
        res = layout.get("num_res_blocks", 2)  # SDXL's ComfyUI config leaves it to model detection (2)
        if isinstance(res, int):
            levels = len(layout["channel_mult"]) if "channel_mult" in layout else max(1, len(depth) // res)
            res = [res] * levels
        res = [int(r) for r in res]
        if len(depth) == len(res):  # one depth per level rather than per res block
            depth = [d for d, r in zip(depth, res) for _ in range(r)]
        depth += [0] * (sum(res) - len(depth))
        starts = [sum(res[:x]) for x in range(len(res))]
        down = [any(d > 0 for d in depth[s : s + r]) for s, r in zip(starts, res)]
        return res, down, list(reversed(down))
    down_types = list(layout["down_block_types"])
    per_block = layout["layers_per_block"]
    res = list(per_block) if isinstance(per_block, (list, tuple)) else [int(per_block)] * len(down_types)
    up = ["CrossAttn" in t for t in layout["up_block_types"]]
    return res, ["CrossAttn" in t for t in down_types], up


def _sdxl_table(layout: Mapping[str, Any]) -> _Table:
    """``(diffusers prefix, ComfyUI prefix, child table or None for identical children)``, per block."""
    res, down_attn, up_attn = _layout_from(layout)
    levels = len(res)
    table: _Table = [(d, c, {}) for d, c in _UNET_TOP]
    for x in range(levels):
        n = 1 + sum(r + 1 for r in res[:x])
        for i in range(res[x]):
            table.append((f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n + i}.0", _RESNET))
            if down_attn[x]:
                table.append((f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n + i}.1", None))
        if x < levels - 1:
            table.append((f"down_blocks.{x}.downsamplers.0", f"input_blocks.{n + res[x]}.0", _DOWNSAMPLER))
    table += [("mid_block.resnets.0", "middle_block.0", _RESNET), ("mid_block.attentions.0", "middle_block.1", None),
              ("mid_block.resnets.1", "middle_block.2", _RESNET)]
    up_res = list(reversed(res))
    for x in range(levels):
        n = sum(r + 1 for r in up_res[:x])
        for i in range(up_res[x] + 1):
            table.append((f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n + i}.0", _RESNET))
            if up_attn[x]:
                table.append((f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n + i}.1", None))
        if x < levels - 1:
            slot = 2 if up_attn[x] else 1  # after the resnet (and the attention)
            table.append((f"up_blocks.{x}.upsamplers.0", f"output_blocks.{n + up_res[x]}.{slot}", {"conv": "conv"}))
    return table


_Table = list[tuple[str, str, "dict[str, str] | None"]]


def _lookup(name: str, table: _Table, reverse: bool) -> tuple[str, str, str] | None:
    """Map ``name`` by its longest block prefix; returns (mapped name, block kind, remainder) or None."""
    best = None
    for d, c, children in table:
        src, dst = (c, d) if reverse else (d, c)
        if (name == src or name.startswith(src + ".")) and (best is None or len(src) > len(best[0])):
            best = (src, dst, children)
    if best is None:
        return None
    src, dst, children = best
    rest = name[len(src) + 1 :]
    if not rest:
        return dst, "block", ""
    if children is None:  # identical child names (transformer blocks, norms, projections)
        return f"{dst}.{rest}", "child", rest
    lookup = {v: k for k, v in children.items()} if reverse else children
    for child in sorted(lookup, key=len, reverse=True):
        if rest == child or rest.startswith(child + "."):
            return f"{dst}.{lookup[child]}{rest[len(child):]}", "child", rest
    return None


def _sdxl_site(site: str, layout: Mapping[str, Any], to_comfy: bool) -> str:
    name, k = parse_site(site)
    table = _sdxl_table(layout)
    hit = _lookup(name, table, reverse=not to_comfy)
    if hit is None:
        side = "ComfyUI" if to_comfy else "diffusers"
        raise KeyError(
            f"Site {site!r} has no known {side} equivalent; translate block outputs, norms, convs or linears"
        )
    mapped, kind, _ = hit
    is_attention = kind == "block" and re.search(r"attentions\.\d+$", name if to_comfy else mapped)
    if to_comfy:  # a Transformer2DModel returns a tuple (sample,); ComfyUI's SpatialTransformer a tensor
        return mapped if k is None or (is_attention and k == 0) else f"{mapped}:{k}"
    if is_attention and k is None:
        return f"{mapped}:0"
    return mapped if k is None else f"{mapped}:{k}"


def _flux_site(site: str, to_comfy: bool, single: str, notes: list[str]) -> list[str]:
    """Translate one FLUX site (may give two diffusers sites for one ComfyUI single block)."""
    name, k = parse_site(site)
    src, dst = ("transformer_blocks", "double_blocks") if to_comfy else ("double_blocks", "transformer_blocks")
    m = re.fullmatch(rf"{src}\.(\d+)(?:\.(.+))?", name)
    if m:
        i, rest = m.groups()
        if rest is None:
            if k not in (0, 1):
                raise KeyError(f"Site {site!r}: a FLUX double block returns two streams; name one as ':0' or ':1'")
            if (k == 0) == to_comfy:  # diffusers :0 and ComfyUI :1 are the text stream
                notes.append(f"{site}: {_TEXT_PADDING}")
            return [f"{dst}.{i}:{1 - k}"]  # diffusers (text, image) <-> ComfyUI (image, text)
        table = _FLUX_DOUBLE if to_comfy else {v: key for key, v in _FLUX_DOUBLE.items()}
        if rest in table:
            return [f"{dst}.{i}.{table[rest]}" + ("" if k is None else f":{k}")]
        raise KeyError(f"Site {site!r} has no known equivalent inside a FLUX double block; use the block outputs")
    src, dst = ("single_transformer_blocks", "single_blocks")
    if not to_comfy:
        src, dst = dst, src
    m = re.fullmatch(rf"{src}\.(\d+)(?:\.(.+))?", name)
    if m:
        i, rest = m.groups()
        if rest is not None:
            table = _FLUX_SINGLE if to_comfy else {v: key for key, v in _FLUX_SINGLE.items()}
            if rest in table:
                return [f"{dst}.{i}.{table[rest]}" + ("" if k is None else f":{k}")]
            raise KeyError(f"Site {site!r} has no known equivalent inside a FLUX single block; use the block outputs")
        if single == FLUX_SINGLE_CONCAT:  # same tensor on both sides: cat([text; image]) along tokens
            return [f"{dst}.{i}"]
        if to_comfy:  # the caller picks one stream's map for the concatenated tensor
            stream = {0: "text", 1: "image"}.get(k, f"element {k}")
            notes.append(f"{site}: fitted on the {stream} stream only, but ComfyUI's single block returns one "
                         "cat([text; image]) tensor, so the map applies to all its tokens")
            return [f"{dst}.{i}"]
        notes.append(f"{site}: fitted on ComfyUI's cat([text; image]) tensor, applied to the text (:0) and image (:1) "
                     f"streams separately; and {_TEXT_PADDING}")
        return [f"{dst}.{i}:0", f"{dst}.{i}:1"]
    top = _FLUX_TOP if to_comfy else [(c, d) for d, c in _FLUX_TOP]
    for a, b in top:
        if name == a:
            return [b + ("" if k is None else f":{k}")]
    side = "ComfyUI" if to_comfy else "diffusers"
    raise KeyError(f"Site {site!r} has no known {side} equivalent in FLUX; translate block outputs")


_DIFFUSERS_PREFIXES = ("unet.", "transformer.", "text_encoder", "down_blocks.", "up_blocks.", "mid_block.",
                       "conv_norm_out", "transformer_blocks.", "single_transformer_blocks.")


def is_diffusers_transport(transport: Transport) -> bool:
    """True when the transport's sites are diffusers names (fitted with actsteer's diffusers API): what its
    metadata records, else what its site names look like."""
    recorded = naming_of(transport)
    if recorded is not None:
        return recorded == "diffusers"
    return bool(transport.sites) and all(s.startswith(_DIFFUSERS_PREFIXES) for s in transport.sites)


def _log(notes: list[str], direction: str) -> None:
    if notes:
        logger.warning(
            "actsteer: %s: %d site(s) have different activation distributions in ComfyUI and diffusers; "
            "refit on the target implementation for best results: %s", direction, len(notes), "; ".join(notes[:4])
            + (f"; and {len(notes) - 4} more" if len(notes) > 4 else ""),
        )


def _per_stage(translate):
    """Translate a per-step transport (`actsteer.core.split_stages`) stage by stage, keeping its stage marks."""

    @functools.wraps(translate)
    def wrapper(transport: Transport, *args: Any, **kwargs: Any) -> Transport:
        parts = split_stages(transport)
        if len(parts) == 1 and parts[0][0] == "all":
            return translate(transport, *args, **kwargs)
        done = [(w, translate(part, *args, **kwargs)) for w, part in parts]
        shared = done[0][1] if done[0][0] == "all" and len(done[0][1]) else None
        return join_stages(shared, [(w, part) for w, part in done if w != "all"])

    return wrapper


@_per_stage
def to_comfy(transport: Transport, arch: Arch | None = None) -> Transport:
    """A copy of a diffusers pipeline transport with ComfyUI ``diffusion_model`` site names.

    Component prefixes (``unet.``, ``transformer.``) are dropped; text-encoder sites have no ComfyUI model
    counterpart here and are dropped with a warning. FLUX double blocks swap their tuple index (diffusers
    returns (text, image), ComfyUI (image, text)). Since diffusers 0.35 a single block returns (text, image)
    while ComfyUI returns one cat([text; image]) tensor: its image-stream map (``:1``) is used for the whole
    tensor, with a warning.

    Args:
        transport: fitted with `fit_pipeline` (or with diffusers names relative to the UNet/transformer).
        arch: ``"sdxl"`` or ``"flux"``; default ``transport.model["arch"]``, else guessed from the names.

    Raises:
        KeyError: a site with no known ComfyUI equivalent (e.g. a whole ``down_blocks.0``).
    """
    arch = transport_arch(transport, arch)
    if naming_of(transport) == "comfyui":
        raise ValueError("This transport already uses ComfyUI names")
    prefix = _DENOISER_PREFIX[arch] + "."
    layout = transport.model.get("unet_layout") or SDXL_LAYOUT
    single = transport.model.get("flux_single_block_output", FLUX_SINGLE_TUPLE)
    notes: list[str] = []
    dropped = [s for s in transport if s.split(".")[0].startswith("text_encoder")]
    maps: dict[str, UnitMap] = {}
    for site, unit_map in transport.items():
        if site in dropped:
            continue
        name = site[len(prefix) :] if site.startswith(prefix) else site
        if arch == "sdxl":
            out = [_sdxl_site(name, layout, to_comfy=True)]
        else:
            module, k = parse_site(name)
            image_site = f"{prefix}{module}:1"
            if single == FLUX_SINGLE_TUPLE and k == 0 and module.startswith("single_") and image_site in transport:
                notes.append(
                    f"{name}: dropped, ComfyUI's one [text; image] tensor gets the image-stream map ({module}:1)"
                )
                continue
            out = _flux_site(name, True, single, notes)
        for comfy_site in out:
            maps[comfy_site] = unit_map
    if dropped:
        logger.warning(
            "actsteer: to_comfy: %d text-encoder site(s) dropped (ComfyUI steers the diffusion model only): %s",
            len(dropped), ", ".join(dropped[:3]) + (", ..." if len(dropped) > 3 else ""),
        )
    if not maps:
        raise ValueError("No diffusion-model site left to translate (the transport has text-encoder sites only)")
    _log(notes, "to_comfy")
    model = dict(transport.model, naming="comfyui", arch=arch)
    extra = dict(transport.extra, comfy_translation={"from": "diffusers", "dropped": dropped, "warnings": notes})
    return transport.replace(maps, model=model, extra=extra)


@_per_stage
def from_comfy(
    transport: Transport,
    arch: Arch,
    *,
    layout: Mapping[str, Any] | None = None,
    diffusers_version: str | None = None,
) -> Transport:
    """A copy of a ComfyUI transport with diffusers pipeline site names (``unet.`` / ``transformer.`` prefixes).

    Args:
        transport: sites relative to ComfyUI's ``diffusion_model``.
        arch: ``"sdxl"`` or ``"flux"``.
        layout: the UNet layout (diffusers ``layers_per_block``/``down_block_types``/``up_block_types`` or a ComfyUI
            ``unet_config``); default ``transport.model["unet_layout"]`` / ``["unet_config"]``, else SDXL base.
        diffusers_version: decides what FLUX single blocks return; default the installed diffusers. Since 0.35 a
            ComfyUI single block's map (fitted on [text; image]) goes to both ``:0`` and ``:1``, with a warning.
    """
    arch = transport_arch(transport, arch)
    layout = layout or transport.model.get("unet_layout") or transport.model.get("unet_config") or SDXL_LAYOUT
    single = flux_single_block_output(diffusers_version)
    prefix = _DENOISER_PREFIX[arch] + "."
    notes: list[str] = []
    maps: dict[str, UnitMap] = {}
    for site, unit_map in transport.items():
        out = [_sdxl_site(site, layout, to_comfy=False)] if arch == "sdxl" else _flux_site(site, False, single, notes)
        for diffusers_site in out:
            maps[prefix + diffusers_site] = unit_map
    _log(notes, "from_comfy")
    model = dict(transport.model, naming="diffusers", arch=arch)
    if arch == "flux":
        model["flux_single_block_output"] = single
    extra = dict(transport.extra, comfy_translation={"from": "comfyui", "warnings": notes})
    return transport.replace(maps, model=model, extra=extra)
