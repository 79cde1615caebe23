"""The whole steering-overhead suite in one command, sized to run in a few minutes; CPU by default, GPU-ready.

Runs, in order, with settings per device (``--quick`` shrinks repetitions further):
  1. hook_overhead        forward pass of a mid-size random Llama, eager and ``torch.compile`` (on CUDA: mode
                          ``reduce-overhead``, i.e. CUDA graphs over static shapes), support all / observed;
  2. generation_overhead  SmolLM2 greedy decoding, batch 1 and 4 (on CUDA also compiled with a static cache);
  3. strength_update      per-row ``set_strength`` + forward cycles, R = 16 and 512 rows;
  4. diffusion_overhead   diffusers SDXL and FLUX layouts (CPU: small widths; CUDA: real SDXL width 320 and
                          FLUX.1's hidden 3072, bfloat16);
  5. fit_cost             sequential ``fit_lm`` vs one plain forward pass;
  6. comfy_overhead       the ComfyUI Apply node (CPU only: the offline ComfyUI harness runs ComfyUI on the CPU;
                          skipped when no ComfyUI tree is found).
Each step writes ``<out>/<name>.json``; a step that fails is reported and the suite goes on. On CUDA every
timing is bracketed by ``torch.cuda.synchronize()`` and CUDA events (``overhead_timing.py``).

    python -m benchmarks.overhead_suite                       # CPU
    python -m benchmarks.overhead_suite --device cuda --out benchmarks/out/gpu
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def steps(device: str, quick: bool) -> list[tuple[str, list[str]]]:
    """``(benchmark module, argv)`` per step for ``device``."""
    cuda = device.startswith("cuda")
    reps = "3" if quick else ("7" if not cuda else "20")
    plan = [
        ("hook_overhead", ["--device", device, "--reps", reps, "--compile", "--dtypes", "float32,bfloat16" if cuda else "float32"]
         + (["--compile-mode", "reduce-overhead", "--hidden", "1024", "--layers", "16"] if cuda else ["--threads", "1"])),
        ("generation_overhead", ["--device", device, "--reps", reps, "--batch", "1", "4", "--new-tokens", "16"]
         + (["--dtype", "bfloat16"] if cuda else ["--threads", "1"])),
        ("strength_update", ["--device", device, "--reps", reps, "--rows", "16", "512"]),
        ("diffusion_overhead", ["--device", device, "--repeats", reps, "--steps", "2"]
         + (["--sdxl-width", "320", "--flux-hidden", "3072", "--dtype", "bfloat16"] if cuda else [])),
        ("fit_cost", ["--device", device, "--reps", "3" if quick or cuda else "5", "--n", "48"]),
    ]
    if cuda:
        plan.insert(2, ("generation_overhead", ["--device", device, "--reps", reps, "--batch", "1", "4",
                                                "--new-tokens", "16", "--dtype", "bfloat16", "--compile"]))
    else:
        plan.append(("comfy_overhead", ["--repeats", reps, "--steps", "2", "--size", "128"]))
    return plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these benchmark modules")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "overhead_suite")
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA build of torch and a visible GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"overhead suite on {device_name}, torch {torch.__version__}; results in {args.out}", flush=True)
    failures, done = [], {}
    for i, (name, bench_argv) in enumerate(steps(args.device, args.quick)):
        if args.only and name not in args.only:
            continue
        label = f"{name}{'_compiled' if '--compile' in bench_argv and name == 'generation_overhead' else ''}"
        print(f"\n=== {label}: {' '.join(bench_argv)}", flush=True)
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            result = module.main([*bench_argv, "--json", str(args.out / f"{label}.json")])
            done[label] = {"seconds": round(time.perf_counter() - t0, 1), "argv": bench_argv}
            del result
        except BaseException as err:  # noqa: BLE001  (a failed step must not stop the suite; Ctrl-C still does)
            if isinstance(err, KeyboardInterrupt):
                raise
            failures.append(label)
            traceback.print_exc()
            print(f"--- {label} failed after {time.perf_counter() - t0:.0f} s: {type(err).__name__}: {err}", flush=True)
    (args.out / "suite.json").write_text(json.dumps({"device": device_name, "torch": torch.__version__,
                                                      "steps": done, "failed": failures}, indent=2))
    print(f"\nsuite done: {len(done)} steps ran, {len(failures)} failed {failures or ''}; results in {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
