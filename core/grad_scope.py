"""Autograd inside hosts that run without it: `grad_enabled`, what LinEAS trains through (`actsteer.core.lineas`).

diffusers pipelines call their components under ``torch.no_grad()`` and ComfyUI runs every node under
``torch.inference_mode()``, so the tensors it makes there (a module's inputs, and the weights it loads) are inference
tensors, which autograd cannot save for a backward pass. `grad_enabled` turns autograd on where the model runs and
hands it ordinary copies of such tensors, without changing anything that outlives the block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .sites import parse_site


@contextlib.contextmanager
def grad_enabled(model: torch.nn.Module, sites: Sequence[str]) -> Iterator[None]:
    """Record autograd graphs inside ``model`` for the forward calls made in the block, whatever the host does.

    - Forward pre-hooks on ``model`` and on its children that hold ``sites`` (the components a pipeline calls
      directly) leave inference mode and turn autograd on for the call (restored after it, also when it raises);
      inference-tensor arguments are cloned into ordinary tensors where they enter.
    - Every parameter stops requiring grad (restored on exit): only the steering parameters are trained, and no
      ``.grad`` ever lands on the model.
    - Modules whose weights are inference tensors (loaded by ComfyUI) use ordinary copies of them during their
      forward calls: the copies are made once per block and dropped on exit (about the model's size in memory
      while LinEAS trains; nothing is copied for models loaded outside inference mode).

    Every hook is removed and every flag restored on exit.
    """
    names = {parse_site(site)[0].split(".")[0] for site in sites}
    entries = [model] + [m for n, m in model.named_children() if n in names]
    modes: list[tuple[bool, Any]] = []
    copies: dict[int, torch.Tensor] = {}
    swapped: list[list[tuple[dict, str, torch.Tensor]]] = []

    def enter(module, args, kwargs):
        cm = torch.inference_mode(False) if torch.is_inference_mode_enabled() else None
        if cm is not None:
            cm.__enter__()
        modes.append((torch.is_grad_enabled(), cm))
        torch.set_grad_enabled(True)
        if _holds_inference((args, kwargs)):
            return _ordinary(args), _ordinary(kwargs)
        return None

    def leave(module, args, output):
        grad, cm = modes.pop()
        torch.set_grad_enabled(grad)
        if cm is not None:
            cm.__exit__(None, None, None)

    def swap_in(module, args):
        saved = []
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None and tensor.is_inference():
                    copy = copies.get(id(tensor))
                    if copy is None:
                        with torch.inference_mode(False):
                            copy = tensor.clone()
                        if isinstance(tensor, torch.nn.Parameter):
                            copy = torch.nn.Parameter(copy, requires_grad=False)
                        copies[id(tensor)] = copy
                    saved.append((table, name, tensor))
                    table[name] = copy
        swapped.append(saved)

    def swap_out(module, args, output):
        for table, name, tensor in swapped.pop():
            table[name] = tensor

    # (inference-tensor weights keep their flag: they are used through copies that do not require grad)
    frozen = [p for p in model.parameters() if p.requires_grad and not p.is_inference()]
    handles = []
    try:
        for p in frozen:
            p.requires_grad_(False)
        for m in entries:
            handles.append(m.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(m.register_forward_hook(leave, always_call=True))
        for m in model.modules():
            if any(t is not None and t.is_inference() for t in (*m._parameters.values(), *m._buffers.values())):
                handles.append(m.register_forward_pre_hook(swap_in))
                handles.append(m.register_forward_hook(swap_out, always_call=True))
        with torch.enable_grad():
            yield
    finally:
        for h in reversed(handles):
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        copies.clear()


def _holds_inference(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_inference()
    if isinstance(value, dict):
        return any(_holds_inference(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_inference(v) for v in value)
    return False


def _ordinary(value: Any) -> Any:
    """``value`` with every inference tensor (also inside dicts, lists and tuples) replaced by an ordinary clone."""
    if isinstance(value, torch.Tensor):
        if not value.is_inference():
            return value
        with torch.inference_mode(False):
            return value.clone()
    if isinstance(value, dict):
        return type(value)((k, _ordinary(v)) for k, v in value.items()) if type(value) is dict else value
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_ordinary(v) for v in value)
    return value
