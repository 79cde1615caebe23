"""Layer choices for ComfyUI diffusion models: which sites of ``model.model.diffusion_model`` to fit or steer.

The named groups ("all-norms", "input-blocks", "image-stream", ...) are `actsteer.archs.site_groups`,
the vocabulary the diffusers presets share; here they are applied in ComfyUI's naming. Site names follow
ComfyUI's module names: SDXL ``input_blocks.4.1.transformer_blocks.0.norm1``; FLUX ``double_blocks.3:0``
(image stream), ``double_blocks.3:1`` (text stream), ``single_blocks.7`` (one ``cat([txt, img])`` tensor).
No ComfyUI import: these are pure functions over module trees.
"""

from __future__ import annotations

import re
import torch

from ..archs import site_groups
from ..archs.detect import module_arch
from ..core import resolve_sites

# The Learn node's `layers` choices: auto, then each family's groups, then a free regex.
LAYER_PRESETS: tuple[str, ...] = (
    "auto", "fast",
    *[g for g in site_groups.group_names("sdxl") if g != "fast"],
    *[g for g in site_groups.group_names("flux") if g != "fast"],
    "regex",
)
# The Apply / Sweep nodes' `layer_group` choices: every layer of the transport, or one group.
APPLY_GROUPS: tuple[str, ...] = ("all", *[p for p in LAYER_PRESETS if p not in ("auto", "regex")])

LAYERS_TOOLTIP = (
    "Which layers to learn. auto: every norm of an SDXL UNet (the paper's choice, 256 layers), every block of "
    "FLUX. fast: a few early layers (quick to learn, weaker). "
    "SDXL groups: all-norms (= auto), input-blocks (composition), middle-block, output-blocks (rendering, "
    "texture), attention-norms (where the prompt acts), resnet-norms. "
    "FLUX groups: blocks (= auto), double-blocks, single-blocks, image-stream, text-stream (of the double blocks). "
    "regex: your own pattern in layer_regex."
)
GROUP_TOOLTIP = (
    "Steer only the transport's layers in this group (all = every layer it was learned on). SDXL: "
    "input-blocks change composition most, output-blocks rendering and texture, attention-norms where the prompt "
    "acts. FLUX: image-stream / text-stream pick one stream of the double blocks."
)


def group_archs(name: str) -> tuple[str, ...]:
    """The architectures (``"sdxl"``, ``"flux"``) that have a layer group or alias called ``name``.

    Example:
        >>> group_archs("blocks"), group_archs("fast"), group_archs("regex")
        (('flux',), ('sdxl', 'flux'), ())
    """
    return tuple(a for a in site_groups.ARCHS if name in site_groups.group_names(a) or name in site_groups.ALIASES[a])


def family_problem(option: str, group: str, arch: str | None, where: str, choices: tuple[str, ...]) -> str | None:
    """What is wrong with picking ``group`` for a MODEL of ``arch`` (None when it fits, or either is unknown).

    Args:
        option: the node input that holds the group (``"layers"``, ``"layer_group"``).
        where: how to name the MODEL in the message, e.g. ``"SDXL (sd_xl_base_1.0.safetensors)"``.
        choices: the input's own options; the message lists those that fit ``arch``.

    Example:
        >>> family_problem("layer_group", "blocks", "sdxl", "SDXL", ("all", "fast", "input-blocks", "blocks"))
        "layer_group: 'blocks' is a layer group of FLUX, and the MODEL is SDXL; choose one of: all, fast, input-blocks"
    """
    owners = group_archs(group)
    if arch is None or not owners or arch in owners:
        return None
    fitting = [c for c in choices if c in ("all", "auto", "regex") or arch in group_archs(c)]
    return (f"{option}: {group!r} is a layer group of {' and '.join(o.upper() for o in owners)}, and the MODEL is "
            f"{where}; choose one of: {', '.join(fitting)}")


def _modules(diffusion_model: torch.nn.Module) -> list[tuple[str, bool]]:
    return [(name, isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)))
            for name, m in diffusion_model.named_modules() if name]


def _regex_sites(diffusion_model: torch.nn.Module, regex: str) -> list[str]:
    if not regex.strip():
        raise ValueError("layers = regex needs a pattern in layer_regex (e.g. 'double_blocks\\.1:0'), or pick a named "
                         "layer group in layers")
    try:
        return resolve_sites(diffusion_model, regex.strip())
    except (KeyError, ValueError) as err:
        detail = str(err.args[0] if err.args else err).split("; see actsteer.list_sites")[0]
        raise ValueError(f"layer_regex: {detail}; change layer_regex (it must match whole layer names), or pick a "
                         "named layer group in layers") from None


def preset_sites(diffusion_model: torch.nn.Module, preset: str, regex: str = "") -> list[str]:
    """Site names for a `layers` choice (module order; fitting reorders them by execution).

    Args:
        diffusion_model: ``model.model.diffusion_model`` of a ComfyUI MODEL.
        preset: ``"auto"`` (all-norms on UNets, blocks on FLUX), a group of
            `actsteer.archs.site_groups` (``"fast"``, ``"input-blocks"``, ``"image-stream"``, ...),
            or ``"regex"``.
        regex: with ``preset="regex"``, a regular expression matched in full against module names; end it
            with ``:0``, ``:1`` or ``:(0|1)`` to pick elements of tuple outputs (FLUX double blocks).

    Raises:
        ValueError: unknown choice, a group of another model family, or nothing matched; the message says
            what to change on the node.
    """
    if preset == "regex":
        return _regex_sites(diffusion_model, regex)
    arch = module_arch(diffusion_model)
    kind = type(diffusion_model).__name__
    if arch is None:
        raise ValueError(f"Named layer groups cover SDXL-style UNets and FLUX; for this {kind} set layers = regex and "
                         "write a pattern over its layer names in layer_regex")
    try:
        sites = site_groups.select(preset, arch, "comfyui", _modules(diffusion_model))
    except ValueError as err:
        raise ValueError(f"layers: {err}") from None
    if not sites:
        raise ValueError(f"The layer group {preset!r} ({site_groups.get_group(preset, arch).summary}) has no layer in "
                         f"this {kind}; pick another group in layers")
    return sites


def group_sites(diffusion_model: torch.nn.Module, sites: list[str], group: str) -> list[str]:
    """The transport sites (ComfyUI names, in order) that lie in ``group``; ``"all"`` keeps them all.

    Raises:
        ValueError: a group of another family, or none of the sites in the group (naming the groups they are in).
    """
    if group == "all":
        return list(sites)
    arch = module_arch(diffusion_model)
    if arch is None:
        raise ValueError(f"layer_group {group!r}: named layer groups cover SDXL-style UNets and FLUX, not "
                         f"{type(diffusion_model).__name__}; set layer_group to 'all' and use the layers regex")
    problem = family_problem("layer_group", group, arch, f"{arch.upper()} ({type(diffusion_model).__name__})",
                             APPLY_GROUPS)
    if problem:
        raise ValueError(problem)
    try:
        return site_groups.filter_sites(sites, group, arch, "comfyui")
    except ValueError as err:
        raise ValueError(f"layer_group: {err}; pick another layer_group, or 'all'") from None


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
        raise ValueError(f"Bad layer filter {pattern!r}: {err}; fix the layers regex, or clear it to steer every layer") from None
    kept = [s for s in sites if rx.search(s)]
    if not kept:
        sample = ", ".join(sites[:3]) + (", ..." if len(sites) > 3 else "")
        raise ValueError(f"Layer filter {pattern!r} matches none of the transport's {len(sites)} sites ({sample}); "
                         "change the layers regex, or clear it to steer every layer")
    return kept
