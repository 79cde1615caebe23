"""AcT Strength Sweep: the same seed sampled once per strength, one IMAGE batch, one progress bar for the whole run."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from .inputs import (
    CATEGORY,
    MODEL_IN_TIP,
    TRANSPORT_IN_TIP,
    Transport,
    input_check,
    layer_filter_inputs,
    parse_strengths,
    steering_problem,
    window_inputs,
)
from .graph import queue_problem
from .presets import APPLY_GROUPS
from .steer import steer_model

logger = logging.getLogger(__name__)


def _sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, on_step):
    """What ``nodes.common_ksampler`` does, with the step callback (progress, previews) left to the caller."""
    import comfy.sample
    import comfy.utils

    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    return comfy.sample.sample(
        model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
        noise_mask=latent.get("noise_mask"), callback=on_step, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
        seed=seed,
    )


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
                        "the order given (times the latent batch size), to compare strengths side by side. Costs one "
                        "full sampling run per strength.",
            inputs=[
                io.Model.Input("model", tooltip=MODEL_IN_TIP),
                Transport.Input("transport", tooltip=TRANSPORT_IN_TIP),
                io.Vae.Input("vae", tooltip="The VAE that decodes each sample into an image"),
                io.Conditioning.Input("positive", tooltip="The positive prompt, as for a KSampler"),
                io.Conditioning.Input("negative", tooltip="The negative prompt, as for a KSampler"),
                io.Latent.Input("latent_image", tooltip="The starting latent (e.g. Empty Latent Image); its size "
                                                        "sets the image size"),
                io.String.Input("strengths", default="0, 0.25, 0.5, 0.75, 1",
                                tooltip="Strengths to sample, separated by commas (0 = unsteered, 1 = full, negative "
                                        "= reverse transport); each one costs a full sampling run"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed, the same for every strength so only the strength differs"),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps per strength"),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance, as for a KSampler (1.0 for FLUX and distilled models)"),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS),
                               tooltip="The sampler, as for a KSampler"),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS),
                               tooltip="The noise schedule, as for a KSampler"),
                *window_inputs(),
                *layer_filter_inputs(),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="One image per strength, in the order given: "
                                                                     "connect it to Preview Image or Save Image")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, strengths=None, start_percent=None, end_percent=None, layers=None,
                        layer_group=None) -> bool | str:
        checked = input_check(strengths, parse_strengths)
        if checked is not True:
            return checked
        problem = (steering_problem(start_percent, end_percent, layers, layer_group)
                   or queue_problem(cls, "ActSteerSweep", "layer_group", layer_group, APPLY_GROUPS))
        return problem or True

    @classmethod
    def execute(cls, model, transport, vae, positive, negative, latent_image, strengths, seed, steps, cfg,
                sampler_name, scheduler, start_percent, end_percent, layers="", layer_group="all") -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils
        import latent_preview

        values = parse_strengths(strengths)
        # build every patched clone first: a mismatching transport fails before any sampling
        patched = [steer_model(model, transport, s, start_percent, end_percent, layers, layer_group) for s in values]
        total = steps * len(values)
        bar = comfy.utils.ProgressBar(total)  # one bar for the whole sweep, not one per strength
        previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
        images = []
        for i, (value, steered) in enumerate(zip(values, patched)):
            comfy.model_management.throw_exception_if_processing_interrupted()

            def on_step(step, x0, x, total_steps, offset=i * steps):
                preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer else None
                bar.update_absolute(offset + min(step + 1, steps), total, preview)

            samples = _sample(steered, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                              on_step)
            decoded = vae.decode(samples)
            if decoded.dim() == 5:  # video VAEs: (B, T, H, W, C) -> frames
                decoded = decoded.reshape(-1, *decoded.shape[-3:])
            images.append(decoded)
            logger.debug("actsteer: sweep strength %s done", value)
        return io.NodeOutput(torch.cat(images))
