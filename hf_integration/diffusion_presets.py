"""Diffusers pipelines: which components hold sites, default site presets per architecture, and model metadata.

Site names in a pipeline transport are prefixed by the component: ``"unet.down_blocks.0.resnets.0.norm1"``,
``"transformer.transformer_blocks.0:1"``, ``"text_encoder.encoder.layers.0.layer_norm1"``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from ..core.sites import resolve_sites

Arch = Literal["sdxl", "flux"]

DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

# Tuple outputs of FLUX blocks (ACT_SPEC.md section 6, REFERENCE_NOTES.md section 4): double blocks return
# (encoder_hidden_states, hidden_states) = (text, image); since diffusers 0.35 single blocks do too, before
# that they returned one cat([text; image]) tensor along the token dim.
FLUX_DOUBLE_OUTPUT = "tuple(text, image)"
FLUX_SINGLE_TUPLE = "tuple(text, image)"
FLUX_SINGLE_CONCAT = "tensor cat(text, image)"


def diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def flux_single_block_output(version: str | None = None) -> str:
    """What ``single_transformer_blocks.{i}`` return in diffusers ``version`` (default: the installed one)."""
    version = diffusers_version() if version is None else version
    major_minor = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    return FLUX_SINGLE_TUPLE if major_minor >= (0, 35) else FLUX_SINGLE_CONCAT


def is_diffusion_pipeline(obj: Any) -> bool:
    """True for a diffusers ``DiffusionPipeline`` (without importing diffusers when it was never imported)."""
    import sys

    diffusers = sys.modules.get("diffusers")
    return diffusers is not None and isinstance(obj, diffusers.DiffusionPipeline)


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
    name = denoiser_name(pipe)
    cls = type(getattr(pipe, name)).__name__
    if name == "unet" and cls == "UNet2DConditionModel":
        return "sdxl"
    if cls == "FluxTransformer2DModel":
        return "flux"
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
def _modules_of(view: torch.nn.Module, prefix: str, keep: Callable[[str, torch.nn.Module], bool]) -> list[str]:
    return [n for n, m in view.named_modules() if n.startswith(prefix + ".") and keep(n, m)]


def _is_norm(_: str, module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))


def _sdxl_norms(view: torch.nn.Module) -> list[str]:
    # Every GroupNorm (resnets, Transformer2DModel.norm, conv_norm_out) and LayerNorm (transformer blocks)
    # of the UNet: ACT_SPEC.md section 6, 256 sites on SDXL.
    return _modules_of(view, "unet", _is_norm)


def _sdxl_fast(view: torch.nn.Module) -> list[str]:
    # The GroupNorms of the first two down levels' resnets: cheap 4-D sites early in the UNet.
    rx = re.compile(r"unet\.down_blocks\.[01]\.resnets\.\d+\.norm[12]")
    return _modules_of(view, "unet", lambda n, m: bool(rx.fullmatch(n)) and _is_norm(n, m))


def _flux_blocks(view: torch.nn.Module) -> list[str]:
    single = ":[0-1]" if flux_single_block_output() == FLUX_SINGLE_TUPLE else ""
    return resolve_sites(
        view, [r"transformer\.transformer_blocks\.\d+:[0-1]", rf"transformer\.single_transformer_blocks\.\d+{single}"]
    )


def _flux_fast(view: torch.nn.Module) -> list[str]:
    return resolve_sites(view, [r"transformer\.transformer_blocks\.[01]:[0-1]"])


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


PRESETS: dict[str, dict[str, Callable[[torch.nn.Module], list[str]]]] = {
    "sdxl": {"auto": _sdxl_norms, "norms": _sdxl_norms, "fast": _sdxl_fast, "text_encoders": _text_encoder_norms},
    "flux": {"auto": _flux_blocks, "blocks": _flux_blocks, "fast": _flux_fast, "text_encoders": _text_encoder_norms},
}


def pipeline_sites(pipe: Any, view: torch.nn.Module, modules: str | Sequence[str]) -> list[str]:
    """Resolve ``modules`` (a preset name, or site names/patterns with component prefixes) to site names.

    Presets: ``"auto"`` (SDXL: every UNet normalization layer; FLUX: both streams of every double block and of
    every single block), ``"norms"``/``"blocks"`` (the same, by name), ``"fast"`` (a few early blocks), and
    ``"text_encoders"`` (the layer norms of the text encoders).

    Raises:
        ValueError: unknown preset, or a pattern that matches nothing (with near misses).
    """
    if isinstance(modules, str) and re.fullmatch(r"[a-z_]+", modules) and "." not in modules:
        presets = PRESETS[pipeline_arch(pipe)]
        if modules not in presets:
            raise ValueError(
                f"Unknown preset `modules={modules!r}` for {type(pipe).__name__}; choose one of: "
                f"{', '.join(presets)}, or pass site names such as 'unet.mid_block.resnets.0.norm1'"
            )
        return presets[modules](view)
    return resolve_sites(view, modules)


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
    info: dict[str, Any] = {
        "class": type(pipe).__name__,
        "name_or_path": str(getattr(pipe, "name_or_path", "") or ""),
        "arch": arch,
        "naming": "diffusers",
        "denoiser": denoiser_name(pipe),
        "components": {name: type(m).__name__ for name, m in components.items()},
        "hidden_sizes": {name: _hidden_size(m) for name, m in components.items()},
        "diffusers_version": diffusers_version(),
    }
    if arch == "sdxl":
        info["unet_layout"] = unet_layout(pipe.unet)
    else:
        cfg = pipe.transformer.config
        info["flux_layout"] = {"num_layers": int(cfg.num_layers), "num_single_layers": int(cfg.num_single_layers)}
        info["flux_double_block_output"] = FLUX_DOUBLE_OUTPUT
        info["flux_single_block_output"] = flux_single_block_output()
    return info
