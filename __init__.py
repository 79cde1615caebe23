"""actsteer: Activation Transport (AcT) steering for transformers, diffusers and ComfyUI.

The top level needs torch only; transformers, diffusers and ComfyUI are imported lazily.

Example:
    >>> import torch, actsteer
    >>> g = torch.Generator().manual_seed(0)
    >>> src, tgt = torch.randn(200, 8, generator=g), 1 + 2 * torch.randn(200, 8, generator=g)
    >>> m = actsteer.estimate(src, tgt, method="linear-act", support="all")
    >>> moved = m(src)
    >>> bool((moved.mean(0) - tgt.mean(0)).abs().max() < 1e-4)
    True
"""

from __future__ import annotations

from .core import __version__

from typing import Any

from .core import Steering, SteeringHandle, Transport, UnitMap, estimate, keep_context, list_sites

# Host-layer entry points, imported on first use so that `import actsteer.core` (and `import actsteer`) load no
# transformers/diffusers glue: `actsteer.attach` also dispatches pipelines, so it lives in hf_integration.
_LAZY = {
    **{name: ".hf_integration" for name in ("attach", "disable_steering", "enable_steering", "fit_lm", "fit_pipeline",
                                            "steer", "strength_grid")},
    **{name: ".archs" for name in ("from_comfy", "to_comfy")},
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'actsteer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "Steering",
    "SteeringHandle",
    "Transport",
    "UnitMap",
    "__version__",
    "attach",
    "disable_steering",
    "enable_steering",
    "estimate",
    "fit_lm",
    "fit_pipeline",
    "from_comfy",
    "keep_context",
    "list_sites",
    "steer",
    "strength_grid",
    "to_comfy",
]


# ComfyUI serves this folder to the browser: web/js/actsteer.js shows the Learn/Save result lines on the nodes and
# keeps AcT Load dropdowns in step with new files.
WEB_DIRECTORY = "./web"



async def comfy_entrypoint():
    """ComfyUI V3 entry point: ComfyUI calls it when this folder is in ``custom_nodes/``.

    Imported lazily so that ``import actsteer`` never needs ComfyUI.
    """
    from .comfy_nodes import comfy_entrypoint as _entrypoint

    return await _entrypoint()
