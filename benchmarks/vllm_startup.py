"""vLLM start-up with the actsteer plugin against stock, each from an empty compile cache (issue 20).

Each variant builds one ``vllm.LLM`` (SmolLM2 in float32, vLLM's default compiled mode) in a fresh process with
compile caches of its own (``VLLM_CACHE_ROOT`` and ``TORCHINDUCTOR_CACHE_DIR`` in a new temporary folder: a cold
start, the worst case), then generates 8 greedy tokens of one request (steered for the plugin variants). Variants:

- ``stock``: actsteer installed, no transports folder (the plugin changes nothing);
- ``fused``: a transports folder, ``graph: "fused"`` (the per-token formula traced into vLLM's graph);
- ``op``: a transports folder, ``graph: "op"`` (one opaque op per site; the default on CPU).

The variants run one after the other, interleaved over ``--rounds`` with the order rotating; reported per start:
the engine's construction (wall seconds; vLLM's compile included), the CPU seconds of the process and its
children (vLLM's engine core and inductor's compile workers: the steadier clock on a shared machine), and the
ratios to the same round's stock start. The plugin variants' text must differ from stock's (steering is live).

    python -m benchmarks.vllm_startup [--rounds 2] [--variants stock fused op] [--transports DIR] [--device cuda]

Needs the vLLM venv (``bash scripts/test_vllm.sh`` builds ``.venv-vllm``). Without ``--transports`` it fits the
"ocean" transport of `benchmarks.vllm_overhead` (61 norm sites). With ``--device cuda`` the ``op`` variant is
refused by the plugin (CUDA graphs), which the run reports.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
VARIANTS = ("stock", "fused", "op")
PROMPT = "Once upon a time,"


def child(variant: str, model: str, folder: str, device: str) -> dict:
    """One cold start in this process: engine construction, then 8 tokens."""
    from vllm import LLM, SamplingParams

    kwargs: dict = {"max_model_len": 512, "seed": 0, "max_num_seqs": 16}
    kwargs.update({"dtype": "float32", "gpu_memory_utilization": 0.1} if device == "cpu" else
                  {"gpu_memory_utilization": 0.4})
    if variant != "stock":
        kwargs["additional_config"] = {"actsteer": {"transports": folder, "graph": variant}}
    t0 = time.perf_counter()
    llm = LLM(model, **kwargs)
    engine_s = time.perf_counter() - t0
    extra = {"actsteer_transport": "ocean", "actsteer_strength": 0.8} if variant != "stock" else None
    out = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0, extra_args=extra), use_tqdm=False)
    return {"engine_s": engine_s, "text": out[0].outputs[0].text}


def _cpu_seconds() -> float:
    """CPU seconds of this process's finished children (each start is one child, with its own children)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_one(variant: str, model: str, folder: Path, device: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"vllm-startup-{variant}-") as cache:
        env = {k: v for k, v in os.environ.items() if k != "ACTSTEER_TRANSPORTS"}
        env.update(VLLM_CACHE_ROOT=str(Path(cache) / "vllm"), TORCHINDUCTOR_CACHE_DIR=str(Path(cache) / "inductor"),
                   HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
        c0, t0 = _cpu_seconds(), time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "benchmarks.vllm_startup", "--child", variant, "--model", model,
                               "--transports", str(folder), "--device", device],
                              env=env, cwd=HERE.parent, capture_output=True, text=True)
        wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    if done.returncode:
        return {"variant": variant, "error": done.stderr[-2000:]}
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return {"variant": variant, "process_s": wall, "cpu_s": cpu, **row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--transports", type=Path, default=None, help="folder with ocean.safetensors")
    parser.add_argument("--model", default=None, help="model folder (default: the converted SmolLM2)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="append each start as a JSON line")
    parser.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, str(args.transports), args.device)), flush=True)
        return
    folder = (args.transports or HERE / "out" / "vllm_transports").resolve()
    if not (folder / "ocean.safetensors").is_file():
        from benchmarks.vllm_overhead import fit_transport

        fit_transport(folder)
    if args.model is None:
        from actsteer.hf_integration.default_model import cache_dir

        args.model = str(cache_dir() / "SmolLM2-135M-Instruct")
    rows = []
    for r in range(args.rounds):
        order = args.variants[r % len(args.variants):] + args.variants[:r % len(args.variants)]
        for variant in order:
            row = {"round": r, **run_one(variant, args.model, folder, args.device)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
    stock = {row["round"]: row for row in rows if row["variant"] == "stock" and "error" not in row}
    print(f"\n{'variant':8s} {'engine s':>12s} {'CPU s':>12s} {'engine/stock':>14s} {'CPU/stock':>12s}  steered text")
    for variant in args.variants:
        mine = [row for row in rows if row["variant"] == variant and "error" not in row]
        if not mine:
            print(f"{variant:8s} failed: {[row['error'][-300:] for row in rows if row['variant'] == variant][:1]}")
            continue
        paired = [(row, stock[row["round"]]) for row in mine if row["round"] in stock]
        engine = " / ".join(f"{row['engine_s']:.0f}" for row in mine)
        cpu = " / ".join(f"{row['cpu_s']:.0f}" for row in mine)
        e_ratio = " / ".join(f"{a['engine_s'] / b['engine_s']:.2f}" for a, b in paired)
        c_ratio = " / ".join(f"{a['cpu_s'] / b['cpu_s']:.2f}" for a, b in paired)
        live = "" if variant == "stock" else ("steered" if all(row["text"] != stock.get(row["round"], {}).get(
            "text") for row in mine) else "NOT STEERED")
        print(f"{variant:8s} {engine:>12s} {cpu:>12s} {e_ratio:>14s} {c_ratio:>12s}  {live}")
    if any(v != "stock" for v in args.variants) and stock:
        ratios = [row["cpu_s"] / stock[row["round"]]["cpu_s"] for row in rows
                  if row["variant"] == "op" and row["round"] in stock and "error" not in row]
        if ratios:
            print(f"op / stock CPU median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
