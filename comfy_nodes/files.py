"""Transport files for ComfyUI: the ``models/act_transports`` folder, safe names, save and load.

The folder is registered with ComfyUI's ``folder_paths`` (so ``extra_model_paths.yaml`` can add more under the
key ``act_transports``); files are actsteer's safetensors format (`actsteer.core.io`), never pickles.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
from typing import Literal

from ..core import Transport, describe_size, shorten

logger = logging.getLogger(__name__)

FOLDER = "act_transports"
EXTENSION = ".safetensors"
IfExists = Literal["add number", "error", "overwrite"]
IF_EXISTS: tuple[str, ...] = ("add number", "error", "overwrite")
EVENT = "actsteer.transports"  # websocket event: the file list changed

# One path segment: letters, digits, '_', '-', '.', ' ', not starting with '.' (no '..', no hidden files).
_SEGMENT = re.compile(r"(?!\.)[\w\-. ]+\Z")
# Names Windows reserves for devices, with or without an extension ("con", "nul.txt", "com1"): a workflow that
# saves to them cannot be shared with Windows users, and on Windows the file never appears.
_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³])(\..*)?$", re.IGNORECASE)
MAX_SEGMENT_BYTES = 200  # per folder or file name, UTF-8; leaves room for "_00001.safetensors" under 255
MAX_NAME_CHARS = 200  # the whole relative name: model folders are often deep, and Windows paths end at 260


def register_folder() -> None:
    """Register ``<models>/act_transports`` with ComfyUI's folder_paths (idempotent)."""
    import folder_paths

    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
    folder_paths.folder_names_and_paths[FOLDER][1].add(EXTENSION)


def list_files() -> list[str]:
    """The transport files in the ``act_transports`` folders (what the Load dropdown shows)."""
    import folder_paths

    register_folder()
    return folder_paths.get_filename_list(FOLDER)


def _unsafe(name: str, why: str) -> ValueError:
    return ValueError(f"Unsafe transport file name {shorten(name)!r}: it {why}; change filename on the AcT Save node")


def safe_name(name: str) -> str:
    """Validate a file name typed by the user: relative, no traversal, portable; returns it with ``.safetensors``.

    ``style/watercolor`` is allowed (a subfolder); ``../x``, ``/abs``, ``C:\\x``, ``.hidden``, Windows device names
    (``con``, ``nul``, ``aux/x``), names ending in a dot or space, and over-long names are not.

    Raises:
        ValueError: one line: what is wrong and what to change.
    """
    cleaned = name.strip().replace("\\", "/")
    if cleaned.endswith(EXTENSION):
        cleaned = cleaned[: -len(EXTENSION)]
    if not cleaned:
        raise _unsafe(name, "is empty")
    if len(cleaned) > MAX_NAME_CHARS:
        raise _unsafe(name, f"is {len(cleaned)} characters long; keep it under {MAX_NAME_CHARS}")
    segments = cleaned.split("/")
    if cleaned.startswith("/") or not all(_SEGMENT.match(s) for s in segments):
        raise ValueError(
            f"Unsafe transport file name {shorten(name)!r}: use letters, digits, '_', '-', '.' and spaces, optionally "
            "one or more subfolders separated by '/', with no '..', no leading '/' or '.', no drive letters; change "
            "filename on the AcT Save node"
        )
    for segment in segments:
        if segment != segment.rstrip(". "):
            raise _unsafe(name, f"has a part ending in a dot or a space ({segment!r}), which Windows drops")
        if segment != segment.lstrip(" "):
            raise _unsafe(name, f"has a part starting with a space ({segment!r})")
        if _RESERVED.match(segment):
            raise _unsafe(name, f"uses {segment!r}, a name Windows reserves for devices")
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise _unsafe(name, f"has a part of {len(segment)} characters ({shorten(segment, 24)!r}); keep each "
                                "folder and file name short")
    return cleaned + EXTENSION


def _root() -> str:
    import folder_paths

    register_folder()
    return os.path.abspath(folder_paths.get_folder_paths(FOLDER)[0])


def _target_path(filename: str) -> str:
    root = _root()
    path = os.path.abspath(os.path.join(root, filename))
    if os.path.commonpath([root, path]) != root:  # belt and braces after safe_name
        raise ValueError(f"Transport file name {filename!r} points outside {root}; change filename on the AcT Save node")
    return path


