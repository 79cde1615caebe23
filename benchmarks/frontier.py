"""Presence / perplexity frontier on SmolLM2-135M-Instruct: actsteer against steering-vectors and repeng, run from
their own code, and prompting (issue 22).

For each concept every arm (a way to steer, fitted once: `frontier_arms.py`) is swept over its strength or scale.
Each setting continues the held-out prompts (greedy, repetition penalty 1.2, 32 new tokens, one left-padded batch)
and is scored with every steering removed (`frontier_cells.py`): concept presence (MiniLM margin >= 0.1),
perplexity of the continuation under the unsteered model alone (``ppl_alone``, the frontier's x axis, as a multiple
of the unsteered value) and given its prompt (``ppl``), distinct-2. A method's **frontier** at a perplexity budget B
is the best presence among its settings with ppl_alone <= B x unsteered and distinct-2 >= 0.8x unsteered (a loop of
concept words scores as "present" with low perplexity: such settings are left out); strength 0 (the unsteered
text) belongs to every method's frontier.

Data (`frontier_data.py`): 4 benchmark concepts + 1 fresh one, 48 held-out prompts, the fitting texts as unmatched
sentences (what fit_lm takes) and as minimal pairs (what repeng is made for). Peers need their packages:
    pip install --no-deps steering-vectors==0.12.2 repeng==0.4.0 scikit-learn joblib threadpoolctl

Runs (one torch thread; cells are cached under --cache, so a run can be stopped and resumed):
    python -m benchmarks.frontier --cache /tmp/actsteer/frontier --figures benchmarks/figures
    python -m benchmarks.frontier --reduced --out /tmp/frontier.json     # the CI version (a few minutes)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import frontier_data as fd
from benchmarks.frontier_arms import BOUNDED_GRID, PEER_ARMS, Arm, Steerer, actsteer_arm, fmt_setting, sweep_arm
from benchmarks.frontier_cells import NEW_TOKENS, Cache, decode, generate_ids, run_cell

# actsteer arms: the defaults, the paper's Llama sites (the old default), the demo's sites, and the norms before
# attention (every layer, and the middle two thirds of the layers: chosen in frontier_sites/frontier_levers)
_ATTN = r"model\.layers\.{}\.input_layernorm"
ACTSTEER_ARMS = {
    "defaults": actsteer_arm("actsteer fit_lm defaults"),
    "paper": actsteer_arm("actsteer paper sites (mlp; old default)", modules="paper"),
    "all-norms": actsteer_arm("actsteer all-norms", modules="all-norms"),
    "attn-norms": actsteer_arm("actsteer attn-norms (every layer)", modules=[_ATTN.format(r"\d+")]),
    "attn-mid": actsteer_arm("actsteer attn-norms, layers 5-24", modules=[_ATTN.format(i) for i in range(5, 25)]),
    "defaults-pairs": actsteer_arm("actsteer fit_lm defaults", "pairs"),
    # issue 22 items 3-4 at the default sites (defined, not yet run on the frontier: no CPU time left this round)
    "quantile": actsteer_arm("actsteer quantile maps (default sites)", method="quantile"),
    "lineas": actsteer_arm("actsteer LinEAS (default sites)", method="lineas"),
}
# The fixed plan (--fixed): the settings each arm runs at without the adaptive sweep, what RESULTS.md reports on
# every concept (the adaptive sweep costs ~2x more cells; on 2 shared cores a cell of 48 prompts takes 2-5 min).
FIXED = {
    ACTSTEER_ARMS["defaults"].label: BOUNDED_GRID,
    ACTSTEER_ARMS["paper"].label: (0.5, 1.0),
    ACTSTEER_ARMS["all-norms"].label: (0.75, 1.0),
    "steering-vectors L12-16 [unmatched]": (0.5, 0.7071, 1.0),
    "repeng pca_center [unmatched]": (4.0, 8.0, 16.0),
}
# The CI version (--reduced): food, 12 prompts, 24 new tokens, the defaults at 0.5 and 1 and the paper's sites at 1
REDUCED = {ACTSTEER_ARMS["defaults"].label: (0.5, 1.0), ACTSTEER_ARMS["paper"].label: (1.0,)}
BUDGETS = (1.25, 1.5, 1.75, 2.0)
DISTINCT_FLOOR = 0.8
GOAL = {"presence": 0.9, "ppl_ratio": 1.75}


def load_model(threads: int = 1):
    from actsteer.hf_integration.default_model import load_default_model

    torch.set_num_threads(threads)
    return load_default_model()


def check_unsteered(model, tok, prompts: list[str], cache: Cache, concept: str, steerers: dict[str, Steerer],
                    new_tokens: int) -> dict[str, bool]:
    """Each library's output at setting 0 must equal plain Hugging Face ``generate`` token for token."""
    import actsteer

    plain = generate_ids(model, tok, prompts, new_tokens=new_tokens)
    out = {}
    for name, st in steerers.items():
        if st.arm.family == "actsteer":  # per-row zero strengths: the hooks run and compute x * 1 + 0
            steering = actsteer.Steering(st.transport, torch.zeros(len(prompts)))
            ids = generate_ids(model, tok, prompts, new_tokens=new_tokens, steering=steering)
        else:
            with st.peer.applied(0.0) as generate:
                ids = generate_ids(model, tok, prompts, new_tokens=new_tokens, generate=generate)
        out[name] = bool(ids.shape == plain.shape and torch.equal(ids, plain))
    return out


