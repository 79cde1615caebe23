"""Named site groups of diffusion models: one vocabulary for the diffusers presets and the ComfyUI layer picker.

A group ("input-blocks", "image-stream", ...) is written once per architecture with its rule in both namings:
diffusers pipeline names (``"unet.down_blocks.1.resnets.0.norm1"``, ``"transformer.transformer_blocks.3:1"``)
and ComfyUI ``diffusion_model`` names (``"input_blocks.4.0.in_layers.0"``, ``"double_blocks.3:0"``). Nothing
here imports torch or ComfyUI: callers pass ``(module name, is_norm)`` pairs from ``named_modules()``.

SDXL groups hold normalization layers (GroupNorm / LayerNorm, the paper's sites); FLUX groups hold block
outputs, with ``:k`` picking one stream of a tuple output. FLUX double blocks return ``(image, text)`` in
ComfyUI and ``(text, image)`` in diffusers, so "image-stream" is ``:0`` in one naming and ``:1`` in the other.
ComfyUI's single blocks return one ``cat([text, image])`` tensor, so the stream groups cover the double blocks.

Example:
    >>> from actsteer.archs import site_groups
    >>> modules = [("input_blocks.1.0.in_layers.0", True), ("input_blocks.1.0.in_layers.2", False),
    ...            ("middle_block.1.norm", True), ("output_blocks.0.0.out_layers.0", True), ("out.0", True)]
    >>> site_groups.select("middle-block", "sdxl", "comfyui", modules)
    ['middle_block.1.norm']
    >>> site_groups.select("auto", "sdxl", "comfyui", modules)
    ['input_blocks.1.0.in_layers.0', 'middle_block.1.norm', 'output_blocks.0.0.out_layers.0', 'out.0']
    >>> site_groups.matches("transformer.transformer_blocks.3:1", "image-stream", "flux", "diffusers")
    True
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Literal

Arch = Literal["sdxl", "flux"]
Naming = Literal["diffusers", "comfyui"]
ARCHS: tuple[str, ...] = ("sdxl", "flux")
NAMINGS: tuple[str, ...] = ("diffusers", "comfyui")

# Names that stand for a group: "auto" is the paper's choice per architecture; "norms" is the diffusers
# presets' older name for "all-norms".
ALIASES: dict[str, dict[str, str]] = {
    "sdxl": {"auto": "all-norms", "norms": "all-norms"},
    "flux": {"auto": "blocks"},
}
FLUX_FAST_DOUBLE_BLOCKS = 5  # "fast" on FLUX: the first 5 double blocks (of 19 in FLUX.1), both streams


@dataclasses.dataclass(frozen=True)
class Rule:
    """Which modules of a model a group takes, in one naming.

    Attributes:
        module: a regex matched in full against module names.
        elements: suffixes added to each matching module: ``("",)`` for the module output itself,
            ``(":0", ":1")`` for both elements of a tuple output.
        norms_only: keep only normalization layers among the matches.
    """

    module: str
    elements: tuple[str, ...] = ("",)
    norms_only: bool = False


@dataclasses.dataclass(frozen=True)
class SiteGroup:
    """A named group of sites of one architecture, with its rules in both namings.

    Attributes:
        name: the group's name (``"input-blocks"``), what ``fit_pipeline(modules=...)`` and the ComfyUI nodes take.
        arch: ``"sdxl"`` (SDXL and other UNets with SDXL's layout) or ``"flux"``.
        summary: one line for tooltips and errors.
        rules: ``{naming: rules}``; a module is in the group when any rule takes it.
    """

    name: str
    arch: str
    summary: str
    rules: dict[str, tuple[Rule, ...]]


def _norms(comfy: str, diffusers: str) -> dict[str, tuple[Rule, ...]]:
    return {"comfyui": (Rule(comfy, norms_only=True),), "diffusers": (Rule(diffusers, norms_only=True),)}


_UNET_PARTS = r"(input_blocks\.\d+|middle_block|output_blocks\.\d+)"
_DIFFUSERS_PARTS = r"unet\.(down_blocks\.\d+|mid_block|up_blocks\.\d+)"
_BOTH = (":0", ":1")
_DOUBLE = {"comfyui": r"double_blocks\.\d+", "diffusers": r"transformer\.transformer_blocks\.\d+"}
_SINGLE = {"comfyui": r"single_blocks\.\d+", "diffusers": r"transformer\.single_transformer_blocks\.\d+"}
_FAST = rf"[0-{FLUX_FAST_DOUBLE_BLOCKS - 1}]"
# Single-block elements: one concatenated tensor in ComfyUI; in diffusers a (text, image) tuple since 0.35
# (`_single_elements` swaps in ("",) for older versions).
_SINGLE_ELEMENTS = {"comfyui": ("",), "diffusers": _BOTH}

GROUPS: tuple[SiteGroup, ...] = (
    # SDXL: normalization layers (GroupNorm outputs are transported by their spatial mean)
    SiteGroup("all-norms", "sdxl", "every normalization layer of the UNet (the paper's choice, 256 on SDXL)",
              _norms(r".+", r"unet\..+")),
    SiteGroup("fast", "sdxl", "the resnet norms of the input (down) blocks: cheap, early layers",
              _norms(r"input_blocks\.\d+\.0\..+", r"unet\.down_blocks\.\d+\.resnets\.\d+\..+")),
    SiteGroup("input-blocks", "sdxl", "the norms of the input (down) blocks: composition and layout",
              _norms(r"input_blocks\..+", r"unet\.down_blocks\..+")),
    SiteGroup("middle-block", "sdxl", "the norms of the middle block: the most abstract features",
              _norms(r"middle_block\..+", r"unet\.mid_block\..+")),
    SiteGroup("output-blocks", "sdxl", "the norms of the output (up) blocks and the final norm: rendering and texture",
              _norms(r"output_blocks\..+|out\.0", r"unet\.(up_blocks\..+|conv_norm_out)")),
    SiteGroup("attention-norms", "sdxl", "the norms inside the attention (transformer) blocks, where the prompt acts",
              _norms(rf"{_UNET_PARTS}\.1\..+", rf"{_DIFFUSERS_PARTS}\.attentions\.\d+\..+")),
    SiteGroup("resnet-norms", "sdxl", "the norms of the resnet (convolution) blocks",
              _norms(r"(input_blocks\.\d+\.0|middle_block\.[02]|output_blocks\.\d+\.0)\..+",
                     rf"{_DIFFUSERS_PARTS}\.resnets\.\d+\..+")),
    # FLUX: block outputs; ":k" picks a stream of a double block's (image, text) / (text, image) tuple
    SiteGroup("blocks", "flux", "both streams of every double block and every single block (76 on FLUX.1)",
              {n: (Rule(_DOUBLE[n], _BOTH), Rule(_SINGLE[n], _SINGLE_ELEMENTS[n])) for n in NAMINGS}),
    SiteGroup("fast", "flux", f"both streams of the first {FLUX_FAST_DOUBLE_BLOCKS} double blocks",
              {n: (Rule(_DOUBLE[n].replace(r"\d+", _FAST), _BOTH),) for n in NAMINGS}),
    SiteGroup("double-blocks", "flux", "both streams of every double block",
              {n: (Rule(_DOUBLE[n], _BOTH),) for n in NAMINGS}),
    SiteGroup("single-blocks", "flux", "every single block (image and text tokens together)",
              {n: (Rule(_SINGLE[n], _SINGLE_ELEMENTS[n]),) for n in NAMINGS}),
    SiteGroup("image-stream", "flux", "the image stream of every double block",
              {"comfyui": (Rule(_DOUBLE["comfyui"], (":0",)),), "diffusers": (Rule(_DOUBLE["diffusers"], (":1",)),)}),
    SiteGroup("text-stream", "flux", "the text stream of every double block",
              {"comfyui": (Rule(_DOUBLE["comfyui"], (":1",)),), "diffusers": (Rule(_DOUBLE["diffusers"], (":0",)),)}),
)
_BY_KEY: dict[tuple[str, str], SiteGroup] = {(g.arch, g.name): g for g in GROUPS}


def group_names(arch: str | None = None) -> list[str]:
    """The group names of ``arch`` (or of every architecture, each once), in vocabulary order.

    Example:
        >>> group_names("flux")
        ['blocks', 'fast', 'double-blocks', 'single-blocks', 'image-stream', 'text-stream']
    """
    names = [g.name for g in GROUPS if arch is None or g.arch == arch]
    return list(dict.fromkeys(names))


def is_group_name(name: str) -> bool:
    """True for a group name or alias of any architecture (``"auto"``, ``"norms"``, ``"input-blocks"``, ...)."""
    return name in group_names() or any(name in aliases for aliases in ALIASES.values())


def get_group(name: str, arch: str) -> SiteGroup:
    """The group called ``name`` (or an alias) for ``arch``.

    Raises:
        ValueError: unknown architecture, or a name that is not a group of ``arch``; the message lists the
            groups that do apply (and says which architecture the name belongs to, if any).
    """
    if arch not in ALIASES:
        raise ValueError(f"Unknown architecture {arch!r} for site groups; choose one of: {', '.join(ARCHS)}")
    group = _BY_KEY.get((arch, ALIASES[arch].get(name, name)))
    if group is not None:
        return group
    owners = [a for a in ARCHS if (a, name) in _BY_KEY]
    where = f"{name!r} is a {' and '.join(o.upper() for o in owners)} layer group" if owners else f"Unknown layer group {name!r}"
    choices = ", ".join(["auto", *group_names(arch)])
    raise ValueError(f"{where}; for this {arch.upper()} model choose one of: {choices}")


def _single_elements(rule: Rule, naming: str, flux_single_tuple: bool) -> tuple[str, ...]:
    if naming == "diffusers" and not flux_single_tuple and rule.module == _SINGLE["diffusers"]:
        return ("",)  # diffusers < 0.35: single blocks return one cat([text, image]) tensor
    return rule.elements


def select(
    group: str,
    arch: str,
    naming: str,
    modules: Iterable[tuple[str, bool]],
    *,
    flux_single_tuple: bool = True,
) -> list[str]:
    """The sites of a model that a group takes, in module order (and element order within a module).

    Args:
        group: a group name or alias (``"auto"``).
        arch: ``"sdxl"`` or ``"flux"``.
        naming: ``"diffusers"`` (pipeline names with component prefixes) or ``"comfyui"`` (``diffusion_model`` names).
        modules: ``(name, is_norm)`` for every module, in ``named_modules()`` order.
        flux_single_tuple: diffusers only: whether FLUX single blocks return a ``(text, image)`` tuple
            (diffusers >= 0.35) rather than one tensor.

    Returns:
        Site names; empty when the model has no module of the group.

    Raises:
        ValueError: unknown naming, or a group that does not exist for ``arch`` (see `get_group`).
    """
    if naming not in NAMINGS:
        raise ValueError(f"Unknown naming {naming!r}; choose one of: {', '.join(NAMINGS)}")
    rules = [(re.compile(r.module), r, _single_elements(r, naming, flux_single_tuple))
             for r in get_group(group, arch).rules[naming]]
    sites: list[str] = []
    for name, is_norm in modules:
        for rx, rule, elements in rules:
            if rx.fullmatch(name) and (is_norm or not rule.norms_only):
                sites.extend(name + e for e in elements)
                break
    return sites


def matches(site: str, group: str, arch: str, naming: str) -> bool:
    """Whether a site name lies in a group (by name only: ``norms_only`` is not checked, so a transport's
    sites can be filtered without the model).

    Example:
        >>> matches("double_blocks.7:1", "text-stream", "flux", "comfyui")
        True
        >>> matches("double_blocks.7:1", "image-stream", "flux", "comfyui")
        False
    """
    module, sep, k = site.rpartition(":")
    suffix = f":{k}" if sep and k.isdigit() else ""
    if not suffix:
        module = site
    # a site without ":k" is a whole module output (e.g. diffusers < 0.35 single blocks): it matches its module
    return any(re.fullmatch(rule.module, module) and (not suffix or suffix in rule.elements)
               for rule in get_group(group, arch).rules[naming])


def filter_sites(sites: Sequence[str], group: str, arch: str, naming: str) -> list[str]:
    """The sites (in their order) that lie in ``group``; ``"all"`` keeps every site.

    Raises:
        ValueError: no site lies in the group; the message names the groups the sites do lie in.
    """
    if group == "all":
        return list(sites)
    kept = [s for s in sites if matches(s, group, arch, naming)]
    if not kept:
        present = [g for g in group_names(arch) if any(matches(s, g, arch, naming) for s in sites)]
        raise ValueError(
            f"None of the transport's {len(sites)} layers is in the group {group!r}; "
            + (f"it has layers in: {', '.join(present)}" if present else "it matches no group of this model")
        )
    return kept

