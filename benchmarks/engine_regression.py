"""The request-scoped engine against the previous model-global one (a git revision), side by side in one process.

The previous engine's ``core/`` is extracted from git into a temporary package and applied to the SAME SmolLM2
model object; runs are interleaved (plain, previous, request-scoped `steer`, model-wide `attach`, ...) and medians
of tokens/s compared. Issue 11 asks that steering be no slower than before.

    python -m benchmarks.engine_regression [--rev 36008e2] [--new-tokens 32] [--reps 5] [--batch 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import actsteer
from actsteer.hf_integration.cli import read_texts
from actsteer.hf_integration.default_model import load_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "hf_integration" / "data"


def previous_core(rev: str, where: Path):
    """Import ``core/`` as it was at ``rev`` under the package name ``prevcore``."""
    pkg = where / "prevcore"
    pkg.mkdir()
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:core"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        text = subprocess.run(["git", "show", f"{rev}:core/{name}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout
        (pkg / name).write_text(text)
    sys.path.insert(0, str(where))
    return importlib.import_module("prevcore.hooks"), importlib.import_module("prevcore.transport")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="36008e2", help="git revision of the previous engine")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--support", default="observed", choices=["observed", "all"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_model("smollm2")
    transport = actsteer.fit_lm(model, tok, read_texts(DATA / "neutral.txt"), read_texts(DATA / "ocean.txt"),
                                modules="all-norms", support=args.support, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        prev_hooks, prev_transport = previous_core(args.rev, Path(tmp))
        old = prev_transport.Transport(
            {s: prev_transport.UnitMap(**{f: getattr(m, f) for f in ("omega", "beta", "lo", "hi", "target_lo",
                                                                      "target_hi", "dead")})
             for s, m in transport.items()})
        tok.padding_side = "left"
        prompts = ["Once upon a time,", "Yesterday I went", "The weather today", "My favorite food is"]
        enc = tok([prompts[i % len(prompts)] for i in range(args.batch)], return_tensors="pt", padding=True)
        gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                   pad_token_id=tok.pad_token_id or tok.eos_token_id)

        def run(arm: str) -> tuple[float, torch.Tensor]:
            t0 = time.perf_counter()
            with torch.inference_mode():
                if arm == "plain":
                    out = model.generate(**enc, **gen)
                elif arm == "previous":
                    with prev_hooks.steer(model, old):
                        out = model.generate(**enc, **gen)
                elif arm == "steer":
                    with actsteer.steer(model, transport):
                        out = model.generate(**enc, **gen)
                else:
                    handle = actsteer.attach(model, transport)
                    try:
                        out = model.generate(**enc, **gen)
                    finally:
                        handle.remove()
            return args.batch * args.new_tokens / (time.perf_counter() - t0), out

        arms = ["plain", "previous", "steer", "attach"]
        outputs = {arm: run(arm)[1] for arm in arms}  # warm-up, and the tokens each arm produces
        same = torch.equal(outputs["previous"], outputs["steer"]) and torch.equal(outputs["steer"], outputs["attach"])
        speed: dict[str, list[float]] = {arm: [] for arm in arms}
        for _ in range(args.reps):
            for arm in arms:
                speed[arm].append(run(arm)[0])
    med = {arm: statistics.median(v) for arm, v in speed.items()}

    def paired(a: str, b: str) -> float:
        # ratios within one rep (one round of all arms) cancel the machine's slow spells; median over reps
        return statistics.median(x / y for x, y in zip(speed[a], speed[b]))

    print(f"SmolLM2, {len(transport)} sites, support={args.support}, batch {args.batch}, {args.new_tokens} tokens, "
          f"{args.reps} interleaved reps, {args.threads} thread(s); previous engine = {args.rev}")
    for arm in arms:
        print(f"  {arm:>8}: {med[arm]:7.1f} tokens/s  paired ratio to plain {paired(arm, 'plain'):.3f}  "
              f"(runs: {', '.join(f'{v:.1f}' for v in speed[arm])})")
    print(f"  paired ratios: request-scoped / previous {paired('steer', 'previous'):.3f}; model-wide / previous "
          f"{paired('attach', 'previous'):.3f}; same greedy tokens: {same}")


if __name__ == "__main__":
    main()
