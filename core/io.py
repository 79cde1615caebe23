"""The transport file format: safetensors tensors + JSON metadata in the header. Never pickles.

Layout (format version 1): tensors ``maps.{i}.{field}`` for the i-th site in order and each `UnitMap`
field; the header's ``__metadata__`` holds ``format = "actsteer.transport"``, ``format_version``,
``actsteer_version`` and ``transport`` (JSON: method, pooling, support, mode, sites, counts, model, ...).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .transport import UNITMAP_FIELDS, UnitMap

if TYPE_CHECKING:
    from .transport import Transport

FORMAT = "actsteer.transport"
FORMAT_VERSION = 1
_METADATA_KEYS = ("method", "pooling", "support", "mode", "n_source", "n_target", "model", "description", "extra")

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

    `load_transport` runs the same checks on every file; call this on transports built in memory before
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


def _version() -> str:
    from ._version import __version__

    return __version__


def save_transport(transport: Transport, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``transport`` to ``path`` (``.safetensors`` is appended if missing); atomic.

    Raises:
        FileExistsError: if ``path`` exists and ``overwrite`` is False.
        IsADirectoryError: if ``path`` is a directory (also with ``overwrite``).
        ValueError: a map with NaN/Inf values, an unusable site name or an oversized description (see
            `check_transport`): such a file could not be loaded again.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    check_transport(transport, str(path))  # never write a file that load_transport would refuse
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; choose a file name for the transport")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it, or choose another name")
    tensors: dict[str, torch.Tensor] = {}
    for i, site in enumerate(transport):
        unit_map = transport[site]
        for field in UNITMAP_FIELDS:
            value = getattr(unit_map, field)
            tensors[f"maps.{i}.{field}"] = value.to(torch.uint8) if field == "dead" else value.contiguous()
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "actsteer_version": _version(),
        "transport": json.dumps(transport.metadata()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".actsteer-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def resolve_path(path: str | Path) -> Path:
    """``path``, or ``path`` + ``.safetensors`` when only that exists (what `load_transport` reads)."""
    path = Path(path)
    if not path.exists() and path.suffix != ".safetensors" and path.with_name(path.name + ".safetensors").is_file():
        return path.with_name(path.name + ".safetensors")
    return path


def read_header(path: str | Path) -> dict[str, str]:
    """The string metadata of a transport file (``.safetensors`` may be left out), with clear errors.

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError: the file cannot be opened (the message names it).
        ValueError: not a safetensors file, truncated or corrupt, or not an actsteer transport.
    """
    from safetensors import safe_open

    path = resolve_path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a transport file")
    if not path.is_file():
        raise FileNotFoundError(f"No transport file at {path}")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise PermissionError(f"{path}: permission denied; check the file's permissions") from None
    except OSError as err:
        raise OSError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for truncated/garbled headers
        detail = shorten(" ".join(str(err).split()), 200)
        raise ValueError(f"{path} is not a readable safetensors file ({detail}); it may be truncated or corrupt") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not an actsteer transport (no 'format: {FORMAT}' in its header)")
    return meta


def _check_metadata(path: Path, info: dict[str, Any]) -> None:
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


def _check_sites(path: Path, sites: Any) -> list[str]:
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


def load_transport(path: str | Path) -> Transport:
    """Read and validate a transport written by `save_transport` (``.safetensors`` may be left out).

    Every file is checked before it is trusted: the header's sites are unique, printable, reasonably short
    names; every site has all its tensors, each of shape ``(D,)`` with the same D; ``omega`` and ``beta`` are
    finite and the support bounds are not NaN (they may be +-inf) with ``lo <= hi``; no tensors belong to sites
    the header does not list; the metadata fields have their types and sane sizes.

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError: the file cannot be opened.
        ValueError: not a safetensors file, not an actsteer transport, corrupt, missing or inconsistent tensors,
            non-finite values, duplicated sites, or a format version newer than this actsteer understands. The
            message names the file and, where there is one, the site.
    """
    from safetensors import safe_open

    from .transport import Transport

    path = resolve_path(path)
    meta = read_header(path)
    version = meta.get("format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise ValueError(
            f"{path} uses transport format version {shorten(version)!r} (written by actsteer "
            f"{shorten(meta.get('actsteer_version', '?'), 40)}); this actsteer reads versions up to {FORMAT_VERSION}: "
            "upgrade actsteer"
        )
    try:
        info = json.loads(meta["transport"])
        sites = info.pop("sites")
    except (KeyError, json.JSONDecodeError, AttributeError, TypeError) as err:
        raise ValueError(f"{path}: the transport metadata is corrupt ({shorten(str(err))})") from None
    sites = _check_sites(path, sites)
    _check_metadata(path, info)
    known = {k: v for k, v in info.items() if k in _METADATA_KEYS}
    unknown = {k: v for k, v in info.items() if k not in _METADATA_KEYS}
    if unknown:  # written by a newer actsteer with the same format version: keep, don't fail
        known["extra"] = {**(known.get("extra") or {}), "unknown_metadata": unknown}
    maps = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            stray = sorted(k for k in keys if _site_index(k) is not None and _site_index(k) >= len(sites))
            if stray:
                raise ValueError(
                    f"{path}: holds tensors ({shorten(', '.join(stray))}) of sites its header does not list "
                    f"({len(sites)} sites); the file is damaged: fit the transport again"
                )
            for i, site in enumerate(sites):
                missing = [fld for fld in UNITMAP_FIELDS if f"maps.{i}.{fld}" not in keys]
                if missing:
                    raise ValueError(f"{path}: tensors {missing} of site {shorten(site)!r} are missing; the file is incomplete")
                fields = {fld: f.get_tensor(f"maps.{i}.{fld}") for fld in UNITMAP_FIELDS}
                shapes = {fld: tuple(t.shape) for fld, t in fields.items()}
                if len(set(shapes.values())) != 1 or len(shapes["omega"]) != 1:
                    raise ValueError(
                        f"{path}: site {shorten(site)!r} is malformed (tensor shapes {shapes}; each must be (D,) with "
                        "the same D); the file is damaged: fit the transport again"
                    )
                fields["dead"] = fields["dead"].bool()
                try:
                    maps[site] = UnitMap(**fields)
                except (TypeError, ValueError, RuntimeError) as err:
                    raise ValueError(f"{path}: site {shorten(site)!r} is malformed ({shorten(str(err), 200)})") from None
                problem = check_unit_map(maps[site])
                if problem:
                    raise ValueError(
                        f"{path}: site {shorten(site)!r} is unusable: {problem}; the file is damaged or came from a "
                        "failed fit: fit the transport again"
                    )
    except ValueError:
        raise
    except Exception as err:
        raise ValueError(f"{path}: could not read the tensors ({shorten(str(err), 200)}); the file may be corrupt") from None
    try:
        return Transport(maps, **known)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: the transport metadata is invalid ({shorten(str(err), 200)})") from None


def _site_index(key: str) -> int | None:
    """``i`` of a tensor key ``maps.{i}.{field}``, else None."""
    parts = key.split(".")
    return int(parts[1]) if len(parts) == 3 and parts[0] == "maps" and parts[1].isdigit() else None
