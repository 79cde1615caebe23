"""Learning a transport inside ComfyUI: encode prompts, sample through ComfyUI's sampler, fit with `core.fit`.

Each item is one (prompt, sample) pair: ``samples_per_prompt`` seeds per prompt (seed, seed + 1, ...; the
same noise for every prompt, so source and target differ by their prompts only). All items of a fit batch
are sampled together in ONE sampler call (latent batch = items, one conditioning row per item); an
APPLY_MODEL wrapper on a clone of the MODEL tells the recording hooks, per model call, which rows are the
positive CFG branch (``ForwardContext.rows``) and whether the call's step is in the pooled window
(``ForwardContext.active``), and stops the sampler once the last pooled step ran: later steps cannot change
what was recorded. Pooling is the token / spatial mean, averaged over the pooled steps.

Cost (model calls, each on a batch of all items, x2 under CFG):
- ``sequential`` (the paper's causal fit, ACT_SPEC.md section 5), pooling the first step only, one batch:
  ONE model call in total; every hook fits its map on the spot and transports the source rows onward.
- ``sequential`` with ``batch_size`` < items: per batch one call for recording, then per further site one
  call that stops right after that site (about ``batches * (1 + L/2)`` calls for L sites).
- ``sequential`` pooling several steps (``collect_steps > 1``): a site runs once per step, so it cannot be
  fitted inside one call; per batch one recording call, then one full call per further site (``fit(one_pass=False)``).
- ``at-once``: ``batches * collect_steps`` calls; sites are fitted independently on unsteered activations.
- ``per_step`` (the default; with ``collect_steps == 1`` and maps fitted from recorded activations, i.e. not LinEAS):
  one fit per step of the schedule (step k's responses along the unsteered run, which stops after step k), joined
  into one per-step transport (`actsteer.core.join_stages`): ``steps`` times the cost above.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Literal

import torch

from ..core import (
    FIT_METHODS,
    ForwardContext,
    canonical_method,
    describe_size,
    fit,
    join_stages,
    lineas_config,
    locate,
    method_defaults,
    model_record,
)
from .checks import diffusion_model
from .patching import KEY, transformer_options_of
from ..archs.detect import family, module_arch

logger = logging.getLogger(__name__)

FitMode = Literal["sequential", "at-once"]
FIT_MODES: tuple[str, ...] = ("sequential", "at-once")
SAMPLER, SCHEDULER = "euler", "simple"  # only the first steps are pooled: any first-order sampler gives the same


@dataclasses.dataclass(frozen=True)
class Item:
    """One input of the fit: a prompt and which of its samples (seed offset) it is."""

    prompt: str
    sample: int


@dataclasses.dataclass(frozen=True)
class CollectSettings:
    """How activations are collected (stored in the transport's metadata under ``extra["comfy"]``)."""

    steps: int = 4
    seed: int = 0
    cfg: float = 1.0
    width: int = 1024
    height: int = 1024
    samples_per_prompt: int = 1
    collect_steps: int = 1
    negative_prompt: str = ""
    per_step: bool = True  # one map per step of the schedule (a per-step transport), each fitted at its step


@dataclasses.dataclass(frozen=True)
class Timing:
    """Where a Learn run spent its time, in seconds (wall clock).

    Attributes:
        encode: encoding the prompts with the CLIP.
        sample: inside ComfyUI's sampler (model loading and the model calls; in the one-call sequential fit the
            maps are also fitted inside that call, by the recording hooks).
        fit: the rest: fitting outside the sampler and bookkeeping.
        model_calls: sampler runs (each on a batch of prompts).
    """

    encode: float
    sample: float
    fit: float
    model_calls: int

    def line(self) -> str:
        """``"encode 1.2 s · sample 30.4 s (1 model call) · fit 0.3 s"``."""
        calls = f"{self.model_calls} model call{'s' if self.model_calls != 1 else ''}"
        return f"encode {self.encode:.1f} s · sample {self.sample:.1f} s ({calls}) · fit {self.fit:.1f} s"


class _StopSampling(Exception):
    """Raised from the collection wrapper after the last pooled step: the rest of the schedule is not needed."""


def parse_prompts(text: str, what: str) -> list[str]:
    """One prompt per non-empty line; raises a ValueError naming the input (``<what>_prompts``) when fewer than 2 remain.

    Example:
        >>> parse_prompts("a cat\\n\\n a dog ", "source")
        ['a cat', 'a dog']
    """
    prompts = [line.strip() for line in str(text).splitlines() if line.strip()]
    if len(prompts) < 2:
        raise ValueError(
            f"Need at least 2 {what} prompts in {what}_prompts (one per line) to estimate a distribution, got "
            f"{len(prompts)}"
        )
    return prompts


class _Collector:
    """The APPLY_MODEL wrapper of the collection clone: sets ``ctx.rows``/``ctx.active`` for each model call."""

    def __init__(self, collect_steps: int, progress) -> None:
        self.first = 0  # record the steps first .. collect_steps - 1
        self.collect_steps = collect_steps
        self.progress = progress
        self.ctx: ForwardContext | None = None

    def __deepcopy__(self, memo: dict) -> _Collector:
        return self

    def __call__(self, executor, *args: Any, **kwargs: Any) -> Any:
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
        to = transformer_options_of(args, kwargs)
        ctx = self.ctx
        schedule = torch.as_tensor(to["sample_sigmas"])
        step, _ = locate(to["sigmas"], schedule[:-1])  # the one diffusion clock: this call's place in the schedule
        flags = list(to.get("cond_or_uncond", [0]))
        chunk = args[0].shape[0] // max(len(flags), 1)
        positive = [j for j, flag in enumerate(flags) if flag == 0]
        record = ctx is not None and self.first <= step < self.collect_steps and len(positive) == 1
        if ctx is not None:  # the recording hooks ignore every call not flagged here (uncond-only, later steps)
            ctx.active = record
            ctx.rows = torch.arange(positive[0] * chunk, (positive[0] + 1) * chunk) if record else None
        try:
            out = executor(*args, **kwargs)
        finally:
            if record:
                ctx.active, ctx.rows = False, None
                self.progress.update(1)
        if record and step >= self.collect_steps - 1:
            raise _StopSampling
        return out


def _batched_conditioning(encoded: list[list]) -> list:
    """Stack single-prompt conditionings ``[[cond (1, T, C), {...}]]`` into one batch, row i = prompt i."""
    conds = [e[0][0] for e in encoded]
    lengths = sorted({c.shape[1] for c in conds})
    if len(lengths) > 1:
        raise ValueError(
            f"The prompts encode to different token lengths ({', '.join(map(str, lengths))}), so they cannot share "
            "one batch; shorten the long prompts, or set batch_size to 1"
        )
    extras: dict[str, Any] = {}
    for key, value in encoded[0][0][1].items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == 1:
            extras[key] = torch.cat([e[0][1][key] for e in encoded])
        else:
            extras[key] = value
    return [[torch.cat(conds), extras]]


def _model_info(model, dm: torch.nn.Module) -> dict[str, Any]:
    """Metadata saved with the transport; ``naming``/``arch``/``unet_config`` let `comfy_names.from_comfy`
    translate it to diffusers names."""
    arch = module_arch(dm)
    info = model_record(
        model.model, naming="comfyui", diffusion_model=type(dm).__name__, family=family(arch),
        latent_channels=model.model.latent_format.latent_channels,
    )
    if arch:
        info["arch"] = arch
    config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    layout = {k: config[k] for k in _LAYOUT_KEYS if k in config}
    if arch == "sdxl" and layout:
        info["unet_config"] = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in layout.items()}
    return info


