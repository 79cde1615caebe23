"""Transport files for ComfyUI: the ``models/act_transports`` folder, safe names, save and load.

The folder is registered with ComfyUI's ``folder_paths`` (so ``extra_model_paths.yaml`` can add more under the
key ``act_transports``); files are actsteer's safetensors format (`actsteer.core.io`), never pickles.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Literal

from ..core.transport import Transport

logger = logging.getLogger(__name__)

FOLDER = "act_transports"
EXTENSION = ".safetensors"
IfExists = Literal["add number", "error", "overwrite"]
IF_EXISTS: tuple[str, ...] = ("add number", "error", "overwrite")

# One path segment: letters, digits, '_', '-', '.', ' ', not starting with '.' (no '..', no hidden files).
_SEGMENT = re.compile(r"^(?!\.)[\w\-. ]{1,128}$")


def register_folder() -> None:
    """Register ``<models>/act_transports`` with ComfyUI's folder_paths (idempotent)."""
    import folder_paths

    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
    folder_paths.folder_names_and_paths[FOLDER][1].add(EXTENSION)


def list_files() -> list[str]:
    import folder_paths

    register_folder()
    return folder_paths.get_filename_list(FOLDER)


def safe_name(name: str) -> str:
    """Validate a file name typed by the user: relative, no traversal; returns it with ``.safetensors``.

    ``style/watercolor`` is allowed (a subfolder); ``../x``, ``/abs``, ``C:\\x``, ``.hidden`` are not.

    Raises:
        ValueError: the name says what is wrong and what is allowed.
    """
    cleaned = name.strip().replace("\\", "/")
    if cleaned.endswith(EXTENSION):
        cleaned = cleaned[: -len(EXTENSION)]
    segments = cleaned.split("/")
    if not cleaned or cleaned.startswith("/") or not all(_SEGMENT.match(s) and s.strip() == s for s in segments):
        raise ValueError(
            f"Unsafe transport file name {name!r}: use letters, digits, '_', '-', '.' and spaces, optionally one "
            "or more subfolders separated by '/', with no '..', no leading '/' or '.', no drive letters"
        )
    return cleaned + EXTENSION


def _target_path(filename: str) -> str:
    import folder_paths

    register_folder()
    root = os.path.abspath(folder_paths.get_folder_paths(FOLDER)[0])
    path = os.path.abspath(os.path.join(root, filename))
    if os.path.commonpath([root, path]) != root:  # belt and braces after safe_name
        raise ValueError(f"Transport file name {filename!r} points outside {root}")
    return path


def _numbered(path: str) -> str:
    stem = path[: -len(EXTENSION)]
    for i in range(1, 100000):
        candidate = f"{stem}_{i:05d}{EXTENSION}"
        if not os.path.exists(candidate):
            return candidate
    raise ValueError(f"Too many numbered copies of {path}; choose another file name")


def save(transport: Transport, name: str, if_exists: str = "add number") -> str:
    """Save into the first ``act_transports`` folder; returns the file name relative to it.

    Args:
        if_exists: ``"add number"`` (save as ``name_00001`` etc.), ``"error"``, or ``"overwrite"``.

    Raises:
        ValueError: unsafe name, unknown ``if_exists``, or the file exists and ``if_exists="error"``.
    """
    if if_exists not in IF_EXISTS:
        raise ValueError(f"Unknown if_exists {if_exists!r}; choose one of: {', '.join(IF_EXISTS)}")
    path = _target_path(safe_name(name))
    if os.path.exists(path):
        if if_exists == "error":
            raise ValueError(
                f"A transport named {os.path.basename(path)!r} already exists; choose another name, or set "
                "if_exists to 'add number' or 'overwrite'"
            )
        if if_exists == "add number":
            path = _numbered(path)
    transport.save(path, overwrite=(if_exists == "overwrite"))
    import folder_paths

    root = os.path.abspath(folder_paths.get_folder_paths(FOLDER)[0])
    saved = os.path.relpath(path, root).replace(os.sep, "/")
    logger.info("actsteer: saved transport %s (%d sites) to %s", saved, len(transport), root)
    return saved


def full_path(name: str) -> str:
    """The path of a file listed in the ``act_transports`` folders, or a one-line ValueError."""
    import folder_paths

    register_folder()
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise ValueError(f"No transport file {name!r} in the {FOLDER} folders ({', '.join(folder_paths.get_folder_paths(FOLDER))})")
    return path


def load(name: str) -> Transport:
    """Load a transport file by its name in the dropdown; errors are one line and name the file."""
    path = full_path(name)
    try:
        return Transport.load(path)
    except (OSError, ValueError) as err:
        detail = err.args[0] if err.args else str(err)
        raise ValueError(f"Cannot read transport file {name!r}: {detail}") from None


def fingerprint(name: str) -> str:
    """Changes when the file changes, so ComfyUI re-runs the Load node after a re-save."""
    try:
        stat = os.stat(full_path(name))
    except (OSError, ValueError):
        return f"missing:{name}"
    return f"{name}:{stat.st_mtime_ns}:{stat.st_size}"
