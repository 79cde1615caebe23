"""Hook overhead: one model's forward pass with a Linear-AcT transport attached vs without, eager and compiled.

A random mid-size Llama (default hidden 512, 8 layers, batch 8 x 128 tokens) gets a transport fitted with
`actsteer.core.fit` on every norm module (``input_layernorm``, ``post_attention_layernorm``, ``norm``),
applied with support "all" (one ``addcmul`` per site) and "observed" (``clamp``, compare, ``lerp`` on top).
Arms are interleaved in one process (see ``overhead_timing.py``); ratios are paired speed ratios (1.0 = free).
With ``--compile``, the same three arms also run through ``torch.compile(model)`` (compiled once, BEFORE any
steering: the dispatcher is traced on the first steered call) and are compared with the compiled plain model;
the script checks that compiled outputs match eager ones and that a strength change does not recompile.

Usage:
    python -m benchmarks.hook_overhead                      # float32 and bfloat16 on CPU
    python -m benchmarks.hook_overhead --compile --dtypes float32 --reps 9
    python -m benchmarks.hook_overhead --device cuda --reps 50 --hidden 1024 --layers 16 --compile
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
from actsteer.core import fit  # noqa: E402
from actsteer.core.sites import resolve_sites  # noqa: E402

from benchmarks.overhead_timing import interleave, report, summary, sync, write_json  # noqa: E402

NORMS = r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)|model\.norm"


def build_model(args: argparse.Namespace, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate or 8 * args.hidden // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 128),
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=args.device, dtype=dtype).eval()


def fit_transports(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, actsteer.Transport]:
    """Linear-AcT on all norms, one forward pass each: source = low token ids, target = high token ids."""
    g = torch.Generator().manual_seed(1)
    half = args.vocab // 2
    source = list(torch.randint(0, half, (args.fit_inputs, args.seq), generator=g))
    target = list(torch.randint(half, args.vocab, (args.fit_inputs, args.seq), generator=g))

    def run(items, ctx):
        model(input_ids=torch.stack(list(items)).to(args.device))

    sites = resolve_sites(model, NORMS)
    return {
        support: fit(model, sites, source, target, run=run, support=support, progress=False)
        for support in ("all", "observed")
    }


def _where_form(fm, x: torch.Tensor) -> torch.Tensor:
    """The per-call formula before issue 15: addcmul inside a bool ``where`` (for comparison only)."""
    moved = torch.addcmul(fm.bias, x, fm.weight)
    if fm.masked:
        moved = torch.where(torch.clamp(x, fm.lo, fm.hi) == x, moved, x)
    return moved.to(x.dtype)


def site_op_time(transport: actsteer.Transport, args: argparse.Namespace, dtype: torch.dtype, reps: int,
                 formula=None) -> float:
    """Median time of the per-call work of ALL sites alone (the folded map on a (B, T, D) activation each)."""
    x = torch.randn(args.batch, args.seq, args.hidden, device=args.device).to(dtype)
    folded = [m.fold(1.0).to(args.device, dtype) for m in transport.values()]
    samples = []
    for _ in range(reps):
        sync(args.device)
        t0 = time.perf_counter()
        for fm in folded:
            fm.apply_last(x) if formula is None else formula(fm, x)
        sync(args.device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _step(forward):
    """One forward; compiled ones start a new CUDA-graph step first (outputs of the last replay are not kept)."""
    if forward is not None and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
        torch.compiler.cudagraph_mark_step_begin()


def arms_for(model, forward, transports, ids, prefix: str = "") -> dict:
    live: list = []
    compiled = forward is not model

    def run():
        _step(forward if compiled else None)
        with torch.no_grad():
            forward(input_ids=ids, use_cache=False)

    arms = {f"{prefix}plain": run}
    for support, transport in transports.items():
        arms[f"{prefix}{support}"] = (lambda t=transport: live.append(actsteer.attach(model, t, strength=1.0)), run,
                                      lambda: live.pop().remove())
    return arms


def compile_checks(model, compiled, transports, ids) -> dict:
    """Max |compiled - eager| of the logits, unsteered and per support (strength 1, then 0.5 on the same handle),
    and how many graphs the strength change compiled (0 expected).

    Rounding differs between inductor's fused kernels and eager ones; with a support range the compare is
    discontinuous, so a value that rounds across a bound moves by a whole step: "all" shows the rounding alone.
    """
    from torch._dynamo.utils import counters

    def both(fn):
        _step(compiled)
        return fn(model).logits, fn(compiled).logits.clone()  # a CUDA-graph output is reused by the next replay

    out = {}
    with torch.no_grad():
        eager, comp = both(lambda m: m(input_ids=ids, use_cache=False))
        out["plain_max_abs_diff"] = (comp - eager).abs().max().item()
        out["max_abs_logit"] = eager.abs().max().item()
        for support, transport in transports.items():
            handle = actsteer.attach(model, transport, strength=1.0)
            try:
                eager, comp = both(lambda m: m(input_ids=ids, use_cache=False))
                graphs = counters["stats"]["unique_graphs"]
                handle.strength = 0.5
                eager_half, comp_half = both(lambda m: m(input_ids=ids, use_cache=False))
                out[f"{support}_graphs_compiled_by_strength_change"] = counters["stats"]["unique_graphs"] - graphs
            finally:
                handle.remove()
            out[f"{support}_max_abs_diff"] = max((comp - eager).abs().max().item(),
                                                 (comp_half - eager_half).abs().max().item())
    return {k: (round(v, 7) if isinstance(v, float) else v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default 8/3 * hidden)")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions of every arm")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forward passes per arm first")
    parser.add_argument("--fit-inputs", type=int, default=8, help="source and target inputs for the fit")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model) arms")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. reduce-overhead on a GPU)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"Llama hidden={args.hidden} layers={args.layers} batch={args.batch} seq={args.seq} device={args.device} "
        f"threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    results = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        model = build_model(args, dtype)
        transports = fit_transports(model, args)
        n_sites = len(transports["all"])
        arms = arms_for(model, model, transports, ids)
        checks = {}
        if args.compile:
            torch._dynamo.reset()
            compiled = torch.compile(model, mode=args.compile_mode)
            arms.update(arms_for(model, compiled, transports, ids, prefix="compiled "))
        times = interleave(arms, args.reps, device=args.device, warmup=args.warmup)
        eager = {k: v for k, v in times.items() if not k.startswith("compiled ")}
        print(f"{dtype_name} [{n_sites} sites, {args.reps} reps]:")
        print("\n".join(report(eager)))
        result = {"dtype": dtype_name, "sites": n_sites, "reps": args.reps, "eager": summary(eager)}
        if args.compile:
            comp = {k: v for k, v in times.items() if k.startswith("compiled ")}
            checks = compile_checks(model, compiled, transports, ids)
            print(f"{dtype_name} compiled (torch.compile, mode={args.compile_mode}); checks: {checks}")
            print("\n".join(report(comp, base="compiled plain")))
            ratio = statistics.median(c["wall"] for c in comp["compiled plain"]) / statistics.median(
                e["wall"] for e in eager["plain"])
            print(f"  compiled plain / eager plain time: {ratio:.3f}")
            result.update(compiled=summary(comp, base="compiled plain"), compile_checks=checks)
        ops = {v: site_op_time(t, args, dtype, max(args.reps, 20)) for v, t in transports.items()}
        before = site_op_time(transports["observed"], args, dtype, max(args.reps, 20), formula=_where_form)
        base = statistics.median(r["wall"] for r in times["plain"])
        print(f"  site ops alone ({n_sites} sites, no model): "
              + " | ".join(f"support={v}: {o * 1e3:.2f} ms = {100 * o / base:.2f}% of the plain pass" for v, o in ops.items())
              + f" | observed with the previous where formula: {before * 1e3:.2f} ms")
        result["site_ops_s"] = {**ops, "observed_where_formula": before}
        results.append(result)
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
