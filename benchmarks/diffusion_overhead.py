"""Sampling time of a steered vs an unsteered diffusers pipeline, reported as ratios (CPU timings are noisy).

Pipelines: random-weight SDXL and FLUX with the real models' *layouts* at small widths, the largest that
sample in about a second here: the SDXL base UNet layout (3 levels, 1/2/10 transformer blocks: all 256
normalization layers hooked) at 64x64, and FLUX.1's 19 double + 38 single blocks (both streams: 114 sites)
at 32x32. Small widths make the hooks' share of the time larger than on real models: an upper bound.

Usage:
    python benchmarks/diffusion_overhead.py [--arch sdxl flux] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from diffusers_support import make_flux_pipeline, make_sdxl_pipeline  # noqa: E402

from actsteer.core import Steering  # noqa: E402
from actsteer.hf_integration.pipeline_fit import fit_pipeline  # noqa: E402
from actsteer.hf_integration.pipelines import attach_pipeline  # noqa: E402

SOURCE = ["a cat", "a dog on grass", "a red car", "a small house", "a tall tree", "a bird in the sky"]
TARGET = [f"watercolor, {s}, soft watercolor painting" for s in SOURCE]

# SDXL base layout (down: DownBlock2D + 2 CrossAttn, transformer depth 1/2/10) at widths 32/64/128.
SDXL_LAYOUT = dict(
    block_out_channels=(32, 64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(2, 4, 8), norm_num_groups=32, sample_size=32,
)
FLUX_LAYOUT = dict(num_layers=19, num_single_layers=38, attention_head_dim=32, axes_dims_rope=(8, 12, 12))


def build(arch: str):
    """``(pipe, call kwargs)`` for one architecture."""
    if arch == "sdxl":
        return make_sdxl_pipeline(**SDXL_LAYOUT), dict(height=64, width=64, num_inference_steps=4, guidance_scale=0.0)
    pipe = make_flux_pipeline(**FLUX_LAYOUT)
    return pipe, dict(height=32, width=32, num_inference_steps=4, guidance_scale=0.0, max_sequence_length=48)


def sample_seconds(pipe, kwargs, steering=None, timesteps=None) -> tuple[float, float]:
    """``(sampling seconds, attach + remove seconds)``; the sampling time excludes attaching."""
    generator = torch.Generator().manual_seed(0)
    if steering is None:
        t0 = time.perf_counter()
        pipe("a horse", generator=generator, output_type="latent", **kwargs)
        return time.perf_counter() - t0, 0.0
    t0 = time.perf_counter()
    handle = attach_pipeline(pipe, steering, timesteps=timesteps)
    t1 = time.perf_counter()
    try:
        pipe("a horse", generator=generator, output_type="latent", **kwargs)
    finally:
        t2 = time.perf_counter()
        handle.remove()
    return t2 - t1, (t1 - t0) + (time.perf_counter() - t2)


def run(arch: str, repeats: int) -> None:
    pipe, kwargs = build(arch)
    fit_kw = {k: v for k, v in kwargs.items() if k in ("height", "width", "max_sequence_length")}
    observed = fit_pipeline(pipe, SOURCE, TARGET, progress=False, **fit_kw)
    all_reals = fit_pipeline(pipe, SOURCE, TARGET, support="all", progress=False, **fit_kw)
    variants = {
        "unsteered": (None, None),
        "strength 0 (maps skipped)": (Steering(observed, 0.0), None),
        "strength 1, observed support": (Steering(observed, 1.0), None),
        "strength 1, support all": (Steering(all_reals, 1.0), None),
        "strength 1, window (0, 0.5)": (Steering(observed, 1.0), (0.0, 0.5)),
        "2 transports composed": ([Steering(observed, 0.5), Steering(all_reals, 0.5)], None),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    attach: dict[str, list[float]] = {name: [] for name in variants}
    for name, (steering, window) in variants.items():  # warm-up
        sample_seconds(pipe, kwargs, steering, window)
    for _ in range(repeats):  # interleaved, so slow spells hit every variant alike
        for name, (steering, window) in variants.items():
            sampling, attaching = sample_seconds(pipe, kwargs, steering, window)
            times[name].append(sampling)
            attach[name].append(attaching)
    base_min, base_median = min(times["unsteered"]), statistics.median(times["unsteered"])
    size = f"{kwargs['height']}x{kwargs['width']}"
    print(f"\n{arch}: {len(observed)} sites, {size}, {kwargs['num_inference_steps']} steps, "
          f"{torch.get_num_threads()} thread(s), {repeats} interleaved repeats (the minimum is the least noisy)")
    for name, values in times.items():
        best, median = min(values), statistics.median(values)
        extra = f"   attach+remove {statistics.median(attach[name]) * 1000:6.1f} ms" if name != "unsteered" else ""
        print(f"  {name:30s} min {best * 1000:7.1f} ms  ratio {best / base_min:5.3f}   "
              f"(median ratio {median / base_median:5.3f}){extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["sdxl", "flux"], choices=["sdxl", "flux"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on 2 shared cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for arch in args.arch:
        run(arch, args.repeats)


if __name__ == "__main__":
    main()
