"""Per-request steering in vLLM: which keys a request sets, and the folder of named transports.

A request asks for steering with two keys of ``SamplingParams.extra_args`` (the server's ``vllm_xargs``):
``actsteer_transport`` (a name, or a list of names composed in order) and ``actsteer_strength`` (a number, or
one per name; default 1.0). A name is a file ``<name>.safetensors`` in the transports folder:
``additional_config={"actsteer": {"transports": DIR}}`` (``--additional-config`` on the command line), else
``$ACTSTEER_TRANSPORTS``. Files are validated against the served model, translated to vLLM's module names
(`actsteer.vllm_integration.names`) and cached per process until the file changes.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from ..core import HALF_DTYPES, Transport, check_strength
from .names import ModelShape, to_vllm

logger = logging.getLogger(__name__)

ENV_VAR = "ACTSTEER_TRANSPORTS"
CONFIG_KEY = "actsteer"
KEY_TRANSPORT = "actsteer_transport"
KEY_STRENGTH = "actsteer_strength"
SUFFIX = ".safetensors"
CHECKED_MAX = 256  # (file, version, strength, dtype) combinations `TransportStore.check` remembers as fine


def transports_dir(additional_config: Mapping[str, Any] | None = None) -> Path | None:
    """The transports folder: ``additional_config["actsteer"]["transports"]``, else ``$ACTSTEER_TRANSPORTS``.

    Returns None when neither is set: steering is then off, and vLLM runs exactly as without actsteer.

    Raises:
        TypeError: ``additional_config["actsteer"]`` is not a mapping.

    Example:
        >>> transports_dir({"actsteer": {"transports": "/srv/transports"}})
        PosixPath('/srv/transports')
    """
    section = (additional_config or {}).get(CONFIG_KEY)
    if section is not None and not isinstance(section, Mapping):
        raise TypeError(
            f'additional_config["{CONFIG_KEY}"] must be a mapping like {{"transports": "/path/to/dir"}}, '
            f"got {section!r}"
        )
    folder = (section or {}).get("transports") or os.environ.get(ENV_VAR)
    return Path(folder).expanduser() if folder else None


@dataclasses.dataclass(frozen=True)
class RequestSteering:
    """What one request asked for: transport names and one strength each, applied in order.

    Example:
        >>> parse_request({"actsteer_transport": ["ocean", "food"], "actsteer_strength": [1.0, 0.5]})
        RequestSteering(names=('ocean', 'food'), strengths=(1.0, 0.5))
    """

    names: tuple[str, ...]
    strengths: tuple[float, ...]


def parse_request(extra_args: Mapping[str, Any] | None) -> RequestSteering | None:
    """Read the actsteer keys of a request's ``extra_args``; None when it asks for no steering.

    Raises:
        ValueError: a bad name, strength or key (the message says which and what is accepted).
    """
    if not extra_args:
        return None
    keys = [k for k in extra_args if isinstance(k, str) and k.startswith("actsteer_")]
    unknown = [k for k in keys if k not in (KEY_TRANSPORT, KEY_STRENGTH)]
    if unknown:
        close = difflib.get_close_matches(unknown[0], [KEY_TRANSPORT, KEY_STRENGTH], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown key {unknown[0]!r}{hint} (actsteer reads {KEY_TRANSPORT!r} and {KEY_STRENGTH!r})")
    if not keys:
        return None
    if KEY_TRANSPORT not in extra_args:
        raise ValueError(f"{KEY_STRENGTH!r} is set but {KEY_TRANSPORT!r} is not: name the transport(s) to apply")
    raw = extra_args[KEY_TRANSPORT]
    names = [raw] if isinstance(raw, str) else raw
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{KEY_TRANSPORT!r} must be a transport name or a non-empty list of names, got {raw!r}")
    for name in names:
        check_name(name)
    raw_s = extra_args.get(KEY_STRENGTH, 1.0)
    values = list(raw_s) if isinstance(raw_s, (list, tuple)) else [raw_s] * len(names)
    if len(values) != len(names):
        raise ValueError(
            f"{KEY_STRENGTH!r} has {len(values)} values for {len(names)} transports {names!r}; give one each"
        )
    strengths = []
    for v in values:
        try:  # the engine's own check (finite, within range), with its messages
            strengths.append(float(check_strength(v, what=KEY_STRENGTH)))
        except TypeError as err:
            raise ValueError(str(err)) from None
    return RequestSteering(tuple(names), tuple(strengths))


def check_name(name: str) -> None:
    """Refuse names that could leave the transports folder (absolute paths, ``..``, backslashes)."""
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "~")) or "\\" in name or ".." in parts or not parts:
        raise ValueError(
            f"Transport name {name!r} is not allowed: use a file name inside the transports folder, like 'ocean' or "
            "'styles/ocean' (no absolute paths, no '..')"
        )


class TransportStore:
    """The named transports of one folder, loaded, checked against one served model, translated and cached.

    Args:
        folder: where ``<name>.safetensors`` files live.
        shape: the served model and this process's tensor-parallel rank.

    Thread-safe; a file is read again only when its modification time or size changes.
    """

    def __init__(self, folder: Path, shape: ModelShape) -> None:
        self.folder = Path(folder)
        self.shape = shape
        self._cache: dict[Path, tuple[str, Transport]] = {}
        self._checked: dict[tuple[str, str, float, torch.dtype], None] = {}  # insertion order: oldest first
        self._lock = threading.Lock()

    def path_of(self, name: str) -> Path:
        """The file of a transport name.

        Raises:
            ValueError: a name that leaves the folder.
            KeyError: no such file (the message lists the closest available names).
        """
        check_name(name)
        path = self.folder / (name if name.endswith(SUFFIX) else name + SUFFIX)
        if not path.is_file():
            names = self.available()
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            hint = f"; closest: {', '.join(repr(c) for c in close)}" if close else ""
            listing = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "") if names else "(none)"
            raise KeyError(f"No transport named {name!r} in {self.folder}{hint}; available: {listing}")
        return path

    def available(self) -> list[str]:
        """The names of the transport files in the folder (subfolders included), sorted."""
        if not self.folder.is_dir():
            return []
        return sorted(str(p.relative_to(self.folder))[: -len(SUFFIX)] for p in self.folder.rglob("*" + SUFFIX))

    def get(self, name: str) -> tuple[str, Transport]:
        """``(version, transport)`` for a name: the transport in vLLM's site names for this rank, and a version
        string that changes whenever the file does.

        Raises:
            KeyError / ValueError: unknown name, unreadable file, or a transport that does not fit the model.
        """
        path = self.path_of(name)
        stat = path.stat()
        version = f"{stat.st_mtime_ns}-{stat.st_size}"
        with self._lock:
            hit = self._cache.get(path)
            if hit is not None and hit[0] == version:
                return hit
        try:
            transport = Transport.load(path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"Transport {name!r} ({path}) could not be read: {err}") from None
        try:
            translated = to_vllm(transport, self.shape)
        except (KeyError, ValueError) as err:
            message = err.args[0] if err.args else str(err)
            raise ValueError(f"Transport {name!r} does not fit the served model: {message}") from None
        logger.info("actsteer: loaded transport %r (%d sites) from %s", name, len(translated), path)
        with self._lock:
            self._cache[path] = (version, translated)
        return version, translated

    def check(self, request: RequestSteering, dtype: torch.dtype) -> str:
        """Load every transport of a request and fold it at its strength for ``dtype``; return a key that
        identifies exactly this steering (names, file versions, strengths), for prefix-cache isolation (the
        plugin hashes it into the request's ``cache_salt``).

        A file version, strength and dtype found fine once is not folded again (the last `CHECKED_MAX` are kept).

        Raises:
            KeyError / ValueError: what `get` raises, or a strength the model's dtype cannot hold.
        """
        parts = []
        for name, strength in zip(request.names, request.strengths):
            version, transport = self.get(name)
            if dtype in HALF_DTYPES and strength != 0.0:  # only half precision can refuse a fold (`FoldedMap.to`)
                memo = (name, version, strength, dtype)
                with self._lock:
                    known = memo in self._checked
                if not known:
                    for site, unit_map in transport.items():
                        try:
                            unit_map.fold(strength).to("cpu", dtype)
                        except ValueError as err:
                            where = f"Transport {name!r}, site {site!r}, strength {strength:g}"
                            raise ValueError(f"{where}: {err}") from None
                    with self._lock:
                        self._checked[memo] = None
                        while len(self._checked) > CHECKED_MAX:
                            del self._checked[next(iter(self._checked))]
            parts.append(f"{name}@{version}x{strength!r}")
        return "|".join(parts)
