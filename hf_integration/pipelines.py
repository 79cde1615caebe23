"""Diffusers pipelines: fit transports from prompts (`fit_pipeline`), steer generation inside a window of
denoising steps (`attach_pipeline`, `steer_pipeline`, ``pipe(..., steering=...)``) and `strength_grid`.

A pipeline transport names sites with the component as prefix (``"unet.mid_block.resnets.0.norm1"``); steering
splits it per component and attaches the core hook engine to each component module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import re
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, Union

import torch

from ..core.hooks import SiteStrength, Steering, SteeringHandle, SteeringLike, as_steerings, attach
from ..core.transport import Transport
from .diffusion_presets import (
    FLUX_SINGLE_CONCAT,
    FLUX_SINGLE_TUPLE,
    denoiser_name,
    diffusers_version,
    flux_single_block_output,
    site_components,
)

logger = logging.getLogger(__name__)

Steps = Union[Literal["first", "all"], tuple[float, float]]
Window = tuple[float, float]


# Step windows ---------------------------------------------------------------------------------------------
def _check_window(window: Sequence[float] | None, name: str) -> Window | None:
    if window is None:
        return None
    try:
        start, end = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a pair (start, end) of fractions of the schedule, got {window!r}") from None
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(
            f"`{name}=({start}, {end})` must satisfy 0 <= start < end <= 1 (fractions of the schedule, 0 = first "
            "step); e.g. (0, 0.5) for the first half of the steps"
        )
    return start, end


def _in_window(window: Window | None, step: int, total: int) -> bool:
    """Step ``step`` of ``total`` is inside when ``start <= step / total < end``."""
    return window is None or window[0] <= step / max(total, 1) < window[1]


def _steps_window(steps: Steps) -> Window | None:
    if steps == "all":
        return None
    if steps == "first":
        return (0.0, 1e-9)  # only step 0: 0 / total < 1e-9 for any total
    if isinstance(steps, str):
        raise ValueError(
            f"Unknown `steps={steps!r}`; use 'first' (the paper's choice), 'all', or (start, end) fractions"
        )
    return _check_window(steps, "steps")


# Per-pipeline state: the __call__ wrapper and the step clock ----------------------------------------------
@dataclasses.dataclass
class _PipeState:
    base: type  # the pipeline's own class, restored when steering is disabled
    enabled: bool = False  # by enable_pipeline_steering
    clock_users: int = 0  # attached handles with a step window
    depth: int = 0  # nesting of pipe(...) calls
    step: int = 0  # index of the denoising step about to run


_STATE: weakref.WeakKeyDictionary[Any, _PipeState] = weakref.WeakKeyDictionary()
# pipeline -> its attached handles (fit_pipeline refuses to fit a steered pipeline)
_LIVE: weakref.WeakKeyDictionary[Any, weakref.WeakSet] = weakref.WeakKeyDictionary()
_STEERABLE: dict[type, type] = {}


def _steerable_call(self, *args: Any, steering: SteeringLike | None, steering_timesteps: Sequence[float] | None,
                    **kwargs: Any) -> Any:
    state = _STATE[self]
    if steering is None:
        if steering_timesteps is not None:
            raise ValueError("`steering_timesteps` was given without `steering=`; pass the transport(s) to steer with")
        if not state.clock_users:
            return state.base.__call__(self, *args, **kwargs)
    handle = attach_pipeline(self, steering, timesteps=steering_timesteps) if steering is not None else None
    try:
        if state.clock_users:
            kwargs = _with_step_callback(self, state, kwargs)
        state.depth += 1
        state.step = 0
        try:
            return state.base.__call__(self, *args, **kwargs)
        finally:
            state.depth -= 1
    finally:
        if handle is not None:
            handle.remove()


def _with_step_callback(pipe: Any, state: _PipeState, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Chain a ``callback_on_step_end`` that advances the step clock before the caller's own callback."""
    if "callback_on_step_end" not in inspect.signature(state.base.__call__).parameters:
        raise NotImplementedError(
            f"{state.base.__name__} has no `callback_on_step_end`, which a timestep window needs to count steps; "
            "steer without `timesteps`, or open an issue with a minimal example"
        )
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    user = kwargs.get("callback_on_step_end")
    kwargs = dict(kwargs)
    if isinstance(user, (PipelineCallback, MultiPipelineCallbacks)):
        kwargs["callback_on_step_end_tensor_inputs"] = user.tensor_inputs  # the pipeline reads it off the object

    def on_step_end(p: Any, i: int, t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        state.step = i + 1
        return user(p, i, t, callback_kwargs) if user is not None else {}

    kwargs["callback_on_step_end"] = on_step_end
    return kwargs


def _steerable_class(base: type) -> type:
    """A subclass of ``base`` with the same name whose ``__call__`` also takes ``steering``/``steering_timesteps``."""
    if base not in _STEERABLE:

        def __call__(self, *args: Any, steering: SteeringLike | None = None,
                     steering_timesteps: Sequence[float] | None = None, **kwargs: Any) -> Any:
            return _steerable_call(self, *args, steering=steering, steering_timesteps=steering_timesteps, **kwargs)

        sig = inspect.signature(base.__call__)
        params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
        params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
                   for n in ("steering", "steering_timesteps")]
        params += [p for p in sig.parameters.values() if p.kind == p.VAR_KEYWORD]
        __call__.__signature__ = sig.replace(parameters=params)
        __call__.__doc__ = (base.__call__.__doc__ or "") + _STEERING_DOC
        _STEERABLE[base] = type(base.__name__, (base,), {
            "__call__": __call__, "__module__": base.__module__, "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
        })
    return _STEERABLE[base]