def frontier(points: list[dict], budget: float) -> float:
    """Best presence among ``points`` (dicts with ratio, presence, ok) with ratio <= budget and ok."""
    inside = [p["presence"] for p in points if p["ok"] and p["ratio"] <= budget + 1e-9]
    return max(inside) if inside else math.nan


def run_concept(name: str, arms: list[Arm], model, tok, prompts: list[str], cache: Cache, prefix: str,
                new_tokens: int, refine: bool = True, grid: tuple[float, ...] | None = None,
                plan: dict[str, tuple[float, ...]] | None = None, cached_only: bool = False) -> list[dict]:
    """All cells of one concept; returns table rows (one per arm and setting, plus the baselines).

    ``plan``: fixed settings per arm label (no adaptive sweep; see `FIXED`). ``cached_only``: every cell of these arms
    already in the cache (none is run; a concept without its unsteered and prompting cells gives no rows).
    """
    concept = fd.CONCEPTS[name]
    desc = concept.descriptions
    gen = lambda ps, **kw: decode(tok, generate_ids(model, tok, ps, new_tokens=new_tokens, **kw))  # noqa: E731

    def cell(key, produce, **kw):
        if cached_only:
            return cache.get(f"{prefix}/{name}/{key}")
        return run_cell(cache, f"{prefix}/{name}/{key}", model, tok, prompts, desc, produce, **kw)

    base = cell("unsteered", lambda: gen(prompts))
    prompted = cell("prompting", lambda: gen(fd.prompting(name, prompts)))
    if base is None or prompted is None:
        return []
    b = base["summary"]
    rows = [{"concept": name, "arm": "unsteered", "setting": 0.0, **b},
            {"concept": name, "arm": "prompting", "setting": math.nan, **prompted["summary"]}]
    for arm in arms:
        t0 = time.perf_counter()
        steerer: list[Steerer] = []

        def run(s: float, arm=arm, steerer=steerer) -> dict:
            def produce():
                if not steerer:
                    steerer.append(Steerer(arm, name, model, tok, prompts, cache))
                return steerer[0].texts(s)
            return cell(f"{arm.key(model)}/{fmt_setting(s)}", produce, meta={"arm": arm.label, "setting": s})

        kw = {} if grid is None else {"grid": grid}
        if cached_only:  # every setting of this arm in the cache
            folder = cache.path(f"{prefix}/{name}/{arm.key(model)}", "")
            cells = {s: run(s) for s in sorted(float(p.stem) for p in folder.glob("*.json"))}
        elif plan is not None:
            cells = {s: run(s) for s in plan.get(arm.label, ())}
        elif refine:
            cells = sweep_arm(arm, run, b["ppl_alone"], **kw)
        else:
            cells = {s: run(s) for s in (grid or [arm.start])}
        for s, c in cells.items():
            if c is not None:
                rows.append({"concept": name, "arm": arm.label, "setting": s, **c["summary"]})
        if not cached_only:
            print(f"  {name} / {arm.label}: {len(cells)} settings ({time.perf_counter() - t0:.0f}s)", flush=True)
    for r in rows:
        r["ratio"] = r["ppl_alone"] / b["ppl_alone"]
        r["ratio_prompt"] = r["ppl"] / b["ppl"]
        r["ok"] = bool(r["distinct_2"] >= DISTINCT_FLOOR * b["distinct_2"])
    return rows


