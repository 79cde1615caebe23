"""Layer presets for ComfyUI diffusion models: which sites of ``model.model.diffusion_model`` to fit.

Pure functions over module names and classes (no ComfyUI import), so they are testable on any module tree.
Site names follow ComfyUI's module names: SDXL ``input_blocks.4.1.transformer_blocks.0.norm1``; FLUX
``double_blocks.3:0`` (image stream), ``double_blocks.3:1`` (text stream), ``single_blocks.7`` (one
``cat([txt, img])`` tensor).
"""

from __future__ import annotations

import re
from typing import Literal

import torch

from ..core.sites import resolve_sites

Family = Literal["unet", "flux", "other"]
LayerPreset = Literal["auto", "all-norms", "fast", "blocks", "regex"]
LAYER_PRESETS: tuple[str, ...] = ("auto", "all-norms", "fast", "blocks", "regex")

# FLUX "fast": the first few double blocks, both streams (of 19 in FLUX.1 dev/schnell).
_FLUX_FAST_DOUBLE_BLOCKS = 5


def model_family(diffusion_model: torch.nn.Module) -> Family:
    """``"unet"`` for SD1/SDXL-style UNets, ``"flux"`` for FLUX-style double/single-block transformers."""
    names = {c.__name__ for c in type(diffusion_model).__mro__}
    if "UNetModel" in names:
        return "unet"
    if hasattr(diffusion_model, "double_blocks") and hasattr(diffusion_model, "single_blocks"):
        return "flux"
    return "other"


def _norm_sites(diffusion_model: torch.nn.Module, prefix: str = "") -> list[str]:
    return [
        name for name, module in diffusion_model.named_modules()
        if name.startswith(prefix) and isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))
    ]


def preset_sites(diffusion_model: torch.nn.Module, preset: str, regex: str = "") -> list[str]:
    """Site names for a layer preset (registration order; fitting reorders them by execution).

    Args:
        diffusion_model: ``model.model.diffusion_model`` of a ComfyUI MODEL.
        preset: ``"auto"`` (all-norms on UNets, blocks on FLUX), ``"all-norms"`` (every GroupNorm/LayerNorm of
            a UNet: the paper's choice for SDXL, 256 sites), ``"fast"`` (UNet: the GroupNorms of the input
            blocks, 16 sites on SDXL; FLUX: both streams of the first 5 double blocks), ``"blocks"`` (FLUX:
            both streams of every double block and every single block, 76 sites on FLUX.1), or ``"regex"``.
        regex: with ``preset="regex"``, a regular expression matched in full against module names; end it
            with ``:0``, ``:1`` or ``:(0|1)`` to pick elements of tuple outputs (FLUX double blocks).

    Raises:
        ValueError: unknown preset, a preset that does not fit this model, or a regex that matches nothing.
    """
    family = model_family(diffusion_model)
    kind = type(diffusion_model).__name__
    if preset == "regex":
        if not regex.strip():
            raise ValueError("Layer preset 'regex' needs a regular expression in `layer_regex` (e.g. 'double_blocks\\.1:0')")
        return resolve_sites(diffusion_model, regex.strip())
    if preset not in LAYER_PRESETS:
        raise ValueError(f"Unknown layer preset {preset!r}; choose one of: {', '.join(LAYER_PRESETS)}")
    if preset == "auto":
        preset = {"unet": "all-norms", "flux": "blocks"}.get(family, "auto")
    if family == "unet":
        if preset == "all-norms":
            return _norm_sites(diffusion_model)
        if preset == "fast":
            return [
                name for name, module in diffusion_model.named_modules()
                if name.startswith("input_blocks.") and isinstance(module, torch.nn.GroupNorm)
            ]
    elif family == "flux":
        n_double = len(diffusion_model.double_blocks)
        if preset == "blocks":
            sites = [f"double_blocks.{i}:{k}" for i in range(n_double) for k in (0, 1)]
            return sites + [f"single_blocks.{i}" for i in range(len(diffusion_model.single_blocks))]
        if preset == "fast":
            return [f"double_blocks.{i}:{k}" for i in range(min(n_double, _FLUX_FAST_DOUBLE_BLOCKS)) for k in (0, 1)]
    fits = {"unet": "'all-norms' or 'fast'", "flux": "'blocks' or 'fast'"}.get(family)
    hint = f"use {fits}" if fits else "use 'regex' with a pattern over its module names"
    raise ValueError(f"Layer preset {preset!r} does not apply to a {kind} diffusion model; {hint}")


def filter_sites(sites: list[str], pattern: str) -> list[str]:
    """The sites whose name matches ``pattern`` (a regex searched anywhere in the name); empty pattern = all.

    Raises:
        ValueError: bad regex, or nothing matches (the message shows a few site names).
    """
    if not pattern.strip():
        return list(sites)
    try:
        rx = re.compile(pattern.strip())
    except re.error as err:
        raise ValueError(f"Bad layer filter {pattern!r}: {err}") from None
    kept = [s for s in sites if rx.search(s)]
    if not kept:
        sample = ", ".join(sites[:3]) + (", ..." if len(sites) > 3 else "")
        raise ValueError(f"Layer filter {pattern!r} matches none of the transport's {len(sites)} sites ({sample})")
    return kept
