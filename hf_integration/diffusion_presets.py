"""Diffusers pipelines: which components hold sites, default site presets per architecture, and model metadata.

Site names in a pipeline transport are prefixed by the component: ``"unet.down_blocks.0.resnets.0.norm1"``,
``"transformer.transformer_blocks.0:1"``, ``"text_encoder.encoder.layers.0.layer_norm1"``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from ..archs import site_groups
from ..archs.detect import module_arch
from ..archs.flux import FLUX_DOUBLE_OUTPUT, FLUX_SINGLE_TUPLE, diffusers_version, flux_single_block_output
from ..archs.site_groups import Arch
from ..core import model_record, resolve_sites

DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def denoiser_name(pipe: Any) -> str:
    """``"unet"`` or ``"transformer"``: the component called once per denoising step."""
    for name in DENOISERS:
        if isinstance(getattr(pipe, name, None), torch.nn.Module):
            return name
    raise NotImplementedError(
        f"{type(pipe).__name__} has no `unet` or `transformer` component; actsteer supports SDXL- and FLUX-style "
        "pipelines. Please open an issue with a minimal example"
    )


def pipeline_arch(pipe: Any) -> Arch:
    """``"sdxl"`` for UNet pipelines (SDXL and other ``UNet2DConditionModel`` ones), ``"flux"`` for FLUX."""
    denoiser = getattr(pipe, denoiser_name(pipe))
    arch = module_arch(denoiser)
    if arch is not None:
        return arch
    cls = type(denoiser).__name__
    raise NotImplementedError(
        f"{type(pipe).__name__} uses a {cls}; actsteer's presets cover UNet2DConditionModel (SDXL) and "
        "FluxTransformer2DModel (FLUX). Pass explicit site names, or open an issue with a minimal example"
    )


def site_components(pipe: Any) -> dict[str, torch.nn.Module]:
    """The components that can hold sites, by attribute name: the denoiser, then the text encoders."""
    out = {denoiser_name(pipe): getattr(pipe, denoiser_name(pipe))}
    for name in TEXT_ENCODERS:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            out[name] = module
    return out


def component_view(pipe: Any) -> torch.nn.ModuleDict:
    """A ``ModuleDict`` holding the pipeline's site components, so one name space covers them all.

    Hooks registered through it are real hooks on the pipeline's modules. Its own ``training`` flag is False
    (set without recursing, so the components keep theirs), so that ``train(was_training)`` calls on it never
    switch the components to training mode.
    """
    view = torch.nn.ModuleDict(site_components(pipe))
    view.training = False
    return view


# Presets --------------------------------------------------------------------------------------------------
# The named groups ("all-norms", "fast", "input-blocks", "image-stream", ...) live in `site_groups`, shared with
# the ComfyUI layer picker; only "text_encoders" is diffusers-specific (ComfyUI's MODEL has no text encoder).
TEXT_ENCODERS_PRESET = "text_encoders"


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))


def _text_encoder_norms(view: torch.nn.Module) -> list[str]:
    # LayerNorms inside the encoder layers: CLIP `layers.{i}.layer_norm{1,2}` (with or without the
    # `text_model.` prefix, which transformers 5 dropped from CLIPTextModel), T5 `block.{i}.layer.{j}.layer_norm`.
    rx = re.compile(
        r"text_encoder(_\d)?\.(text_model\.)?encoder\.(layers\.\d+\.layer_norm[12]|block\.\d+\.layer\.\d+\.layer_norm)"
    )
    names = [n for n, _ in view.named_modules() if rx.fullmatch(n)]
    if not names:
        raise ValueError("The pipeline's text encoders have no recognised layer norms; pass explicit site names")
    return names


def preset_names(arch: Arch) -> list[str]:
    """The preset names ``fit_pipeline(modules=...)`` takes for ``arch``: ``"auto"``, the `site_groups` groups
    (and the older alias ``"norms"`` on SDXL), and ``"text_encoders"``."""
    return ["auto", *(["norms"] if arch == "sdxl" else []), *site_groups.group_names(arch), TEXT_ENCODERS_PRESET]


def _is_preset_name(modules: str | Sequence[str]) -> bool:
    return isinstance(modules, str) and (
        modules == TEXT_ENCODERS_PRESET or site_groups.is_group_name(modules) or bool(re.fullmatch(r"[a-z][a-z_-]*", modules))
    )


def pipeline_sites(pipe: Any, view: torch.nn.Module, modules: str | Sequence[str]) -> list[str]:
    """Resolve ``modules`` (a preset name, or site names/patterns with component prefixes) to site names.

    Presets: ``"auto"`` (SDXL: every UNet normalization layer; FLUX: both streams of every double block and of
    every single block), the named groups of `actsteer.archs.site_groups` (SDXL: ``"all-norms"``
    (also ``"norms"``), ``"fast"``, ``"input-blocks"``, ``"middle-block"``, ``"output-blocks"``,
    ``"attention-norms"``, ``"resnet-norms"``; FLUX: ``"blocks"``, ``"fast"``, ``"double-blocks"``,
    ``"single-blocks"``, ``"image-stream"``, ``"text-stream"``), and ``"text_encoders"`` (the layer norms
    of the text encoders).

    Raises:
        ValueError: unknown preset, a group the pipeline has no module of, or a pattern that matches
            nothing (with near misses).
    """
    if not _is_preset_name(modules):
        return resolve_sites(view, modules)
    arch = pipeline_arch(pipe)
    if modules == TEXT_ENCODERS_PRESET:
        return _text_encoder_norms(view)
    try:
        sites = site_groups.select(
            modules, arch, "diffusers", ((n, _is_norm(m)) for n, m in view.named_modules()),
            flux_single_tuple=flux_single_block_output() == FLUX_SINGLE_TUPLE,
        )
    except ValueError:
        raise ValueError(
            f"Unknown preset `modules={modules!r}` for {type(pipe).__name__}; choose one of: "
            f"{', '.join(preset_names(arch))}, or pass site names such as 'unet.mid_block.resnets.0.norm1'"
        ) from None
    if not sites:
        raise ValueError(
            f"The preset `modules={modules!r}` ({site_groups.get_group(modules, arch).summary}) matches no module of "
            f"{type(pipe).__name__}; choose another of: {', '.join(preset_names(arch))}"
        )
    return sites


# Metadata -------------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _hidden_size(module: torch.nn.Module) -> Any:
    config = getattr(module, "config", None)
    for key in ("hidden_size", "d_model", "block_out_channels"):
        value = getattr(config, key, None) if config is not None else None
        if value is not None:
            return _jsonable(value)
    return None


def unet_layout(unet: torch.nn.Module) -> dict[str, Any]:
    """The UNet config fields that decide module names (what ComfyUI name translation needs)."""
    cfg = unet.config
    return _jsonable({
        "layers_per_block": cfg.layers_per_block,
        "down_block_types": cfg.down_block_types,
        "up_block_types": cfg.up_block_types,
        "block_out_channels": cfg.block_out_channels,
        "transformer_layers_per_block": cfg.transformer_layers_per_block,
    })


def pipeline_info(pipe: Any) -> dict[str, Any]:
    """Model metadata stored in a pipeline transport: classes, hidden sizes, layout, diffusers version."""
    arch = pipeline_arch(pipe)
    components = site_components(pipe)
    info = model_record(
        pipe,
        name_or_path=str(getattr(pipe, "name_or_path", "") or ""),
        arch=arch,
        naming="diffusers",
        denoiser=denoiser_name(pipe),
        components={name: type(m).__name__ for name, m in components.items()},
        hidden_sizes={name: _hidden_size(m) for name, m in components.items()},
        diffusers_version=diffusers_version(),
    )
    if arch == "sdxl":
        info["unet_layout"] = unet_layout(pipe.unet)
    else:
        cfg = pipe.transformer.config
        info["flux_layout"] = {"num_layers": int(cfg.num_layers), "num_single_layers": int(cfg.num_single_layers)}
        info["flux_double_block_output"] = FLUX_DOUBLE_OUTPUT
        info["flux_single_block_output"] = flux_single_block_output()
    return info
