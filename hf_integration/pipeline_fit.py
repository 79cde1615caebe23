"""Fitting transports on diffusers pipelines (`fit_pipeline`) and the labelled strength grid (`strength_grid`)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch

from ..core import (
    FIT_METHODS,
    ForwardContext,
    Steering,
    StepClock,
    Steps,
    Support,
    Transport,
    as_steerings,
    canonical_method,
    check_steps,
    fit,
    join_stages,
    method_defaults,
)
from .diffusion_presets import (
    component_view,
    denoiser_name,
    pipeline_info,
    pipeline_sites,
    site_components,
)
from .pipelines import denoiser_step, is_pipeline_steered, steer_pipeline
from .texts import check_balance, check_texts

logger = logging.getLogger(__name__)


# Fitting --------------------------------------------------------------------------------------------------
def fit_pipeline(
    pipe: Any,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    *,
    modules: str | Sequence[str] = "auto",
    method: str = "linear-act",
    steps: Steps | Literal["each"] | None = None,
    num_inference_steps: int = 4,
    guidance_scale: float | None = None,
    support: Support | None = None,
    pooling: str | None = None,
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
        source_prompts, target_prompts: lists of at least 2 non-empty prompts each (e.g. plain captions vs the
            same in a style), of similar sizes (within 10x); a single string is refused, not split into characters.
        modules: a preset (``"auto"``, ``"fast"``, ``"text_encoders"``, ``"norms"`` for SDXL, ``"blocks"`` for
            FLUX) or site names/patterns with component prefixes; see `pipeline_sites`.
        method, support, pooling, estimate_options: see `actsteer.estimate` and `actsteer.core.fit`. ``None``
            takes the method's defaults (`actsteer.core.method_defaults` with ``spatial=True``: mean
            pooling; observed support for the AcT maps, all reals for the additive baselines).
        steps: ``"each"`` (one map per step for the denoiser's sites, each fitted on that step's responses along
            the unsteered sampling trajectory and applied at that step only: a per-step transport, see
            `actsteer.core.split_stages`; text-encoder sites, which run once per call, are fitted once with the
            first step; costs n(n+1)/2 denoiser calls per batch for n steps, 10 for the default 4), ``"first"``
            (the paper's rule: one map from the first step the call runs, its highest-noise step, applied at every
            step; one UNet call per batch), ``"all"`` (average over every step run), or a window ``(start, end)`` in
            fractions of the scheduler's full schedule, the same clock as steering windows (`actsteer.core.steps`:
            img2img at strength 0.5 runs steps n/2 .. n-1 of n, so ``(0, 0.5)`` holds none of them). None (the
            default) is ``"each"``, or ``"first"`` where each does not apply (only text-encoder sites; LinEAS,
            which trains through the model). Per-step fitting is the default because it measured better on our
            few-step miniature (RESULTS.md, "Per-step fitting": style presence at strength 1 0.25 -> 0.98 pastel,
            0.80 -> 0.89-0.98 sepia; negation leaves less and keeps more).
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
        TypeError: a prompt list that is a single string or holds non-strings.
        ValueError: an unknown preset or ``steps``, a pattern that matches nothing, empty prompts, fewer than 2
            prompts a side, or sides more than 10x apart in size.
        RuntimeError: the pipeline is being steered, or a site never ran (e.g. a VAE site: latents are returned).

    Example:
        >>> source = ["a cat", "a dog on grass", "a red car"]  # doctest: +SKIP
        >>> target = [f"{p}, watercolor painting" for p in source]  # doctest: +SKIP
        >>> transport = fit_pipeline(pipe, source, target, guidance_scale=0.0)  # doctest: +SKIP
        >>> with steer_pipeline(pipe, transport, strength=1.0):  # doctest: +SKIP
        ...     image = pipe("a horse", guidance_scale=0.0, num_inference_steps=4).images[0]
    """
    source_prompts = check_texts("source_prompts", source_prompts)
    target_prompts = check_texts("target_prompts", target_prompts)
    check_balance(len(source_prompts), len(target_prompts))
    method = canonical_method(method)
    defaults = method_defaults(method, spatial=True)
    pooling = defaults["pooling"] if pooling is None else pooling
    support = defaults["support"] if support is None else support
    if "num_images_per_prompt" in call_kwargs or "output_type" in call_kwargs:
        raise ValueError("`num_images_per_prompt` and `output_type` are set by fit_pipeline; remove them")
    view = component_view(pipe)
    sites = pipeline_sites(pipe, view, modules)
    if is_pipeline_steered(pipe):
        raise RuntimeError("The pipeline is being steered; remove its steering before fitting a new transport")
    denoiser = denoiser_name(pipe)
    if steps is None:  # per-step where it applies (see the docstring), else the paper's first step
        steps = "each" if method not in FIT_METHODS and any(s.startswith(denoiser + ".") for s in sites) else "first"
    each = steps == "each"
    window = "first" if each else check_steps(steps)
    if each and method in FIT_METHODS:
        raise ValueError(f"steps='each' fits one map per step from recorded responses; {method} trains through the "
                         "model: use steps='first' (or a window)")
    if each and not any(s.startswith(denoiser + ".") for s in sites):
        raise ValueError(
            f"steps='each' fits the {denoiser}'s sites once per denoising step, and these sites are all outside it "
            "(text encoders run once per call): use steps='first'"
        )
    options = dict(
        method=method, pooling=pooling, support=support, sequential=sequential, batch_size=batch_size, seed=seed,
        progress=progress, description=description, estimate_options=estimate_options,
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, call_kwargs=call_kwargs,
    )
    if each:
        return _fit_each(pipe, view, sites, source_prompts, target_prompts, **options)
    return _fit_window(pipe, view, sites, source_prompts, target_prompts, window, steps=steps, **options)


