"""SmolLM2-135M tokens/s, unsteered vs steered (Linear-AcT on all its norm modules), side by side.

Repetitions are interleaved (unsteered, steered, unsteered, ...) so slow spells of a noisy machine hit both;
medians are compared. Target: steered >= 0.95x the unsteered tokens/s.

    python benchmarks/generation_overhead.py [--model smollm2] [--new-tokens 32] [--reps 5] [--batch 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import actsteer
from actsteer.hf_integration.cli import read_texts
from actsteer.hf_integration.default_model import load_model

DATA = Path(actsteer.__file__).parent / "hf_integration" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--support", default="observed", choices=["observed", "all"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model(args.model)
    transport = actsteer.fit_lm(model, tok, read_texts(DATA / "neutral.txt"), read_texts(DATA / "ocean.txt"),
                                modules="all-norms", support=args.support, progress=False)
    actsteer.enable_steering(model)
    tok.padding_side = "left"
    prompts = ["Once upon a time,", "Yesterday I went", "The weather today", "My favorite food is"]
    enc = tok([prompts[i % len(prompts)] for i in range(args.batch)], return_tensors="pt", padding=True)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               pad_token_id=tok.pad_token_id or tok.eos_token_id)

    def tokens_per_s(steering) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(**enc, steering=steering, **gen)
        return args.batch * args.new_tokens / (time.perf_counter() - t0)

    tokens_per_s(None), tokens_per_s(transport)  # warm-up
    plain, steered = [], []
    for _ in range(args.reps):
        plain.append(tokens_per_s(None))
        steered.append(tokens_per_s(transport))
    p, s = statistics.median(plain), statistics.median(steered)
    print(f"model: {model.config._name_or_path}; {len(transport)} sites steered, support={args.support}; "
          f"batch {args.batch}, {args.new_tokens} new tokens, {args.reps} interleaved reps, {torch.get_num_threads()} threads")
    print(f"unsteered: {p:8.1f} tokens/s  (runs: {', '.join(f'{v:.1f}' for v in plain)})")
    print(f"steered:   {s:8.1f} tokens/s  (runs: {', '.join(f'{v:.1f}' for v in steered)})")
    print(f"ratio steered/unsteered: {s / p:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
