"""Checks and translation before steering a ComfyUI MODEL: the diffusion model, matching sites and widths, and
diffusers-named transports translated to ComfyUI names (`actsteer.hf_integration.comfy_names`).
"""

from __future__ import annotations

import torch

from ..core.hooks import validate
from ..core.sites import infer_width, iter_site_modules
from ..core.transport import Transport
from .presets import model_family


def diffusion_model(model) -> torch.nn.Module:
    """``model.model.diffusion_model`` of a ComfyUI MODEL, with a clear error for anything else."""
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(inner, torch.nn.Module):
        raise ValueError(
            f"Expected a ComfyUI MODEL (a ModelPatcher with model.diffusion_model), got {type(model).__name__}; "
            "wrappers that replace the diffusion model (e.g. Nunchaku) are not supported"
        )
    return inner


def _fitted_on(transport: Transport) -> str:
    info = transport.model
    if info.get("framework") == "comfyui" and info.get("class"):
        return f"{info['class']} (ComfyUI)"
    return str(info.get("name_or_path") or info.get("class") or "an unknown model")


def site_width(module: torch.nn.Module) -> int | None:
    """Units of a site module's output: norms and linears by their size, FLUX blocks by their hidden size."""
    width = infer_width(module)
    if width is None:  # FLUX blocks: DoubleStreamBlock.hidden_size, SingleStreamBlock.hidden_dim
        for attr in ("hidden_size", "hidden_dim"):
            value = getattr(module, attr, None)
            if isinstance(value, int):
                return value
    return width


def check_transport(model, transport: Transport) -> None:
    """Raise a one-line ValueError when ``transport`` cannot steer ``model`` (missing sites, wrong widths)."""
    dm = diffusion_model(model)
    kind = f"{type(model.model).__name__} ({type(dm).__name__})"
    try:
        validate(dm, transport)
        resolved = iter_site_modules(dm, transport.sites)
    except (KeyError, ValueError) as err:
        detail = err.args[0] if err.args else str(err)
        raise ValueError(
            f"This transport does not match the MODEL: it was fitted on {_fitted_on(transport)}, the MODEL is {kind}. "
            f"{detail}"
        ) from None
    wrong = [
        f"{site!r} has {transport[site].dim} units, the model {width}"
        for site, _, _, module in resolved
        if (width := site_width(module)) is not None and width != transport[site].dim
    ]
    if wrong:
        raise ValueError(
            f"This transport does not match the MODEL: it was fitted on {_fitted_on(transport)}, the MODEL is {kind}; "
            + "; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        )


_DIFFUSERS_PREFIXES = ("unet.", "transformer.", "text_encoder", "down_blocks.", "up_blocks.", "mid_block.",
                       "conv_norm_out", "transformer_blocks.", "single_transformer_blocks.")


def is_diffusers_transport(transport: Transport) -> bool:
    """True when the transport's sites are diffusers names (fitted with actsteer's diffusers API)."""
    naming = transport.model.get("naming") or transport.model.get("framework")
    if naming in ("diffusers", "comfyui"):
        return naming == "diffusers"
    return bool(transport.sites) and all(s.startswith(_DIFFUSERS_PREFIXES) for s in transport.sites)


def to_comfy_names(model, transport: Transport) -> Transport:
    """Translate a diffusers-fitted transport to ComfyUI site names (no-op for ComfyUI transports).

    Uses ``actsteer.hf_integration.comfy_names.to_comfy``, which logs a warning where the two frameworks'
    activation distributions differ (e.g. FLUX text streams: T5 padding 256 in ComfyUI vs 512 in diffusers).
    """
    if not is_diffusers_transport(transport):
        return transport
    arch = {"unet": "sdxl", "flux": "flux"}.get(model_family(diffusion_model(model)))
    if arch is None:
        raise ValueError(
            f"This transport was fitted with diffusers; translating its names supports SDXL and FLUX models, "
            f"not {type(model.model).__name__}"
        )
    try:
        from ..hf_integration import comfy_names
    except ImportError as err:
        raise ValueError(
            f"This transport was fitted with diffusers and needs its site names translated, but "
            f"actsteer.hf_integration.comfy_names cannot be imported ({err})"
        ) from None
    try:
        return comfy_names.to_comfy(transport, arch=arch)
    except (KeyError, ValueError) as err:
        detail = err.args[0] if err.args else str(err)
        raise ValueError(f"Cannot translate this diffusers transport to ComfyUI names: {detail}") from None
