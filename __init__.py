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

from .core._version import __version__

from .core import Steering, SteeringHandle, Transport, UnitMap, estimate, list_sites
from .hf_integration import (
    attach,
    disable_steering,
    enable_steering,
    fit_lm,
    fit_pipeline,
    from_comfy,
    steer,
    strength_grid,
    to_comfy,
)

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
