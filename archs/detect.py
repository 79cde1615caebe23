"""Architecture detection: which site-group architecture (``"sdxl"``, ``"flux"``) a diffusion model or a transport is.

One rule for both hosts: a diffusers denoiser (``UNet2DConditionModel``, ``FluxTransformer2DModel``) and a ComfyUI
``diffusion_model`` (``comfy.ldm...UNetModel``, a FLUX-style model with ``double_blocks`` and ``single_blocks``) are
told apart by their class names and module layout, never by importing diffusers or ComfyUI.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

import torch

from .site_groups import ARCHS, Arch

if TYPE_CHECKING:
    from ..core import Transport

Family = Literal["unet", "flux", "other"]
_UNETS = {"UNet2DConditionModel", "UNetModel"}  # diffusers, ComfyUI
_FLUX = {"FluxTransformer2DModel"}


def module_arch(denoiser: torch.nn.Module) -> Arch | None:
    """``"sdxl"`` for UNets (SDXL and other UNets with SDXL's naming: SD1.x), ``"flux"`` for FLUX-style
    transformers, None for anything else.

    Example:
        >>> import torch
        >>> class UNetModel(torch.nn.Module): ...
        >>> module_arch(UNetModel()), module_arch(torch.nn.Linear(2, 2))
        ('sdxl', None)
    """
    names = {c.__name__ for c in type(denoiser).__mro__}
    if names & _UNETS:
        return "sdxl"
    if names & _FLUX or (hasattr(denoiser, "double_blocks") and hasattr(denoiser, "single_blocks")):
        return "flux"
    return None


def checkpoint_arch(keys: Iterable[str]) -> Arch | None:
    """The architecture of a checkpoint from its tensor names (ComfyUI's original layout, with or without the
    ``model.diffusion_model.`` prefix of full checkpoints, or diffusers' layout); None for anything else (SD3, ...).

    Example:
        >>> checkpoint_arch(["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.down.0"])
        'sdxl'
        >>> checkpoint_arch(["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"])
        'flux'
        >>> checkpoint_arch(["joint_blocks.0.x_block.attn.qkv.weight"]) is None
        True
    """
    keys = list(keys)
    prefix = "model.diffusion_model."
    if any(k.startswith(prefix) for k in keys):
        keys = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    tops = {k.split(".", 1)[0] for k in keys}
    if {"double_blocks", "single_blocks"} <= tops or "single_transformer_blocks" in tops:
        return "flux"
    if "input_blocks" in tops or "down_blocks" in tops:
        return "sdxl"
    return None


def family(arch: str | None) -> Family:
    """The model family an architecture belongs to: ``"unet"``, ``"flux"`` or ``"other"``."""
    return {"sdxl": "unet", "flux": "flux"}.get(arch or "", "other")  # type: ignore[return-value]


def transport_arch(transport: Transport, arch: str | None = None) -> Arch:
    """``arch`` if given, else the architecture the transport records, else a guess from its site names.

    Raises:
        ValueError: an architecture other than ``"sdxl"`` and ``"flux"``.
    """
    arch = arch or transport.model.get("arch")
    if arch is None:
        names = " ".join(transport.sites)
        arch = "flux" if re.search(r"transformer_blocks|double_blocks|single_blocks", names) else "sdxl"
    if arch not in ARCHS:
        raise ValueError(f"Unknown `arch={arch!r}`; ComfyUI name translation supports 'sdxl' and 'flux'")
    return arch  # type: ignore[return-value]