_STEERING_DOC = """
        actsteer (added by `enable_steering`):
            steering (`Transport`, `Steering` or a list of them, *optional*): steer this call (see `actsteer.steer`).
            steering_timesteps (`tuple[float, float]`, *optional*): steer the denoiser's sites only at steps i of n
                with ``start <= i / n < end``; None = every step.
"""


def _install(pipe: Any) -> _PipeState:
    state = _STATE.get(pipe)
    if state is None:
        base = type(pipe)
        state = _STATE[pipe] = _PipeState(base=base)
        pipe.__class__ = _steerable_class(base)  # `pipe(...)` looks __call__ up on the class, not the instance
    return state


def _maybe_uninstall(pipe: Any) -> None:
    state = _STATE.get(pipe)
    if state is not None and not state.enabled and not state.clock_users:
        pipe.__class__ = state.base
        del _STATE[pipe]


def enable_pipeline_steering(pipe: Any) -> Any:
    """Let ``pipe(..., steering=..., steering_timesteps=(start, end))`` steer one call. Idempotent.

    Without ``steering=`` the pipeline behaves exactly as before. Undo with `disable_pipeline_steering`.

    Returns:
        ``pipe`` itself (its class is swapped for a subclass with the same name that adds the keyword).
    """
    site_components(pipe)  # NotImplementedError for pipelines without a unet/transformer
    _install(pipe).enabled = True
    return pipe


def disable_pipeline_steering(pipe: Any) -> Any:
    """Undo `enable_pipeline_steering`; the class is restored once no windowed steering is attached."""
    state = _STATE.get(pipe)
    if state is not None:
        state.enabled = False
        _maybe_uninstall(pipe)
    return pipe


def is_pipeline_steering_enabled(pipe: Any) -> bool:
    state = _STATE.get(pipe)
    return state is not None and state.enabled


# Steering -------------------------------------------------------------------------------------------------
def _split_sites(pipe: Any, transport: Transport) -> dict[str, Transport]:
    """``{component: transport with the component prefix stripped}``, components in first-site order."""
    components = site_components(pipe)
    groups: dict[str, dict[str, Any]] = {}
    for site, unit_map in transport.items():
        component, sep, rest = site.partition(".")
        if not sep or component not in components:
            naming = transport.model.get("naming")
            hint = (
                "; it uses ComfyUI names: translate it with "
                "actsteer.hf_integration.comfy_names.from_comfy(transport, arch)"
                if naming == "comfyui" else f"; site names must start with one of: {', '.join(components)}"
            )
            raise KeyError(f"Site {site!r} names no component of {type(pipe).__name__}{hint}")
        groups.setdefault(component, {})[rest] = unit_map
    _check_single_block_semantics(pipe, transport)
    return {c: transport.replace(maps) for c, maps in groups.items()}