def frontier_table(rows: list[dict]) -> list[dict]:
    """Per concept and arm: the frontier at each budget (strength 0 = unsteered is every arm's first point)."""
    out = []
    for name in dict.fromkeys(r["concept"] for r in rows):
        mine = [r for r in rows if r["concept"] == name]
        base = next(r for r in mine if r["arm"] == "unsteered")
        for arm in dict.fromkeys(r["arm"] for r in mine if r["arm"] != "unsteered"):
            points = [base] + [r for r in mine if r["arm"] == arm]
            out.append({"concept": name, "arm": arm, **{f"@{b:g}x": frontier(points, b) for b in BUDGETS}})
    return out


def goal_cells(rows: list[dict], arm_label: str) -> list[dict]:
    """The goal per concept: ``arm_label`` at strength 1 has presence >= 0.9 at ppl_alone <= 1.75x unsteered, and
    its frontier is at or above every peer's at every budget up to 2x (the smallest margin and where).
    ``distinct@1``: distinct-2 at strength 1 as a multiple of unsteered (below 0.8: the continuations of different
    prompts converge on the same phrases, a cost that perplexity does not see)."""
    out = []
    for name in dict.fromkeys(r["concept"] for r in rows):
        mine = [r for r in rows if r["concept"] == name]
        base = next(r for r in mine if r["arm"] == "unsteered")
        ours = [base] + [r for r in mine if r["arm"] == arm_label]
        at1 = next((r for r in ours if r["setting"] == 1.0 and r["arm"] == arm_label), None)
        peers = [a for a in dict.fromkeys(r["arm"] for r in mine)
                 if a.startswith(("steering-vectors", "repeng"))]
        budgets = sorted({r["ratio"] for r in mine if r["ratio"] <= 2.0 and r["ratio"] >= 1.0} | {2.0})
        margin, where = math.inf, None
        for b in budgets:
            best_peer = max((frontier([base] + [r for r in mine if r["arm"] == a], b) for a in peers), default=math.nan)
            gap = frontier(ours, b) - best_peer
            if gap < margin:
                margin, where = gap, b
        out.append({
            "concept": name, "presence@1": at1["presence"] if at1 else math.nan,
            "ratio@1": at1["ratio"] if at1 else math.nan, "ratio_prompt@1": at1["ratio_prompt"] if at1 else math.nan,
            "distinct@1": at1["distinct_2"] / base["distinct_2"] if at1 else math.nan,
            "strength-1 goal": bool(at1 and at1["presence"] >= GOAL["presence"] and at1["ratio"] <= GOAL["ppl_ratio"]),
            "min margin vs peers": margin if peers else math.nan, "at budget": where,
        })
    return out


