"""Steering a ComfyUI MODEL: a cloned ModelPatcher carrying one keyed pair of wrappers, never an in-place edit.

How it works (COMFYUI_NOTES.md section 3):

- `apply_steering` clones the MODEL and registers, under the key ``"actsteer"``, an OUTER_SAMPLE and an
  APPLY_MODEL wrapper, both bound to one `SteeringPatch` that holds every `SteeringEntry` of the clone
  (transport, strength, sigma window). A second Apply node on that clone replaces the pair with one holding
  both entries: the engine steers a module through ONE handle per binding, so composition is a list.
- OUTER_SAMPLE (once per sampling run): bind the entries to the diffusion model as request-scoped steering
  (`actsteer.core.bind`: only calls made in this sampling run's thread are steered) with
  ``active=False``; the per-strength folding happens here, once. The handle is removed in ``finally`` (also on
  Cancel).
- APPLY_MODEL (every model call): read the call's sigma (only when some entry has a window: reading it syncs
  the GPU), switch each entry on or off for its window (`SteeringHandle.set_enabled`, no re-folding), set
  ``handle.active`` for the call, and reset it in ``finally``.
  Other users of the shared module (other threads, other clones) see it unchanged.
- A per-step transport (fitted with ``steps="each"`` / Learn's ``per_step``) becomes one entry per stage, each with its
  stage window in fractions of the schedule: such entries are switched by the call's step, located in the run's
  ``sample_sigmas`` with the one diffusion clock (`actsteer.core.locate`), as Learn locates the steps it records.
- Where the steer enters CFG (``SteeringEntry.cfg``, the Apply node's ``cfg_placement``): ``"conditional"`` (the
  default) only the rows the sampler flags as positive (``cond_or_uncond`` in each call's ``transformer_options``),
  so the CFG scale amplifies the steer as it amplifies the prompt; ``"both"`` (the paper's reference) steers every
  batch row, positive and negative; ``"guidance-aware"`` every row at CFG x strength (the guider's ``cfg``,
  read once per sampling run; 1 for guiders without one). Chained Apply nodes must agree on it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch

from ..core import (
    CFG_CHOICES,
    DEFAULT_CFG,
    Steering,
    SteeringHandle,
    Transport,
    Window,
    bind,
    check_cfg,
    in_window,
    locate,
    split_stages,
    steer,
)
from .checks import check_transport, to_comfy_names
from .presets import filter_sites

logger = logging.getLogger(__name__)

KEY = "actsteer"
_RUN_KEY = "actsteer_run"  # transformer_options entry holding the live `_Run` of a sampling run


@dataclasses.dataclass(frozen=True)
class SteeringEntry:
    """One Apply node: a transport, its strength, and the part of the schedule it is active in.

    The window is in sigmas (``sigma_end <= sigma <= sigma_start``), converted from
    ``start_percent``/``end_percent`` with the model's ``percent_to_sigma`` when the node runs; open ends
    (start 0, end 1) are ``inf`` and ``-inf``, and an entry open at both needs no sigma at all.
    """

    transport: Transport
    strength: float
    sigma_start: float = float("inf")
    sigma_end: float = float("-inf")
    cfg: str = DEFAULT_CFG
    stage: Window | None = None  # a per-step transport's stage: (start, end) fractions of the schedule

    def __deepcopy__(self, memo: dict) -> SteeringEntry:
        return self  # immutable; ModelPatcher.clone() deep-copies model_options, never copy tensors

    @property
    def windowed(self) -> bool:
        """Whether the entry is off for part of the schedule (then each model call's sigma must be read)."""
        return self.stage is not None or not (self.sigma_start == math.inf and self.sigma_end == -math.inf)

    def is_active(self, sigma: float | None, step: tuple[int, int] | None = None) -> bool:
        """Whether the entry steers at ``sigma`` (None: not read, allowed for an entry without a window), at step
        ``step = (i, n)`` of the run's schedule (None outside a sampling run: a stage entry is then off)."""
        if not self.windowed:
            return True
        if self.stage is not None and (step is None or not in_window(self.stage, *step)):
            return False
        return self.sigma_end <= sigma <= self.sigma_start


@dataclasses.dataclass
class RunLog:
    """What happened during the last sampling run of a `SteeringPatch` (for logs and tests).

    Attributes:
        calls: one ``(sigma, steered)`` pair per model call, in order; sigma is None when no entry has a
            window (it is not read then).
        site_calls: how many times each site was transported (``SteeringHandle.calls``).
        entries_on: per model call, the indices of the entries switched on (a per-step transport's stages are
            entries too).
    """

    calls: list[tuple[float | None, bool]] = dataclasses.field(default_factory=list)
    site_calls: dict[str, int] = dataclasses.field(default_factory=dict)
    entries_on: list[tuple[int, ...]] = dataclasses.field(default_factory=list)  # per model call: entries switched on


class _Run:
    """The live state of one sampling run: the handle, and which entries are on for the current call."""

    def __init__(self, model: torch.nn.Module, entries: list[SteeringEntry], guidance: float = 1.0) -> None:
        self.model = model
        self.entries = entries
        self.handle: SteeringHandle = bind(
            model, [Steering(e.transport, e.strength * _scale(e, guidance)) for e in entries])
        self.handle.active = False
        self.conditional = entries[0].cfg == "conditional"
        self.on = [True] * len(entries)
        self.windowed = any(e.windowed for e in entries)
        self.staged = any(e.stage is not None for e in entries)
        self.log = RunLog()

    def enter(self, sigma: float | None, step: tuple[int, int] | None = None) -> bool:
        """Switch entries for ``sigma`` (None: no entry has a window) and the call's ``step`` (None: no entry is a
        stage of a per-step transport); returns whether any entry steers this call."""
        for i, entry in enumerate(self.entries):
            on = entry.is_active(sigma, step)
            if on != self.on[i]:
                self.handle.set_enabled(i, on)
                self.on[i] = on
        steered = any(self.on)
        self.handle.active = steered
        self.log.calls.append((sigma, steered))
        self.log.entries_on.append(tuple(i for i, on in enumerate(self.on) if on))
        return steered


def _scale(entry: SteeringEntry, guidance: float) -> float:
    """The factor on an entry's strength: the CFG scale for ``"guidance-aware"`` (when CFG runs), else 1."""
    return guidance if entry.cfg == "guidance-aware" and guidance > 1.0 else 1.0


def positive_rows(args: tuple, to: dict) -> torch.Tensor | None:
    """The batch rows of an APPLY_MODEL call that the sampler flags as positive (``cond_or_uncond`` 0), or None
    when every row is (or the call has no flags: a call outside a sampler)."""
    flags = to.get("cond_or_uncond")
    x = args[0] if args else None
    if not flags or not isinstance(x, torch.Tensor) or all(f == 0 for f in flags):
        return None
    chunk = x.shape[0] // len(flags)
    rows = [torch.arange(j * chunk, (j + 1) * chunk) for j, flag in enumerate(flags) if flag == 0]
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)