def _check_single_block_semantics(pipe: Any, transport: Transport) -> None:
    """FLUX single blocks return a (text, image) tuple since diffusers 0.35, one [text; image] tensor before."""
    single = [s for s in transport if re.fullmatch(r"transformer\.single_transformer_blocks\.\d+(:\d+)?", s)]
    if not single:
        return
    installed = flux_single_block_output()
    tupled = [s for s in single if ":" in s]
    if (installed == FLUX_SINGLE_TUPLE) != bool(tupled):
        fitted = transport.model.get("diffusers_version", "another version")
        raise ValueError(
            f"Site {single[0]!r}: this transport was fitted with diffusers {fitted}, whose FLUX single blocks return "
            f"{FLUX_SINGLE_TUPLE if tupled else FLUX_SINGLE_CONCAT}, but the installed diffusers {diffusers_version()} "
            f"returns {installed}; refit the transport, or install the diffusers it was fitted with"
        )


def _component_strength(strength: SiteStrength, component: str) -> SiteStrength:
    if not isinstance(strength, Mapping):
        return strength
    prefix = component + "."
    out = {k[len(prefix):]: v for k, v in strength.items() if k.startswith(prefix)}
    if "*" in strength:
        out["*"] = strength["*"]
    return out


class PipelineSteeringHandle:
    """Live steering of a pipeline: one core `SteeringHandle` per component. ``remove()`` is idempotent.

    Attributes:
        timesteps: the window ``(start, end)`` in fractions of the schedule, or None for every step.
        active: read/write; False pauses steering without removing hooks.
        strength: read/write (one value, or a list with one per composed transport).
        calls: how often each site (with component prefix) was transported since attach.
    """

    def __init__(self, pipe: Any, steerings: list[Steering], window: Window | None) -> None:
        self._pipe_ref = weakref.ref(pipe)
        self._steerings = steerings
        self.timesteps = window
        self._denoiser = denoiser_name(pipe)
        self._parts: dict[str, tuple[SteeringHandle, list[int]]] = {}
        self._active = True
        self._window_hook: torch.utils.hooks.RemovableHandle | None = None
        self._uses_clock = False

    def _attach(self, pipe: Any) -> None:
        per_component: dict[str, list[tuple[int, Steering]]] = {}
        for i, st in enumerate(self._steerings):
            for component, sub in _split_sites(pipe, st.transport).items():
                strength = _component_strength(st.strength, component)
                per_component.setdefault(component, []).append((i, Steering(sub, strength)))
        components = site_components(pipe)
        try:
            for component, items in per_component.items():
                handle = attach(components[component], [s for _, s in items])
                self._parts[component] = (handle, [i for i, _ in items])
            if self.timesteps is not None and self._denoiser in self._parts:
                state = _install(pipe)
                state.clock_users += 1
                self._uses_clock = True
                self._window_hook = components[self._denoiser].register_forward_pre_hook(self._on_denoiser_call)
            _LIVE.setdefault(pipe, weakref.WeakSet()).add(self)
        except BaseException:
            self.remove()
            raise

    def _on_denoiser_call(self, module: torch.nn.Module, args: Any) -> None:
        pipe = self._pipe_ref()
        state = _STATE.get(pipe) if pipe is not None else None
        if state is None or state.depth == 0:
            raise RuntimeError(
                f"The {self._denoiser} of {type(pipe).__name__} ran outside a call of the steered pipeline while a "
                "timestep window is set; the window counts the denoising steps of that pipeline's own calls. Call "
                "the steered pipeline, or steer without `timesteps`"
            )
        total = getattr(pipe, "_num_timesteps", None)
        if not total:
            raise NotImplementedError(f"{type(pipe).__name__} does not record its number of steps (`_num_timesteps`)")
        handle = self._parts[self._denoiser][0]
        handle.active = self._active and _in_window(self.timesteps, state.step, total)

    # public state -------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        self._active = bool(value)
        for handle, _ in self._parts.values():
            handle.active = self._active

    @property
    def strength(self) -> SiteStrength | list[SiteStrength]:
        values = [s.strength for s in self._steerings]
        return values[0] if len(values) == 1 else values

    @strength.setter
    def strength(self, value: SiteStrength) -> None:
        self.set_strength(value)

    def set_strength(self, value: SiteStrength, *, index: int | None = None) -> None:
        """Set the strength of every composed transport, or only of ``self.transports[index]``."""
        targets = range(len(self._steerings)) if index is None else [index]
        for i in targets:
            self._steerings[i] = dataclasses.replace(self._steerings[i], strength=value)
        for component, (handle, indices) in self._parts.items():
            for j, i in enumerate(indices):
                if i in targets:
                    handle.set_strength(_component_strength(value, component), index=j)

    @property
    def transports(self) -> list[Transport]:
        return [s.transport for s in self._steerings]

    @property
    def calls(self) -> dict[str, int]:
        return {f"{c}.{site}": n for c, (handle, _) in self._parts.items() for site, n in handle.calls.items()}

    @property
    def is_attached(self) -> bool:
        return any(handle.is_attached for handle, _ in self._parts.values())

    def remove(self) -> None:
        """Remove every hook, restore the pipeline's class when nothing else needs it; safe to call twice."""
        if self._window_hook is not None:
            self._window_hook.remove()
            self._window_hook = None
        for handle, _ in reversed(list(self._parts.values())):
            handle.remove()
        pipe = self._pipe_ref()
        if pipe is None:
            return
        live = _LIVE.get(pipe)
        if live is not None:
            live.discard(self)
            if not len(live):
                del _LIVE[pipe]
        state = _STATE.get(pipe)
        if state is not None and self._uses_clock:
            state.clock_users -= 1
            self._uses_clock = False
            _maybe_uninstall(pipe)

    def __enter__(self) -> PipelineSteeringHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"PipelineSteeringHandle(components={list(self._parts)}, strength={self.strength!r}, "
            f"timesteps={self.timesteps!r}, attached={self.is_attached})"
        )


