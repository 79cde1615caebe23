"""Sampling time in ComfyUI with the AcT Apply node vs without it (ratio), on the biggest configs that run here.

The models keep the real SDXL / FLUX.1 block layouts, so the number of hooked sites is the real one (SDXL UNet:
every GroupNorm/LayerNorm, 256 sites; FLUX: both streams of 19 double blocks + 38 single blocks), with random
weights. ``--sdxl-width 320`` is the real SDXL UNet (2.6B parameters, ~10 GB in float32); FLUX.1's real hidden
size 3072 (12B parameters) does not fit in this machine's memory, so FLUX runs at the largest hidden size that
does in reasonable time (``--flux-hidden 1024``: 1.3B parameters). Narrow widths make each hook relatively MORE
expensive than on the real models.

Arms, interleaved in one process (see ``overhead_timing.py``): ``plain``, ``observed`` (Apply node, finite
support ranges: the masked path, Learn's default) and ``all`` (support all reals). Ratios are paired speed
ratios (plain time / arm time; 1/ratio is the sampling-time factor), wall and CPU time.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.comfy_overhead --arch sdxl --sdxl-width 320 --size 256 --steps 2 --repeats 3
    .venv/bin/python -m benchmarks.comfy_overhead --arch flux --flux-hidden 1024 --size 256 --steps 2 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from tests.support import comfy as harness  # (sets ComfyUI up offline: CPU, stubbed torchvision, tiny CLIP)
from benchmarks.overhead_timing import interleave, report, summary, write_json


def sdxl_layout(width: int):
    """SDXL base's UNet layout (2 res blocks per level, transformer depth 2/10, 10 in the middle) at ``width``."""
    import comfy.supported_models

    mc = comfy.supported_models.SDXL(dict(
        image_size=32, use_spatial_transformer=True, legacy=False, num_classes="sequential", model_channels=width,
        in_channels=4, out_channels=4, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
        transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
        transformer_depth_middle=10, context_dim=64, adm_in_channels=64 + 6 * 256, use_linear_in_transformer=True,
        use_temporal_attention=False, dtype=torch.float32,
    ))
    mc.unet_config["num_head_channels"] = 32
    return harness._patcher(mc, seed=0)


def flux_layout(hidden: int):
    """FLUX.1's layout (19 double + 38 single blocks) at hidden size ``hidden`` (4 heads)."""
    import comfy.supported_models

    head = hidden // 4
    axes = [head - 2 * (head * 3 // 8), head * 3 // 8, head * 3 // 8]
    mc = comfy.supported_models.Flux(dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=64, context_in_dim=64, hidden_size=hidden,
        mlp_ratio=4.0, num_heads=4, depth=19, depth_single_blocks=38, axes_dim=axes, theta=10000, patch_size=2,
        qkv_bias=True, guidance_embed=True, dtype=torch.float32,
    ))
    return harness._patcher(mc, seed=0)


def transport_for(pack, model, preset: str, support: str = "observed"):
    """A transport with random maps; ``support="observed"`` gives finite ranges (the masked ``where`` path)."""
    core, nodes_pkg = pack.core, pack.comfy_nodes
    dm = model.model.diffusion_model
    sites = nodes_pkg.presets.preset_sites(dm, preset)
    g = torch.Generator().manual_seed(0)
    maps = {}
    for site in sites:
        d = core.infer_width(dm.get_submodule(site.split(":")[0]))
        bound = 4.0 if support == "observed" else float("inf")
        maps[site] = core.UnitMap(1 + 0.2 * (torch.rand(d, generator=g) - 0.5), 0.1 * torch.randn(d, generator=g),
                                  lo=torch.full((d,), -bound), hi=torch.full((d,), bound),
                                  target_lo=torch.full((d,), -bound), target_hi=torch.full((d,), bound))
    return core.Transport(maps, model={"naming": "comfyui", "class": type(model.model).__name__})


def bench(name: str, model, flux: bool, preset: str, args, pack) -> dict:
    import nodes

    clip = harness.tiny_clip(0)
    pos, neg = harness.encode(clip, "a photo of a cat", flux=flux), harness.encode(clip, "", flux=flux)
    cfg = 1.0 if flux else 4.0
    apply = nodes.NODE_CLASS_MAPPINGS["ActSteerApply"]
    transports = {support: transport_for(pack, model, preset, support) for support in args.support}
    arms = {"plain": model}
    arms.update({support: apply.execute(model=model, transport=t, strength=1.0, start_percent=0.0, end_percent=1.0,
                                        layers="")[0] for support, t in transports.items()})

    def sampler(m, steps):
        return lambda: harness.ksample(m, pos, neg, seed=0, steps=steps, cfg=cfg,
                                       latent=harness.empty_latent(m, 1, args.size))

    for m in arms.values():  # warm-up (first-call allocations, model load), one step each
        sampler(m, 1)()
    times = interleave({k: sampler(m, args.steps) for k, m in arms.items()}, args.repeats, warmup=0)
    dm = model.model.diffusion_model
    attach_times = []
    transport = next(iter(transports.values()))
    for _ in range(3):  # the per-run fixed cost: validate + fold every site once (in the OUTER_SAMPLE wrapper)
        start = time.perf_counter()
        pack.core.attach(dm, transport, strength=1.0).remove()
        attach_times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in dm.parameters())
    print(f"{name}: {params / 1e6:.0f}M parameters, {len(transport)} sites, latent {args.size // 8}x{args.size // 8}, "
          f"{args.steps} steps, cfg {cfg}, {args.repeats} interleaved repeats, {torch.get_num_threads()} thread(s); "
          f"attach+fold {statistics.median(attach_times):.3f} s")
    print("\n".join(report(times, unit=lambda s: f"{s:.2f} s")), flush=True)
    return {
        "config": name, "params_M": round(params / 1e6, 1), "sites": len(transport),
        "units": sum(m.dim for m in transport.values()), "latent": f"{args.size // 8}x{args.size // 8}",
        "steps": args.steps, "cfg": cfg, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "attach_fold_s": statistics.median(attach_times), **summary(times),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["sdxl", "flux"], choices=["sdxl", "flux"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size / 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is the most stable on shared CPUs)")
    parser.add_argument("--sdxl-width", type=int, default=64, help="UNet model_channels (real SDXL: 320)")
    parser.add_argument("--flux-hidden", type=int, default=256, help="FLUX hidden size (real FLUX.1: 3072)")
    parser.add_argument("--support", nargs="+", choices=["observed", "all"], default=["observed", "all"],
                        help="observed: finite support ranges (masked path, the default of Learn); all: unmasked")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pack = harness.load_pack()
    results = []
    if "sdxl" in args.arch:
        results.append(bench(f"SDXL layout, width {args.sdxl_width}", sdxl_layout(args.sdxl_width), False,
                             "all-norms", args, pack))
    if "flux" in args.arch:
        results.append(bench(f"FLUX.1 layout, hidden {args.flux_hidden}", flux_layout(args.flux_hidden), True,
                             "blocks", args, pack))
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
