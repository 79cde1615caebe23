"""The transport file format: safetensors tensors + JSON metadata in the header (`save_transport`, `read_transport`;
`Transport.save` and `Transport.load` call them). Never pickles.

Layout: tensors ``maps.{i}.{field}`` for the i-th site in order and each `UnitMap` field, all of shape ``(D,)``;
the header's ``__metadata__`` holds ``format = "actsteer.transport"``, ``format_version``, ``actsteer_version``,
``transport`` (JSON: method, pooling, support, mode, sites, counts, model, ...) and ``tensors_sha256``, a checksum of
the tensor data (`tensors_digest`) that `read_transport` verifies: a file damaged after saving (a flipped bit in a
copy or a download) is refused. Files written by earlier versions of actsteer (and by other tools) have no checksum
and load unchecked. The checksum guards against damage, not against a forger, who can rewrite it.

Format version 2 adds, for the sites that are a `QuantileMap`, the tensors ``maps.{i}.knots`` and
``maps.{i}.values`` of shape ``(K, D)``. A file is written as version 2 only when it holds such a site, so affine
transports stay version 1 and older actsteer releases keep reading them; a release that only knows version 1
refuses a version-2 file (rather than silently applying the affine part alone).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .validation import (
    check_metadata,
    check_site_list,
    check_transport,
    check_unit_map,
    parse_metadata,
    printable,
    shorten,
)

if TYPE_CHECKING:
    from .transport import Transport, UnitMap

FORMAT = "actsteer.transport"
FORMAT_VERSION = 2  # the newest version this release reads
FIELDS = ("omega", "beta", "lo", "hi", "target_lo", "target_hi", "dead")  # the tensors of every site
PIECEWISE_FIELDS = ("knots", "values")  # version 2: the (K, D) tensors of a QuantileMap site
_METADATA_KEYS = ("method", "pooling", "support", "mode", "n_source", "n_target", "model", "description", "extra")
CHECKSUM = "tensors_sha256"  # the header key of `tensors_digest`


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of the tensors as a file stores them: each name, dtype, shape and its bytes, in name order.

    Example:
        >>> len(tensors_digest({"maps.0.omega": torch.ones(3)}))
        64
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    check_transport(transport, str(path))  # never write a file that Transport.load would refuse
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; choose a file name for the transport")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it, or choose another name")
    tensors: dict[str, torch.Tensor] = {}
    version = 1
    seen: set[int] = set()
    for i, site in enumerate(transport):
        fields = transport[site].to_tensors()
        unknown = sorted(set(fields) - set(FIELDS) - set(PIECEWISE_FIELDS))
        if unknown:
            raise ValueError(f"site {shorten(site)!r}: this format cannot hold the map's fields {unknown}")
        if any(f in fields for f in PIECEWISE_FIELDS):
            version = 2
        for field, value in fields.items():
            value = value.to(torch.uint8) if field == "dead" else value.contiguous()
            if value.data_ptr() in seen:  # one map under several sites (e.g. stages): safetensors refuses shared memory
                value = value.clone()
            seen.add(value.data_ptr())
            tensors[f"maps.{i}.{field}"] = value
    header = {
        "format": FORMAT,
        "format_version": str(version),
        "actsteer_version": _version(),
        "transport": json.dumps(transport.metadata()),
        CHECKSUM: tensors_digest(tensors),
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
    """``path``, or ``path`` + ``.safetensors`` when only that exists (what `Transport.load` reads)."""
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


def read_transport(
    path: str | Path, make_map: Callable[..., UnitMap]
) -> tuple[Path, dict[str, UnitMap], dict[str, Any]]:
    """Read and validate a transport file written by `save_transport` (``.safetensors`` may be left out): its
    path, its maps (``make_map(**tensors)`` per site, in order) and the keyword arguments of `Transport`
    (what `Transport.load` builds from them).

    Every file is checked before it is trusted: the header's sites are unique, printable, reasonably short
    names; every site has all its tensors, each of shape ``(D,)`` with the same D (plus, in version 2, either both
    or none of ``knots``/``values``, of shape ``(K, D)`` with ``K >= 2``, finite and non-decreasing); ``omega`` and
    ``beta`` are finite and the support bounds are not NaN (they may be +-inf) with ``lo <= hi``; no tensors belong
    to sites the header does not list, and no site has tensors its format version does not define; the metadata
    fields have their types and sane sizes.

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError: the file cannot be opened.
        ValueError: not a safetensors file, not an actsteer transport, corrupt, missing or inconsistent tensors,
            non-finite values, duplicated sites, or a format version newer than this actsteer understands. The
            message names the file and, where there is one, the site.
    """
    from safetensors import safe_open

    path = resolve_path(path)
    meta = read_header(path)
    version = check_format_version(path, meta)
    checksum = meta.get(CHECKSUM)
    if checksum is not None and not re.fullmatch(r"[0-9a-f]{64}", checksum):
        raise ValueError(f"{path}: malformed checksum {printable(checksum)!r} in the header ({CHECKSUM}); the file is "
                         "damaged: get it again or fit the transport again")
    info = parse_metadata(path, meta.get("transport"))
    if not isinstance(info, dict) or "sites" not in info:
        raise ValueError(f"{path}: the transport metadata is corrupt (no site list); the file is damaged: fit the "
                         "transport again")
    sites = check_site_list(path, info.pop("sites"))
    check_metadata(path, info)
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
            allowed = set(FIELDS) | (set(PIECEWISE_FIELDS) if int(version) >= 2 else set())
            for i, site in enumerate(sites):
                missing = [fld for fld in FIELDS if f"maps.{i}.{fld}" not in keys]
                if missing:
                    raise ValueError(f"{path}: tensors {missing} of site {shorten(site)!r} are missing; the file is incomplete")
                own = {k.rsplit(".", 1)[1] for k in keys if _site_index(k) == i}
                foreign = sorted(own - allowed)
                if foreign:
                    raise ValueError(
                        f"{path}: site {shorten(site)!r} holds tensors {shorten(str(foreign))} that format version "
                        f"{version} does not define; the file is damaged: fit the transport again"
                    )
            if checksum is not None:
                _verify(path, {k: f.get_tensor(k) for k in keys}, checksum)
            for i, site in enumerate(sites):
                own = {k.rsplit(".", 1)[1] for k in keys if _site_index(k) == i}
                fields = {fld: f.get_tensor(f"maps.{i}.{fld}") for fld in FIELDS}
                shapes = {fld: tuple(t.shape) for fld, t in fields.items()}
                if len(set(shapes.values())) != 1 or len(shapes["omega"]) != 1:
                    raise ValueError(
                        f"{path}: site {shorten(site)!r} is malformed (tensor shapes {shapes}; each must be (D,) with "
                        "the same D); the file is damaged: fit the transport again"
                    )
                fields["dead"] = fields["dead"].bool()
                piecewise = [fld for fld in PIECEWISE_FIELDS if fld in own]
                if piecewise:
                    if len(piecewise) != len(PIECEWISE_FIELDS):
                        raise ValueError(f"{path}: site {shorten(site)!r} has {piecewise} but not all of "
                                         f"{list(PIECEWISE_FIELDS)}; the file is incomplete")
                    extra = {fld: f.get_tensor(f"maps.{i}.{fld}") for fld in PIECEWISE_FIELDS}
                    d = shapes["omega"][0]
                    if any(t.dim() != 2 or t.shape[1] != d or t.shape[0] < 2 for t in extra.values()):
                        raise ValueError(
                            f"{path}: site {shorten(site)!r} is malformed (knots/values shapes "
                            f"{[tuple(t.shape) for t in extra.values()]}; each must be (K, {d}) with K >= 2); the file "
                            "is damaged: fit the transport again"
                        )
                    fields.update(extra)
                try:
                    maps[site] = make_map(**fields)
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
    return path, maps, known


def check_format_version(path: str | Path, meta: dict[str, str]) -> int:
    """The header's format version, a whole number this actsteer reads.

    Raises:
        ValueError: a version that is not a whole number >= 1 ("malformed": a damaged file), or one newer than
            `FORMAT_VERSION` (upgrade actsteer).
    """
    version = meta.get("format_version", "")
    if not re.fullmatch(r"[0-9]{1,9}", version) or int(version) < 1:
        raise ValueError(
            f"{path}: malformed format version {printable(version)!r} in the header (a whole number such as "
            f"'{FORMAT_VERSION}' is expected); the file is damaged or was not written by actsteer"
        )
    if int(version) > FORMAT_VERSION:
        raise ValueError(
            f"{path} uses transport format version {version!r} (written by actsteer "
            f"{printable(meta.get('actsteer_version', '?'), 40)}); this actsteer reads versions up to {FORMAT_VERSION}: "
            "upgrade actsteer"
        )
    return int(version)


def _verify(path: Path, tensors: dict[str, torch.Tensor], checksum: str) -> None:
    if tensors_digest(tensors) != checksum:
        raise ValueError(
            f"{path}: the tensor data does not match the checksum in its header ({CHECKSUM}): the tensor data was "
            "changed after it was saved (a damaged copy or download); get the file again or fit the transport again"
        )


def _site_index(key: str) -> int | None:
    """``i`` of a tensor key ``maps.{i}.{field}``, else None."""
    parts = key.split(".")
    return int(parts[1]) if len(parts) == 3 and parts[0] == "maps" and parts[1].isdigit() else None
