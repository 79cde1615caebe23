"""The AcT node pack (ComfyUI V3 API): Learn and Apply here, Save/Load in `file_nodes`, the Sweep in `sweep`.

Nodes are stateless classmethods. Inputs an artist can get wrong are checked when the prompt is queued
(``validate_inputs``: before any checkpoint loads); everything else raises a one-line ValueError that ComfyUI
shows on the node and that says what to change in the graph.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from comfy_api.latest import io, ui

from ..core import DEFAULT_CFG, ESTIMATORS, FIT_METHODS, describe_size, shorten
from . import learn_cache
from .checks import diffusion_model, for_artist
from .file_nodes import ActSteerLoad, ActSteerSave
from .graph import queue_problem
from .inputs import (
    CATEGORY,
    MODEL_IN_TIP,
    STRENGTH_MAX,
    STRENGTH_MIN,
    TRANSPORT_IN_TIP,
    TRANSPORT_OUT_TIP,
    Transport,
    cfg_placement_input,
    cfg_placement_problem,
    input_check,
    int_problem,
    layer_filter_inputs,
    number_problem,
    regex_problem,
    steering_problem,
    strength_input,
    window_inputs,
)
from .learn import FIT_MODES, CollectSettings, learn, parse_prompts
from .presets import APPLY_GROUPS, LAYER_PRESETS, LAYERS_TOOLTIP, preset_sites
from .steer import steer_model
from .sweep import ActSteerSweep

logger = logging.getLogger(__name__)
MAX_STEPS = 1000  # Learn's steps and collect_steps


def _layers_problem(layers, layer_regex) -> str | None:
    if layers is None:
        return None
    if layers not in LAYER_PRESETS:
        return f"layers: {shorten(str(layers), 40)!r} is not one of its choices; pick one of: {', '.join(LAYER_PRESETS)}"
    if layers != "regex":
        return None
    if layer_regex is not None and not str(layer_regex).strip():
        return ("layers = regex needs a pattern in layer_regex (e.g. 'double_blocks\\.1:0'), or pick a named layer "
                "group in layers")
    return regex_problem("layer_regex", layer_regex, "or pick a named layer group in layers")


PER_STEP_DEFAULT = True
PER_STEP_TIP = (
    "On (default): one map per step of Learn's schedule, each fitted on that step's activations and applied in that "
    "part of the sampler's schedule (on our few-step test model strength 1 then added pastel to 98% of images "
    "instead of 25%, sepia to 89-98% instead of 80%, and negation left less of the style). Off: the paper's one map "
    "from the first step (one model call instead of steps x (steps + 1) / 2). Applies with collect_steps 1 and "
    "the methods fitted from recorded activations (not lineas)"
)


def _schedule_problem(steps, collect_steps) -> str | None:
    if steps is None or collect_steps is None or int(collect_steps) <= int(steps):
        return None
    return (f"collect_steps ({int(collect_steps)}) is more than steps ({int(steps)}): only the first steps of the "
            "schedule can be pooled; set collect_steps to at most steps")


class ActSteerLearn(io.ComfyNode):
    """Fit a transport from source prompts to target prompts by sampling the MODEL."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ActSteerLearn",
            display_name="AcT Learn Transport",
            category=CATEGORY,
            description=(
                "Learns an Activation Transport (AcT): samples every prompt through this MODEL, records the "
                "activations of the chosen layers (positive branch) and fits a per-unit map from the source prompts' "
                "activations to the target prompts': one map per step of a short schedule (per_step, the default), "
                "or one from the first steps. Apply it with 'AcT Apply Transport'. Costs about steps x (steps + 1) / 2 "
                "sampling steps per prompt and sample with per_step (10 for 4 steps), one without."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL to learn on (SDXL-family or FLUX); the transport works "
                                                "on this model family and size only"),
                io.Clip.Input("clip", tooltip="The CLIP that encodes the prompts (the checkpoint's CLIP output)"),
                io.String.Input("source_prompts", multiline=True, default="",
                                tooltip="Prompts WITHOUT the wanted style/concept (or WITH the one to remove), one per "
                                        "line; at least 2, 8-32 work well"),
                io.String.Input("target_prompts", multiline=True, default="",
                                tooltip="The same prompts WITH the wanted style/concept (or without the one to "
                                        "remove), one per line, in the same order"),
                io.Combo.Input("method", options=[*ESTIMATORS, *FIT_METHODS], default="linear-act",
                               tooltip="linear-act is the paper's method and the default (on our few-step test model, "
                                       "strength 1 added dark to 100% and sepia to 80% of images); quantile: the exact "
                                       "monotone map per unit (bends with the data instead of a straight line); lineas: "
                                       "all layers trained together through the model (minutes, not seconds; keeps only "
                                       "the layers that help); the others are baselines"),
                io.Combo.Input("layers", options=list(LAYER_PRESETS), default="auto", tooltip=LAYERS_TOOLTIP),
                io.String.Input("layer_regex", default="",
                                tooltip="With layers = regex: a regex matched in full against layer names of the "
                                        "diffusion model; end with ':0', ':1' or ':(0|1)' for FLUX double-block streams"),
                io.Int.Input("steps", default=4, min=1, max=MAX_STEPS,
                             tooltip="Length of the schedule Learn samples with. With per_step: one map per step, each "
                                     "covering that fraction of any sampler's schedule (4 maps serve a 30-step "
                                     "sampler in quarters); cost grows as steps x (steps + 1) / 2. Without: only "
                                     "the first collect_steps steps are run"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Noise seed of the learning samples (seed, seed+1, ... per prompt); fixed, so "
                                     "that queuing again reuses the learned transport instead of learning anew"),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG while collecting; the first step does not depend on it (with per_step the "
                                       "later steps follow the path this CFG draws), and 1.0 skips the negative pass "
                                       "(half the cost)"),
                io.Int.Input("width", default=1024, min=64, max=8192, step=8,
                             tooltip="Image width while learning: use the size you generate at (cost grows with area)"),
                io.Int.Input("height", default=1024, min=64, max=8192, step=8,
                             tooltip="Image height while learning: use the size you generate at"),
                io.Int.Input("samples_per_prompt", default=1, min=1, max=64,
                             tooltip="Seeds per prompt (seed, seed+1, ...); each sample is one data point and adds "
                                     "one image's worth of work to the batch"),
                io.Int.Input("collect_steps", default=1, min=1, max=MAX_STEPS,
                             tooltip="Pool the activations of this many first steps (1 = the highest-noise step, as "
                                     "in the paper; more than 1 costs one sampling run per layer in sequential mode)"),
                io.Combo.Input("fit_mode", options=list(FIT_MODES), default="sequential",
                               tooltip="sequential (default): each layer is fitted after the earlier ones are "
                                       "transported (the paper; one batched model call); at-once: all layers on "
                                       "unsteered activations; try it when a style shows only in part at strength 1 "
                                       "(halftone on our test model: 72% vs 48%)"),
                io.Combo.Input("support", options=["method default", "observed", "all"], default="method default",
                               tooltip="observed: leave activations outside the source range alone (on our few-step "
                                       "test model strength 1 added and removed palette styles, keeping as much of the "
                                       "picture as a prompt change); all: transport every value (removes a style "
                                       "fully already at 0.5, adds less reliably and changes more of the picture); "
                                       "method default: observed for linear-act/mean-act/gaussian-ot, all for the "
                                       "additive baselines (actadd, caa, itic, aura)"),
                io.Int.Input("batch_size", default=0, min=0, max=4096,
                             tooltip="Prompts x samples per model call; 0 = all at once (fastest: one call in sequential "
                                     "mode). If memory runs out, prefer fit_mode at-once with batch_size 8: in "
                                     "sequential mode each batch costs a partial model call per layer"),
                io.Boolean.Input("per_step", default=PER_STEP_DEFAULT, optional=True, tooltip=PER_STEP_TIP),
            ],
            outputs=[Transport.Output(display_name="transport", tooltip=TRANSPORT_OUT_TIP)],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def validate_inputs(cls, source_prompts=None, target_prompts=None, layers=None, layer_regex=None, steps=None,
                        collect_steps=None) -> bool | str:
        # ComfyUI skips its own range and list checks for the inputs named here, and shows the message returned on
        # each of them: every message names the input(s) to change (web/js/actsteer.js keeps it on those)
        for prompts, what in ((source_prompts, "source"), (target_prompts, "target")):
            if (problem := input_check(prompts, parse_prompts, what)) is not True:
                return problem
        problem = (
            _layers_problem(layers, layer_regex)
            or int_problem("steps", steps, 1, MAX_STEPS)
            or int_problem("collect_steps", collect_steps, 1, MAX_STEPS)
            or _schedule_problem(steps, collect_steps)
            or queue_problem(cls, "ActSteerLearn", "layers", layers, LAYER_PRESETS, with_transport=False)
        )
        return problem or True

    @classmethod
    def execute(cls, model, clip, source_prompts, target_prompts, method, layers, layer_regex, steps, seed, cfg,
                width, height, samples_per_prompt, collect_steps, fit_mode, support, batch_size,
                per_step=PER_STEP_DEFAULT) -> io.NodeOutput:
        if clip is None:
            raise ValueError("AcT Learn needs a CLIP to encode the prompts; connect the checkpoint's CLIP output")
        source = parse_prompts(source_prompts, "source")
        target = parse_prompts(target_prompts, "target")
        settings = CollectSettings(
            steps=steps, seed=seed, cfg=cfg, width=width, height=height, samples_per_prompt=samples_per_prompt,
            collect_steps=collect_steps, per_step=bool(per_step),
        )
        hidden = getattr(cls, "hidden", None)
        key = learn_cache.make_key(
            getattr(hidden, "prompt", None), getattr(hidden, "unique_id", None), model, clip,
            {"source": source, "target": target, "method": method, "layers": layers, "layer_regex": layer_regex,
             "settings": dataclasses.asdict(settings), "fit_mode": fit_mode, "support": support,
             "batch_size": batch_size},
        )
        if (cached := learn_cache.get(key)) is not None:
            import comfy.utils

            comfy.utils.ProgressBar(1).update_absolute(1)
            when = time.strftime("%H:%M", time.localtime(cached.learned_at))
            logger.info("actsteer: reused the transport learned at %s (same MODEL, prompts and settings)", when)
            return io.NodeOutput(cached.transport, ui=ui.PreviewText(
                f"reused what was learned at {when} (same MODEL, prompts and settings); {cached.summary}"))
        try:
            sites = preset_sites(diffusion_model(model), layers, layer_regex)
            transport, timing = learn(
                model, clip, source, target, sites=sites, method=method, support=support, fit_mode=fit_mode,
                batch_size=batch_size, settings=settings,
            )
        except (KeyError, ValueError) as err:  # core messages may address Python users: say what to change here
            raise ValueError(for_artist(err, "change layers or layer_regex on the AcT Learn node", always=False)) from None
        summary = (f"learned {describe_size(transport)} from {transport.n_source} + {transport.n_target} samples: "
                   f"{timing.line()}")
        learn_cache.put(key, transport, summary)
        return io.NodeOutput(transport, ui=ui.PreviewText(summary))


