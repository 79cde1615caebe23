"""``model.generate(**inputs, steering=...)`` for Hugging Face causal LMs (`enable_steering`).

`enable_steering` sets ``generate`` on the model INSTANCE to a thin wrapper (the class is untouched;
`disable_steering` deletes the instance attribute). Without ``steering=`` the wrapper calls the original
``generate`` with exactly the same arguments. With it, the call is steered request-scoped, as inside
`actsteer.steer` (per-row strengths spread over the rows ``generate`` adds for beams and ``num_return_sequences``):
only this call is steered, so concurrent ``generate`` calls on the same model in other threads or asyncio tasks each get
their own steering, or none. Copies and pickles of the model never carry the wrapper: a deep copy or an
unpickled model is plain (call `enable_steering` on it again).
"""

from __future__ import annotations

import functools
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ..core import SteeringHandle, SteeringLike, as_steerings, bind


class _SteerableGenerate:
    """The ``generate`` that `enable_steering` puts on a model instance: it also takes ``steering=``."""

    def __init__(self, model: torch.nn.Module, original: Callable | None) -> None:
        self._model = weakref.ref(model)
        self._original = original  # an instance-level generate that was there before, else None
        functools.update_wrapper(self, type(model).generate)

    def _plain(self, model: torch.nn.Module) -> Callable:
        return self._original if self._original is not None else types.MethodType(type(model).generate, model)

    def __call__(self, *args: Any, steering: SteeringLike | None = None, **kwargs: Any) -> Any:
        model = self._model()
        if model is None:
            raise RuntimeError("The model this generate() belonged to no longer exists")
        if steering is None:
            return self._plain(model)(*args, **kwargs)
        return _generate(model, self._plain(model), args, kwargs, steering)

    def __deepcopy__(self, memo: dict) -> Any:
        # a copy of the model is plain: its `generate` is its class's own method, bound to the copy
        copy = memo.get(id(self._model()))
        return types.MethodType(type(copy).generate, copy) if copy is not None else self

    def __reduce__(self) -> tuple:
        # pickled as the class's own bound method: no actsteer reference in the file
        return (getattr, (self._model(), "generate"))


def is_steering_enabled(model: Any) -> bool:
    return isinstance(getattr(model, "__dict__", {}).get("generate"), _SteerableGenerate)


def enable_steering_lm(model: torch.nn.Module) -> torch.nn.Module:
    """Let ``model.generate`` take ``steering=`` (a Transport, a Steering, or a list). Idempotent.

    Example:
        >>> import actsteer
        >>> model = actsteer.enable_steering(model)  # doctest: +SKIP
        >>> model.generate(**inputs, steering=actsteer.Steering(transport, strength=0.8))  # doctest: +SKIP
    """
    if not hasattr(model, "generate"):
        raise TypeError(f"{type(model).__name__} has no generate(); enable_steering works on causal LMs and pipelines")
    if not is_steering_enabled(model):
        model.generate = _SteerableGenerate(model, model.__dict__.get("generate"))
    return model


def disable_steering_lm(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `enable_steering`: ``model.generate`` is what it was before."""
    if is_steering_enabled(model):
        wrapper = model.__dict__.pop("generate")
        if wrapper._original is not None:
            model.generate = wrapper._original
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


def _position_callback(handle: SteeringHandle, prompt_length: int) -> Callable:
    """Before each forward of generate(): where the tokens of this forward sit (for ``apply_to``)."""

    def before_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        handle.set_positions(int(_past_length(ids, kwargs)), prompt_length)

    return before_forward


def _generate(model: torch.nn.Module, original: Callable, args: tuple, kwargs: dict, steering: SteeringLike) -> Any:
    steerings = as_steerings(steering)
    prompt_length = _prompt_length(args, kwargs)
    # request-scoped, like `steer`; per-row strengths spread over the rows generate() adds (beams,
    # num_return_sequences: k consecutive rows per input row) in the core, so nothing changes mid-call
    handle = bind(model, steerings, scope="request", rows="interleaved")  # validates every site and width first
    try:
        if any(s.apply_to != "all" for s in steerings):  # else nothing to do per forward
            handle.on_call(model, _position_callback(handle, prompt_length))
        return original(*args, **kwargs)
    finally:
        handle.remove()