def _relative(path: str) -> str:
    return os.path.relpath(path, _root()).replace(os.sep, "/")


def _copies(path: str) -> list[tuple[int, str]]:
    """``(number, path)`` of the numbered copies ``<stem>_00001.safetensors``, ... of ``path``, in number order."""
    folder, base = os.path.split(path[: -len(EXTENSION)])
    rx = re.compile(re.escape(base) + r"_(\d{5})" + re.escape(EXTENSION))
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    return sorted((int(m[1]), os.path.join(folder, e)) for e in entries if (m := rx.fullmatch(e)))


def _numbered(path: str) -> str:
    copies = _copies(path)
    number = copies[-1][0] + 1 if copies else 1
    if number > 99999:
        raise ValueError(f"{_relative(path)!r} has 99999 numbered copies; change filename on the AcT Save node")
    return f"{path[: -len(EXTENSION)]}_{number:05d}{EXTENSION}"


def _latest(path: str) -> str | None:
    """The last save under this name: its highest numbered copy, else the file itself, else None."""
    copies = [p for _, p in _copies(path) if os.path.isfile(p)]
    if copies:
        return copies[-1]
    return path if os.path.isfile(path) else None


def _holds(path: str | None, transport: Transport) -> bool:
    if path is None:
        return False
    try:
        return Transport.load(path) == transport
    except (OSError, ValueError):
        return False  # unreadable: never treated as "already saved"


@dataclasses.dataclass(frozen=True)
class Saved:
    """The outcome of `save`: the file name (relative to the ``act_transports`` folder) and whether it was
    written (False: the last file saved under this name already holds the same transport)."""

    name: str
    written: bool
    size: str  # `actsteer.core.describe_size`: "33 layers" or "33 layers x 4 steps"

    def message(self) -> str:
        """One line for the node: what was saved, or why nothing new was written."""
        if self.written:
            return f"saved {self.name} ({self.size})"
        return (f"not saved again: {self.name} already holds this transport (learn again, or change filename, to "
                "save a new one)")


def save(transport: Transport, name: str, if_exists: str = "add number") -> Saved:
    """Save into the first ``act_transports`` folder, unless the last save under this name holds the same transport.

    Args:
        transport: what to save.
        name: the file name typed on the node (see `safe_name`).
        if_exists: ``"add number"`` (save as ``name_00001`` etc.), ``"error"``, or ``"overwrite"``.

    Returns:
        A `Saved`: re-running a graph whose transport did not change writes no duplicate, whatever ``if_exists``.

    Raises:
        ValueError: unsafe name, unknown ``if_exists``, the file exists with another transport and
            ``if_exists="error"``, a folder in the way, or the disk refusing the file; always one line that says
            what to change on the node.
    """
    if if_exists not in IF_EXISTS:
        raise ValueError(f"Unknown if_exists {if_exists!r}; choose one of: {', '.join(IF_EXISTS)}")
    path = _target_path(safe_name(name))
    if os.path.isdir(path):
        raise ValueError(f"{_relative(path)!r} is a folder in {FOLDER}; change filename on the AcT Save node")
    latest = _latest(path) if if_exists == "add number" else (path if os.path.isfile(path) else None)
    if _holds(latest, transport):
        return Saved(_relative(latest), False, describe_size(transport))
    if os.path.exists(path):
        if if_exists == "error":
            raise ValueError(
                f"A different transport named {_relative(path)!r} already exists; change filename, or set if_exists "
                "to 'add number' or 'overwrite' on the AcT Save node"
            )
        if if_exists == "add number":
            path = _numbered(path)
    try:
        transport.save(path, overwrite=(if_exists == "overwrite"))
    except OSError as err:  # a file where a subfolder should be, a full disk, no permission, a name the OS refuses
        reason = err.strerror or type(err).__name__
        raise ValueError(f"Cannot write {_relative(path)!r} in {FOLDER}: {reason}; change filename on the AcT Save "
                         "node, or check that folder") from None
    saved = _relative(path)
    logger.info("actsteer: saved transport %s (%d layers) to %s", saved, len(transport), _root())
    return Saved(saved, True, describe_size(transport))


def full_path(name: str) -> str:
    """The path of a file listed in the ``act_transports`` folders, or a one-line ValueError."""
    import folder_paths

    register_folder()
    path = folder_paths.get_full_path(FOLDER, name) if isinstance(name, str) else None
    if path is None:
        raise ValueError(
            f"No transport file {shorten(str(name))!r} in models/{FOLDER}; pick one in transport_name (press R to "
            "refresh the list), or save one with AcT Save Transport"
        )
    return path