def transformer_options_of(args: tuple, kwargs: dict) -> dict:
    """The ``transformer_options`` dict of an APPLY_MODEL call (positional or keyword)."""
    if isinstance(kwargs.get("transformer_options"), dict):
        return kwargs["transformer_options"]
    if len(args) > 5 and isinstance(args[5], dict):  # apply_model(x, t, c_concat, c_crossattn, control, transformer_options)
        return args[5]
    return {}


def _call_sigma(args: tuple, to: dict) -> float:
    sigmas = to.get("sigmas")
    if sigmas is None and len(args) > 1:
        sigmas = args[1]
    return float(torch.as_tensor(sigmas).reshape(-1)[0])


def call_step(sigma: float, to: dict) -> tuple[int, int] | None:
    """``(i, n)``: the call at ``sigma`` runs step ``i`` of the ``n``-step schedule of its sampling run (the run's
    ``sample_sigmas`` without the final 0; the one diffusion clock), or None outside a sampling run."""
    schedule = to.get("sample_sigmas")
    if schedule is None:
        return None
    schedule = torch.as_tensor(schedule)
    return locate(sigma, schedule[:-1] if schedule.numel() > 1 else schedule)


class SteeringPatch:
    """The steering of one cloned MODEL: its entries, plus the OUTER_SAMPLE and APPLY_MODEL wrappers."""

    def __init__(self, entries: list[SteeringEntry]) -> None:
        self.entries = tuple(entries)
        self.windowed = any(e.windowed for e in self.entries)
        self.last_run: RunLog | None = None

    def __deepcopy__(self, memo: dict) -> SteeringPatch:
        return self

    def outer_sample(self, executor, *args: Any, **kwargs: Any) -> Any:
        guider = executor.class_obj
        entries = [e for e in self.entries if e.strength != 0.0]
        if not entries:  # strength 0 everywhere: no hooks at all, bit-identical to the unpatched model
            self.last_run = RunLog()
            return executor(*args, **kwargs)
        model = guider.model_patcher.model.diffusion_model
        run = _Run(model, entries, float(getattr(guider, "cfg", 1.0) or 1.0))
        options = guider.model_options.setdefault("transformer_options", {})
        options[_RUN_KEY] = run
        try:
            return executor(*args, **kwargs)
        finally:
            run.handle.remove()
            options.pop(_RUN_KEY, None)
            run.log.site_calls = dict(run.handle.calls)
            self.last_run = run.log
            steered = sum(s for _, s in run.log.calls)
            logger.info(
                "actsteer: steered %d/%d model calls with %d transport(s) on %d layers",
                steered, len(run.log.calls), len(entries), len(run.handle.sites),
            )

    def apply_model(self, executor, *args: Any, **kwargs: Any) -> Any:
        to = transformer_options_of(args, kwargs)
        run = to.get(_RUN_KEY)
        model = executor.class_obj.diffusion_model
        model = getattr(model, "_orig_mod", model)  # TorchCompileModel before Apply swaps in torch.compile's wrapper
        if run is None or run.model is not model:
            sigma = _call_sigma(args, to) if self.windowed else None
            step = call_step(sigma, to) if sigma is not None else None
            return self._apply_model_alone(executor, model, sigma, step, *args, **kwargs)
        sigma = _call_sigma(args, to) if run.windowed else None
        run.enter(sigma, call_step(sigma, to) if run.staged else None)
        if run.conditional:
            run.handle.set_rows(positive_rows(args, to))
        try:
            return executor(*args, **kwargs)
        finally:
            run.handle.active = False
            if run.conditional:
                run.handle.set_rows(None)

    def _apply_model_alone(self, executor, model, sigma: float | None, step: tuple[int, int] | None, *args: Any,
                           **kwargs: Any) -> Any:
        """A model call outside a sampler run (no OUTER_SAMPLE): steer this one call."""
        entries = [e for e in self.entries if e.strength != 0.0 and e.is_active(sigma, step)]
        if not entries:
            return executor(*args, **kwargs)
        with steer(model, [Steering(e.transport, e.strength) for e in entries]) as handle:
            if entries[0].cfg == "conditional":
                handle.set_rows(positive_rows(args, transformer_options_of(args, kwargs)))
            return executor(*args, **kwargs)