def concept_tables(rows: list[dict]) -> str:
    """Per concept, one compact table (what RESULTS.md shows): presence, ppl alone and given the prompt, distinct-2,
    each perplexity and distinct-2 as a multiple of unsteered; settings left out of the frontier (distinct-2 below
    0.8x unsteered: the continuations of different prompts converge on the same phrases) say "(repetitive)"."""
    out = []
    for name in dict.fromkeys(r["concept"] for r in rows):
        mine = [r for r in rows if r["concept"] == name]
        base = next(r for r in mine if r["arm"] == "unsteered")
        out += [f"\n**{name}** (unsteered: presence {base['presence']:.2f}, ppl alone {base['ppl_alone']:.2f}, "
                f"given the prompt {base['ppl']:.2f}, distinct-2 {base['distinct_2']:.2f})\n",
                "| method | setting | presence | ppl alone (x) | ppl given prompt (x) | distinct-2 (x) |",
                "|---|---|---|---|---|---|"]
        for r in mine:
            if r["arm"] == "unsteered":
                continue
            setting = "-" if math.isnan(r["setting"]) else f"{r['setting']:g}"
            flag = "" if r["ok"] else " (repetitive)"
            out.append(f"| {r['arm']} | {setting} | {r['presence']:.2f} | {r['ratio']:.2f} | {r['ratio_prompt']:.2f} | "
                       f"{r['distinct_2'] / base['distinct_2']:.2f}{flag} |")
    return "\n".join(out)