class ActSteerApply(io.ComfyNode):
    """Steer a MODEL with a transport (returns a patched clone)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ActSteerApply",
            display_name="AcT Apply Transport",
            category=CATEGORY,
            description="Returns a copy of the MODEL steered by the transport; the input MODEL is unchanged. Chain "
                        "two Apply nodes to combine two concepts.",
            inputs=[io.Model.Input("model", tooltip=MODEL_IN_TIP), Transport.Input("transport", tooltip=TRANSPORT_IN_TIP),
                    strength_input(), *window_inputs(), *layer_filter_inputs(), cfg_placement_input()],
            outputs=[io.Model.Output(tooltip="A steered copy of the MODEL: connect it to your KSampler (the input "
                                             "MODEL and other branches stay unsteered)")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, strength=None, start_percent=None, end_percent=None, layers=None,
                        layer_group=None, cfg_placement=None) -> bool | str:
        problem = (
            number_problem("strength", strength, STRENGTH_MIN, STRENGTH_MAX)
            or cfg_placement_problem(cfg_placement)
            or steering_problem(start_percent, end_percent, layers, layer_group)
            or queue_problem(cls, "ActSteerApply", "layer_group", layer_group, APPLY_GROUPS)
        )
        return problem or True

    @classmethod
    def execute(cls, model, transport, strength, start_percent, end_percent, layers="", layer_group="all",
                cfg_placement=DEFAULT_CFG) -> io.NodeOutput:
        return io.NodeOutput(steer_model(model, transport, strength, start_percent, end_percent, layers, layer_group,
                                         cfg_placement))


NODES: list[type[io.ComfyNode]] = [ActSteerLearn, ActSteerSave, ActSteerLoad, ActSteerApply, ActSteerSweep]
