"""Per-row strength updates: ``handle.set_strength(one strength per row)`` before every forward, as a serving engine
does (one strength per flattened token, 0 for the tokens of unsteered requests), vs a plain forward.

R rows of one token each go through SmolLM2 (61 norm sites, observed support). Arms, interleaved in one process:
  plain     the forward alone, no steering;
  scalar    steered at strength 1 on every row (no per-row work);
  per-row   ``set_strength(s)`` with a new 0/1 pattern every call (half the rows at 1), then the forward.
Also printed: the median time of ``set_strength`` alone. Rows at 0 must equal the plain forward, rows at 1 the
scalar one, bit for bit (checked first).

    python -m benchmarks.strength_update [--rows 16 512] [--reps 9] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import actsteer  # noqa: E402
from actsteer.hf_integration.cli import read_texts  # noqa: E402
from actsteer.hf_integration.default_model import load_model  # noqa: E402

from benchmarks.overhead_timing import interleave, report, summary, write_json  # noqa: E402

DATA = Path(actsteer.__file__).parent / "hf_integration" / "data"


def pattern(rows: int, step: int) -> torch.Tensor:
    """Half the rows (a window that moves every step) at strength 1, the others 0."""
    s = torch.zeros(rows)
    start = (step * rows // 4) % rows
    s[start : start + rows // 2] = 1.0
    return s


def run_rows(model, transport, rows: int, args) -> dict:
    device = args.device
    ids = torch.randint(0, 1000, (rows, 1), generator=torch.Generator().manual_seed(rows)).to(device)
    live: list = []
    step = [0]
    update_times: list[float] = []

    def forward():
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False).logits

    def cycle():
        step[0] += 1
        s = pattern(rows, step[0])
        t0 = time.perf_counter()
        live[0].set_strength(s)
        update_times.append(time.perf_counter() - t0)
        return forward()

    # correctness: per-row rows equal the plain / scalar results of the same rows
    plain = forward()
    with actsteer.steer(model, transport, strength=1.0):
        full = forward()
    with actsteer.steer(model, transport, strength=pattern(rows, 0)):
        mixed = forward()
    on = pattern(rows, 0).bool().to(device)
    check = bool(torch.equal(mixed[on], full[on]) and torch.equal(mixed[~on], plain[~on]))

    arms = {
        "plain": forward,
        "scalar": (lambda: live.append(actsteer.attach(model, transport, strength=1.0)), forward,
                   lambda: live.pop().remove()),
        "per-row": (lambda: live.append(actsteer.attach(model, transport, strength=pattern(rows, 0))), cycle,
                    lambda: live.pop().remove()),
    }
    times = interleave(arms, args.reps, device=device, warmup=1)
    update = statistics.median(update_times)
    print(f"R = {rows} rows: rows equal plain/scalar bit for bit: {check}; set_strength alone {update * 1e3:.2f} ms "
          f"(median of {len(update_times)})")
    print("\n".join(report(times)))
    return {"rows": rows, "reps": args.reps, "rows_bit_identical": check, "set_strength_s": update, **summary(times)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 512])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device=args.device)
    transport = actsteer.fit_lm(model, tok, read_texts(DATA / "neutral.txt"), read_texts(DATA / "ocean.txt"),
                                modules="all-norms", progress=False)
    print(f"model: {model.config._name_or_path}; {len(transport)} sites, observed support; "
          f"{torch.get_num_threads()} thread(s); {args.device}")
    results = [run_rows(model, transport, rows, args) for rows in args.rows]
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
