"""What a usable transport is: finite maps, sane site names and metadata. Checked on every load and save.

`actsteer.core.io` runs these checks on every file it reads or writes; `check_transport` applies them to a
transport built in memory (e.g. before a ComfyUI node applies it). Messages never echo huge text whole.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .transport import Transport, UnitMap

# Sanity limits for what a file may claim. Real site names are dotted module paths well under 200 characters;
# anything near these limits is a damaged or hostile file, and such text is never echoed whole.
MAX_SITE_NAME = 512
MAX_DESCRIPTION = 65536
MAX_NAME_FIELD = 128  # method, pooling, mode, support names
SHOWN_CHARS = 80  # how much of a long name or text goes into a message


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` cut to ``limit`` characters with its length noted, for messages and listings.

    Example:
        >>> shorten("model.layers.0.mlp"), shorten("x" * 1000, limit=8)
        ('model.layers.0.mlp', 'xxxxxxx… (1000 characters)')
    """
    text = str(text)
    return text if len(text) <= limit else f"{text[: limit - 1]}… ({len(text)} characters)"


def check_site_name(site: object) -> str | None:
    """What is wrong with a site name from a file or a caller (None when it is fine)."""
    if not isinstance(site, str):
        return f"a site name must be a string, got {type(site).__name__}"
    if not site.strip():
        return "a site name is empty"
    if len(site) > MAX_SITE_NAME:
        return f"site name {shorten(site)!r} is longer than {MAX_SITE_NAME} characters"
    if not site.isprintable():
        return f"site name {shorten(site)!r} contains control characters"
    return None


def check_unit_map(unit_map: UnitMap) -> str | None:
    """What is wrong with a map's numbers (None when it is usable): NaN/Inf in ``omega``/``beta``, NaN bounds
    (bounds may be +-inf), or a lower bound above its upper bound."""
    if unit_map.dim == 0:
        return "it has 0 units"
    for field in ("omega", "beta"):
        bad = ~torch.isfinite(getattr(unit_map, field))
        if bad.any():
            return f"`{field}` has {int(bad.sum())} NaN/Inf value(s) of {unit_map.dim} (first at unit {int(bad.nonzero()[0])})"
    for field in ("lo", "hi", "target_lo", "target_hi"):
        bad = torch.isnan(getattr(unit_map, field))
        if bad.any():
            return f"`{field}` has {int(bad.sum())} NaN value(s) (first at unit {int(bad.nonzero()[0])})"
    for lo, hi in (("lo", "hi"), ("target_lo", "target_hi")):
        bad = getattr(unit_map, lo) > getattr(unit_map, hi)
        if bad.any():
            return f"`{lo}` is above `{hi}` at {int(bad.sum())} unit(s) (first at unit {int(bad.nonzero()[0])})"
    return None


def check_transport(transport: Transport, where: str = "transport") -> Transport:
    """Refuse a transport that would corrupt a model's activations; returns it unchanged.

    `Transport.load` runs the same checks on every file; call this on transports built in memory before
    applying them where a bad value would only show up much later (e.g. a NaN image after sampling).

    Args:
        transport: the transport.
        where: how messages name it (a file path, a node name).

    Raises:
        ValueError: naming ``where``, the site and the problem (non-finite ``omega``/``beta``, NaN support bounds,
            an unusable site name), or an oversized description.

    Example:
        >>> import torch, actsteer
        >>> bad = actsteer.Transport({"s": actsteer.UnitMap(torch.tensor([float("nan")]), torch.zeros(1))})
        >>> check_transport(bad, "ocean")
        Traceback (most recent call last):
        ...
        ValueError: ocean: site 's' is unusable: `omega` has 1 NaN/Inf value(s) of 1 (first at unit 0); fit the transport again
    """
    for site, unit_map in transport.items():
        problem = check_site_name(site) or check_unit_map(unit_map)
        if problem:
            raise ValueError(f"{where}: site {shorten(site)!r} is unusable: {problem}; fit the transport again")
    if len(str(transport.description)) > MAX_DESCRIPTION:
        raise ValueError(
            f"{where}: the description is {len(str(transport.description))} characters long (at most "
            f"{MAX_DESCRIPTION}); shorten it"
        )
    return transport


def check_metadata(path: str | Path, info: dict[str, Any]) -> None:
    """Types and sizes of the known header fields; raises a ValueError naming the file and the field."""

    def bad(field: str, problem: str) -> ValueError:
        return ValueError(f"{path}: the header field {field!r} {problem}; the file is damaged: fit the transport again")

    for field in ("method", "pooling", "mode"):
        value = info.get(field)
        if field in info and not isinstance(value, str):
            raise bad(field, f"must be a string, got {type(value).__name__}")
        if isinstance(value, str) and len(value) > MAX_NAME_FIELD:
            raise bad(field, f"is {len(value)} characters long ({shorten(value)!r})")
    support = info.get("support", "observed")
    if isinstance(support, str):
        if len(support) > MAX_NAME_FIELD:
            raise bad("support", f"is {len(support)} characters long ({shorten(support)!r})")
    elif not (isinstance(support, list) and len(support) == 2 and all(_is_number(q) for q in support)):
        raise bad("support", f"must be a name or a [q_lo, q_hi] pair, got {shorten(json.dumps(support))}")
    for field in ("n_source", "n_target"):
        value = info.get(field, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad(field, f"must be a count (an integer >= 0), got {shorten(json.dumps(value))}")
    description = info.get("description", "")
    if not isinstance(description, str):
        raise bad("description", f"must be a string, got {type(description).__name__}")
    if len(description) > MAX_DESCRIPTION:
        raise bad("description", f"is {len(description)} characters long (at most {MAX_DESCRIPTION})")
    for field in ("model", "extra"):
        value = info.get(field)
        if value is not None and not isinstance(value, dict):
            raise bad(field, f"must be a JSON object, got {type(value).__name__}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_site_list(path: str | Path, sites: Any) -> list[str]:
    """The header's site list: a list of unique, usable names; raises a ValueError naming the file."""
    if not isinstance(sites, list):
        raise ValueError(f"{path}: the header's site list is not a list; the file is damaged: fit the transport again")
    seen: set[str] = set()
    for i, site in enumerate(sites):
        problem = check_site_name(site)
        if problem:
            raise ValueError(f"{path}: site {i} of the header is unusable: {problem}; the file is damaged: fit the transport again")
        if site in seen:
            raise ValueError(
                f"{path}: the header lists site {shorten(site)!r} twice; the file is damaged: fit the transport again"
            )
        seen.add(site)
    return sites
