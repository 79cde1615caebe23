"""Steering diffusers pipelines: `steer_pipeline` (request-scoped), `attach_pipeline` (model-wide) and
``pipe(..., steering=...)`` (`enable_pipeline_steering`), with a window of the denoising schedule.

A pipeline transport names sites with the component as prefix (``"unet.mid_block.resnets.0.norm1"``). One core
`SteeringHandle` steers all components at once, through a `ModuleDict` view of them (the same view fitting uses).
A step window is a per-call callback on the denoiser: it reads the call's ``timestep``, finds its place in the
scheduler's full schedule (`denoiser_step`, the clock fitting uses too), and pauses the denoiser's sites outside the
window for that call only; text-encoder sites are not windowed. A per-step transport (``fit_pipeline(steps="each")``)
is bound as one composed entry per stage, and the same callback switches on only the stage whose window holds the
call's step (`SteeringHandle.set_entries_off`, this call only).
"""

from __future__ import annotations

import contextlib
import copyreg
import inspect
import logging
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..core import (
    SiteStrength,
    Steps,
    SteeringHandle,
    SteeringLike,
    Transport,
    Window,
    as_steerings,
    bind,
    check_steps,
    expand_stages,
    in_window,
    locate,
    naming_of,
    steering_of,
)
from ..archs.flux import FLUX_SINGLE_CONCAT, FLUX_SINGLE_TUPLE, diffusers_version, flux_single_block_output
from .cfg import DEFAULT_CFG, Cfg, ConditionalPlacement, GuidanceAwareStrength, check_cfg, check_guidance_aware
from .diffusion_presets import component_view, denoiser_name, site_components

logger = logging.getLogger(__name__)



# pipe(..., steering=...) ----------------------------------------------------------------------------------
_STEERABLE: dict[type, type] = {}


def _base_class(pipe: Any) -> type:
    cls = type(pipe)
    return cls.__mro__[1] if cls in _STEERABLE.values() else cls


def _steerable_call(self, *args: Any, steering: SteeringLike | None, steering_steps: Steps | None,
                    steering_cfg: Cfg | None = None, **kwargs: Any) -> Any:
    base = _base_class(self)
    if steering is None:
        for name, value in (("steering_steps", steering_steps), ("steering_cfg", steering_cfg)):
            if value is not None:
                raise ValueError(f"`{name}` was given without `steering=`; pass the transport(s) to steer with")
        return base.__call__(self, *args, **kwargs)
    with steer_pipeline(self, steering, steps=steering_steps, cfg=steering_cfg):
        return base.__call__(self, *args, **kwargs)


def _reduce_as_base(self, protocol: int) -> Any:
    # copies and pickles of an enabled pipeline are plain pipelines of the original class: the standard state,
    # rebuilt by the standard library's `copyreg._reconstructor` (``object.__new__(base)``; pickle refuses
    # ``__newobj__`` for another class). The object itself is left alone: other threads may be calling it.
    _, _, *rest = object.__reduce_ex__(self, max(protocol, 2))
    return (copyreg._reconstructor, (_base_class(self), object, None), *rest)


def _steerable_class(base: type) -> type:
    """A subclass of ``base`` with the same name whose ``__call__`` also takes ``steering``/``steering_steps``."""
    if base not in _STEERABLE:

        def __call__(self, *args: Any, steering: SteeringLike | None = None, steering_steps: Steps | None = None,
                     steering_cfg: Cfg | None = None, **kwargs: Any) -> Any:
            return _steerable_call(self, *args, steering=steering, steering_steps=steering_steps,
                                   steering_cfg=steering_cfg, **kwargs)

        sig = inspect.signature(base.__call__)
        params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
        params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
                   for n in ("steering", "steering_steps", "steering_cfg")]
        params += [p for p in sig.parameters.values() if p.kind == p.VAR_KEYWORD]
        __call__.__signature__ = sig.replace(parameters=params)
        __call__.__doc__ = (base.__call__.__doc__ or "") + _STEERING_DOC
        _STEERABLE[base] = type(base.__name__, (base,), {
            "__call__": __call__, "__reduce_ex__": _reduce_as_base, "__module__": base.__module__,
            "__qualname__": base.__qualname__, "__doc__": base.__doc__,
        })
    return _STEERABLE[base]


_STEERING_DOC = """
        actsteer (added by `enable_steering`):
            steering (`Transport`, `Steering` or a list of them, *optional*): steer this call (see `actsteer.steer`).
            steering_steps (`tuple[float, float]`, *optional*): steer the denoiser's sites only at steps i of n
                of the full schedule with ``start <= i / n < end``; None = every step (`actsteer.core.steps`).
            steering_cfg (`str`, *optional*): where the steer enters classifier-free guidance: ``"both"`` (None, the
                default) both branches, ``"conditional"`` the prompt's branch only, ``"guidance-aware"`` both at
                guidance_scale x strength (`actsteer.hf_integration.cfg`).
"""


