"""Checks and translation before steering a ComfyUI MODEL: the diffusion model, matching sites and widths, and
diffusers-named transports translated to ComfyUI names (`actsteer.archs.comfy_names`).

Errors here speak to an artist in the graph: what to change on which node, never a Python call. Messages of the
core (written for Python users, e.g. "see actsteer.list_sites(model)") are rephrased by `for_artist`.
"""

from __future__ import annotations

import re

import torch

from ..archs.comfy_names import is_diffusers_transport, to_comfy
from ..archs.detect import module_arch
from ..core import Transport, WidthMismatch, fitted_on, join_stages, split_stages, validate
from .presets import group_sites


# Hints the core gives Python users; an artist in ComfyUI cannot act on them.
_PYTHON_HINTS = re.compile(r"\s*[;,]?\s*\(?see actsteer\.list_sites\(model\)\)?")
MATCH_ADVICE = ("connect the MODEL this transport was learned on (same family and size), or learn a new transport "
                "on this MODEL with AcT Learn Transport")


def for_artist(err: BaseException | str, advice: str, *, always: bool = True) -> str:
    """One line for the node: the core's message without its Python hints, then what to change in the graph.

    With ``always=False`` the advice replaces a removed Python hint only (messages written for the graph
    already say what to change).

    Example:
        >>> for_artist(KeyError("Site 'x' not found in Flux (9 submodules); see actsteer.list_sites(model)"),
        ...            "pick another layer group")
        "Site 'x' not found in Flux (9 submodules); pick another layer group"
    """
    text = err if isinstance(err, str) else str(err.args[0] if err.args else err)
    cleaned = " ".join(_PYTHON_HINTS.sub("", text).split())
    if not always and cleaned == " ".join(text.split()):
        return cleaned
    return f"{cleaned.rstrip(' ;.')}; {advice}"


def diffusion_model(model) -> torch.nn.Module:
    """``model.model.diffusion_model`` of a ComfyUI MODEL, with a clear error for anything else."""
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(inner, torch.nn.Module):
        raise ValueError(
            f"Expected a ComfyUI MODEL (a ModelPatcher with model.diffusion_model), got {type(model).__name__}; "
            "wrappers that replace the diffusion model (e.g. Nunchaku) are not supported"
        )
    return inner


def check_transport(model, transport: Transport) -> None:
    """Raise a one-line ValueError when ``transport`` cannot steer ``model`` (missing sites, wrong widths: the core's
    `validate`, said for the graph)."""
    dm = diffusion_model(model)
    kind = f"{type(model.model).__name__} ({type(dm).__name__})"
    mismatch = f"This transport does not match the MODEL: it was fitted on {fitted_on(transport)}, the MODEL is {kind}"
    try:
        validate(dm, transport)
    except WidthMismatch as err:
        wrong = [f"{site!r} has {units} units, the model {width}" for site, units, width, _ in err.mismatches]
        raise ValueError(
            f"{mismatch}; " + "; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
            + f"; {MATCH_ADVICE}"
        ) from None
    except (KeyError, ValueError) as err:
        raise ValueError(for_artist(f"{mismatch}. " + str(err.args[0] if err.args else err), MATCH_ADVICE)) from None


def to_comfy_names(model, transport: Transport) -> Transport:
    """Translate a diffusers-fitted transport to ComfyUI site names (no-op for ComfyUI transports).

    Uses `actsteer.archs.comfy_names.to_comfy`, which logs a warning where the two frameworks'
    activation distributions differ (e.g. FLUX text streams: T5 padding 256 in ComfyUI vs 512 in diffusers).
    """
    if not is_diffusers_transport(transport):
        return transport
    arch = module_arch(diffusion_model(model))
    if arch is None:
        raise ValueError(
            f"This transport was fitted with diffusers; translating its names supports SDXL and FLUX models, "
            f"not {type(model.model).__name__}; {MATCH_ADVICE}"
        )
    try:
        return to_comfy(transport, arch=arch)
    except (KeyError, ValueError) as err:
        raise ValueError(for_artist(f"Cannot translate this diffusers transport to ComfyUI names: {err.args[0] if err.args else err}",
                                    MATCH_ADVICE)) from None


def check_numbers(transport: Transport, where: str) -> Transport:
    """Refuse a transport with NaN/Inf maps before it reaches a sampler (`actsteer.core.validation.check_transport`).

    Raises:
        ValueError: one line naming ``where`` and the site, and saying to learn it again.
    """
    from ..core import check_transport as check_maps

    try:
        return check_maps(transport, where)
    except ValueError as err:
        raise ValueError(str(err).replace("fit the transport again", "learn it again with AcT Learn Transport")) from None


def select_group(model, transport: Transport, group: str) -> Transport:
    """The part of ``transport`` (translated to ComfyUI names) that lies in a `site_groups` group of ``model``.

    ``"all"`` returns the transport unchanged (translation is left to `apply_steering`).

    Raises:
        ValueError: a group of another model family, or no layer of the transport in the group.
    """
    if group == "all":
        return transport
    parts = [(w, to_comfy_names(model, part)) for w, part in split_stages(transport)]
    names = list(dict.fromkeys(s for _, part in parts for s in part.sites))
    kept = set(group_sites(diffusion_model(model), names, group))
    parts = [(w, part.select([s for s in part.sites if s in kept])) for w, part in parts
             if any(s in kept for s in part.sites)]
    if parts[0][0] == "all" and len(parts) == 1:
        return parts[0][1]
    shared = parts[0][1] if parts[0][0] == "all" else None
    return join_stages(shared, [(w, part) for w, part in parts if w != "all"])
