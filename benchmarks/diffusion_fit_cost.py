"""Forward-pass cost of fitting a pipeline transport: sequential vs at-once, against the reference's loop.

The reference (apple/ml-act, REFERENCE_NOTES.md section 3) re-runs the data once per module, stopping at
it: about (L+1)/2 full forward passes per batch for L modules (~128 UNet passes for SDXL's 256 norms).
actsteer's `fit_pipeline` with ``steps="first"`` and all prompts in one batch fits every site sequentially
inside ONE UNet call; the default, one map per step (``steps="each"``), costs one such fit per step (10 UNet calls
for 4 steps: step k's fit runs steps 0..k). With several batches core falls back to one early-stopping pass per site, the
reference's cost, which this script also measures.

Pipeline: random-weight SDXL with the SDXL base UNet *layout* (256 norms) at small widths, 32x32 images.

Usage:
    python -m benchmarks.diffusion_fit_cost [--prompts 4] [--threads 1] [--skip-passes]
"""

from __future__ import annotations

import argparse
import time

import torch
from tests.support.tiny_pipelines import make_sdxl_pipeline
from benchmarks.diffusion_overhead import sdxl_layout

from actsteer.hf_integration.pipeline_fit import fit_pipeline

PROMPTS = ["a cat", "a dog on grass", "a red car", "a small house", "a tall tree", "a bird in the sky",
           "a bowl of fruit", "a city street"]


def measure(pipe, source, target, **kw) -> tuple[dict, float]:
    t0 = time.perf_counter()
    transport = fit_pipeline(pipe, source, target, progress=False, height=32, width=32, guidance_scale=0.0, **kw)
    return transport.extra["fit"], time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4, help="source prompts (and as many target prompts)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-passes", action="store_true", help="skip the slow per-site passes (reference cost)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = PROMPTS[: args.prompts]
    target = [f"watercolor, {p}, soft watercolor painting" for p in source]
    pipe = make_sdxl_pipeline(**{**sdxl_layout(32), "attention_head_dim": (2, 4, 8)})  # SDXL's block layout, width 32
    n_sites = sum(isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) for m in pipe.unet.modules())
    measure(pipe, source, target, modules="fast")  # warm-up

    rows = []
    stats, seconds = measure(pipe, source, target, sequential=True, steps="first")
    rows.append(("sequential, one batch, first step", stats, seconds))
    stats, seconds = measure(pipe, source, target, sequential=True)  # the default: one map per step of 4
    rows.append(("sequential, one batch, each of 4 steps", stats, seconds))
    stats, seconds = measure(pipe, source, target, sequential=False, steps="first")
    rows.append(("at once, one batch, first step", stats, seconds))
    if not args.skip_passes:
        stats, seconds = measure(pipe, source, target, sequential=True, batch_size=args.prompts, steps="first")
        rows.append(("sequential, 2 batches (per-site passes)", stats, seconds))
    print(f"\nSDXL layout: {n_sites} norm sites, {args.prompts}+{args.prompts} prompts, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"  {'mode':42s} {'pipeline calls':>14s} {'UNet calls':>10s} {'UNet-pass equiv.':>16s} {'seconds':>8s}")
    for name, st, sec in rows:
        calls = f"{st['pipeline_calls']:14d} {st['denoiser_calls']:10d}"
        print(f"  {name:42s} {calls} {st['forward_equivalents']:16.1f} {sec:8.1f}")
    print(f"  {'reference (apple/ml-act incr), estimate':42s} {'':14s} {'':10s} {2 * (n_sites + 1) / 2:16.1f}"
          f"   ((L+1)/2 per batch; ~{(n_sites + 1) / 2:.0f} UNet passes for one batch)")
    base = rows[0][2]
    for name, _, sec in rows[1:]:
        print(f"  time ratio {name} / sequential one batch, first step: {sec / base:.2f}")


if __name__ == "__main__":
    main()
