"""The AcT node pack (ComfyUI V3 API): Learn, Save, Load, Apply and Strength Sweep, plus the ACT_TRANSPORT type.

Nodes are stateless classmethods. Each raises a one-line ValueError that ComfyUI shows on the node when its
inputs cannot work (empty prompts, unsafe file name, a transport fitted on another model, ...).
"""

from __future__ import annotations

import logging
import re

import torch
from comfy_api.latest import io, ui

from ..core.estimate import ESTIMATORS
from . import files
from .learn import FIT_MODES, CollectSettings, learn, parse_prompts
from .checks import diffusion_model
from .patching import apply_steering
from .presets import LAYER_PRESETS, preset_sites

logger = logging.getLogger(__name__)

CATEGORY = "model_patches/steering (AcT)"
Transport = io.Custom("ACT_TRANSPORT")

_STRENGTH_TIP = (
    "0 = no effect, 1 = full transport (the paper's setting, safe by design), values in between interpolate; "
    "negative values apply the reverse transport (target -> source); above 1 extrapolates"
)


def _strength_input(default: float = 1.0) -> io.Float.Input:
    return io.Float.Input(
        "strength", default=default, min=-3.0, max=3.0, step=0.05, display_mode=io.NumberDisplay.slider,
        tooltip=_STRENGTH_TIP,
    )


def _window_inputs() -> list[io.Float.Input]:
    return [
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Start steering at this fraction of the sampling schedule (0 = first step)"),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Stop steering after this fraction of the sampling schedule (1 = last step)"),
    ]


def _layers_input() -> io.String.Input:
    return io.String.Input(
        "layers", default="", optional=True,
        tooltip="Optional regex: apply only the transport's sites whose name matches (e.g. 'input_blocks' or "
                "'double_blocks'); empty = all sites",
    )


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
                "activations of the chosen layers (positive branch, pooled over the first steps), and fits a "
                "per-unit map from the source prompts' activations to the target prompts'. Apply it with "
                "'AcT Apply Transport'."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.String.Input("source_prompts", multiline=True, default="",
                                tooltip="Prompts WITHOUT the wanted style/concept (or WITH the one to remove), one per line"),
                io.String.Input("target_prompts", multiline=True, default="",
                                tooltip="The same prompts WITH the wanted style/concept (or without the one to remove), one per line"),
                io.Combo.Input("method", options=list(ESTIMATORS), default="linear-act",
                               tooltip="linear-act is the paper's method; the others are baselines"),
                io.Combo.Input("layers", options=list(LAYER_PRESETS), default="auto",
                               tooltip="auto: every norm of an SDXL UNet, every block of FLUX; fast: a few early "
                                       "layers; regex: the pattern below"),
                io.String.Input("layer_regex", default="",
                                tooltip="With layers = regex: a regex matched in full against module names of the "
                                        "diffusion model; end with ':0', ':1' or ':(0|1)' for FLUX double-block streams"),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Length of the sampling schedule"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG while collecting; the first step does not depend on it, and 1.0 skips the "
                                       "negative pass"),
                io.Int.Input("width", default=1024, min=64, max=8192, step=8),
                io.Int.Input("height", default=1024, min=64, max=8192, step=8),
                io.Int.Input("samples_per_prompt", default=1, min=1, max=64,
                             tooltip="Seeds per prompt (seed, seed+1, ...); each sample is one data point"),
                io.Int.Input("collect_steps", default=1, min=1, max=1000,
                             tooltip="Pool the activations of this many first steps (1 = the highest-noise step, as "
                                     "in the paper; more than 1 costs one sampling run per layer in sequential mode)"),
                io.Combo.Input("fit_mode", options=list(FIT_MODES), default="sequential",
                               tooltip="sequential: each layer is fitted after the earlier ones are transported (the "
                                       "paper; one batched model call); at-once: all layers on unsteered activations"),
                io.Combo.Input("support", options=["observed", "all"], default="observed",
                               tooltip="observed: leave activations outside the source range alone (safe at strength 1); "
                                       "all: transport every value (stronger, can break images at strength 1)"),
                io.Int.Input("batch_size", default=0, min=0, max=4096,
                             tooltip="Prompts x samples per model call; 0 = all at once (fastest; lower it if memory runs out)"),
            ],
            outputs=[Transport.Output(display_name="transport")],
        )

    @classmethod
    def execute(cls, model, clip, source_prompts, target_prompts, method, layers, layer_regex, steps, seed, cfg,
                width, height, samples_per_prompt, collect_steps, fit_mode, support, batch_size) -> io.NodeOutput:
        if clip is None:
            raise ValueError("AcT Learn needs a CLIP to encode the prompts; connect the checkpoint's CLIP output")
        source = parse_prompts(source_prompts, "source")
        target = parse_prompts(target_prompts, "target")
        sites = preset_sites(diffusion_model(model), layers, layer_regex)
        settings = CollectSettings(
            steps=steps, seed=seed, cfg=cfg, width=width, height=height, samples_per_prompt=samples_per_prompt,
            collect_steps=collect_steps,
        )
        transport = learn(
            model, clip, source, target, sites=sites, method=method, support=support, fit_mode=fit_mode,
            batch_size=batch_size, settings=settings,
        )
        return io.NodeOutput(transport)