class _NoStepRun(ValueError):
    """A fit's step window holds none of the steps its pipeline call ran (img2img runs only the end)."""


def _fit_each(pipe: Any, view: torch.nn.Module, sites: list[str], source_prompts: list[str],
              target_prompts: list[str], **options: Any) -> Transport:
    """``steps="each"``: one single-step fit per step of the schedule (unsteered trajectories), joined into one
    per-step transport; the sites outside the denoiser are fitted once, with the first step that runs."""
    n = options["num_inference_steps"]
    denoiser = denoiser_name(pipe)
    inside = [s for s in sites if s.startswith(denoiser + ".")]
    stages: list[tuple[tuple[float, float], Transport]] = []
    shared: Transport | None = None
    for k in range(n):
        window = (k / n, (k + 1) / n)
        try:
            part = _fit_window(pipe, view, sites if shared is None else inside, source_prompts, target_prompts,
                               window, steps=window, **options)
        except _NoStepRun:
            continue  # img2img: the call starts later in the schedule
        logger.info("actsteer: fitted step %d of %d", k + 1, n)
        if shared is None:
            shared = part.select([s for s in part.sites if s not in inside]) if len(inside) < len(sites) else None
            shared = shared if shared is not None and len(shared) else None
        stages.append((window, part.select(inside)))
    if not stages:
        raise ValueError("steps='each': the pipeline call ran none of the schedule's steps")
    transport = join_stages(shared, stages)  # (sums the stages' fitting cost)
    return transport.replace(extra={**transport.extra, "diffusion": {**transport.extra["diffusion"], "steps": "each"}})


def _fit_window(
    pipe: Any, view: torch.nn.Module, sites: list[str], source_prompts: list[str], target_prompts: list[str],
    window: Any, *, steps: Any, method: str, pooling: str, support: Support, sequential: bool,
    batch_size: int | None, seed: int, progress: bool, description: str, estimate_options: dict[str, Any] | None,
    num_inference_steps: int, guidance_scale: float | None, call_kwargs: dict[str, Any],
) -> Transport:
    """`fit_pipeline` for one step window (``"first"``, ``"all"`` or a pair)."""
    n_active = StepClock.count(window, num_inference_steps)  # at most; img2img runs only the end of the schedule
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
        clock = StepClock(window)  # this call's clock: each denoiser call located in the full schedule
        encoder_calls = dict.fromkeys(encoders, 0)

        def on_step_end(p: Any, i: int, t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if clock.done():
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
            ctx.active = clock.inside(*denoiser_step(pipe, args, kw))
            recorded[0] += ctx.active
            cost["denoiser_calls"] += 1

        def on_encoder(name: str):
            def hook(module: torch.nn.Module, args: Any) -> None:
                ctx.rows = None
                ctx.active = encoder_calls[name] == 0  # later calls encode negative prompts
                encoder_calls[name] += 1

            return hook

        components = site_components(pipe)
        recorded = [0]  # denoiser calls inside the window
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
        if not recorded[0] and any(s.startswith(denoiser + ".") for s in sites) and clock.last is not None:
            i, total = clock.last
            raise _NoStepRun(
                f"`steps={steps!r}` holds none of the steps this call ran (it ended at step {i} of the {total}-step "
                "schedule; img2img runs only the end of it): choose a window that overlaps them, or steps='first'"
            )

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
        "steps": window if isinstance(window, str) else list(window),
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
    steps: Steps | None = "all",
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
        steps: the step window (see `attach_pipeline`).
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
            with steer_pipeline(pipe, steerings, steps=steps):
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
