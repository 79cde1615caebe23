"""Hook overhead: one model's forward pass with a Linear-AcT transport attached vs without, in the same run.

A random mid-size Llama (default hidden 512, 8 layers, batch 8 x 128 tokens) gets a transport fitted with
`actsteer.core.fit.fit` on every norm module (``input_layernorm``, ``post_attention_layernorm``, ``norm``),
applied with support "all" (one ``addcmul`` per site) and "observed" (``addcmul`` inside a ``where``).
Repetitions are interleaved (baseline, all, observed, rotated each repetition) so that machine noise hits
every variant alike; each round reports the median time per variant, the ratio to the baseline's median, and
the median of the per-repetition ratios ("paired").
The measurement runs in two rounds after a warmup, so their agreement shows how stable the figures are.

Usage:
    python benchmarks/hook_overhead.py                      # float32 and bfloat16 on CPU
    python benchmarks/hook_overhead.py --device cuda --reps 50 --hidden 1024 --layers 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import actsteer  # noqa: E402
from actsteer.core.fit import fit  # noqa: E402
from actsteer.core.sites import resolve_sites  # noqa: E402

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


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_forward(model: torch.nn.Module, ids: torch.Tensor, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    sync(device)
    return time.perf_counter() - t0


def measure(model, ids, transports, args, reps: int) -> dict[str, list[float]]:
    variants = ["baseline", *transports]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(reps):
        order = variants[rep % len(variants):] + variants[: rep % len(variants)]  # rotate who goes first
        for variant in order:
            handle = None if variant == "baseline" else actsteer.attach(model, transports[variant], strength=1.0)
            try:
                times[variant].append(time_forward(model, ids, args.device))
            finally:
                if handle is not None:
                    handle.remove()
    return times


def site_op_time(transport: actsteer.Transport, args: argparse.Namespace, dtype: torch.dtype, reps: int) -> float:
    """Median time of the per-call work of ALL sites alone (the folded map on a (B, T, D) activation each)."""
    x = torch.randn(args.batch, args.seq, args.hidden, device=args.device).to(dtype)
    folded = [m.fold(1.0).to(args.device, dtype) for m in transport.values()]
    samples = []
    for _ in range(reps):
        sync(args.device)
        t0 = time.perf_counter()
        for fm in folded:
            fm.apply_last(x)
        sync(args.device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default 8/3 * hidden)")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per variant and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forward passes per variant first")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fit-inputs", type=int, default=8, help="source and target inputs for the fit")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"Llama hidden={args.hidden} layers={args.layers} batch={args.batch} seq={args.seq} device={args.device} "
        f"threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        model = build_model(args, dtype)
        transports = fit_transports(model, args)
        n_sites = len(transports["all"])
        measure(model, ids, transports, args, args.warmup)
        for r in range(args.rounds):
            times = measure(model, ids, transports, args, args.reps)
            base = statistics.median(times["baseline"])
            parts = [f"baseline {base * 1e3:8.2f} ms"]
            for v in transports:
                med = statistics.median(times[v])
                paired = statistics.median(t / b for t, b in zip(times[v], times["baseline"]))
                parts.append(f"support={v}: {med * 1e3:8.2f} ms (x{med / base:.3f}, paired x{paired:.3f})")
            print(f"{dtype_name:>9} round {r + 1} [{n_sites} sites, median of {args.reps}]: " + " | ".join(parts))
        ops = {v: site_op_time(t, args, dtype, max(args.reps, 20)) for v, t in transports.items()}
        print(
            f"{dtype_name:>9} site ops alone ({n_sites} sites, no model): "
            + " | ".join(f"support={v}: {o * 1e3:.2f} ms = {100 * o / base:.2f}% of the baseline" for v, o in ops.items())
        )


if __name__ == "__main__":
    main()
