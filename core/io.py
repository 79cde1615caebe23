"""The transport file format: safetensors tensors + JSON metadata in the header (`save_transport`, `read_transport`;
`Transport.save` and `Transport.load` call them). Never pickles.

Layout (format version 1): tensors ``maps.{i}.{field}`` for the i-th site in order and each `UnitMap`
field; the header's ``__metadata__`` holds ``format = "actsteer.transport"``, ``format_version``,
``actsteer_version`` and ``transport`` (JSON: method, pooling, support, mode, sites, counts, model, ...).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .validation import check_metadata, check_site_list, check_transport, check_unit_map, shorten

if TYPE_CHECKING:
    from .transport import Transport, UnitMap

FORMAT = "actsteer.transport"
FORMAT_VERSION = 1
FIELDS = ("omega", "beta", "lo", "hi", "target_lo", "target_hi", "dead")  # the tensors of a site, format version 1
_METADATA_KEYS = ("method", "pooling", "support", "mode", "n_source", "n_target", "model", "description", "extra")

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
    for i, site in enumerate(transport):
        unit_map = transport[site]
        for field in FIELDS:
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
    sites = check_site_list(path, sites)
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
            for i, site in enumerate(sites):
                missing = [fld for fld in FIELDS if f"maps.{i}.{fld}" not in keys]
                if missing:
                    raise ValueError(f"{path}: tensors {missing} of site {shorten(site)!r} are missing; the file is incomplete")
                fields = {fld: f.get_tensor(f"maps.{i}.{fld}") for fld in FIELDS}
                shapes = {fld: tuple(t.shape) for fld, t in fields.items()}
                if len(set(shapes.values())) != 1 or len(shapes["omega"]) != 1:
                    raise ValueError(
                        f"{path}: site {shorten(site)!r} is malformed (tensor shapes {shapes}; each must be (D,) with "
                        "the same D); the file is damaged: fit the transport again"
                    )
                fields["dead"] = fields["dead"].bool()
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


def _site_index(key: str) -> int | None:
    """``i`` of a tensor key ``maps.{i}.{field}``, else None."""
    parts = key.split(".")
    return int(parts[1]) if len(parts) == 3 and parts[0] == "maps" and parts[1].isdigit() else None