def markdown(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.3g}" if abs(v) >= 10 else f"{v:.2f}"
        return "-" if v is None else str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def plot(rows: list[dict], folder: Path, highlight: str | None = None) -> list[Path]:
    """One small PNG per concept: presence against perplexity (alone and given the prompt, x unsteered)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in dict.fromkeys(r["concept"] for r in rows):
        mine = [r for r in rows if r["concept"] == name]
        base = next(r for r in mine if r["arm"] == "unsteered")
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8), sharey=True)
        for ax, key, title in ((axes[0], "ratio", "ppl alone"), (axes[1], "ratio_prompt", "ppl given the prompt")):
            for arm in dict.fromkeys(r["arm"] for r in mine if r["arm"] not in ("unsteered", "prompting")):
                pts = [base] + sorted((r for r in mine if r["arm"] == arm), key=lambda r: r["setting"])
                style = "-" if "minimal pairs" not in arm else "--"
                lw = 2.4 if arm == highlight else 1.0
                line, = ax.plot([p[key] for p in pts], [p["presence"] for p in pts], style, lw=lw, label=arm)
                bad = [p for p in pts if not p["ok"]]
                ax.plot([p[key] for p in pts if p["ok"]], [p["presence"] for p in pts if p["ok"]], "o", ms=3,
                        color=line.get_color())
                ax.plot([p[key] for p in bad], [p["presence"] for p in bad], "x", ms=5, color=line.get_color())
            pr = next(r for r in mine if r["arm"] == "prompting")
            ax.plot([pr[key]], [pr["presence"]], "k*", ms=10, label="prompting")
            for x in (1.75, 2.0):
                ax.axvline(x, color="gray", ls=":", lw=1)
            ax.set_xscale("log")
            ax.set_xlim(0.8, 8)
            ax.set_xticks([1, 1.5, 2, 3, 5, 8], ["1", "1.5", "2", "3", "5", "8"])
            ax.minorticks_off()
            ax.set_xlabel(f"{title} / unsteered")
            ax.set_title(f"{name}: {title}", fontsize=9)
        axes[0].set_ylabel("concept presence")
        axes[1].legend(fontsize=5.5, loc="lower right")
        fig.tight_layout()
        path = folder / f"frontier_{name}.png"
        fig.savefig(path, dpi=72)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default=",".join(fd.BENCHMARK_CONCEPTS))
    parser.add_argument("--arms", default="defaults,paper,all-norms,defaults-pairs",
                        help=f"actsteer arms ({', '.join(ACTSTEER_ARMS)}); peers follow with --peers")
    parser.add_argument("--peers", default="all", help="'all', 'none', or 'unmatched'/'pairs' (one data kind)")
    parser.add_argument("--prompts", default="frontier", help="prompt set: frontier (48 held out) or dev (24)")
    parser.add_argument("--n-prompts", type=int, default=0, help="use only the first N prompts (0 = all)")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--cache", default="/tmp/actsteer/frontier", help="folder for cached cells and fits")
    parser.add_argument("--figures", default=None, help="folder for the PNGs (needs matplotlib)")
    parser.add_argument("--out", default=None, help="write the rows and tables as JSON here")
    parser.add_argument("--reduced", action="store_true",
                        help="the CI version: food, 12 prompts, 24 tokens, defaults at 0.5/1, paper sites at 1, prompting; no peers")
    parser.add_argument("--fixed", action="store_true", help="the fixed settings of FIXED per arm, no adaptive sweep")
    parser.add_argument("--cached-only", action="store_true",
                        help="tables and plots from the cells already in --cache; run nothing")
    parser.add_argument("--check", action="store_true",
                        help="check each library's unsteered output = plain HF generate (on the first concept)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.reduced:
        args.concepts, args.arms, args.peers, args.n_prompts, args.new_tokens = "food", "defaults,paper", "none", 12, 24
    threads = int(os.environ.get("ACTSTEER_THREADS", "1"))
    t0 = time.perf_counter()
    model, tok = load_model(threads)
    prompts = fd.prompts(args.prompts)
    if args.n_prompts:
        prompts = prompts[: args.n_prompts]
    arms = [ACTSTEER_ARMS[a] for a in args.arms.split(",") if a]
    if args.peers != "none":
        arms += [a for a in PEER_ARMS if args.peers == "all" or a.data == args.peers]
    cache = Cache(args.cache)
    prefix = f"{args.prompts}{len(prompts)}-t{args.new_tokens}"
    rows: list[dict] = []
    checks = {}
    for name in args.concepts.split(","):
        print(f"## {name}: {len(prompts)} prompts, {len(arms)} arms", flush=True)
        if args.reduced:
            rows += run_concept(name, arms, model, tok, prompts, cache, prefix, args.new_tokens, plan=REDUCED)
        else:
            rows += run_concept(name, arms, model, tok, prompts, cache, prefix, args.new_tokens,
                                plan=FIXED if args.fixed else None, cached_only=args.cached_only)
        if args.check and not checks:  # once: the decoding path does not depend on the concept
            steerers = {a.label: Steerer(a, name, model, tok, prompts, cache) for a in arms}
            checks[name] = check_unsteered(model, tok, prompts, cache, name, steerers, args.new_tokens)
            print(f"  unsteered output = plain HF generate: {checks[name]}", flush=True)
    table = frontier_table(rows)
    cols = ["concept", "arm", "setting", "presence", "score", "ppl_alone", "ratio", "ppl", "ratio_prompt",
            "distinct_2", "ok"]
    print(markdown(rows, cols))
    print(concept_tables(rows))
    print("\n# Frontier: best presence within ppl_alone <= B x unsteered (distinct-2 >= 0.8x)")
    print(markdown(table, ["concept", "arm"] + [f"@{b:g}x" for b in BUDGETS]))
    default_label = ACTSTEER_ARMS["defaults"].label
    goal = goal_cells(rows, default_label)
    print(f"\n# Goal ({default_label}): strength 1 presence >= 0.9 at <= 1.75x; frontier vs peers up to 2x")
    if goal:
        print(markdown(goal, list(goal[0])))
    result = {"args": vars(args), "prompts": len(prompts), "seconds": time.perf_counter() - t0, "rows": rows,
              "frontier": table, "goal": goal, "checks": checks}
    if args.figures:
        for path in plot(rows, Path(args.figures), highlight=default_label):
            print(f"wrote {path}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
