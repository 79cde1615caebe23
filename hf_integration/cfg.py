"""Where steering enters classifier-free guidance (CFG) in a diffusers pipeline (``cfg=``).

Under CFG a pipeline predicts each step twice, with the prompt (the conditional branch, ``c``) and with the negative
prompt (``""`` by default: the unconditional branch, ``u``), and denoises along ``u + g (c - u)``. A prompt's words
reach ``c`` only, so the guidance scale ``g`` multiplies their effect. Three placements of the steer:

- ``"conditional"`` (the default): the steer stands in for the prompt's words and enters the conditional branch
  only, so guidance amplifies it as it amplifies the prompt (weight ``g``). Rows ``n .. 2n-1`` of an SD/SDXL batch ``[uncond; cond]``;
  in FLUX's true CFG (``true_cfg_scale > 1`` with a negative prompt) the first transformer call of each step (the
  positive one; the second call of the same step is the negative one); and of each text encoder, its first call
  in a pipeline call (the prompt: later calls encode the negative prompt).
- ``"both"`` (the paper's reference code): every row and every call. Steering the unconditional branch alike
  subtracts most of the steer again in ``c - u``: to first order the steer reaches the guided output at weight 1
  while the prompt gets weight ``g``.
- ``"guidance-aware"``: every row at ``g`` times the strength (``g`` = the call's ``guidance_scale`` when the
  pipeline runs CFG, else 1): the strength a first-order picture says ``"both"`` needs to give the steer the
  prompt's weight. Per pipeline call, so request-scoped only (`steer_pipeline`, ``pipe(steering=)``), and only on
  pipelines that expose their guidance (``do_classifier_free_guidance``: SD, SDXL, SD3, ...; not FLUX's true CFG).

Without CFG (guidance <= 1, and guidance-distilled models such as SDXL-Lightning and FLUX.1-schnell at guidance 0)
there is one branch, and all placements steer the same rows at the same strength. Measured on the miniatures in
benchmarks/RESULTS.md, "Few-step miniature: guidance".
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..core import CFG_CHOICES, DEFAULT_CFG, Cfg, SteeringHandle, check_cfg, guidance_scaled

__all__ = ["CFG_CHOICES", "DEFAULT_CFG", "Cfg", "ConditionalPlacement", "GuidanceAwareStrength", "check_cfg",
           "check_guidance_aware"]

_NONE = torch.zeros(0, dtype=torch.long)


@dataclasses.dataclass
class _CallState:
    """Where this thread/task's pipeline call is: encoder calls so far, and the last denoiser call's step."""

    encoder_calls: dict[str, int] = dataclasses.field(default_factory=dict)
    denoised: bool = False
    schedule: Any = None  # the scheduler's timesteps tensor of the last denoiser call (a new one per pipeline call)
    step: Any = None  # (the scheduler's step index, the call's timestep) at that call


class ConditionalPlacement:
    """The per-call callbacks that keep one handle's steer in the conditional branch of a pipeline's CFG.

    Args:
        pipe: the diffusers pipeline.
        handle: the bound handle (its sites carry component prefixes).
        denoiser: the denoiser's component name (``"unet"``, ``"transformer"``).
        encoders: the text-encoder component names that hold sites of the handle.
    """

    def __init__(self, pipe: Any, handle: SteeringHandle, denoiser: str, encoders: Sequence[str]) -> None:
        self.pipe, self.handle, self.denoiser, self.encoders = pipe, handle, denoiser, tuple(encoders)
        self._state: contextvars.ContextVar[_CallState | None] = contextvars.ContextVar("actsteer_cfg", default=None)

    def state(self) -> _CallState:
        st = self._state.get()
        if st is None:
            st = _CallState()
            self._state.set(st)
        return st

    def install(self, components: dict[str, torch.nn.Module]) -> None:
        """Register the callbacks on the denoiser and the encoders (`SteeringHandle.on_call`)."""
        if any(s.startswith(self.denoiser + ".") for s in self.handle.sites):
            self.handle.on_call(components[self.denoiser], self.before_denoiser)
        for name in self.encoders:
            self.handle.on_call(components[name], self.before_encoder(name))

    def before_denoiser(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        under = self.denoiser + "."
        flag = getattr(type(self.pipe), "do_classifier_free_guidance", None)
        if flag is not None:  # SD/SDXL-style pipelines batch CFG as [uncond; cond]
            sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            rows = sample.shape[0] if isinstance(sample, torch.Tensor) and sample.dim() > 0 else 0
            if self.pipe.do_classifier_free_guidance and rows % 2 == 0 and rows > 0:
                self.handle.set_rows(torch.arange(rows // 2, rows), under=under)
            else:
                self.handle.set_rows(None, under=under)
            self.state().denoised = True
            return
        # FLUX's true CFG calls the transformer twice per step, the positive prompt first: a second call under the
        # same schedule (set_timesteps makes a new tensor per pipeline call), step index and timestep is the
        # negative one
        st = self.state()
        schedule = getattr(self.pipe.scheduler, "timesteps", None)
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        # the scheduler's step index (None before its first step) with the call's timestep (schedulers such as Heun
        # repeat timesteps; an index alone is None for the whole first step)
        step = (getattr(self.pipe.scheduler, "step_index", None),
                float(torch.as_tensor(timestep).reshape(-1)[0]) if timestep is not None else None)
        repeated = st.denoised and schedule is not None and schedule is st.schedule and step == st.step
        st.denoised, st.schedule, st.step = True, schedule, step
        self.handle.set_rows(_NONE if repeated else None, under=under)

    def before_encoder(self, name: str) -> Callable[[torch.nn.Module, tuple, dict], None]:
        def callback(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            st = self.state()
            if st.denoised:  # the denoiser ran since the last encoder call: a new pipeline call begins
                st.encoder_calls, st.denoised, st.schedule, st.step = {}, False, None, None
            count = st.encoder_calls.get(name, 0)
            st.encoder_calls[name] = count + 1
            self.handle.set_rows(None if count == 0 else _NONE, under=name + ".")  # the prompt, then negatives

        return callback


def check_guidance_aware(pipe: Any, scope: str) -> None:
    """Refuse ``cfg="guidance-aware"`` where it cannot follow each call's guidance, before anything is bound.

    Raises:
        ValueError: a model-wide handle (concurrent calls with other guidance scales would share one strength), or
            a pipeline that does not expose whether it runs CFG (FLUX's true CFG).
    """
    if scope == "model":
        raise ValueError(
            "cfg='guidance-aware' sets the strength per pipeline call from its guidance_scale, so it needs a "
            "request-scoped steer: use actsteer.steer(pipe, ...) or pipe(..., steering=..., steering_cfg=...), or "
            "cfg='both' / 'conditional' with attach"
        )
    if not isinstance(getattr(type(pipe), "do_classifier_free_guidance", None), property):
        raise ValueError(
            f"cfg='guidance-aware' reads the guidance scale of each call, which {type(pipe).__name__} does not expose "
            "(FLUX's true CFG is a local of its __call__); use cfg='conditional' to let true_cfg_scale amplify the "
            "steer, or 'both'"
        )


class GuidanceAwareStrength:
    """The per-call callbacks that set a request-scoped handle's strength to ``g`` x its strength, ``g`` the
    running pipeline call's guidance scale (1 without CFG); re-folds only when ``g`` changes."""

    def __init__(self, pipe: Any, handle: SteeringHandle) -> None:
        self.pipe, self.handle = pipe, handle
        strength = handle.strength
        self.base = list(strength) if len(handle.transports) > 1 else [strength]
        self.scale = 1.0

    def install(self, components: dict[str, torch.nn.Module], names: Sequence[str]) -> None:
        for name in names:
            self.handle.on_call(components[name], self.before_call)

    def guidance(self) -> float:
        if not getattr(self.pipe, "do_classifier_free_guidance", False):
            return 1.0
        return float(getattr(self.pipe, "guidance_scale", 1.0))

    def before_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        g = self.guidance()
        if g == self.scale:
            return
        for i, strength in enumerate(self.base):
            self.handle.set_strength(guidance_scaled(strength, g), index=i)
        self.scale = g