def _one_line(err: Exception, path: str, name: str) -> str:
    detail = " ".join(str(err.args[0] if err.args else err).split())
    return detail.replace(str(path), name).replace(os.path.abspath(path), name)


def check_readable(name: str) -> None:
    """Queue-time check of a file name: listed, and an actsteer transport (reads the header only).

    Raises:
        ValueError: one line naming the file and what to do.
    """
    from ..core import read_header

    path = full_path(name)
    try:
        read_header(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot read transport file {name!r}: {_one_line(err, path, name)}") from None


def load(name: str) -> Transport:
    """Load a transport file by its name in the dropdown; errors are one line and name the file, not its path."""
    path = full_path(name)
    try:
        return Transport.load(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot read transport file {name!r}: {_one_line(err, path, name)}") from None


def fingerprint(name: str) -> str:
    """Changes when the file changes, so ComfyUI re-runs the Load node after a re-save."""
    try:
        stat = os.stat(full_path(name))
    except (OSError, ValueError):
        return f"missing:{name}"
    return f"{name}:{stat.st_mtime_ns}:{stat.st_size}"


_NUMBER = re.compile(r"_\d{5}\Z")


def newest_copy(name: str) -> str:
    """The newest save of a listed file's name: its highest numbered copy (``name_00002``), else the file itself.

    ``name`` may itself be a numbered copy: ``x_00001.safetensors`` stands for ``x``. Returns ``name`` when nothing
    under that name exists (the caller's checks then report the missing file).
    """
    if not isinstance(name, str) or not name.endswith(EXTENSION):
        return name
    base = _NUMBER.sub("", name[: -len(EXTENSION)]) + EXTENSION
    for root in _roots():
        latest = _latest(os.path.join(root, base))
        if latest is not None:
            return os.path.relpath(latest, root).replace(os.sep, "/")
    return name


def _roots() -> list[str]:
    import folder_paths

    register_folder()
    return [os.path.abspath(p) for p in folder_paths.get_folder_paths(FOLDER)]


# Save's cache fingerprint: the files under a name as the last Save left them keep the last fingerprint, so
# queuing an unchanged graph again reuses Save and everything after it; a file deleted or added by hand changes it.
_SAVE_STATE: dict[tuple[str, str], tuple[tuple, str]] = {}
_SAVE_STATE_LIMIT = 256


def _save_state(name: str) -> tuple:
    try:
        path = _target_path(safe_name(name))
    except ValueError:
        return ("unsafe", name)
    files = [p for p in [path, *(c for _, c in _copies(path))] if os.path.isfile(p)]
    return tuple((p, (s := os.stat(p)).st_mtime_ns, s.st_size) for p in files)


def save_fingerprint(name: str, if_exists: str) -> str:
    """AcT Save's fingerprint for ComfyUI's cache: the state of the files under ``name`` (see `saved_state`)."""
    state = _save_state(name)
    last = _SAVE_STATE.get((name, if_exists))
    return last[1] if last is not None and last[0] == state else repr((if_exists, state))


def saved_state(name: str, if_exists: str, fingerprint_before: str) -> None:
    """Record the files under ``name`` after a Save that ran with ``fingerprint_before``: until they change, the
    next fingerprint is that same value (the Save's own new file does not count as a change)."""
    if len(_SAVE_STATE) >= _SAVE_STATE_LIMIT:
        _SAVE_STATE.pop(next(iter(_SAVE_STATE)))
    _SAVE_STATE[(name, if_exists)] = (_save_state(name), fingerprint_before)


def announce(saved: Saved) -> None:
    """Tell open browser tabs that the file list changed, so their Load dropdowns follow (web/js/actsteer.js).

    Sends the websocket event ``actsteer.transports`` (``{"files": [...], "saved": name}``) to every client;
    does nothing outside a running ComfyUI server.
    """
    module = sys.modules.get("server")  # ComfyUI's server module, imported by main.py when a server runs
    server = getattr(getattr(module, "PromptServer", None), "instance", None)
    if server is not None and hasattr(server, "send_sync"):
        server.send_sync(EVENT, {"files": list_files(), "saved": saved.name})
