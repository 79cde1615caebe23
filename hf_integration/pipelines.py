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

from ..core.estimate import Support
from ..core.fit import ForwardContext, fit
from ..core.hooks import SiteStrength, Steering, SteeringHandle, SteeringLike, as_steerings, attach
from ..core.transport import Transport
from .diffusion_presets import (
    FLUX_SINGLE_CONCAT,
    FLUX_SINGLE_TUPLE,
    component_view,
    denoiser_name,
    diffusers_version,
    flux_single_block_output,
    pipeline_info,
    pipeline_sites,
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


# Fitting --------------------------------------------------------------------------------------------------
def fit_pipeline(
    pipe: Any,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    *,
    modules: str | Sequence[str] = "auto",
    method: str = "linear-act",
    steps: Steps = "first",
    num_inference_steps: int = 4,
    guidance_scale: float | None = None,
    support: Support = "observed",
    pooling: str = "mean",
    sequential: bool = True,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    description: str = "",
    estimate_options: dict[str, Any] | None = None,
    **call_kwargs: Any,
) -> Transport:
    """Fit a transport from source to target prompts on a diffusers pipeline (ACT_SPEC.md sections 5-6).

    Each prompt gives one response per site: the site's output in the chosen denoising steps, pooled per
    prompt (spatial mean for ``(B, C, H, W)``, token mean for ``(B, T, D)``, no padding mask, like the reference)
    and averaged over those steps. Under classifier-free guidance only the conditional half of the batch counts.

    Args:
        pipe: an SDXL- or FLUX-style pipeline (or an img2img variant: pass ``image=...`` in ``call_kwargs``).
        source_prompts, target_prompts: at least 2 each (e.g. plain captions vs the same in a style).
        modules: a preset (``"auto"``, ``"fast"``, ``"text_encoders"``, ``"norms"`` for SDXL, ``"blocks"`` for
            FLUX) or site names/patterns with component prefixes; see `pipeline_sites`.
        method, support, pooling, estimate_options: see `actsteer.estimate` and `actsteer.core.fit.fit`.
        steps: ``"first"`` (the highest-noise step, like the paper: one UNet call per batch), ``"all"`` (average
            over every step), or a window ``(start, end)`` in fractions of the schedule.
        num_inference_steps: length of the schedule the steps are taken from (default 4, like the distilled
            models of the paper); later steps are skipped once the window is done.
        guidance_scale: None keeps the pipeline's default; 0 for guidance-distilled models.
        sequential: causal estimation in execution order (default). With several steps per site it re-runs the
            prompts once per site (``fit(one_pass=False)``: exact, but about (L+1)/2 pipeline runs for L sites).
        batch_size: prompts per pipeline call; None = all at once (one pass for ``steps="first"``).
        seed: source prompt ``j`` and target prompt ``j`` start from the noise of ``seed + j`` (paired noise).
        **call_kwargs: passed to ``pipe(...)`` (``height``, ``width``, ``max_sequence_length``, ``image``, ...).

    Returns:
        A `Transport` whose sites carry component prefixes, in execution order. ``model`` holds the pipeline
        and component classes, layout and ``diffusers_version``; ``extra["diffusion"]`` the steps, guidance and
        sizes used; ``extra["fit"]`` the cost (pipeline calls, denoiser calls).

    Raises:
        ValueError: an unknown preset or ``steps``, a pattern that matches nothing, fewer than 2 prompts a side.
        RuntimeError: the pipeline is being steered, or a site never ran (e.g. a VAE site: latents are returned).

    Example:
        >>> source = ["a cat", "a dog on grass", "a red car"]  # doctest: +SKIP
        >>> target = [f"{p}, watercolor painting" for p in source]  # doctest: +SKIP
        >>> transport = fit_pipeline(pipe, source, target, guidance_scale=0.0)  # doctest: +SKIP
        >>> with steer_pipeline(pipe, transport, strength=1.0):  # doctest: +SKIP
        ...     image = pipe("a horse", guidance_scale=0.0, num_inference_steps=4).images[0]
    """
    window = _steps_window(steps)
    if "num_images_per_prompt" in call_kwargs or "output_type" in call_kwargs:
        raise ValueError("`num_images_per_prompt` and `output_type` are set by fit_pipeline; remove them")
    view = component_view(pipe)
    sites = pipeline_sites(pipe, view, modules)
    if len(_LIVE.get(pipe, ())):
        raise RuntimeError("The pipeline is being steered; remove its steering before fitting a new transport")
    n_active = sum(_in_window(window, i, num_inference_steps) for i in range(num_inference_steps))
    # core.fit fits sequentially inside one pass only when every site runs once per pass
    one_pass = not (sequential and n_active > 1)
    if not one_pass:
        logger.info("actsteer: %d denoising steps per prompt: sequential fit in one pass per site", n_active)
    denoiser = denoiser_name(pipe)
    encoders = [c for c in site_components(pipe) if c != denoiser]
    cost = {"pipeline_calls": 0, "denoiser_calls": 0}
    kwargs = dict(call_kwargs, num_inference_steps=num_inference_steps, output_type="latent")
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale

    def run(items: Sequence[tuple[int, str]], ctx: ForwardContext) -> None:
        n = len(items)
        clock = {"step": 0, "encoder_calls": dict.fromkeys(encoders, 0)}

        def on_step_end(p: Any, i: int, t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            clock["step"] = i + 1
            total = p._num_timesteps
            if not any(_in_window(window, j, total) for j in range(i + 1, total)):
                p._interrupt = True  # nothing left to record: skip the remaining steps
            return {}

        def on_denoiser(module: torch.nn.Module, args: Any, kw: dict[str, Any]) -> None:
            sample = args[0] if args else kw.get("sample", kw.get("hidden_states"))
            rows = sample.shape[0]
            if rows not in (n, 2 * n):
                raise RuntimeError(
                    f"The {denoiser} got a batch of {rows} rows for {n} prompts; expected {n} or {2 * n}"
                )
            ctx.rows = torch.arange(n, 2 * n) if rows == 2 * n else None  # CFG batches are [uncond, cond]
            ctx.active = _in_window(window, clock["step"], pipe._num_timesteps)
            cost["denoiser_calls"] += 1

        def on_encoder(name: str):
            def hook(module: torch.nn.Module, args: Any) -> None:
                ctx.rows = None
                ctx.active = clock["encoder_calls"][name] == 0  # later calls encode negative prompts
                clock["encoder_calls"][name] += 1

            return hook

        components = site_components(pipe)
        handles = [components[denoiser].register_forward_pre_hook(on_denoiser, with_kwargs=True)]
        handles += [components[c].register_forward_pre_hook(on_encoder(c)) for c in encoders]
        generators = [torch.Generator("cpu").manual_seed(seed + j) for j, _ in items]
        cost["pipeline_calls"] += 1
        try:
            pipe([p for _, p in items], generator=generators, callback_on_step_end=on_step_end, **kwargs)
        finally:
            for h in reversed(handles):
                h.remove()
            pipe._interrupt = False

    training = {m: m.training for m in view.modules()}
    try:
        transport = fit(
            view, sites, list(enumerate(source_prompts)), list(enumerate(target_prompts)), run=run, method=method,
            pooling=pooling, support=support, sequential=sequential, batch_size=batch_size, one_pass=one_pass,
            progress=progress,
            model_info=pipeline_info(pipe), description=description, estimate_options=estimate_options,
        )
    finally:
        for module, was_training in training.items():
            module.training = was_training
    extra = dict(transport.extra)
    extra["fit"] = {**extra.get("fit", {}), **cost}
    extra["diffusion"] = {
        "steps": steps if isinstance(steps, str) else list(window),
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "cfg_rows": "conditional",
        "seed": seed,
        "call_kwargs": {k: v for k, v in call_kwargs.items() if isinstance(v, (int, float, str, bool))},
    }
    return transport.replace(extra=extra)


# Strength grid --------------------------------------------------------------------------------------------
def _label_font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable since Pillow 10.1
    except TypeError:
        return ImageFont.load_default()


def strength_grid(
    pipe: Any,
    prompt: str | Sequence[str],
    transport: Transport | Steering | Sequence[Transport | Steering],
    *,
    strengths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    seed: int = 0,
    timesteps: Sequence[float] | None = None,
    label: bool = True,
    **call_kwargs: Any,
) -> Any:
    """One image per strength from the same seed, side by side under ``strength=...`` labels; a row per prompt.

    Artists judge steering by eye: strength 0 (the unsteered image, generated without hooks) next to
    increasing strengths shows what the transport does and where it starts to break the image.

    Args:
        pipe: the pipeline (``output_type`` and ``generator`` are set here).
        prompt: one prompt, or several (one row each).
        transport: a `Transport`, a `Steering` or a list of them; every composed transport gets the column's
            strength (negative = the reverse direction).
        strengths: one column each, left to right.
        seed: the generator seed of every image.
        timesteps: the step window (see `attach_pipeline`).
        label: draw the labels (a white strip above each row).
        **call_kwargs: passed to ``pipe(...)`` (``num_inference_steps``, ``guidance_scale``, ``height``, ...).

    Returns:
        A ``PIL.Image.Image``; ``image.info["strengths"]`` lists the strengths, left to right.

    Example:
        >>> grid = strength_grid(pipe, "a cat", transport, strengths=[0, 0.5, 1], seed=0)  # doctest: +SKIP
        >>> grid.save("watercolor.png")  # doctest: +SKIP
    """
    from PIL import Image, ImageDraw

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not len(strengths):
        raise ValueError("`prompt` and `strengths` must not be empty")
    rows = []
    for text in prompts:
        row = []
        for s in strengths:
            kwargs = dict(call_kwargs, output_type="pil", generator=torch.Generator("cpu").manual_seed(seed))
            if float(s) == 0.0:
                row.append(pipe(text, **kwargs).images[0])
                continue
            steerings = [dataclasses.replace(st, strength=float(s)) for st in as_steerings(transport)]
            with steer_pipeline(pipe, steerings, timesteps=timesteps):
                row.append(pipe(text, **kwargs).images[0])
        rows.append(row)
    w, h = rows[0][0].size
    font = _label_font(max(10, h // 24))
    pad = font.size + 4 if label and hasattr(font, "size") else (14 if label else 0)
    grid = Image.new("RGB", (w * len(strengths), (h + pad) * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (c * w, r * (h + pad) + pad))
            if label:
                text = f"strength={float(strengths[c]):g}"
                if draw.textlength(text, font=font) > w - 4:  # narrow tiles: the number alone
                    text = f"{float(strengths[c]):g}"
                draw.text((c * w + 2, r * (h + pad) + 1), text, fill="black", font=font)
    grid.info["strengths"] = [float(s) for s in strengths]
    return grid
