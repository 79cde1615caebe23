"""Cost of sequential vs at-once fitting on SmolLM2 (all norm modules): forward passes and wall time.

Prints both modes side by side (interleaved repetitions, medians), their ratio (target <= 1.5x), the
reference implementation's ~(L+1)/2 full-pass figure for L sites, and what sequential fitting costs when
the texts do NOT fit in one batch (--batch-size).

    python benchmarks/fit_cost.py [--model smollm2] [--n 48] [--reps 3] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import actsteer
from actsteer.hf_integration.cli import read_texts
from actsteer.hf_integration.default_model import load_model

DATA = Path(actsteer.__file__).parent / "hf_integration" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--n", type=int, default=48, help="texts per side")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="for the multi-batch row")
    args = parser.parse_args()

    model, tok = load_model(args.model)
    src, tgt = read_texts(DATA / "neutral.txt")[: args.n], read_texts(DATA / "ocean.txt")[: args.n]

    def fit(sequential: bool, batch_size=None):
        t0 = time.perf_counter()
        t = actsteer.fit_lm(model, tok, src, tgt, modules="all-norms", sequential=sequential,
                            batch_size=batch_size, progress=False)
        return time.perf_counter() - t0, t

    fit(True), fit(False)  # warm-up
    seq, once = [], []
    for _ in range(args.reps):
        seq.append(fit(True))
        once.append(fit(False))
    n_sites = len(seq[0][1])
    s_time, o_time = statistics.median(x for x, _ in seq), statistics.median(x for x, _ in once)
    s_fit, o_fit = seq[0][1].extra["fit"], once[0][1].extra["fit"]
    print(f"model: {model.config._name_or_path}; {n_sites} sites (all norms); {len(src)} + {len(tgt)} texts; "
          f"{args.reps} interleaved reps")
    print(f"{'mode':<34} {'forward calls':>13} {'full-pass equiv.':>17} {'wall s (median)':>16}")
    print(f"{'at once (1 batch)':<34} {o_fit['forward_calls']:>13} {o_fit['forward_equivalents']:>17.2f} {o_time:>16.2f}")
    print(f"{'sequential (1 batch, one pass)':<34} {s_fit['forward_calls']:>13} {s_fit['forward_equivalents']:>17.2f} {s_time:>16.2f}")
    multi_time, multi = fit(True, args.batch_size)
    m_fit = multi.extra["fit"]
    label = f"sequential ({m_fit['batches']} batches of {args.batch_size})"
    print(f"{label:<34} {m_fit['forward_calls']:>13} "
          f"{m_fit['forward_equivalents']:>17.2f} {multi_time:>16.2f}")
    print(f"reference ml-act 'incr' (per-site passes): ~(L+1)/2 = {(n_sites + 1) / 2:.1f} full passes per batch")
    print(f"ratio sequential/at-once wall time (1 batch): {s_time / o_time:.2f}x  (target <= 1.5x)")


if __name__ == "__main__":
    main()
