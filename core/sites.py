"""Sites: parse ``"module.path:k"`` names, list and resolve them on a model, suggest near misses; the one width rule
(`infer_width`) and the one check that a transport fits a model (`validate`)."""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .provenance import fitted_on_note

if TYPE_CHECKING:
    from .transport import Transport

# "<module regex>:<tuple index spec>" where the spec is digits, a character class or an alternation of digits.
_TUPLE_SPEC = re.compile(r"^(?P<module>.*?):(?P<k>\d+|\[[0-9\-,]+\]|\(\d+(?:\|\d+)*\))$")


def parse_site(site: str) -> tuple[str, int | None]:
    """Split ``"a.b:1"`` into ``("a.b", 1)``; ``"a.b"`` gives ``("a.b", None)``."""
    module, sep, k = site.rpartition(":")
    if sep and k.isdigit():
        return module, int(k)
    if ":" in site:
        raise ValueError(f"Bad site name {site!r}: use 'module.path' or 'module.path:k' with an integer k")
    return site, None


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The submodule called ``name`` (``""`` is the model itself), or a KeyError with near misses."""
    if name == "":
        return model
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise KeyError(missing_site_message(model, name)) from None


def look_alike(given: str, close: str) -> str:
    r"""How ``given`` differs from a near miss ``close`` that may look identical (a Cyrillic 'а' for a Latin 'a', a
    no-break space): the characters that differ, by code point; empty when the difference is plain to see.

    Example:
        >>> print(look_alike("l\u0430yers", "layers").strip())
        (character 2 is '\u0430' (U+0430 CYRILLIC SMALL LETTER A), not 'a' (U+0061 LATIN SMALL LETTER A))
        >>> look_alike("layres", "layers")
        ''
    """
    if given.isascii() and given.isprintable():
        return ""
    matcher = difflib.SequenceMatcher(None, given, close, autojunk=False)
    shown = []
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            continue
        mine, theirs = given[i1:i2], close[j1:j2]
        if all(ch.isascii() and ch.isprintable() for ch in mine):
            continue  # a visible typo: the name itself shows it
        what = ", ".join(_spell(ch) for ch in mine[:3]) or "nothing"
        instead = ", ".join(_spell(ch) for ch in theirs[:3]) or "nothing"
        shown.append(f"character {i1 + 1} is {what}, not {instead}")
    return f" ({'; '.join(shown[:3])})" if shown else ""


def _spell(ch: str) -> str:
    """One character as ``'\\u0430' (U+0430 CYRILLIC SMALL LETTER A)``: escaped, with its code point and name."""
    return f"'{ch.encode('unicode_escape').decode('ascii')}' (U+{ord(ch):04X} {unicodedata.name(ch, 'unnamed')})"


def _closest(name: str, names: Sequence[str], cutoff: float) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=cutoff)
    return f"; closest: {', '.join(repr(c) for c in close)}{look_alike(name, close[0])}" if close else ""


def missing_site_message(model: torch.nn.Module, name: str) -> str:
    names = [n for n, _ in model.named_modules() if n]
    hint = _closest(name, names, 0.6)
    return (
        f"Site {name!r} not found in {type(model).__name__} ({len(names)} submodules){hint}; "
        "see actsteer.list_sites(model)"
    )


def list_sites(model: torch.nn.Module, pattern: str | None = None) -> list[str]:
    """Names of ``model``'s submodules (registration order), optionally those matching ``pattern`` in full.

    Example:
        >>> import torch, actsteer
        >>> actsteer.list_sites(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)), r".*")
        ['0', '1']
    """
    names = [n for n, _ in model.named_modules() if n]
    if pattern is None:
        return names
    rx = re.compile(pattern)
    return [n for n in names if rx.fullmatch(n)]


def _expand_k(spec: str) -> list[int]:
    if spec.isdigit():
        return [int(spec)]
    rx = re.compile(spec)
    return [k for k in range(10) if rx.fullmatch(str(k))]


def resolve_sites(model: torch.nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Expand regexes (matched in full against module names) into site names, in registration order.

    A pattern may end with ``:k``, ``:[0-1]`` or ``:(0|1)`` to select tuple elements; the suffix is added to
    every module the regex matches (unlike the reference, plain names are never rewritten). Exact names
    are accepted as they are.

    Raises:
        ValueError: if a pattern matches no module; the message lists near misses.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    names = [n for n, _ in model.named_modules() if n]
    index = {n: i for i, n in enumerate(names)}
    found: dict[str, tuple[int, int]] = {}
    for pattern in patterns:
        m = _TUPLE_SPEC.match(pattern)
        module_rx, ks = (m["module"], _expand_k(m["k"])) if m else (pattern, [None])
        if module_rx in index:  # an exact name (may contain regex metacharacters like '.')
            hits = [module_rx]
        else:
            try:
                rx = re.compile(module_rx)
            except re.error as err:
                raise ValueError(f"Bad site pattern {pattern!r}: {err}") from None
            hits = [n for n in names if rx.fullmatch(n)]
        if not hits:
            hint = _closest(module_rx, names, 0.5)
            raise ValueError(
                f"Site pattern {pattern!r} matches no module of {type(model).__name__}{hint}; "
                "see actsteer.list_sites(model)"
            )
        for n in hits:
            for k in ks:
                site = n if k is None else f"{n}:{k}"
                found.setdefault(site, (index[n], -1 if k is None else k))
    return sorted(found, key=found.__getitem__)


def infer_width(module: torch.nn.Module) -> int | None:
    """The number of units a module's output has along its unit axis, when it can be told without running it.

    The one width rule of every host (`validate`): torch's own layers by their sizes, RMSNorms by their weight,
    else the module's ``output_size_per_partition``, ``embedding_dim``, ``hidden_size`` or ``hidden_dim``. For a
    tuple output (``"name:k"``) the element is taken to have the module's width.

    Example:
        >>> import torch
        >>> infer_width(torch.nn.Linear(3, 5)), infer_width(torch.nn.GroupNorm(2, 8)), infer_width(torch.nn.ReLU())
        (5, 8, None)
    """
    if isinstance(module, torch.nn.Linear):
        return module.out_features
    if isinstance(module, torch.nn.LayerNorm):
        return module.normalized_shape[-1]
    if isinstance(module, torch.nn.GroupNorm):
        return module.num_channels
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return module.out_channels
    if isinstance(module, torch.nn.Embedding):
        return module.embedding_dim
    if isinstance(module, torch.nn.modules.batchnorm._NormBase):
        return module.num_features
    if type(module).__name__.endswith("RMSNorm"):  # torch.nn.RMSNorm, the HF and vLLM *RMSNorm classes
        shape = getattr(module, "normalized_shape", None)
        if isinstance(shape, (tuple, list)) and shape:
            return int(shape[-1])
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 1:
            return weight.shape[0]
    # what the module says of itself: vLLM's parallel linears (this rank's share) and embeddings, the hidden size
    # of transformer blocks and MLPs (HF decoder layers, ComfyUI's FLUX DoubleStreamBlock / SingleStreamBlock)
    for attr in _WIDTH_ATTRIBUTES:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


_WIDTH_ATTRIBUTES = ("output_size_per_partition", "embedding_dim", "hidden_size", "hidden_dim")


def iter_site_modules(model: torch.nn.Module, sites: Iterable[str]) -> list[tuple[str, str, int | None, torch.nn.Module]]:
    """``(site, module_name, k, module)`` for each site; raises KeyError naming the first missing module."""
    out = []
    for site in sites:
        name, k = parse_site(site)
        out.append((site, name, k, get_module(model, name)))
    return out


def element(output: Any, k: int | None, site: str) -> torch.Tensor:
    """The tensor a site names in a module's output: the output itself (``k`` None) or element ``k`` of a tuple.

    The one place that reads ``name:k`` sites (the hook engine, fitting and recording all use it).

    Raises:
        TypeError: the output (or its element ``k``) is not a tensor; the message says how to name an element.
    """
    x = output if k is None else (output[k] if isinstance(output, (tuple, list)) and k < len(output) else None)
    if isinstance(x, torch.Tensor):
        return x
    if k is None:
        raise TypeError(
            f"Site {site!r} returned a {type(output).__name__}, not a tensor; name the element to steer as '{site}:k'"
        )
    got = type(output).__name__ + (f" of length {len(output)}" if isinstance(output, (tuple, list)) else "")
    raise TypeError(f"Site {site!r} selects element {k} but the module returned a {got}")


def replace_element(output: Any, k: int | None, new: torch.Tensor) -> Any:
    """``output`` with the tensor a site names replaced by ``new`` (a new tuple/list; the original is untouched)."""
    if k is None:
        return new
    items = list(output)
    items[k] = new
    return items if isinstance(output, list) else tuple(items)


class WidthMismatch(ValueError):
    """`validate`'s error for sites whose module outputs another number of units than the transport's map has.

    Attributes:
        mismatches: ``(site, units of the map, units of the module, module class name)`` per wrong site.
    """

    def __init__(self, message: str, mismatches: list[tuple[str, int, int, str]]) -> None:
        super().__init__(message)
        self.mismatches = mismatches


def validate(model: torch.nn.Module, transport: Transport) -> None:
    """Check that every site of ``transport`` exists in ``model`` with the right width, before touching it.

    The one check of every host (the engine before it binds, the ComfyUI nodes, the vLLM worker); widths follow
    `infer_width` (sites whose width cannot be told are not checked).

    Raises:
        KeyError: a site's module is missing (the message names near misses and what the transport was fitted on).
        WidthMismatch: a module's width differs from the transport's (a ValueError naming expected vs actual).

    Example:
        >>> import torch, actsteer
        >>> t = actsteer.Transport({"0": actsteer.UnitMap(torch.ones(4), torch.zeros(4))}, model={"class": "Big"})
        >>> validate(torch.nn.Sequential(torch.nn.Linear(2, 3)), t)
        Traceback (most recent call last):
        ...
        actsteer.core.sites.WidthMismatch: Transport does not match Sequential: '0': transport has 4 units, Linear outputs 3 (the transport was fitted on Big)
    """
    from .steps import refuse_stages

    refuse_stages(transport, f"steering a {type(model).__name__} directly")
    mismatches = []
    for site, unit_map in transport.items():
        name, k = parse_site(site)
        try:
            module = get_module(model, name)
        except KeyError:
            raise KeyError(missing_site_message(model, name) + fitted_on_note(transport)) from None
        width = infer_width(module)
        if width is not None and width != unit_map.dim:
            mismatches.append((site, unit_map.dim, width, type(module).__name__))
    if mismatches:
        problems = [f"{site!r}: transport has {units} units, {cls} outputs {width}"
                    for site, units, width, cls in mismatches]
        raise WidthMismatch(
            f"Transport does not match {type(model).__name__}: " + "; ".join(problems[:5])
            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "") + fitted_on_note(transport),
            mismatches,
        )


def present_sites(model: torch.nn.Module, sites: Iterable[str]) -> list[str]:
    """The sites (in their order) whose module exists in ``model`` (e.g. the layers one pipeline stage holds).

    Example:
        >>> import torch
        >>> present_sites(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["0", "1:0", "0:1"])
        ['0', '0:1']
    """
    names = {n for n, _ in model.named_modules()}
    return [s for s in sites if parse_site(s)[0] in names]