def enable_pipeline_steering(pipe: Any) -> Any:
    """Let ``pipe(..., steering=..., steering_steps=(start, end), steering_cfg=...)`` steer one call. Idempotent.

    Without ``steering=`` the pipeline behaves exactly as before. Undo with `disable_pipeline_steering`.
    Deep copies and pickles of the pipeline are plain pipelines of its own class.

    Returns:
        ``pipe`` itself (its class is swapped for a subclass with the same name that adds the keyword).
    """
    site_components(pipe)  # NotImplementedError for pipelines without a unet/transformer
    if not is_pipeline_steering_enabled(pipe):
        pipe.__class__ = _steerable_class(type(pipe))  # `pipe(...)` looks __call__ up on the class
    return pipe


def disable_pipeline_steering(pipe: Any) -> Any:
    """Undo `enable_pipeline_steering`: the pipeline's class is its own again."""
    if is_pipeline_steering_enabled(pipe):
        pipe.__class__ = _base_class(pipe)
    return pipe


def is_pipeline_steering_enabled(pipe: Any) -> bool:
    return type(pipe) in _STEERABLE.values()


# Steering -------------------------------------------------------------------------------------------------
def _check_names(pipe: Any, transport: Transport) -> None:
    """Every site starts with a component of the pipeline, and FLUX single blocks match the installed diffusers."""
    components = site_components(pipe)
    for site in transport:
        component, sep, _ = site.partition(".")
        if not sep or component not in components:
            hint = (
                "; it uses ComfyUI names: translate it with actsteer.from_comfy(transport, arch)"
                if naming_of(transport) == "comfyui"
                else f"; site names must start with one of: {', '.join(components)}"
            )
            raise KeyError(f"Site {site[:200]!r} names no component of {type(pipe).__name__}{hint}")
    _check_single_block_semantics(pipe, transport)


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


def denoiser_step(pipe: Any, args: tuple, kwargs: dict) -> tuple[int, int]:
    """``(i, n)``: the denoiser call with these arguments runs step ``i`` of the ``n``-step schedule of ``pipe``'s
    scheduler (`actsteer.core.steps.locate`; the one clock of fitting and steering).

    UNets get the scheduler's timestep itself; FLUX-style transformers get it divided by 1000; the nearest entry
    of ``scheduler.timesteps`` under either scale is the step.

    Raises:
        NotImplementedError: the scheduler has no ``timesteps`` schedule, or the call no ``timestep``.
    """
    schedule = getattr(pipe.scheduler, "timesteps", None)
    if not isinstance(schedule, torch.Tensor) or schedule.numel() == 0:
        raise NotImplementedError(
            f"{type(pipe.scheduler).__name__} exposes no `timesteps` schedule, which a step window needs; steer "
            "without `steps`, or open an issue with a minimal example"
        )
    timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if timestep is None:
        raise NotImplementedError("The denoiser was called without a `timestep`; steer without `steps`")
    return locate(timestep, schedule, divisors=(1.0, 1000.0))


_MAX_FRAMES = 64  # a pipeline's __call__ is a few frames above its denoiser's hooks (no_grad, hooks, _call_impl)


def running_pipeline(denoiser: torch.nn.Module, name: str, default: Any) -> Any:
    """The pipeline whose call is running ``denoiser`` now (the nearest caller frame of a pipeline ``__call__``
    whose ``self.<name>`` is this module), else ``default`` (the denoiser called directly).

    Pipelines that share their components and each have their own scheduler (the way to run calls at the same
    time) run the same denoiser module: a step window must be located in the schedule of the call that runs it,
    not in that of the pipeline passed to `steer`/`attach`. Called once per denoising step.
    """
    frame = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            break
        code = frame.f_code
        if code.co_name == "__call__" and code.co_varnames[:1] == ("self",):
            caller = frame.f_locals.get("self")
            if getattr(caller, name, None) is denoiser and hasattr(caller, "scheduler"):
                return caller
        frame = frame.f_back
    return default


