"""Decoding speed with steering vs without (SmolLM2-135M, Linear-AcT on all 61 norm outputs), side by side.

Arms, interleaved in one process (each repetition runs every arm once, rotating who goes first):
  plain        no steering at all (no hook installed);
  observed     actsteer, observed support (the default: the masked path);
  all          actsteer, support all reals (one multiply-add per site);
  where-hooks  plain forward hooks computing the pre-issue-15 per-call formula ``where(clamp(x)==x, addcmul, x)``
               with the same observed-support maps, no dispatcher (a floor for "a hook per site");
  empty-hooks  plain forward hooks that do nothing (return None) on the same 61 modules: the cost of the hook
               machinery alone, the floor of any eager hook-based steering.
Before timing, the greedy tokens of ``observed`` are checked against ``where-hooks`` (same maps, the formula of
the previous per-call path): they must be identical. Ratios are paired speed ratios (plain time / arm time,
1.0 = free), median and interquartile range over repetitions, for wall time and process CPU time (the steadier
one on a shared machine). Targets (issue 15): observed >= 0.97, all >= 0.99.

    python -m benchmarks.generation_overhead [--batch 1 4] [--threads 1 2] [--new-tokens 16] [--reps 21]
    python -m benchmarks.generation_overhead --device cuda --dtype bfloat16 [--compile]   # on a GPU
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import actsteer  # noqa: E402
from actsteer.hf_integration.cli import read_texts  # noqa: E402
from actsteer.hf_integration.default_model import load_model  # noqa: E402

from benchmarks.overhead_timing import interleave, report, summary, write_json  # noqa: E402

DATA = Path(actsteer.__file__).parent / "hf_integration" / "data"
PROMPTS = ["Once upon a time,", "Yesterday I went", "The weather today", "My favorite food is"]


def where_hooks(model: torch.nn.Module, transport: actsteer.Transport, device, dtype) -> list:
    """Forward hooks with the previous per-call formula (the reference arm); returns their handles."""
    handles = []
    for site, unit_map in transport.items():
        fm = unit_map.fold(1.0).to(device, dtype)

        def hook(module, args, out, fm=fm):
            moved = torch.where(torch.clamp(out, fm.lo, fm.hi) == out, torch.addcmul(fm.bias, out, fm.weight), out)
            return moved.to(out.dtype)

        handles.append(model.get_submodule(site).register_forward_hook(hook))
    return handles


def empty_hooks(model: torch.nn.Module, transport: actsteer.Transport) -> list:
    """Forward hooks that do nothing on the transport's sites (the hook-machinery floor); returns their handles."""
    return [model.get_submodule(site).register_forward_hook(lambda module, args, out: None) for site in transport]


def fit(model, tok, support: str) -> actsteer.Transport:
    return actsteer.fit_lm(model, tok, read_texts(DATA / "neutral.txt"), read_texts(DATA / "ocean.txt"),
                           modules="all-norms", support=support, progress=False)


def run_config(model, tok, transports, args, batch: int) -> dict:
    device = args.device
    enc = tok([PROMPTS[i % len(PROMPTS)] for i in range(batch)], return_tensors="pt", padding=True).to(device)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               pad_token_id=tok.pad_token_id or tok.eos_token_id)
    if args.compile:
        gen["cache_implementation"] = "static"  # static shapes: what CUDA graphs need
    live: list = []

    def generate():
        with torch.inference_mode():
            return model.generate(**enc, **gen)

    def steered(support):
        return (lambda: live.append(actsteer.attach(model, transports[support], strength=1.0)), generate,
                lambda: live.pop().remove())

    def reference():
        return (lambda: live.extend(where_hooks(model, transports["observed"], device, args.torch_dtype)), generate,
                lambda: [live.pop().remove() for _ in range(len(live))])

    arms = {"plain": generate}
    arms.update({support: steered(support) for support in args.support})
    arms["where-hooks"] = reference()
    arms["empty-hooks"] = (lambda: live.extend(empty_hooks(model, transports["observed"])), generate,
                           lambda: [live.pop().remove() for _ in range(len(live))])
    # same greedy tokens as the previous per-call formula (and steering does change them)
    before, run, after = arms["where-hooks"]
    before()
    ref_tokens = run()
    after()
    check = {}
    for support in args.support:
        before, run, after = arms[support]
        before()
        tokens = run()
        after()
        if support == "observed":
            check["observed_equals_where_hooks"] = bool(torch.equal(tokens, ref_tokens))
    check["steering_changes_tokens"] = bool(not torch.equal(generate(), ref_tokens))
    times = interleave(arms, args.reps, device=device, warmup=1)
    tokens = batch * args.new_tokens
    lines = report(times, unit=lambda s: f"{tokens / s:.1f} tokens/s")
    print(f"batch {batch}, {args.new_tokens} new tokens, {torch.get_num_threads()} thread(s), {args.reps} reps; "
          f"checks: {check}")
    print("\n".join(lines), flush=True)
    return {"batch": batch, "threads": torch.get_num_threads(), "new_tokens": args.new_tokens, "reps": args.reps,
            "checks": check, **summary(times)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op threads (CPU)")
    parser.add_argument("--support", nargs="+", default=["observed", "all"], choices=["observed", "all"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the forward (mode reduce-overhead: CUDA graphs on a GPU) with a static "
                             "cache; every arm then runs compiled")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.torch_dtype = getattr(torch, args.dtype)
    if "observed" not in args.support:
        args.support = ["observed", *args.support]

    model, tok = load_model(args.model, dtype=args.torch_dtype, device=args.device)
    tok.padding_side = "left"
    transports = {support: fit(model, tok, support) for support in args.support}
    actsteer.enable_steering(model)
    if args.compile:
        model.forward = torch.compile(model.forward, mode="reduce-overhead" if args.device != "cpu" else None)
    print(f"model: {model.config._name_or_path} ({args.dtype}, {args.device}); {len(transports['observed'])} sites; "
          f"torch {torch.__version__}{'; compiled' if args.compile else ''}")
    results = []
    for threads in args.threads if args.device == "cpu" else [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        for batch in args.batch:
            results.append(run_config(model, tok, transports, args, batch))
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
