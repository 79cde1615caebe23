"""Sampling time of a steered vs an unsteered diffusers pipeline, reported as paired speed ratios.

Pipelines: random-weight SDXL and FLUX with the real models' *layouts* (SDXL base UNet: 3 levels, 1/2/10
transformer blocks, all 256 normalization layers hooked; FLUX.1: 19 double + 38 single blocks, both streams: 114
sites) at a chosen width: ``--sdxl-width 320`` is the real SDXL UNet (2.4B parameters with the tiny text
encoders' cross-attention width, ~9 GB in float32); FLUX.1's real hidden size 3072 does not fit in memory here, so
``--flux-hidden`` picks the largest that does. The defaults are the small widths that sample in about a second.

Arms, interleaved in one process (see ``overhead_timing.py``; attaching is outside the timed part): unsteered,
strength 0 (maps skipped), strength 1 with observed support, with support all, in a timestep window (0, 0.5),
and two transports composed. Maps are fitted with `fit_pipeline` at small widths; at large widths
(``--random-maps``, the default above width 128 / hidden 256) random maps with the same support kind are used:
the per-call cost does not depend on the values.

Usage:
    python -m benchmarks.diffusion_overhead [--arch sdxl flux] [--repeats 3] [--threads 1]
    python -m benchmarks.diffusion_overhead --arch sdxl --sdxl-width 320 --steps 2 --repeats 3
    python -m benchmarks.diffusion_overhead --arch flux --flux-hidden 1024 --steps 2 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from tests.support.tiny_pipelines import make_flux_pipeline, make_sdxl_pipeline
from benchmarks.overhead_timing import interleave, report, summary, write_json

import actsteer
from actsteer.core import Steering
from actsteer.core.sites import infer_width, parse_site
from actsteer.hf_integration.diffusion_presets import component_view, pipeline_sites
from actsteer.hf_integration.pipeline_fit import fit_pipeline
from actsteer.hf_integration.pipelines import attach_pipeline

SOURCE = ["a cat", "a dog on grass", "a red car", "a small house", "a tall tree", "a bird in the sky"]
TARGET = [f"watercolor, {s}, soft watercolor painting" for s in SOURCE]

# SDXL base layout (down: DownBlock2D + 2 CrossAttn, transformer depth 1/2/10, heads 5/10/20 at width 320).
def sdxl_layout(width: int) -> dict:
    heads = (max(1, width // 64), max(1, width // 32), max(1, width // 16))
    return dict(
        block_out_channels=(width, 2 * width, 4 * width),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=heads, norm_num_groups=32, sample_size=32,
    )


def flux_layout(hidden: int) -> dict:
    head = hidden // 2  # the test pipeline's transformer has 2 heads
    axes = (head - 2 * (head * 3 // 8), head * 3 // 8, head * 3 // 8)
    return dict(num_layers=19, num_single_layers=38, attention_head_dim=head, axes_dims_rope=axes)


def build(arch: str, args):
    """``(pipe, call kwargs)`` for one architecture, on ``args.device`` in ``args.dtype``."""
    dtype = getattr(torch, args.dtype)
    if arch == "sdxl":
        pipe = make_sdxl_pipeline(**sdxl_layout(args.sdxl_width)).to(args.device, dtype)
        return pipe, dict(height=64, width=64, num_inference_steps=args.steps, guidance_scale=0.0)
    pipe = make_flux_pipeline(**flux_layout(args.flux_hidden)).to(args.device, dtype)
    return pipe, dict(height=32, width=32, num_inference_steps=args.steps, guidance_scale=0.0, max_sequence_length=48)


def random_transport(pipe, support: str) -> actsteer.Transport:
    """Random maps on the "auto" sites, finite support ranges for "observed" (the masked path)."""
    view = component_view(pipe)
    denoiser = getattr(pipe, "transformer", None)
    hidden = None if denoiser is None else denoiser.config.num_attention_heads * denoiser.config.attention_head_dim
    g = torch.Generator().manual_seed(0)
    maps = {}
    for site in pipeline_sites(pipe, view, "auto"):
        name, k = parse_site(site)
        width = infer_width(view.get_submodule(name)) if k is None else None
        width = width or hidden
        bound = 4.0 if support == "observed" else float("inf")
        maps[site] = actsteer.UnitMap(1 + 0.2 * (torch.rand(width, generator=g) - 0.5), 0.1 * torch.randn(width, generator=g),
                                      lo=torch.full((width,), -bound), hi=torch.full((width,), bound),
                                      target_lo=torch.full((width,), -bound), target_hi=torch.full((width,), bound))
    return actsteer.Transport(maps)


def run(arch: str, args) -> dict:
    pipe, kwargs = build(arch, args)
    big = args.sdxl_width > 128 if arch == "sdxl" else args.flux_hidden > 256
    if args.random_maps or big:
        observed, all_reals = random_transport(pipe, "observed"), random_transport(pipe, "all")
    else:
        fit_kw = {k: v for k, v in kwargs.items() if k in ("height", "width", "max_sequence_length")}
        observed = fit_pipeline(pipe, SOURCE, TARGET, progress=False, **fit_kw)
        all_reals = fit_pipeline(pipe, SOURCE, TARGET, support="all", progress=False, **fit_kw)
    variants = {
        "strength 0": (Steering(observed, 0.0), None),
        "observed": (Steering(observed, 1.0), None),
        "all": (Steering(all_reals, 1.0), None),
        "window (0, 0.5)": (Steering(observed, 1.0), (0.0, 0.5)),
        "2 composed": ([Steering(observed, 0.5), Steering(all_reals, 0.5)], None),
    }
    variants = {name: v for name, v in variants.items() if args.variants is None or name in args.variants}
    live: list = []
    attach_s: dict[str, list[float]] = {name: [] for name in variants}

    def sample():
        pipe("a horse", generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs)

    def arm(name, steering, window):
        def before():
            t0 = time.perf_counter()
            live.append(attach_pipeline(pipe, steering, steps=window))
            attach_s[name].append(time.perf_counter() - t0)
        return before, sample, lambda: live.pop().remove()

    arms = {"plain": sample}
    arms.update({name: arm(name, st, w) for name, (st, w) in variants.items()})
    times = interleave(arms, args.repeats, device=args.device, warmup=1)
    params = sum(p.numel() for p in (pipe.unet if arch == "sdxl" else pipe.transformer).parameters())
    width = f"width {args.sdxl_width}" if arch == "sdxl" else f"hidden {args.flux_hidden}"
    print(f"\n{arch} ({width}, {params / 1e6:.0f}M parameters): {len(observed)} sites, "
          f"{kwargs['height']}x{kwargs['width']}, {kwargs['num_inference_steps']} steps, "
          f"{torch.get_num_threads()} thread(s), {args.repeats} interleaved repeats; attach "
          f"{statistics.median(next(iter(attach_s.values()))) * 1e3:.1f} ms")
    print("\n".join(report(times, unit=lambda s: f"{s:.2f} s")), flush=True)
    return {"arch": arch, "width": args.sdxl_width if arch == "sdxl" else args.flux_hidden,
            "params_M": round(params / 1e6), "sites": len(observed), "steps": kwargs["num_inference_steps"],
            "repeats": args.repeats, "threads": torch.get_num_threads(), **summary(times)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["sdxl", "flux"], choices=["sdxl", "flux"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sdxl-width", type=int, default=32, help="UNet block_out_channels[0] (real SDXL: 320)")
    parser.add_argument("--flux-hidden", type=int, default=64, help="FLUX hidden size (real FLUX.1: 3072)")
    parser.add_argument("--random-maps", action="store_true", help="random maps instead of fitting (any width)")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="steered arms to run (default all): 'strength 0' observed all 'window (0, 0.5)' '2 composed'")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on 2 shared cores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [run(arch, args) for arch in args.arch]
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