def attach_pipeline(
    pipe: Any, steering: SteeringLike, strength: SiteStrength = 1.0, *, timesteps: Sequence[float] | None = None
) -> PipelineSteeringHandle:
    """Steer ``pipe`` until ``handle.remove()``.

    Args:
        pipe: a diffusers pipeline with a ``unet`` or ``transformer`` (SDXL, FLUX and their img2img variants).
        steering: a `Transport`, a `Steering`, or a list of them (applied in order); sites carry component
            prefixes (``"unet."``, ``"transformer."``, ``"text_encoder."``).
        strength: strength for bare transports: 0 identity, 1 full transport, negative the reverse transport.
        timesteps: ``(start, end)`` fractions of the schedule (0 = first step): the denoiser's sites are steered at
            step ``i`` of ``n`` when ``start <= i / n < end``; None steers every step. Text-encoder sites run
            once per call, before the denoising loop, and are steered whatever the window.

    Returns:
        A `PipelineSteeringHandle`.

    Raises:
        KeyError / ValueError: when a site is missing or has the wrong width; nothing stays attached.
        RuntimeError: when a component is already steered (pass a list to compose instead).
        NotImplementedError: a window on a pipeline without ``callback_on_step_end`` (at its first call).

    With classifier-free guidance both halves of the batch (unconditional and conditional) are steered, as the
    ComfyUI nodes do, so the effect is not multiplied by the guidance scale. A window counts the steps of calls
    to ``pipe`` itself: another pipeline sharing the denoiser (``from_pipe``) raises while the window is set.
    """
    window = _check_window(timesteps, "timesteps")
    if window == (0.0, 1.0):
        window = None
    handle = PipelineSteeringHandle(pipe, as_steerings(steering, strength), window)
    handle._attach(pipe)
    return handle


@contextlib.contextmanager
def steer_pipeline(
    pipe: Any, steering: SteeringLike, strength: SiteStrength = 1.0, *, timesteps: Sequence[float] | None = None
) -> Iterator[PipelineSteeringHandle]:
    """Context manager form of `attach_pipeline`; hooks are removed on exit, also when the body raises.

    Example:
        >>> with steer_pipeline(pipe, transport, strength=0.8, timesteps=(0.0, 0.5)):  # doctest: +SKIP
        ...     image = pipe("a cat", num_inference_steps=4, guidance_scale=0.0).images[0]
    """
    handle = attach_pipeline(pipe, steering, strength, timesteps=timesteps)
    try:
        yield handle
    finally:
        handle.remove()
