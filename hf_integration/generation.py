"""``model.generate(**inputs, steering=...)`` for Hugging Face causal LMs (`enable_steering`).

`enable_steering` replaces ``generate`` on the model INSTANCE with a thin wrapper (the class is untouched;
`disable_steering` deletes the instance attribute). Without ``steering=`` the wrapper calls the original
``generate`` with exactly the same arguments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from ..core.hooks import Steering, SteeringHandle, SteeringLike, as_steerings, attach

_MARK = "_actsteer_original_generate"


def is_steering_enabled(model: Any) -> bool:
    return _MARK in getattr(model, "__dict__", {})


def enable_steering_lm(model: torch.nn.Module) -> torch.nn.Module:
    """Let ``model.generate`` take ``steering=`` (a Transport, a Steering, or a list). Idempotent.

    Example:
        >>> import actsteer
        >>> model = actsteer.enable_steering(model)  # doctest: +SKIP
        >>> model.generate(**inputs, steering=actsteer.Steering(transport, strength=0.8))  # doctest: +SKIP
    """
    if not hasattr(model, "generate"):
        raise TypeError(f"{type(model).__name__} has no generate(); enable_steering works on causal LMs and pipelines")
    if is_steering_enabled(model):
        return model
    original = model.generate
    setattr(model, _MARK, original)
    model.generate = functools.wraps(original)(functools.partial(_generate, model, original))
    return model


def disable_steering_lm(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `enable_steering`: ``model.generate`` is the class's method again."""
    if is_steering_enabled(model):
        del model.__dict__["generate"]
        del model.__dict__[_MARK]
    return model


def _prompt_length(args: tuple, kwargs: dict) -> int:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs")
    if ids is None and kwargs.get("inputs_embeds") is not None:
        return kwargs["inputs_embeds"].shape[1]
    if not isinstance(ids, torch.Tensor):
        raise ValueError("generate(..., steering=...) needs `input_ids` (or `inputs_embeds`) as a tensor")
    return ids.shape[1]


def _per_row(steerings: list[Steering]) -> bool:
    return any(isinstance(s.strength, torch.Tensor) and s.strength.dim() == 1 for s in steerings)


def _expand_rows(steerings: list[Steering], batch: int) -> list[Steering]:
    """Repeat per-row strengths for the rows generate() adds (beams, num_return_sequences)."""
    out = []
    for s in steerings:
        st = s.strength
        if isinstance(st, torch.Tensor) and st.dim() == 1 and st.shape[0] != batch:
            if batch % st.shape[0]:
                raise ValueError(f"{st.shape[0]} per-row strengths cannot be spread over a batch of {batch} rows")
            st = st.repeat_interleave(batch // st.shape[0])
            s = Steering(s.transport, st, s.apply_to)
        out.append(s)
    return out


def _past_length(ids: torch.Tensor | None, kwargs: dict) -> int:
    """How many tokens precede this forward's tokens (0 without a cache)."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and ids is not None:
        return mask.shape[1] - ids.shape[1]  # generate's 2-D mask spans cached + current tokens
    # transformers 5 passes the cache as `cache`; 4.x as `past_key_values`
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return 0


def _position_hook(handle: SteeringHandle, prompt_length: int, steerings: list[Steering]) -> Callable:
    state = {"expanded": False}

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        offset = _past_length(ids, kwargs)
        handle.set_positions(int(offset), prompt_length)
        if not state["expanded"] and ids is not None and _per_row(steerings):
            expanded = _expand_rows(steerings, ids.shape[0])
            for i, s in enumerate(expanded):
                if s is not steerings[i]:
                    handle.set_strength(s.strength, index=i)
            state["expanded"] = True

    return pre_hook


def _generate(model: torch.nn.Module, original: Callable, *args: Any, steering: SteeringLike | None = None, **kwargs: Any):
    if steering is None:
        return original(*args, **kwargs)
    steerings = as_steerings(steering)
    prompt_length = _prompt_length(args, kwargs)
    handle = attach(model, steerings)  # validates every site and width before touching the model
    try:
        pre = model.register_forward_pre_hook(_position_hook(handle, prompt_length, steerings), with_kwargs=True)
        try:
            return original(*args, **kwargs)
        finally:
            pre.remove()
    finally:
        handle.remove()
