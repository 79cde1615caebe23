"""Why strength 1 does (not) induce a style, and what changes it: variants of the fit, each measured on held-out
captions and seeds (the protocol of `diffusion_fewstep_style.py`).

Variants (UNet norms unless said; Linear-AcT; support ``observed`` and ``all``):
- ``first``: the paper's fit on the first step's responses (the reference row);
- ``all steps``: responses averaged over every step the model is sampled with (``steps="all"``);
- ``per step``: one transport per sampling step, each fitted on that step's responses (``steps=(k/n, (k+1)/n)``,
  unsteered trajectories) and applied only at its step;
- windows: the first-step transport applied only in part of the schedule (``(0, 0.25)`` = the first step only,
  ``(0, 0.5)``, ``(0.25, 1)``);
- ``te`` and ``both`` site sets with the ``all`` support, for comparison in the same run.

Run (one thread):
    python -m benchmarks.diffusion_fewstep_variants --out .../variants_fewstep.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Any

import torch

import actsteer
from benchmarks import fewstep_common as C

logger = logging.getLogger("diffusion_fewstep_variants")
WINDOWS = ((0.0, 0.25), (0.0, 0.5), (0.25, 1.0))


@contextlib.contextmanager
def per_step(pipe: Any, transports: list[actsteer.Transport], strength: float):
    """Steer with ``transports[k]`` at sampling step k only (one handle; the denoiser's timestep picks the step)."""
    with actsteer.steer(pipe, transports, strength=strength) as handle:
        def before(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            t = float(torch.as_tensor(kwargs.get("timestep", args[1] if len(args) > 1 else None)).reshape(-1)[0])
            step = int((pipe.scheduler.timesteps.double() - t).abs().argmin())
            for i in range(len(transports)):
                handle.set_enabled(i, i == step)

        handle.on_call(pipe.unet, before)
        yield handle


@torch.no_grad()
def generate_per_step(m: C.Mini, prompts: list[str], transports: list[actsteer.Transport], strength: float
                      ) -> torch.Tensor:
    kw = dict(num_inference_steps=m.steps, guidance_scale=0.0, output_type="pt",
              generator=[torch.Generator("cpu").manual_seed(1000 + i) for i in range(len(prompts))])
    with per_step(m.pipe, transports, strength):
        images = m.pipe(list(prompts), **kw).images
    return images.float() * 2 - 1


def run(args: argparse.Namespace) -> None:
    m = C.load(args.model, n_fit=args.n_fit, n_eval=args.n_eval, seeds=args.seeds)
    rows = C.Rows(args.out, {"model": args.model, "strengths": args.strengths})
    prompts = m.captions(m.eval_attrs)
    reference = C.generate(m, prompts)
    unet_sites = C.unet_site_names(m)
    for style in args.styles or m.styles:
        base = dict(model=m.name, style=style)
        rows.add(**base, variant="unsteered", support="-", strength=0.0, **m.score(reference, reference, style))
        source, target = m.captions(m.fit_attrs), m.captions(m.fit_attrs, f", {style}")
        for support in args.supports:
            kw = dict(method="linear-act", support=support)
            first = C.fit(m, source, target, sites="unet", **kw)
            every = C.fit(m, source, target, sites="unet", steps="all", **kw)
            stepwise = [C.fit(m, source, target, sites="unet", steps=(k / m.steps, (k + 1) / m.steps), **kw)
                        for k in range(m.steps)]
            fits = {"first": first, "all steps": every,
                    "te first": C.fit(m, source, target, sites="te", **kw),
                    "both first": C.fit(m, source, target, sites="both", unet_sites=unet_sites, **kw)}
            for s in args.strengths:
                for name, transport in fits.items():
                    images = C.generate(m, prompts, transport, strength=s)
                    rows.add(**base, variant=name, support=support, strength=s, **m.score(images, reference, style))
                images = generate_per_step(m, prompts, stepwise, s)
                rows.add(**base, variant="per step", support=support, strength=s, **m.score(images, reference, style))
                for window in WINDOWS:
                    images = C.generate(m, prompts, first, strength=s, timesteps=window)
                    rows.add(**base, variant=f"first, window {window[0]:g}-{window[1]:g}", support=support,
                             strength=s, **m.score(images, reference, style))


def main(argv: list[str] | None = None) -> None:
    def own(p: Any) -> None:
        p.add_argument("--supports", type=C.names, default=["observed", "all"])
        p.add_argument("--strengths", type=C.floats, default=[0.5, 1.0, 1.5, 2.0])

    C.cli(__doc__, run, argv, own=own)


if __name__ == "__main__":
    main()
