"""What a queued graph says about a node's MODEL and transport before anything loads.

ComfyUI checks a prompt before it runs any node, so ``validate_inputs`` sees widget values, not models. Which
family a MODEL input will be (an SDXL-style UNet or FLUX) is written in the graph all the same: follow the ``model``
links up to a core loader and read the tensor names in its file's safetensors header (no weights are read). A
transport's family is in its file's header (AcT Load) or is that of the MODEL it is learned on (AcT Learn).

The server hands each queued graph to extensions first (``PromptServer.add_on_prompt_handler``): `remember_prompt`
keeps it for the request being checked, in a context variable, so concurrent requests never see each other's
graphs. Anything unknown (another loader, a GGUF file, a family other than SDXL/FLUX, a prompt checked outside the
server) gives None, and the nodes check when they run, as before.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
from typing import Any

from ..archs.detect import checkpoint_arch
from ..archs.site_groups import ARCHS

logger = logging.getLogger(__name__)

_PROMPT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("actsteer_queued_prompt", default=None)
# core loaders: class -> (models folder, the input naming the file)
LOADERS: dict[str, tuple[str, str]] = {
    "CheckpointLoaderSimple": ("checkpoints", "ckpt_name"),
    "CheckpointLoader": ("checkpoints", "ckpt_name"),
    "unCLIPCheckpointLoader": ("checkpoints", "ckpt_name"),
    "UNETLoader": ("diffusion_models", "unet_name"),
}
_MAX_HOPS = 64
_HEADERS: dict[tuple[str, int, int], str | None] = {}  # (path, mtime, size) -> architecture


def remember_prompt(json_data: Any) -> Any:
    """An on-prompt handler: keep the graph being queued for this request's checks; returns ``json_data``."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    _PROMPT.set(prompt if isinstance(prompt, dict) else None)
    return json_data


def register() -> bool:
    """Install `remember_prompt` on the running ComfyUI server (once); False outside a server."""
    module = sys.modules.get("server")
    server = getattr(getattr(module, "PromptServer", None), "instance", None)
    handlers = getattr(server, "on_prompt_handlers", None)
    if server is None or not hasattr(server, "add_on_prompt_handler") or handlers is None:
        return False
    if remember_prompt not in handlers:
        server.add_on_prompt_handler(remember_prompt)
    return True


def queued_node(unique_id: Any, class_type: str) -> tuple[dict, dict] | None:
    """``(prompt, node)`` for the node being checked, when the remembered graph holds it with this class."""
    prompt = _PROMPT.get()
    node = prompt.get(str(unique_id)) if prompt is not None and unique_id is not None else None
    if not isinstance(node, dict) or node.get("class_type") != class_type or not isinstance(node.get("inputs"), dict):
        return None
    return prompt, node


def _linked(prompt: dict, node: dict, name: str) -> dict | None:
    link = node.get("inputs", {}).get(name)
    if isinstance(link, list) and len(link) == 2 and isinstance(prompt.get(str(link[0])), dict):
        return prompt[str(link[0])]
    return None


def file_arch(folder: str, name: Any) -> str | None:
    """The architecture (``"sdxl"``, ``"flux"``) of a model file listed in a ComfyUI models folder, from its
    safetensors header (read once per file version; `actsteer.archs.detect.checkpoint_arch`)."""
    import folder_paths

    try:
        path = folder_paths.get_full_path(folder, name) if isinstance(name, str) else None
        stat = os.stat(path) if path else None
    except (OSError, KeyError):
        return None
    if stat is None or not path.endswith((".safetensors", ".sft")):
        return None
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _HEADERS:
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                _HEADERS[key] = checkpoint_arch(f.keys())
        except Exception as err:  # not a readable safetensors file: the loader reports it when it runs
            logger.debug("actsteer: cannot read the header of %s: %s", path, err)
            _HEADERS[key] = None
    return _HEADERS[key]


def model_arch(prompt: dict, node: dict, name: str = "model") -> tuple[str, str] | None:
    """``(architecture, file name)`` of the MODEL fed into ``node``'s input ``name``: follows MODEL -> MODEL nodes
    (LoRA loaders, AcT Apply, ...) through their ``model`` input up to a core loader."""
    current = _linked(prompt, node, name)
    for _ in range(_MAX_HOPS):
        if current is None:
            return None
        loader = LOADERS.get(current.get("class_type"))
        if loader is not None:
            folder, field = loader
            file = current.get("inputs", {}).get(field)
            arch = file_arch(folder, file)
            return (arch, str(file)) if arch else None
        current = _linked(prompt, current, "model")
    return None


def transport_arch(prompt: dict, node: dict) -> tuple[str, str] | None:
    """``(architecture, where from)`` of the transport fed into ``node``: the AcT Load file's header, or the MODEL an
    AcT Learn node (through AcT Save) learns on."""
    current = _linked(prompt, node, "transport")
    for _ in range(_MAX_HOPS):
        kind = current.get("class_type") if current is not None else None
        if kind == "ActSteerSave":
            current = _linked(prompt, current, "transport")
        elif kind == "ActSteerLearn":
            return model_arch(prompt, current)
        elif kind == "ActSteerLoad":
            name = current.get("inputs", {}).get("transport_name")
            arch = _transport_file_arch(name)
            return (arch, str(name)) if arch else None
        else:
            return None
    return None


def _transport_file_arch(name: Any) -> str | None:
    """The architecture a transport file records (``Transport.model["arch"]``); None when it records none."""
    from ..core import read_header
    from .files import full_path

    try:
        info = json.loads(read_header(full_path(name)).get("transport", "{}")).get("model") or {}
    except (OSError, ValueError, AttributeError):
        return None  # a missing or unreadable file is reported by AcT Load's own check
    return info.get("arch") if info.get("arch") in ARCHS else None


def describe(found: tuple[str, str]) -> str:
    """``"SDXL (sd_xl_base_1.0.safetensors)"``."""
    arch, source = found
    return f"{arch.upper()} ({source})"


def queue_problem(node_cls: type, class_type: str, option: str, group: Any, choices: tuple[str, ...],
                  *, with_transport: bool = True) -> str | None:
    """The family mistakes a queued graph shows for one AcT node (None when none is seen, or nothing is known).

    Checks the layer group in ``option`` against the family of the node's MODEL, and (``with_transport``) the
    family of the transport it gets against that MODEL.
    """
    from .presets import family_problem

    hidden = getattr(node_cls, "hidden", None)
    found = queued_node(getattr(hidden, "unique_id", None), class_type)
    if found is None:
        return None
    prompt, node = found
    model = model_arch(prompt, node)
    if model is None:
        return None
    problem = family_problem(option, group, model[0], describe(model), choices) if isinstance(group, str) else None
    if problem or not with_transport:
        return problem
    transport = transport_arch(prompt, node)
    if transport is not None and transport[0] != model[0]:
        return (f"The transport was learned on {describe(transport)} and the MODEL is {describe(model)}: a transport "
                "steers only the model family it was learned on; connect a matching MODEL or transport")
    return None