def _window_callback(pipe: Any, handle: SteeringHandle, window: Window | str, denoiser: str,
                     stages: list[Window | str] | None = None) -> Callable:
    """Before each denoiser call: pause the denoiser's sites outside the call's ``window``, and switch off the
    entries (stages of per-step transports) whose own window does not hold this step; for this call only."""
    under = denoiser + "."

    def before_denoiser(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        running = running_pipeline(module, denoiser, pipe)
        i, n = denoiser_step(running, args, kwargs)
        if window != "all":
            handle.set_active(in_window(window, i, n), under=under)  # this call only
        if stages is not None:
            handle.set_entries_off(frozenset(e for e, w in enumerate(stages) if not in_window(w, i, n)))

    return before_denoiser


def _pipeline_handle(pipe: Any, steering: SteeringLike, strength: SiteStrength, steps: Steps | None,
                     scope: str, cfg: Cfg | None) -> tuple[SteeringHandle, Callable]:
    window = check_steps(steps, first=False)
    cfg = check_cfg(cfg)
    if cfg == "guidance-aware":
        check_guidance_aware(pipe, scope)
    steerings, stages = expand_stages(as_steerings(steering, strength))  # per-step transports: one entry per stage
    staged = any(w != "all" for w in stages)
    denoiser = denoiser_name(pipe)
    for st, w in zip(steerings, stages):
        _check_names(pipe, st.transport)
        outside = [s for s in st.transport if not s.startswith(denoiser + ".")]
        if w != "all" and outside:
            raise ValueError(
                f"Site {outside[0][:200]!r} has a per-step map, but it runs outside the {denoiser} (once per call, "
                f"not once per step): per-step maps apply to the {denoiser}'s sites only; fit again with "
                "fit_pipeline(steps='each')"
            )
    view = component_view(pipe)

    def setup(handle: SteeringHandle) -> None:
        if (window != "all" or staged) and any(s.startswith(denoiser + ".") for s in handle.sites):
            handle.on_call(getattr(pipe, denoiser),
                           _window_callback(pipe, handle, window, denoiser, stages if staged else None))
        if cfg == "conditional":
            components = site_components(pipe)
            encoders = [c for c in components if c != denoiser and any(s.startswith(c + ".") for s in handle.sites)]
            ConditionalPlacement(pipe, handle, denoiser, encoders).install(components)
        elif cfg == "guidance-aware":
            components = site_components(pipe)
            names = [c for c in components if any(s.startswith(c + ".") for s in handle.sites)]
            GuidanceAwareStrength(pipe, handle).install(components, names)

    return bind(view, steerings, scope=scope), setup


def attach_pipeline(
    pipe: Any, steering: SteeringLike, strength: SiteStrength = 1.0, *, steps: Steps | None = "all",
    cfg: Cfg | None = DEFAULT_CFG,
) -> SteeringHandle:
    """Steer EVERY call of ``pipe`` (model-wide: all threads) until ``handle.remove()``.

    Args:
        pipe: a diffusers pipeline with a ``unet`` or ``transformer`` (SDXL, FLUX and their img2img variants).
        steering: a `Transport`, a `Steering`, or a list of them (applied in order); sites carry component
            prefixes (``"unet."``, ``"transformer."``, ``"text_encoder."``).
        strength: strength for bare transports: 0 identity, 1 full transport, negative the reverse transport.
        steps: ``(start, end)`` fractions of the scheduler's full schedule (0 = first step): the denoiser's
            sites are steered at step ``i`` of ``n`` when ``start <= i / n < end`` (img2img at strength 0.5 runs
            steps n/2..n; `actsteer.core.steps`); ``"all"`` (or None) steers every step. The window is per call:
            concurrent calls never move each other's, and each is located in the schedule of the pipeline call
            that runs the denoiser (pipelines sharing ``pipe``'s components, each with its own scheduler, are
            steered too, each in its own schedule). Text-encoder sites run once per call, before the denoising
            loop, and are steered whatever the window.
        cfg: where the steer enters classifier-free guidance: ``"conditional"`` (the default) steers the prompt's
            branch only (the conditional half of the batch, the prompt's text encoding), so guidance amplifies the
            steer as it amplifies the prompt; ``"both"`` (the paper's reference) steers both branches alike, so the
            steer reaches the guided output at weight ~1 while the prompt gets the guidance scale;
            ``"guidance-aware"`` (`steer_pipeline` only) steers both at guidance_scale x strength. All the same
            without guidance. See `actsteer.hf_integration.cfg`.

    Returns:
        One `SteeringHandle` over all components (site names keep their component prefix).

    Raises:
        KeyError / ValueError: when a site is missing or has the wrong width; nothing stays attached.
        RuntimeError: when a component is already steered model-wide (pass a list to compose instead).

    """
    handle, setup = _pipeline_handle(pipe, steering, strength, steps, "model", cfg)
    try:
        setup(handle)
    except BaseException:
        handle.remove()
        raise
    return handle


@contextlib.contextmanager
def steer_pipeline(
    pipe: Any, steering: SteeringLike, strength: SiteStrength = 1.0, *, steps: Steps | None = "all",
    cfg: Cfg | None = DEFAULT_CFG,
) -> Iterator[SteeringHandle]:
    """Steer the calls of ``pipe`` made inside the ``with`` block, in this thread or asyncio task only.

    Arguments as `attach_pipeline`; hooks are removed on exit, also when the body raises.

    Example:
        >>> with steer_pipeline(pipe, transport, strength=0.8, steps=(0.0, 0.5)):  # doctest: +SKIP
        ...     image = pipe("a cat", num_inference_steps=4, guidance_scale=0.0).images[0]
    """
    handle, setup = _pipeline_handle(pipe, steering, strength, steps, "request", cfg)
    try:
        setup(handle)
        yield handle
    except BaseException:
        handle.remove()
        raise
    handle.close_request()  # warns where steering was lost (calls in other threads/tasks)


def is_pipeline_steered(pipe: Any) -> bool:
    """True when a call of ``pipe`` made here would be steered (model-wide, or by this thread/task)."""
    return bool(steering_of(component_view(pipe)))
