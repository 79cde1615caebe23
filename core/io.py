"""The transport file format: safetensors tensors + JSON metadata in the header. Never pickles.

Layout (format version 1): tensors ``maps.{i}.{field}`` for the i-th site in order and each `UnitMap`
field; the header's ``__metadata__`` holds ``format = "actsteer.transport"``, ``format_version``,
``actsteer_version`` and ``transport`` (JSON: method, pooling, support, mode, sites, counts, model, ...).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .transport import UNITMAP_FIELDS, UnitMap

if TYPE_CHECKING:
    from .transport import Transport

FORMAT = "actsteer.transport"
FORMAT_VERSION = 1
_METADATA_KEYS = ("method", "pooling", "support", "mode", "n_source", "n_target", "model", "description", "extra")


def _version() -> str:
    from ._version import __version__

    return __version__


def save_transport(transport: Transport, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``transport`` to ``path`` (``.safetensors`` is appended if missing); atomic.

    Raises:
        FileExistsError: if ``path`` exists and ``overwrite`` is False.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
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


def read_header(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file, with clear errors for missing, foreign or corrupt files."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No transport file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for truncated/garbled headers
        raise ValueError(f"{path} is not a readable safetensors file ({err}); it may be truncated or corrupt") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not an actsteer transport (no 'format: {FORMAT}' in its header)")
    return meta


def load_transport(path: str | Path) -> Transport:
    """Read a transport written by `save_transport`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, not an actsteer transport, corrupt, missing tensors, or a format
            version newer than this actsteer understands.
    """
    from safetensors import safe_open

    from .transport import Transport

    path = Path(path)
    if not path.exists() and path.suffix != ".safetensors" and path.with_name(path.name + ".safetensors").is_file():
        path = path.with_name(path.name + ".safetensors")
    meta = read_header(path)
    version = meta.get("format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise ValueError(
            f"{path} uses transport format version {version!r} (written by actsteer {meta.get('actsteer_version', '?')}); "
            f"this actsteer reads versions up to {FORMAT_VERSION}: upgrade actsteer"
        )
    try:
        info = json.loads(meta["transport"])
        sites = info.pop("sites")
    except (KeyError, json.JSONDecodeError, AttributeError, TypeError) as err:
        raise ValueError(f"{path}: the transport metadata is corrupt ({err})") from None
    known = {k: v for k, v in info.items() if k in _METADATA_KEYS}
    unknown = {k: v for k, v in info.items() if k not in _METADATA_KEYS}
    if unknown:  # written by a newer actsteer with the same format version: keep, don't fail
        known["extra"] = {**(known.get("extra") or {}), "unknown_metadata": unknown}
    maps = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for i, site in enumerate(sites):
                missing = [fld for fld in UNITMAP_FIELDS if f"maps.{i}.{fld}" not in keys]
                if missing:
                    raise ValueError(f"{path}: tensors {missing} of site {site!r} are missing; the file is incomplete")
                fields = {fld: f.get_tensor(f"maps.{i}.{fld}") for fld in UNITMAP_FIELDS}
                fields["dead"] = fields["dead"].bool()
                try:
                    maps[site] = UnitMap(**fields)
                except ValueError as err:
                    raise ValueError(f"{path}: site {site!r} is malformed ({err})") from None
    except ValueError:
        raise
    except Exception as err:
        raise ValueError(f"{path}: could not read the tensors ({err}); the file may be corrupt") from None
    try:
        return Transport(maps, **known)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: the transport metadata is invalid ({err})") from None
