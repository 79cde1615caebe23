"""actsteer.hf_integration: transformers and diffusers integration.

Nothing here imports transformers or diffusers at import time; they are loaded on first use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..core import SiteStrength, SteeringHandle, SteeringLike, attach as _attach_module, steer as _steer_module
from .generation import disable_steering_lm, enable_steering_lm
from .lm import fit_lm
from .pipeline_fit import fit_pipeline, strength_grid
from .pipelines import attach_pipeline
from .presets import LM_PRESETS, lm_sites

__all__ = [
    "LM_PRESETS",
    "attach",
    "disable_steering",
    "enable_steering",
    "fit_lm",
    "fit_pipeline",
    "is_pipeline",
    "lm_sites",
    "steer",
    "strength_grid",
]


def is_pipeline(obj: Any) -> bool:
    """True for diffusers pipelines (objects with ``components`` that are not torch modules)."""
    return not isinstance(obj, torch.nn.Module) and hasattr(obj, "components")


def enable_steering(model_or_pipe: Any) -> Any:
    """Let ``model.generate(..., steering=...)`` (transformers) or ``pipe(..., steering=...)`` (diffusers) work.

    Idempotent and reversible (`disable_steering`); without ``steering=`` calls behave exactly as before.
    Returns its argument.
    """
    if is_pipeline(model_or_pipe):
        from .pipelines import enable_pipeline_steering

        return enable_pipeline_steering(model_or_pipe)
    return enable_steering_lm(model_or_pipe)


def disable_steering(model_or_pipe: Any) -> Any:
    """Undo `enable_steering`."""
    if is_pipeline(model_or_pipe):
        from .pipelines import disable_pipeline_steering

        return disable_pipeline_steering(model_or_pipe)
    return disable_steering_lm(model_or_pipe)


def attach(model: Any, transport: SteeringLike, strength: SiteStrength = 1.0, **options: Any) -> SteeringHandle:
    """Steer EVERY call of a torch module or diffusers pipeline, in every thread, until ``handle.remove()``.

    Model-wide and long-lived (notebooks, a process that owns the model); to steer one request of a shared model
    use `steer`. See `actsteer.core.attach`. Pipelines accept ``steps=(start, end)``, a window in
    fractions of the schedule (0 = first step; `actsteer.core.steps`).
    """
    if is_pipeline(model):
        return attach_pipeline(model, transport, strength, **options)
    if options:
        raise TypeError(f"attach() got unexpected options {sorted(options)} for a {type(model).__name__}")
    return _attach_module(model, transport, strength)


@contextlib.contextmanager
def steer(
    model: Any, transport: SteeringLike, strength: SiteStrength = 1.0, **options: Any
) -> Iterator[Any]:
    """Steer the calls of a torch module or diffusers pipeline made inside the ``with`` block, in this thread or
    asyncio task only (request-scoped: concurrent calls elsewhere on the same object are not affected).

    Pipelines accept ``steps=(start, end)``, a window in fractions of the schedule (0 = first step;
    `actsteer.core.steps`).

    Example:
        >>> import torch, actsteer
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3))
        >>> t = actsteer.Transport({"0": actsteer.UnitMap(torch.ones(3), torch.ones(3))})
        >>> x = torch.zeros(1, 3)
        >>> with actsteer.steer(model, t, strength=0.5):
        ...     y = model(x)
        >>> torch.allclose(y, model(x) + 0.5)
        True
    """
    if is_pipeline(model):
        from .pipelines import steer_pipeline

        with steer_pipeline(model, transport, strength, **options) as handle:
            yield handle
        return
    if options:
        raise TypeError(f"steer() got unexpected options {sorted(options)} for a {type(model).__name__}")
    with _steer_module(model, transport, strength) as handle:
        yield handle