class ActSteerSave(io.ComfyNode):
    """Save a transport into models/act_transports."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ActSteerSave",
            display_name="AcT Save Transport",
            category=CATEGORY,
            description="Saves a transport as a .safetensors file in models/act_transports (never overwrites "
                        "unless told to).",
            inputs=[
                Transport.Input("transport"),
                io.String.Input("filename", default="my_transport",
                                tooltip="Name inside models/act_transports; subfolders with '/' are allowed, '..' is not"),
                io.Combo.Input("if_exists", options=list(files.IF_EXISTS), default="add number",
                               tooltip="add number: save as name_00001, ...; error: stop; overwrite: replace the file"),
            ],
            outputs=[io.String.Output(display_name="saved_as")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, transport, filename, if_exists) -> io.NodeOutput:
        saved = files.save(transport, filename, if_exists)
        return io.NodeOutput(saved, ui=ui.PreviewText(f"saved {saved} ({len(transport)} sites)"))


class ActSteerLoad(io.ComfyNode):
    """Load a transport from models/act_transports."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ActSteerLoad",
            display_name="AcT Load Transport",
            category=CATEGORY,
            description="Loads a transport file from models/act_transports (actsteer's safetensors format; also "
                        "transports fitted with actsteer's diffusers API, translated when applied).",
            inputs=[io.Combo.Input("transport_name", options=files.list_files())],
            outputs=[Transport.Output(display_name="transport")],
        )

    @classmethod
    def fingerprint_inputs(cls, transport_name) -> str:
        return files.fingerprint(transport_name)

    @classmethod
    def execute(cls, transport_name) -> io.NodeOutput:
        transport = files.load(transport_name)
        if transport.model.get("framework") == "diffusers":
            logger.info("actsteer: %s was fitted with diffusers; its site names are translated when applied", transport_name)
        return io.NodeOutput(transport)


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
            inputs=[io.Model.Input("model"), Transport.Input("transport"), _strength_input(), *_window_inputs(),
                    _layers_input()],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, transport, strength, start_percent, end_percent, layers="") -> io.NodeOutput:
        patched = apply_steering(
            model, transport, strength=strength, start_percent=start_percent, end_percent=end_percent, layers=layers or ""
        )
        return io.NodeOutput(patched)


def parse_strengths(text: str) -> list[float]:
    """``"0, 0.5, 1"`` -> ``[0.0, 0.5, 1.0]`` (commas, spaces or semicolons); a bad entry is named in the error."""
    tokens = [t for t in re.split(r"[,;\s]+", text.strip()) if t]
    if not tokens:
        raise ValueError("Give at least one strength, e.g. '0, 0.25, 0.5, 0.75, 1'")
    values = []
    for token in tokens:
        try:
            value = float(token)
        except ValueError:
            raise ValueError(f"Bad strength {token!r} in {text!r}; write numbers separated by commas") from None
        if not torch.isfinite(torch.tensor(value)):
            raise ValueError(f"Strength {token!r} is not finite")
        values.append(value)
    return values


class ActSteerSweep(io.ComfyNode):
    """Sample the same seed at several strengths; one image per strength."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id="ActSteerSweep",
            display_name="AcT Strength Sweep",
            category=CATEGORY,
            description="Samples the same seed once per strength and decodes the results into one IMAGE batch, in "
                        "the order given (times the latent batch size), to compare strengths side by side.",
            inputs=[
                io.Model.Input("model"),
                Transport.Input("transport"),
                io.Vae.Input("vae"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.String.Input("strengths", default="0, 0.25, 0.5, 0.75, 1",
                                tooltip="Strengths to sample, separated by commas (negative = reverse transport)"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS)),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS)),
                *_window_inputs(),
                _layers_input(),
            ],
            outputs=[io.Image.Output(display_name="images")],
        )

    @classmethod
    def execute(cls, model, transport, vae, positive, negative, latent_image, strengths, seed, steps, cfg,
                sampler_name, scheduler, start_percent, end_percent, layers="") -> io.NodeOutput:
        import comfy.model_management
        import nodes

        values = parse_strengths(strengths)
        # build every patched clone first: a mismatching transport fails before any sampling
        patched = [
            apply_steering(model, transport, strength=s, start_percent=start_percent, end_percent=end_percent,
                           layers=layers or "")
            for s in values
        ]
        images = []
        for value, steered in zip(values, patched):
            comfy.model_management.throw_exception_if_processing_interrupted()
            (latent,) = nodes.common_ksampler(steered, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                              latent_image)
            samples = latent["samples"]
            decoded = vae.decode(samples)
            if decoded.dim() == 5:  # video VAEs: (B, T, H, W, C) -> frames
                decoded = decoded.reshape(-1, *decoded.shape[-3:])
            images.append(decoded)
            logger.debug("actsteer: sweep strength %s done", value)
        return io.NodeOutput(torch.cat(images))


NODES: list[type[io.ComfyNode]] = [ActSteerLearn, ActSteerSave, ActSteerLoad, ActSteerApply, ActSteerSweep]
