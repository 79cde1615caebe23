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
MAX_TEXT = 65536  # any other text in the metadata (``model`` and ``extra`` values and keys, e.g. Learn's prompts)
MAX_NAME_FIELD = 128  # method, pooling, mode, support names
MAX_DEPTH = 32  # nesting of the metadata JSON (real files: 4 levels)
MAX_DIGITS = 32  # digits of a number in the metadata (real files: counts, sizes and seeds, 20 digits at most)
MAX_METADATA_CHARS = 16 * 2**20  # the whole ``transport`` JSON of a header
SHOWN_CHARS = 80  # how much of a long name or text goes into a message
# |omega| and |beta| of a usable map. Fitted maps stay many orders below (omega is a ratio of spreads, dead units
# are mean shifts; beta is on the activations' scale); a value beyond this is damage, and would overflow float32
# activations a layer later (1e38 x 1e2 is inf) where no check of the steered site sees it.
MAX_MAP_VALUE = 1e12


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` cut to ``limit`` characters with its length noted, for messages and listings.

    Example:
        >>> shorten("model.layers.0.mlp"), shorten("x" * 1000, limit=8)
        ('model.layers.0.mlp', 'xxxxxxx… (1000 characters)')
    """
    text = str(text)
    return text if len(text) <= limit else f"{text[: limit - 1]}… ({len(text)} characters)"


def printable(text: Any, limit: int = SHOWN_CHARS) -> str:
    r"""``text`` safe to show in a terminal, a log or a UI: every control or format character escaped as Python
    writes it (``\x1b``, ``\n``, ``\u202e``), so a file cannot move the cursor, set a terminal's title or
    reorder what is shown; then cut like `shorten`. The one helper for showing text that came from a file.

    Example:
        >>> printable("ocean\x1b[2J waves"), printable("a\u202eb"), printable("x" * 1000, limit=8)
        ('ocean\\x1b[2J waves', 'a\\u202eb', 'xxxxxxx… (1000 characters)')
    """
    text = str(text)
    head = text[:limit]  # never escape more than can be shown (the text may be megabytes long)
    shown = head if head.isprintable() else "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in head
    )
    if len(text) <= limit and len(shown) <= limit:
        return shown
    return f"{shown[: limit - 1]}… ({len(text)} characters)"


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
    """What is wrong with a map's numbers (None when it is usable): NaN/Inf in ``omega``/``beta``, magnitudes above
    `MAX_MAP_VALUE` there, NaN bounds (bounds may be +-inf), a lower bound above its upper bound, or what the map's
    own ``problem()`` reports (a `QuantileMap`: non-finite or decreasing knots or values)."""
    if unit_map.dim == 0:
        return "it has 0 units"
    for field in ("omega", "beta"):
        value = getattr(unit_map, field)
        bad = ~torch.isfinite(value)
        if bad.any():
            return f"`{field}` has {int(bad.sum())} NaN/Inf value(s) of {unit_map.dim} (first at unit {int(bad.nonzero()[0])})"
        worst = float(value.abs().max())
        if worst > MAX_MAP_VALUE:
            return (f"`{field}` has values of magnitude up to {worst:.3g} (no fit gives more than {MAX_MAP_VALUE:.0e}: "
                    "steered activations would overflow)")
    for field in ("lo", "hi", "target_lo", "target_hi"):
        bad = torch.isnan(getattr(unit_map, field))
        if bad.any():
            return f"`{field}` has {int(bad.sum())} NaN value(s) (first at unit {int(bad.nonzero()[0])})"
    for lo, hi in (("lo", "hi"), ("target_lo", "target_hi")):
        bad = getattr(unit_map, lo) > getattr(unit_map, hi)
        if bad.any():
            return f"`{lo}` is above `{hi}` at {int(bad.sum())} unit(s) (first at unit {int(bad.nonzero()[0])})"
    own = getattr(unit_map, "problem", None)
    return own() if callable(own) else None


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
    info = transport.metadata()
    info.pop("sites")
    check_metadata(where, info)
    check_stages(transport, where)
    return transport


def check_stages(transport: Transport, where: str) -> None:
    """Refuse a per-step transport whose stage windows and stage marks disagree (`actsteer.core.steps`)."""
    from .steps import stage_windows

    try:
        stage_windows(transport)
    except ValueError as err:
        raise ValueError(f"{where}: {shorten(str(err), 300)}; the file is damaged: fit the transport again") from None


class _Refused(ValueError):
    """A bound of the metadata JSON was exceeded while parsing it (`parse_metadata`)."""


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_DIGITS:
        raise _Refused(f"holds a number of {digits} digits (at most {MAX_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > MAX_DIGITS + 16:
        raise _Refused(f"holds a number written with {len(text)} characters (at most {MAX_DIGITS + 16})")
    return float(text)


def parse_metadata(path: str | Path, text: str) -> Any:
    """The header's ``transport`` JSON, parsed within bounds: at most `MAX_METADATA_CHARS` characters, numbers of at
    most `MAX_DIGITS` digits, nesting at most `MAX_DEPTH` levels (see `check_metadata` for the rest).

    Raises:
        ValueError: naming the file: not JSON, or beyond a bound.
    """

    def refuse(problem: str) -> ValueError:
        return ValueError(f"{path}: the transport metadata {problem}; the file is damaged or was not written by "
                          "actsteer: fit the transport again")

    if not isinstance(text, str):
        raise refuse("is missing")
    if len(text) > MAX_METADATA_CHARS:
        raise refuse(f"is {len(text)} characters long (at most {MAX_METADATA_CHARS})")
    try:
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float)
    except _Refused as err:
        raise refuse(str(err)) from None
    except RecursionError:  # json's own limit, far above MAX_DEPTH: the exact depth does not matter
        raise refuse(f"is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as err:  # json.JSONDecodeError
        raise refuse(f"is corrupt (not valid JSON: {shorten(str(err))})") from None


def _bounded(value: Any, depth: int = 1) -> str | None:
    """What exceeds a bound in a JSON value (None when nothing does): depth, text length or digits."""
    if depth > MAX_DEPTH:
        return f"is nested more than {MAX_DEPTH} levels deep"
    if isinstance(value, str):
        return f"holds a text of {len(value)} characters (at most {MAX_TEXT})" if len(value) > MAX_TEXT else None
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return None
    if isinstance(value, int):
        digits = len(str(abs(value))) if abs(value) < 10 ** (MAX_DIGITS + 1) else MAX_DIGITS + 1
        return None if digits <= MAX_DIGITS else f"holds a number of {len(str(abs(value)))} digits (at most {MAX_DIGITS})"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        problem = (_bounded(key, depth + 1) if isinstance(key, str) else None) or _bounded(item, depth + 1)
        if problem:
            return problem
    return None


def check_metadata(path: str | Path, info: dict[str, Any]) -> None:
    """Types and sizes of the known header fields; raises a ValueError naming the file and the field.

    Name fields (method, pooling, mode, a support name) are short and printable; the description at most
    `MAX_DESCRIPTION` characters; every text in ``model`` and ``extra`` at most `MAX_TEXT`, numbers at most
    `MAX_DIGITS` digits, nesting at most `MAX_DEPTH` levels.
    """

    def bad(field: str, problem: str) -> ValueError:
        return ValueError(f"{path}: the header field {field!r} {problem}; the file is damaged: fit the transport again")

    for field in ("method", "pooling", "mode"):
        value = info.get(field)
        if field in info and not isinstance(value, str):
            raise bad(field, f"must be a string, got {type(value).__name__}")
        if isinstance(value, str) and len(value) > MAX_NAME_FIELD:
            raise bad(field, f"is {len(value)} characters long ({shorten(value)!r})")
        if isinstance(value, str) and not value.isprintable():
            raise bad(field, f"contains control characters ({shorten(value)!r})")
    support = info.get("support", "observed")
    if isinstance(support, str):
        if len(support) > MAX_NAME_FIELD:
            raise bad("support", f"is {len(support)} characters long ({shorten(support)!r})")
        if not support.isprintable():
            raise bad("support", f"contains control characters ({shorten(support)!r})")
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
    for field, value in info.items():
        problem = _bounded(value, 2) if field != "description" else None
        if problem:
            raise bad(field if len(field) <= MAX_NAME_FIELD and field.isprintable() else "(unnamed)", problem)


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