def steering_patch(model) -> SteeringPatch | None:
    """The `SteeringPatch` of a ModelPatcher, or None when no AcT Apply node patched it."""
    from comfy.patcher_extension import WrappersMP

    for wrapper in model.get_wrappers(WrappersMP.OUTER_SAMPLE, KEY):
        patch = getattr(wrapper, "__self__", None)
        if isinstance(patch, SteeringPatch):
            return patch
    return None


def apply_steering(
    model,
    transport: Transport,
    *,
    strength: float = 1.0,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    layers: str = "",
    cfg: str = DEFAULT_CFG,
):
    """A clone of ``model`` that steers with ``transport``; ``model`` itself is never modified.

    Args:
        model: a ComfyUI MODEL (``comfy.model_patcher.ModelPatcher``).
        transport: the fitted `Transport` (ComfyUI or diffusers site names).
        strength: 0 identity, 1 full transport, negative = reverse (target -> source), above 1 extrapolation.
        start_percent, end_percent: the part of the sampling schedule to steer (0 = first step, 1 = last).
        layers: a regex; only the transport's sites whose name it matches (searched anywhere) are applied.
        cfg: where the steer enters CFG: ``"conditional"`` (the positive rows only; the default), ``"both"`` (every row) or
            ``"guidance-aware"`` (every row at the sampler's CFG x strength); see the module docstring.

    Returns:
        The cloned ModelPatcher. Steering already present on ``model`` (an earlier Apply node) is kept:
        both are applied, in node order, through one handle.

    Raises:
        ValueError: bad percents, a layer filter matching nothing, a transport that does not fit the model, or a
            ``cfg`` other than the one of the Apply node(s) already on ``model``.
    """
    cfg = check_cfg(cfg, "cfg_placement")
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(
            f"Need 0 <= start_percent <= end_percent <= 1, got start_percent={start_percent}, end_percent={end_percent}"
        )
    # (stage window or None, transport): one part for a plain transport, one per stage for a per-step one
    parts = [(None if w == "all" else w, to_comfy_names(model, part)) for w, part in split_stages(transport)]
    if layers.strip():
        kept = set(filter_sites(list(dict.fromkeys(s for _, p in parts for s in p.sites)), layers))
        parts = [(w, p.select([s for s in p.sites if s in kept])) for w, p in parts if any(s in kept for s in p.sites)]
    parts = [(w, part) for w, part in parts if len(part)] or parts[:1]  # e.g. text-encoder maps dropped in translation
    for _, part in parts:
        check_transport(model, part)
    sampling = model.get_model_object("model_sampling")
    # the schedule's ends are open: float noise in the first sigma must not drop the first step
    sigma_start = float("inf") if start_percent <= 0.0 else float(sampling.percent_to_sigma(start_percent))
    sigma_end = float("-inf") if end_percent >= 1.0 else float(sampling.percent_to_sigma(end_percent))
    entries = [SteeringEntry(part, float(strength), sigma_start, sigma_end, cfg, stage) for stage, part in parts]
    from comfy.patcher_extension import WrappersMP

    previous = steering_patch(model)
    if previous and previous.entries and previous.entries[0].cfg != cfg:
        raise ValueError(
            f"cfg_placement {cfg!r} differs from the {previous.entries[0].cfg!r} of the AcT Apply node before this one "
            f"on the same MODEL; chained Apply nodes share one placement, so set both to the same choice "
            f"({', '.join(CFG_CHOICES)})"
        )
    patch = SteeringPatch([*(previous.entries if previous else ()), *entries])
    patched = model.clone()
    patched.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, KEY)
    patched.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, KEY)
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, patch.outer_sample)
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, KEY, patch.apply_model)
    logger.debug("actsteer: %d transport(s) on %s", len(patch.entries), type(model.model).__name__)
    return patched

