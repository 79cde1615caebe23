"""What AcT Learn fitted, kept across workflows: queuing an unchanged Learn again reuses its transport.

ComfyUI's own cache keeps a node's output only while the node stays in the graph being run: as soon as another
workflow runs, Learn's result is dropped and the next queue of the first workflow learns again (minutes on a
slow machine). This cache is keyed by content, not by node: everything that changes what Learn fits.

- The MODEL and the CLIP as the graph makes them: every node upstream of Learn with its widget values (checkpoint
  and LoRA names with their strengths, CLIP skip, sampling patches...), and the size and modification time of
  every model file those values name. A graph with an upstream node whose output can change while its inputs do
  not (a node with its own change check, e.g. loading a file by content, or one marked not idempotent) is not
  cached here: Learn then learns again whenever ComfyUI runs it, as before.
- The loaded objects' kind (model class, parameter count, CLIP class), as a guard.
- Learn's own inputs: prompts, method, layers, steps, seed, cfg, size, samples, pooling, fit mode, support,
  batch size.

It holds at most `MAX_ENTRIES` transports and `MAX_BYTES` of tensors (least recently used first out), in this
ComfyUI process only: a restart, or Learn on other inputs more than `MAX_ENTRIES` times, means learning again.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from typing import Any

import torch

logger = logging.getLogger(__name__)

MAX_ENTRIES = 8
MAX_BYTES = 512 * 2**20
_MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")


@dataclasses.dataclass(frozen=True)
class Entry:
    """A cached Learn result: the transport, the node's result line, when it was learned, its tensor bytes."""

    transport: Any
    summary: str
    learned_at: float
    nbytes: int


_ENTRIES: collections.OrderedDict[str, Entry] = collections.OrderedDict()
_LOCK = threading.Lock()


def _changes_by_itself(class_type: str) -> bool:
    """Whether a node class can give a new output for the same inputs (own change check, not idempotent)."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS.get(class_type)
    if cls is None:
        return True
    if getattr(cls, "NOT_IDEMPOTENT", False) or hasattr(cls, "IS_CHANGED"):
        return True
    try:
        from comfy_api.internal import first_real_override

        return first_real_override(cls, "fingerprint_inputs") is not None
    except (ImportError, ValueError, AttributeError):
        return False


def _file_stats(value: str) -> list[Any]:
    """Size and modification time of the model file(s) a widget value names, in any registered models folder."""
    import folder_paths

    stats = []
    for folder in list(folder_paths.folder_names_and_paths):
        try:
            path = folder_paths.get_full_path(folder, value)
        except Exception:  # a folder whose paths cannot be listed
            continue
        if path:
            stat = os.stat(path)
            stats.append([folder, stat.st_size, stat.st_mtime_ns])
    return stats


def graph_signature(prompt: Any, node_id: Any) -> str | None:
    """A canonical description of everything upstream of ``node_id`` in the queued ``prompt`` (None: not cacheable).

    Each upstream node contributes its class, its widget values (with the stats of the model files they name) and,
    for each link, the upstream node's own description and the output slot. Node ids do not matter.
    """
    if not isinstance(prompt, dict) or str(node_id) not in prompt:
        return None
    memo: dict[str, Any] = {}

    def describe(nid: str, depth: int) -> Any:
        if nid in memo:
            return memo[nid]
        node = prompt.get(nid)
        if depth > 200 or not isinstance(node, dict) or not isinstance(node.get("inputs"), dict):
            raise LookupError(nid)
        if depth > 0 and _changes_by_itself(node.get("class_type")):
            raise LookupError(nid)
        inputs = {}
        for name, value in sorted(node["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
                inputs[name] = ["link", describe(str(value[0]), depth + 1), value[1]]
            elif isinstance(value, str) and value.lower().endswith(_MODEL_SUFFIXES):
                inputs[name] = [value, _file_stats(value)]
            else:
                inputs[name] = value
        memo[nid] = [node.get("class_type"), inputs]
        return memo[nid]

    try:
        upstream = describe(str(node_id), 0)[1]
    except (LookupError, OSError, RecursionError):
        return None
    links = {k: v for k, v in upstream.items() if isinstance(v, list) and v[:1] == ["link"]}
    return json.dumps(links, sort_keys=True, default=repr)


def object_kind(model: Any, clip: Any) -> list[Any]:
    """What the loaded MODEL and CLIP are, cheaply (a guard next to the graph description)."""
    inner = getattr(model, "model", None)
    dm = getattr(inner, "diffusion_model", None)
    params = sum(p.numel() for p in dm.parameters()) if isinstance(dm, torch.nn.Module) else None
    encoder = getattr(clip, "cond_stage_model", None)
    return [type(inner).__name__, type(dm).__name__, params, type(encoder).__name__]


def make_key(prompt: Any, node_id: Any, model: Any, clip: Any, settings: dict[str, Any]) -> str | None:
    """The cache key of one Learn run, or None when the graph cannot be described (then nothing is cached)."""
    graph = graph_signature(prompt, node_id)
    if graph is None:
        return None
    text = json.dumps([graph, object_kind(model, clip), settings], sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def _nbytes(transport: Any) -> int:
    total = 0
    for site in transport.sites:
        unit = transport[site]
        for field in dataclasses.fields(unit):
            value = getattr(unit, field.name)
            if isinstance(value, torch.Tensor):
                total += value.nelement() * value.element_size()
    return total


def get(key: str | None) -> Entry | None:
    """The cached entry for ``key`` (and mark it recently used), or None."""
    if key is None:
        return None
    with _LOCK:
        entry = _ENTRIES.get(key)
        if entry is not None:
            _ENTRIES.move_to_end(key)
        return entry


def put(key: str | None, transport: Any, summary: str) -> None:
    """Keep a learned transport; drops the least recently used entries beyond the bounds."""
    if key is None:
        return
    entry = Entry(transport, summary, time.time(), _nbytes(transport))
    if entry.nbytes > MAX_BYTES:
        return
    with _LOCK:
        _ENTRIES[key] = entry
        _ENTRIES.move_to_end(key)
        while len(_ENTRIES) > MAX_ENTRIES or sum(e.nbytes for e in _ENTRIES.values()) > MAX_BYTES:
            _ENTRIES.popitem(last=False)


def clear() -> None:
    """Forget every cached transport."""
    with _LOCK:
        _ENTRIES.clear()
