"""Cost of fitting on SmolLM2 (all 61 norm modules): a sequential `fit_lm` vs ONE plain forward pass over the same
texts, and vs an at-once fit; forward passes and wall time.

Arms, interleaved in one process (each repetition runs every arm once, rotating who goes first):
  plain forward   the texts (source + target, one padded batch) through the model once, as fit_lm feeds them;
  sequential      ``fit_lm(..., sequential=True)`` with all texts in one batch (the default);
  at once         ``fit_lm(..., sequential=False)``.
Reported: the paired cost ratio (arm time / plain forward time), median and interquartile range, wall and CPU
time. Target (issue 15): sequential <= 2x one plain forward pass. Also: what a sequential fit costs when the texts
do NOT fit in one batch (--batch-size), and the reference implementation's ~(L+1)/2 passes for L sites.

    python -m benchmarks.fit_cost [--model smollm2] [--n 48] [--reps 7] [--batch-size 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import actsteer  # noqa: E402
from actsteer.hf_integration.cli import read_texts  # noqa: E402
from actsteer.hf_integration.default_model import load_model  # noqa: E402
from actsteer.hf_integration.lm import make_runner, padding_ready  # noqa: E402

from benchmarks.overhead_timing import interleave, quartiles, write_json  # noqa: E402

DATA = Path(actsteer.__file__).parent / "hf_integration" / "data"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--n", type=int, default=48, help="texts per side")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=16, help="for the multi-batch row")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model(args.model, device=args.device)
    src, tgt = read_texts(DATA / "neutral.txt")[: args.n], read_texts(DATA / "ocean.txt")[: args.n]
    fitted: dict[str, actsteer.Transport] = {}

    def plain_forward():
        with padding_ready(tok), torch.no_grad():
            make_runner(model, tok, 512)(src + tgt, types.SimpleNamespace())

    def fit(sequential: bool):
        def run():
            fitted["sequential" if sequential else "at once"] = actsteer.fit_lm(
                model, tok, src, tgt, modules="all-norms", sequential=sequential, progress=False)
        return run

    arms = {"plain forward": plain_forward, "sequential": fit(True), "at once": fit(False)}
    times = interleave(arms, args.reps, device=args.device, warmup=1)
    n_sites = len(fitted["sequential"])
    print(f"model: {model.config._name_or_path}; {n_sites} sites (all norms); {len(src)} + {len(tgt)} texts in one "
          f"batch; {args.reps} interleaved reps; {torch.get_num_threads()} thread(s)")
    result: dict = {"sites": n_sites, "texts": len(src) + len(tgt), "reps": args.reps, "threads": torch.get_num_threads()}
    for clock in ("wall", "cpu"):
        base = [r[clock] for r in times["plain forward"]]
        base_q = quartiles(base)
        line = [f"plain forward {base_q[1]:.2f} s"]
        for name in ("sequential", "at once"):
            q = quartiles([r[clock] / b for r, b in zip(times[name], base)])
            line.append(f"{name} {q[1]:.2f}x [{q[0]:.2f}-{q[2]:.2f}]")
            result.setdefault(clock, {})[name] = dict(zip(("q1", "median", "q3"), q))
        result.setdefault(clock, {})["plain_forward_s"] = base_q[1]
        print(f"  {clock:>4}: " + "; ".join(line) + "  (cost vs one plain forward; target: sequential <= 2x)")
    fits = {name: t.extra["fit"] for name, t in fitted.items()}
    print(f"  forward calls: sequential {fits['sequential']['forward_calls']}, at once {fits['at once']['forward_calls']}")
    t0 = time.perf_counter()
    multi = actsteer.fit_lm(model, tok, src, tgt, modules="all-norms", batch_size=args.batch_size, progress=False)
    m_fit = multi.extra["fit"]
    print(f"  sequential, {m_fit['batches']} batches of {args.batch_size}: {m_fit['forward_calls']} forward calls, "
          f"{m_fit['forward_equivalents']:.1f} full-pass equivalents, {time.perf_counter() - t0:.1f} s wall "
          f"(reference ml-act: ~(L+1)/2 = {(n_sites + 1) / 2:.0f} full passes per batch)")
    result["multi_batch"] = {k: m_fit[k] for k in ("batches", "forward_calls", "forward_equivalents")}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
