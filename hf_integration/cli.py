"""The ``actsteer`` command: ``fit``, ``generate``, ``inspect`` and ``demo`` (causal LMs).

Examples:
    actsteer demo
    actsteer fit --model smollm2 --source neutral.txt --target ocean.txt -o ocean.safetensors
    actsteer generate --model smollm2 --steer ocean.safetensors --sweep 0,0.5,1 --prompt "Once upon a time"
    actsteer inspect ocean.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from ..core import printable, resolve_path
from .presets import preset_names
from .cli_checks import (
    CliError,
    Parser,
    check_options,
    check_output,
    finite_float,
    one_line,
    parse_floats,
    parse_option,
    parse_support,
    positive_int,
    read_examples,
)
from .texts import check_balance, read_texts

DEMO_PROMPTS = ["Once upon a time,", "My favorite thing to do on weekends is", "Yesterday I went"]
# Words whose presence marks the demo concept (the ocean) in a generation.
DEMO_KEYWORDS = (
    "ocean sea seas beach wave waves tide shore coast coral reef whale whales dolphin dolphins fish ship ships "
    "sail sailor sailors boat boats harbor island surf sand shell shells marine underwater water waters"
).split()


def concept_score(text: str, keywords: Sequence[str] = DEMO_KEYWORDS) -> int:
    """How many concept keywords a text contains (a cheap presence score for the demo; `actsteer.eval.keyword_hits`)."""
    from ..eval.text import keyword_hits

    return int(keyword_hits([text], keywords)[0])


def _load(args: argparse.Namespace):
    import torch

    from .default_model import load_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    try:
        return load_model(args.model, dtype=dtype, device=args.device)
    except Exception as err:
        raise CliError(f"cannot load the model {args.model!r}: {one_line(err)}") from err


def _check_model(args: argparse.Namespace) -> None:
    from .default_model import check_model

    try:
        check_model(args.model)
    except (OSError, ImportError) as err:
        raise CliError(f"--model: {one_line(err)}") from None


def generate_rows(model, tokenizer, transport, prompts: Sequence[str], strengths: Sequence[float], *,
                  max_new_tokens: int = 40, sample: bool = False, seed: int = 0, apply_to: str = "all") -> list[list[str]]:
    """Continuations of ``prompts`` at each strength, ``rows[s][p]`` (`actsteer.eval.generate_continuations`: all
    strengths in one batched ``generate``, one strength per row); greedy with repetition penalty 1.2, or sampled
    (top-p 0.9, temperature 0.8)."""
    from ..eval.sweep import generate_continuations

    sampling = {"do_sample": True, "top_p": 0.9, "temperature": 0.8} if sample else {}
    return generate_continuations(model, tokenizer, prompts, transport=transport, strengths=strengths,
                                  apply_to=apply_to, max_new_tokens=max_new_tokens, seed=seed, **sampling)


def print_rows(prompts: Sequence[str], strengths: Sequence[float], rows: list[list[str]], score=None) -> None:
    for p, prompt in enumerate(prompts):
        print(f"\n=== {prompt}")
        for s, row in zip(strengths, rows):
            text = " ".join(row[p].split())
            tag = f"  [concept words: {score(prompt + ' ' + text)}]" if score else ""
            print(f"  strength {s:>5g}{tag}: {text}")


def cmd_fit(args: argparse.Namespace) -> int:
    from ..core import canonical_method
    from .lm import fit_lm

    # Everything that can be checked without the model is checked first: a fit can take minutes.
    out = check_output(args.output, overwrite=args.overwrite)
    source = read_examples(args.source, "--source")
    target = read_examples(args.target, "--target")
    check_balance(len(source), len(target))
    method = canonical_method(args.method)
    options = check_options(method, dict(args.option or []))
    _check_model(args)
    model, tokenizer = _load(args)
    modules = args.modules if args.modules in preset_names() else args.modules.split(",")
    transport = fit_lm(model, tokenizer, source, target, modules=modules, method=method, pooling=args.pooling,
                       support=args.support, sequential=not args.at_once, batch_size=args.batch_size,
                       max_length=args.max_length, description=args.description, options=options or None)
    try:
        path = transport.save(out, overwrite=args.overwrite)
    except FileExistsError:  # created by someone else while fitting
        raise CliError(f"{out} exists; pass --overwrite to replace it, or choose another name") from None
    print(f"Fitted {transport.method} on {len(transport)} sites from {len(source)} source / {len(target)} target texts.")
    print(f"Wrote {path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from ..core import Transport

    transport = Transport.load(args.steer)
    strengths = args.sweep if args.sweep is not None else [args.strength]
    if not any(p.strip() for p in args.prompt):
        raise CliError("--prompt: give at least one non-empty prompt")
    _check_model(args)
    model, tokenizer = _load(args)
    rows = generate_rows(model, tokenizer, transport, args.prompt, strengths, max_new_tokens=args.max_new_tokens,
                         sample=args.sample, seed=args.seed, apply_to=args.apply_to)
    print_rows(args.prompt, strengths, rows)
    return 0


def summarize(transport) -> list[dict[str, Any]]:
    """Per-site summary: units, mean |beta|, omega range, ``ranged`` (the share of units whose support is a finite
    range rather than all reals), dead units. (How many activations a support covers on real inputs is
    `actsteer.eval.support_coverage`.)"""
    out = []
    for site, m in transport.items():
        ranged = (m.lo.isfinite() | m.hi.isfinite()).float().mean().item()
        out.append({
            "site": site, "units": m.dim, "mean_abs_beta": m.beta.abs().mean().item(),
            "omega_min": m.omega.min().item(), "omega_max": m.omega.max().item(),
            "ranged": ranged, "dead": int(m.dead.sum()),
        })
    return out


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..core import Transport, describe_size, read_header, stage_windows

    path = resolve_path(args.path)  # like `generate --steer`, the .safetensors suffix may be left out
    transport = Transport.load(path)
    header = read_header(path)
    meta = transport.metadata()
    meta.pop("sites")
    # every text below came from the file: shown through `printable`, so it cannot drive the terminal
    print(f"{printable(path, 400)} (format v{printable(header.get('format_version'), 12)}, written by actsteer "
          f"{printable(header.get('actsteer_version', '?'), 40)})")
    for key, value in meta.items():
        if value not in ({}, "", None):
            text = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)
            print(f"  {key}: {printable(' '.join(text.split()), 200)}")
    print(f"  sites: {len(transport)}, units: {sum(m.dim for m in transport.values())}")
    windows = stage_windows(transport)
    if windows:  # a per-step diffusion transport: site@k is stage k's map
        print(f"  per-step transport: {describe_size(transport)} (site@k applies in stage k's part of the schedule: "
              + ", ".join(f"{k}: {a:g}-{b:g}" for k, (a, b) in enumerate(windows)) + ")")
    knots = sorted({m.num_knots for m in transport.values() if hasattr(m, "num_knots")})
    if knots:  # QuantileMap sites: the columns below show their affine summary (the Linear-AcT fit, the tails)
        print(f"  quantile maps: {sum(hasattr(m, 'num_knots') for m in transport.values())} sites with "
              f"{'/'.join(map(str, knots))} knots (omega and beta below: their affine summary and tail slope)")
    print(f"\n  {'site':<48} {'units':>6} {'mean|beta|':>11} {'omega range':>17} {'ranged':>7} {'dead':>5}")
    for row in summarize(transport):
        print(f"  {printable(row['site']):<48} {row['units']:>6} {row['mean_abs_beta']:>11.4f} "
              f"{row['omega_min']:>8.3f}..{row['omega_max']:<7.3f} {row['ranged']:>6.0%} {row['dead']:>5}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..core import Transport
    from .default_model import cache_dir
    from .lm import fit_lm

    t0 = time.perf_counter()
    out = check_output(args.output, overwrite=args.overwrite) if args.output else None
    data = resources.files(__package__) / "data"
    source = read_texts(Path(str(data / "neutral.txt")))
    target = read_texts(Path(str(data / "ocean.txt")))
    _check_model(args)
    print(f"actsteer demo: induce the concept 'the ocean' into neutral text ({len(source)} neutral vs {len(target)} "
          f"ocean sentences), Linear-AcT, sites: {args.modules}")
    model, tokenizer = _load(args)
    print(f"Model: {model.config._name_or_path} ({type(model).__name__}) loaded in {time.perf_counter() - t0:.0f}s")
    transport = fit_lm(model, tokenizer, source, target, modules=args.modules, progress=not args.quiet,
                       description="actsteer demo: neutral sentences -> sentences about the ocean")
    # the default path is the demo's own cache file, replaced on every run
    path = transport.save(out or cache_dir() / "demo" / "ocean.safetensors", overwrite=True)
    print(f"Fitted {len(transport)} sites in {time.perf_counter() - t0:.0f}s total; wrote {path}")
    reloaded = Transport.load(path)
    rows = generate_rows(model, tokenizer, reloaded, DEMO_PROMPTS, args.strengths, max_new_tokens=args.max_new_tokens)
    print_rows(DEMO_PROMPTS, args.strengths, rows, score=concept_score)
    totals = [sum(concept_score(p + " " + t) for p, t in zip(DEMO_PROMPTS, row)) for row in rows]
    print("\nConcept words per strength: " + ", ".join(f"{s:g}: {n}" for s, n in zip(args.strengths, totals)))
    print(f"Done in {time.perf_counter() - t0:.0f}s. Try: actsteer generate --steer {path} --sweep 0,0.5,1 --prompt \"...\"")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="local path or cached hub id; 'smollm2' (default) is the embedded SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="actsteer", description="Activation Transport (AcT) steering for language models")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (and tracebacks of errors)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="fit a transport from two text files")
    _add_model_args(p)
    p.add_argument("--source", required=True, help="source examples: .txt (one per line), .jsonl or a .json array")
    p.add_argument("--target", required=True, help="target examples: .txt (one per line), .jsonl or a .json array")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    p.add_argument("--method", default="linear-act",
                   help="linear-act (default), quantile (the exact monotone map per unit), lineas (all sites trained "
                        "jointly through the model: minutes, not seconds), mean-act, gaussian-ot, actadd, caa, itic, aura")
    p.add_argument("--option", action="append", type=parse_option, metavar="KEY=VALUE",
                   help="a method option, repeatable: knots=8 (quantile; more follow the data closer); steps=150, lr=0.1, l1=0.5, group=0.5 (lineas)")
    p.add_argument("--modules", default="auto", help=f"{', '.join(preset_names())}, or comma-separated regexes")
    p.add_argument("--support", default=None, type=parse_support,
                   help="observed, all, or q_lo,q_hi (default: observed for the AcT maps, all for the baselines)")
    p.add_argument("--pooling", default=None, choices=["mean", "last", "max", "min"], help="default: the method's own")
    p.add_argument("--batch-size", type=positive_int, default=None, help="texts per forward pass (default: all at once)")
    p.add_argument("--max-length", type=positive_int, default=128, help="tokens per text (capped at the model's context)")
    p.add_argument("--at-once", action="store_true", help="fit all sites at once instead of sequentially")
    p.add_argument("--description", default="")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("generate", help="generate with a transport at one or several strengths")
    _add_model_args(p)
    p.add_argument("--steer", required=True, help="a transport .safetensors file (the suffix may be left out)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--strength", type=finite_float, default=1.0)
    g.add_argument("--sweep", type=parse_floats, default=None, help="comma-separated strengths, e.g. 0,0.5,1")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument("--max-new-tokens", type=positive_int, default=40)
    p.add_argument("--sample", action="store_true", help="sample (top_p 0.9) instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--apply-to", default="all", choices=["all", "prompt", "generated"])
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="show a transport file's metadata and a per-site summary")
    p.add_argument("path", help="a transport .safetensors file (the suffix may be left out)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="fit and try a concept transport on the embedded SmolLM2 (or --model)")
    _add_model_args(p)
    p.add_argument("--modules", default="auto", help="sites (default auto: on SmolLM2 the norms before attention of "
                   "the middle layers, the most fluent at strength 1)")
    p.add_argument("--strengths", type=parse_floats, default=[0.0, 0.5, 1.0])
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("-o", "--output", default=None, help="where to write the fitted transport (default: the cache dir)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code: 0, or 2 after printing ONE ``error:`` line (no traceback unless
    ``--verbose``) for any failure: bad arguments, unreadable or missing files, a model that cannot load, a
    failed fit. Inputs and the output path are checked before any model is loaded."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("actsteer: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure is one line; -v shows where it came from
        if args.verbose:
            traceback.print_exc()
        hint = "" if args.verbose or isinstance(err, (CliError, OSError, ValueError, KeyError, TypeError, ImportError)) \
            else " (run with -v for the traceback)"
        print(f"error: {one_line(err)}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
