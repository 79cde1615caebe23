"""The diffusion clock: where a denoiser call is in its run's schedule, and step windows (the ``steps`` argument).

Fitting and steering use this one clock, in every host: a denoiser call's noise level (the ``timestep`` diffusers
passes, the sigma ComfyUI passes) is located in the FULL schedule of its run (``scheduler.timesteps``, ComfyUI's
``sample_sigmas``), so "step i of n" means the same whether the run starts at the first step (text-to-image) or
later (img2img at strength 0.5 runs steps n/2 .. n-1 of n).

A step window, everywhere in Python (``steps=``; ``pipe(..., steering_steps=...)``):

- ``"all"``: every step (None means the same);
- ``(start, end)``: fractions of the schedule: step ``i`` of ``n`` is inside when ``start <= i / n < end``;
- ``"first"``: the first step the run makes, its highest-noise step (the paper's choice for fitting; for fitting
  only: to steer the start of the schedule, pass a window such as ``(0, 0.25)``);
- ``"each"`` (`fit_pipeline` only, its default for the denoiser's sites): one map per step, each fitted on that
  step's responses: a per-step transport (below), steered stage by stage on this same clock.

ComfyUI's nodes take ``start_percent``/``end_percent`` instead, in ComfyUI's own convention (``percent_to_sigma``),
as ComfyUI's core nodes do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Union

import torch

Steps = Union[Literal["first", "all"], tuple[float, float]]
Window = tuple[float, float]


def check_steps(steps: Any, *, name: str = "steps", first: bool = True) -> Literal["first", "all"] | Window:
    """``steps`` normalised: ``"all"``, ``"first"`` or a ``(start, end)`` pair of floats.

    Args:
        steps: ``"all"`` (or None), ``"first"``, or ``(start, end)`` fractions of the schedule.
        name: the argument's name, for messages.
        first: whether ``"first"`` is accepted (fitting; steering takes windows).

    Raises:
        ValueError: an unknown name, a pair that is not ``0 <= start < end <= 1``, or ``"first"`` where it is not
            accepted.

    Example:
        >>> check_steps(None), check_steps("first"), check_steps([0, 0.5]), check_steps((0.0, 1.0))
        ('all', 'first', (0.0, 0.5), 'all')
    """
    if steps is None or steps == "all":
        return "all"
    if steps == "first":
        if not first:
            raise ValueError(
                f"`{name}='first'` is for fitting (which step's activations to record); to steer only the start of "
                f"the schedule pass a window, e.g. {name}=(0, 0.25)"
            )
        return "first"
    if isinstance(steps, str):
        choices = "'first' (the paper's choice), 'all', " if first else "'all' "
        raise ValueError(f"Unknown `{name}={steps!r}`; use {choices}or (start, end) fractions of the schedule")
    try:
        start, end = (float(v) for v in steps)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a pair (start, end) of fractions of the schedule, got {steps!r}") from None
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(
            f"`{name}=({start}, {end})` must satisfy 0 <= start < end <= 1 (fractions of the schedule, 0 = first "
            "step); e.g. (0, 0.5) for the first half of the steps"
        )
    return "all" if (start, end) == (0.0, 1.0) else (start, end)


def in_window(window: Literal["all"] | Window, i: int, n: int) -> bool:
    """Step ``i`` of an ``n``-step schedule is inside a window when ``start <= i / n < end`` (``"all"``: always)."""
    return window == "all" or window[0] <= i / max(n, 1) < window[1]


_HOST_SCHEDULE: list[Any] = [None]  # (the last schedule tensor, its float64 CPU copy)


def _host_schedule(schedule: torch.Tensor) -> torch.Tensor:
    """A float64 CPU copy of ``schedule``, made once per schedule (not at every denoiser call)."""
    last = _HOST_SCHEDULE[0]
    if last is None or last[0] is not schedule or last[1].shape != schedule.shape:
        last = _HOST_SCHEDULE[0] = (schedule, schedule.detach().double().cpu())
    return last[1]


def locate(value: Any, schedule: torch.Tensor, *, divisors: Sequence[float] = (1.0,)) -> tuple[int, int]:
    """``(i, n)``: ``value`` (a denoiser call's timestep or sigma) is entry ``i`` of the ``n``-entry ``schedule``.

    The nearest entry, under whichever of ``divisors`` brings the schedule closest to the value (FLUX-style
    transformers get diffusers' timesteps divided by 1000). Repeated calls of one step (e.g. true CFG) give the same
    ``i``; for a tensor value, its first element counts.

    Example:
        >>> locate(750.0, torch.tensor([999.0, 749.0, 499.0, 249.0]))
        (1, 4)
        >>> locate(torch.tensor([0.5]), torch.tensor([1000.0, 750.0, 500.0, 250.0]), divisors=(1.0, 1000.0))
        (2, 4)
    """
    t = float(torch.as_tensor(value).reshape(-1)[0])
    ts = _host_schedule(schedule)
    gaps = torch.stack([(ts / d - t).abs() for d in divisors])
    scale = int(gaps.min(dim=1).values.argmin())
    return int(gaps[scale].argmin()), ts.numel()


class StepClock:
    """The clock of ONE run (a pipeline call, a sampling run) for a step window: which denoiser calls are inside,
    and when no step that is left can be.

    Args:
        steps: the window (see the module docstring; ``"first"`` is the first step this run makes).

    Example:
        >>> clock = StepClock((0.5, 1.0))
        >>> [clock.inside(i, 4) for i in (2, 3)], clock.done()  # an img2img run at strength 0.5: steps 2, 3 of 4
        ([True, True], True)
        >>> first = StepClock("first")
        >>> [first.inside(i, 4) for i in (2, 2, 3)]  # both calls of the first step run (e.g. true CFG)
        [True, True, False]
    """

    def __init__(self, steps: Steps | None = "all") -> None:
        self.window = check_steps(steps)
        self.first: int | None = None  # the first step this run made
        self.last: tuple[int, int] | None = None  # the last step located: (i, n)

    def inside(self, i: int, n: int) -> bool:
        """Whether step ``i`` of ``n`` (a denoiser call of this run) is inside the window."""
        if self.first is None:
            self.first = i
        self.last = (i, n)
        if self.window == "first":
            return i == self.first
        return in_window(self.window, i, n)

    def done(self) -> bool:
        """True when no step after the last one located is inside the window (the run may stop early)."""
        if self.last is None or self.window == "all":
            return False
        if self.window == "first":
            return True
        i, n = self.last
        return not any(in_window(self.window, j, n) for j in range(i + 1, n))

    @staticmethod
    def count(steps: Steps | None, n: int) -> int:
        """How many steps of an ``n``-step schedule a window holds at most (``"first"``: 1)."""
        window = check_steps(steps)
        return 1 if window == "first" else sum(in_window(window, i, n) for i in range(n))


# Per-step transports ----------------------------------------------------------------------------------------
# A transport fitted with ``steps="each"`` holds one map per denoising step for the denoiser's sites: site
# ``"unet.x.norm1@2"`` is the map of stage 2, applied in stage 2's window (``extra["stages"][2]``, fractions of the
# schedule like a step window); sites without the mark (e.g. text encoders, which run once per call) apply at every
# step. Hosts with a denoising schedule (diffusers, ComfyUI) split such a transport into one plain transport per
# stage (`split_stages`) and switch each on at its steps only; other hosts refuse it (`refuse_stages`).
STAGE_MARK = "@"
STAGES_KEY = "stages"


def stage_of(site: str) -> tuple[str, int | None]:
    """``("unet.x", 2)`` for ``"unet.x@2"``; ``(site, None)`` for a site without a stage mark.

    Example:
        >>> stage_of("unet.mid_block.resnets.0.norm1@3"), stage_of("text_encoder.final_layer_norm")
        (('unet.mid_block.resnets.0.norm1', 3), ('text_encoder.final_layer_norm', None))
    """
    name, mark, k = site.rpartition(STAGE_MARK)
    if mark and k.isdigit() and name:
        return name, int(k)
    return site, None


def stage_windows(transport: Any) -> list[Window]:
    """The stage windows of a per-step transport (``extra["stages"]``), or ``[]`` for a plain one.

    Raises:
        ValueError: the windows are not a list of ``(start, end)`` pairs, in order and not overlapping, or a site
            names a stage that has no window (a damaged file).
    """
    raw = transport.extra.get(STAGES_KEY) if isinstance(transport.extra, dict) else None
    marked = [(site, k) for site in transport for _, k in [stage_of(site)] if k is not None]
    if raw is None:
        if marked:
            raise ValueError(
                f"site {marked[0][0]!r} is marked for stage {marked[0][1]} but the transport has no "
                f"extra[{STAGES_KEY!r}] windows; fit it again with steps='each'"
            )
        return []
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"extra[{STAGES_KEY!r}] must be a non-empty list of [start, end] windows, got {raw!r:.80}")
    windows: list[Window] = []
    for w in raw:
        window = check_steps(w, name=STAGES_KEY, first=False)
        window = (0.0, 1.0) if window == "all" else window
        if windows and window[0] < windows[-1][1]:
            raise ValueError(f"extra[{STAGES_KEY!r}]: the windows must be in order and not overlap, got {raw!r:.120}")
        windows.append(window)
    for site, k in marked:
        if k >= len(windows):
            raise ValueError(f"site {site!r} names stage {k}, but the transport has {len(windows)} stage windows")
    return windows


def split_stages(transport: Any) -> list[tuple[Window | Literal["all"], Any]]:
    """A transport as ``[(window, plain transport), ...]``: the unmarked sites at ``"all"`` steps (first, when there
    are any), then one transport per stage with the mark taken off its site names. A plain transport gives
    ``[("all", transport)]``.

    Example:
        >>> import torch, actsteer
        >>> m = actsteer.UnitMap(torch.ones(2), torch.ones(2))
        >>> t = actsteer.Transport({"te": m, "unet.a@0": m, "unet.a@1": m}, extra={"stages": [[0, 0.5], [0.5, 1]]})
        >>> [(w, list(part)) for w, part in split_stages(t)]
        [('all', ['te']), ((0.0, 0.5), ['unet.a']), ((0.5, 1.0), ['unet.a'])]
    """
    windows = stage_windows(transport)
    if not windows:
        return [("all", transport)]
    extra = {k: v for k, v in transport.extra.items() if k != STAGES_KEY}
    parts: list[tuple[Window | Literal["all"], Any]] = []
    plain = {s: m for s, m in transport.items() if stage_of(s)[1] is None}
    if plain:
        parts.append(("all", transport.replace(plain, extra=extra)))
    for k, window in enumerate(windows):
        maps = {stage_of(s)[0]: m for s, m in transport.items() if stage_of(s)[1] == k}
        if maps:
            parts.append((window, transport.replace(maps, extra={**extra, "stage": k})))
    return parts


def join_stages(shared: Any | None, stages: Sequence[tuple[Window, Any]]) -> Any:
    """One per-step transport from the maps that apply at every step (``shared``, may be None) and one transport
    per stage window (in order); the metadata is the first stage's, with ``extra["stages"]`` added and the fitting
    cost in ``extra["fit"]`` summed over the stages."""
    if not stages:
        raise ValueError("join_stages needs at least one stage")
    maps: dict[str, Any] = dict(shared.items()) if shared is not None else {}
    for k, (_, part) in enumerate(stages):
        maps.update({f"{site}{STAGE_MARK}{k}": m for site, m in part.items()})
    first = stages[0][1]
    extra = {**first.extra, STAGES_KEY: [list(w) for w, _ in stages]}
    extra.pop("stage", None)
    cost = {k: sum(part.extra.get("fit", {}).get(k, 0) for _, part in stages) for k in _FIT_COUNTS}
    if isinstance(extra.get("fit"), dict):  # what fitting cost: the sum over the stages
        extra["fit"] = {**extra["fit"], **{k: v for k, v in cost.items() if k in extra["fit"]}}
    return first.replace(maps, extra=extra)


_FIT_COUNTS = ("forward_calls", "forward_equivalents", "pipeline_calls", "denoiser_calls")


def refuse_stages(transport: Any, where: str = "this model") -> None:
    """Refuse a per-step transport where no denoising schedule is known (a module steered directly, a language
    model, vLLM).

    Raises:
        ValueError: saying what the transport is and where it can be used.
    """
    if stage_windows(transport):
        raise ValueError(
            f"This transport holds one map per denoising step (fitted with steps='each' on a diffusion pipeline) and "
            f"{where} cannot tell which step a call runs: steer the whole diffusers pipeline with it "
            "(actsteer.steer(pipe, transport)), or a ComfyUI MODEL with the Apply node"
        )


def describe_size(transport: Any) -> str:
    """``"33 layers"``, or ``"33 layers x 4 steps"`` for a per-step transport (what nodes and listings show).

    Example:
        >>> import torch, actsteer
        >>> m = actsteer.UnitMap(torch.ones(2), torch.ones(2))
        >>> describe_size(actsteer.Transport({"a@0": m, "a@1": m, "b@0": m, "b@1": m}, extra={"stages": [[0, .5], [.5, 1]]}))
        '2 layers x 2 steps'
    """
    layers = len(dict.fromkeys(stage_of(site)[0] for site in transport))
    stages = len(stage_windows(transport))
    return f"{layers} layers" + (f" x {stages} steps" if stages else "")