_LAYOUT_KEYS = ("num_res_blocks", "channel_mult", "transformer_depth", "transformer_depth_output",
                "transformer_depth_middle", "model_channels", "context_dim")


def learn(
    model,
    clip,
    source: list[str],
    target: list[str],
    *,
    sites: list[str],
    method: str = "linear-act",
    support: str | None = None,
    fit_mode: str = "sequential",
    batch_size: int = 0,
    settings: CollectSettings = CollectSettings(),
    options: dict[str, Any] | None = None,
) -> tuple[Any, Timing]:
    """Fit a transport from source prompts to target prompts by sampling ``model`` through ComfyUI.

    Args:
        model: a ComfyUI MODEL; it is cloned, never modified (AcT steering already on it is dropped for the fit).
        clip: the CLIP used to encode the prompts (``CLIPTextEncode``).
        source, target: prompts (at least 2 each).
        sites: site names of ``model.model.diffusion_model`` (see `presets.preset_sites`).
        method, support: passed to `actsteer.estimate`; ``support`` None (or ``"method default"``) takes the
            method's own (`actsteer.core.method_defaults`), which also sets the pooling: the mean over
            tokens/pixels, the max for AurA. ``"lineas"`` trains every layer's map jointly through the diffusion
            model (``fit_mode`` does not apply; see `actsteer.core.LineasConfig`).
        options: method options (``{"knots": 8}`` for quantile, `LineasConfig` fields for lineas).
        fit_mode: ``"sequential"`` (one call with ``collect_steps == 1``, one call per site otherwise) or ``"at-once"``.
        batch_size: items per sampler call; 0 = all items in one call (cheapest).
        settings: sampling and pooling settings.

    Returns:
        ``(transport, timing)``: the fitted `Transport` (its metadata records the model class and the settings,
        not the timing, so that learning the same thing twice gives equal transports) and a `Timing`.

    Raises:
        ValueError: bad settings; RuntimeError from a failed forward; InterruptProcessingException on Cancel.
    """
    import comfy.model_management
    import comfy.sample
    import comfy.utils
    import nodes
    from comfy.patcher_extension import WrappersMP

    if fit_mode not in FIT_MODES:
        raise ValueError(f"Unknown fit_mode {fit_mode!r}; choose one of: {', '.join(FIT_MODES)}")
    defaults = method_defaults(method, spatial=True)
    if support in (None, "method default"):
        support = defaults["support"]
    s = settings
    if s.collect_steps < 1 or s.collect_steps > s.steps:
        raise ValueError(f"collect_steps must be between 1 and steps ({s.steps}), got {s.collect_steps}")
    # per_step applies to maps fitted from one step's recorded activations: pooling several steps, or LinEAS (which
    # trains through the model), keep the one-map fit
    per_step = s.per_step and s.collect_steps == 1 and canonical_method(method) not in FIT_METHODS
    dm = diffusion_model(model)
    items_source = [Item(p, k) for p in source for k in range(s.samples_per_prompt)]
    items_target = [Item(p, k) for p in target for k in range(s.samples_per_prompt)]
    n_items = len(items_source) + len(items_target)
    bs = n_items if batch_size <= 0 else min(batch_size, n_items)
    batches = math.ceil(n_items / bs)
    sequential = fit_mode == "sequential"
    one_pass = s.collect_steps == 1
    if canonical_method(method) in FIT_METHODS:  # LinEAS: a target pass, a center pass, then training passes
        config = lineas_config(options)
        expected_calls = batches * (2 + config.steps + config.steps // config.eval_every + 1)
    elif not sequential:
        expected_calls = batches * s.collect_steps
    elif batches == 1 and one_pass:
        expected_calls = 1
    else:
        expected_calls = batches * len(sites)  # a recording call, then one per further site
    stages = s.steps if per_step else 1
    expected_calls *= stages
    # every prompt is encoded once, before sampling: one progress unit each (on a slow machine most of the time
    # goes there), then one per recorded model call
    distinct = list(dict.fromkeys([s.negative_prompt, *source, *target]))
    progress = comfy.utils.ProgressBar(len(distinct) + expected_calls)

    collector = _Collector(s.collect_steps, progress)
    work = model.clone()
    for kind in (WrappersMP.OUTER_SAMPLE, WrappersMP.APPLY_MODEL):
        if work.get_wrappers(kind, KEY):
            logger.warning("actsteer: AcT Apply steering on the Learn node's MODEL is ignored while learning")
            work.remove_wrappers_with_key(kind, KEY)
    work.add_wrapper_with_key(WrappersMP.APPLY_MODEL, KEY + "_learn", collector)

    encoder = nodes.CLIPTextEncode()
    cache: dict[str, list] = {}
    spent = {"encode": 0.0, "sample": 0.0, "calls": 0}
    started = time.perf_counter()

    def encoded(prompt: str) -> list:
        if prompt not in cache:
            comfy.model_management.throw_exception_if_processing_interrupted()
            t0 = time.perf_counter()
            (cache[prompt],) = encoder.encode(clip, prompt)
            spent["encode"] += time.perf_counter() - t0
        return cache[prompt]

    for prompt in distinct:
        encoded(prompt)
        progress.update(1)
    negative = encoded(s.negative_prompt)
    channels = model.model.latent_format.latent_channels

    def run(batch: list[Item], ctx: ForwardContext) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        positive = _batched_conditioning([encoded(item.prompt) for item in batch])
        latent = torch.zeros(len(batch), channels, s.height // 8, s.width // 8)
        noise = torch.cat([comfy.sample.prepare_noise(latent[:1], (s.seed + item.sample) % 2**64) for item in batch])
        ctx.active, ctx.rows = False, None
        collector.ctx = ctx
        t0 = time.perf_counter()
        spent["calls"] += 1
        try:
            comfy.sample.sample(
                work, noise, s.steps, s.cfg, SAMPLER, SCHEDULER, positive, negative, latent,
                disable_pbar=True, seed=s.seed,
            )
        except _StopSampling:
            pass
        finally:
            collector.ctx = None
            spent["sample"] += time.perf_counter() - t0

    def fit_steps(first: int, last: int) -> Any:
        """The transport fitted on the steps ``first .. last - 1`` of the schedule."""
        collector.first, collector.collect_steps = first, last
        return fit(
            dm, sites, items_source, items_target, run=run, method=method, support=support,
            pooling=defaults["pooling"], sequential=sequential, batch_size=None if bs >= n_items else bs,
            one_pass=one_pass, progress=False, estimate_options=options, model_info=_model_info(model, dm),
            description=f"{len(source)} source vs {len(target)} target prompts, learned in ComfyUI",
            # in ComfyUI the core's one "fitted in N s" figure would include prompt encoding and sampling: this node
            # logs its own split line (`Timing`) instead
            log_summary=False,
        )

    if per_step:  # one fit per step, each on that step's responses along the unsteered sampling run
        transport = join_stages(None, [((k / s.steps, (k + 1) / s.steps), fit_steps(k, k + 1)) for k in range(s.steps)])
    else:
        transport = fit_steps(0, s.collect_steps)
    total = time.perf_counter() - started
    timing = Timing(spent["encode"], spent["sample"], max(0.0, total - spent["encode"] - spent["sample"]), spent["calls"])
    logger.info(
        "actsteer: learned %s from %d source + %d target samples in %.1f s: %s", describe_size(transport),
        len(items_source), len(items_target), total, timing.line(),
    )
    extra = {**transport.extra, "comfy": dataclasses.asdict(s) | {"sampler": SAMPLER, "scheduler": SCHEDULER,
                                                                    "per_step": per_step}}
    extra["comfy"]["prompts"] = {"source": source, "target": target}
    return transport.replace(extra=extra), timing
