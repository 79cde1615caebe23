"""Concept induction on SmolLM2-135M-Instruct: Linear-AcT against Mean-AcT, ActAdd, CAA, ITI-c, AurA and prompting.

The paper's concept-induction protocol in miniature (ACT_SPEC.md section 7; Rodriguez et al., ICLR 2025):
fit each method from neutral sentences (source) to sentences about a concept (target), then continue held-out
prompts (benchmarks/data/prompts.txt, never used for fitting) at several strengths and measure

- presence: fraction of continuations judged about the concept (`actsteer.eval.concept_presence`, MiniLM margin),
  and ``score``, the mean margin;
- perplexity: median perplexity of the continuation under the UNSTEERED model (fluency), given its prompt
  (``ppl``) and on its own (``ppl_alone``: a fluent change of topic is less surprising there);
- distinct-2: unique word bigrams / all bigrams of the strength's continuations (diversity; low = loops).

Methods share the sites (``--modules``, default ``all-norms``: the 60 decoder norms and the final norm) and the data.
AcT methods are fitted sequentially on mean pooling with the observed support (actsteer's defaults) and swept over
strength 0..1; ``linear-act/all`` is the paper's induction support (all reals). The additive baselines are fitted
at once like their original recipes (ActAdd: one source/target pair, mean pooling; CAA: difference of means on the
last token; ITI-c: logistic-probe direction, mean pooling) and swept over their own unbounded scale. AurA (max
pooling, all reals) dampens units by their AUROC; its strength interpolates like AcT's. The prompting baseline puts
"The following text is about <topic>." before each prompt.

Run (16 min wall on 2 CPU cores shared with other jobs, 12 min of CPU time; see benchmarks/RESULTS.md):
    .venv/bin/python -m benchmarks.concept_induction --out /tmp/actsteer/induction --figures benchmarks/figures
Smaller: ``--concepts food --prompts 6 --new-tokens 24 --methods linear-act,caa``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

import actsteer
from actsteer.eval import concept_presence, sweep
from actsteer.hf_integration.cli import read_texts
from actsteer.hf_integration.default_model import load_default_model

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
PKG_DATA = Path(actsteer.__file__).parent / "hf_integration" / "data"


@dataclasses.dataclass(frozen=True)
class Concept:
    target: Path
    descriptions: tuple[str, ...]  # for the MiniLM presence judge
    topic: str  # for the prompting baseline
    mitigation_prompts: Path | None = None


CONCEPTS = {
    "ocean": Concept(PKG_DATA / "ocean.txt", ("the ocean", "the sea", "waves on a beach", "sailing a boat at sea",
                                             "fish and whales in the ocean"), "the ocean",
                     DATA / "mitigation_ocean.txt"),
    "food": Concept(DATA / "food.txt", ("food", "cooking", "a recipe", "cooking a meal in the kitchen",
                                        "eating a delicious dish"), "food and cooking", DATA / "mitigation_food.txt"),
    "sports": Concept(DATA / "sports.txt", ("sports", "a sports game", "athletes competing in a race",
                                            "a team playing a match", "scoring a goal", "a tennis match",
                                            "a basketball game", "running a race"), "sports"),
}

BOUNDED = (0.25, 0.5, 0.75, 1.0)
UNBOUNDED = (0.125, 0.25, 0.5, 1.0, 2.0, 8.0)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    label: str
    method: str
    pooling: str = "mean"
    support: Any = "observed"
    sequential: bool = True
    strengths: tuple[float, ...] = BOUNDED


METHODS = {
    "linear-act": MethodSpec("linear-act", "linear-act"),
    "linear-act/all": MethodSpec("linear-act/all", "linear-act", support="all"),
    "mean-act": MethodSpec("mean-act", "mean-act"),
    "aura": MethodSpec("aura", "aura", pooling="max", support="all", sequential=False),
    "actadd": MethodSpec("actadd", "actadd", support="all", sequential=False, strengths=UNBOUNDED),
    "caa": MethodSpec("caa", "caa", pooling="last", support="all", sequential=False, strengths=UNBOUNDED),
    "itic": MethodSpec("itic", "itic", support="all", sequential=False, strengths=UNBOUNDED),
}


def load_model():
    """SmolLM2-135M-Instruct; one intra-op thread (faster than two on a shared, oversubscribed CPU)."""
    torch.set_num_threads(int(os.environ.get("ACTSTEER_THREADS", "1")))
    return load_default_model()


def concept_data(name: str) -> tuple[list[str], list[str]]:
    """(source, target) fitting texts: the neutral sentences NOT judged about the concept, and the concept's."""
    concept = CONCEPTS[name]
    neutral = read_texts(PKG_DATA / "neutral.txt")
    # neutral.txt has a few sentences about food (a bakery, pancakes...): drop what the judge sees as on-topic
    keep = concept_presence(neutral, list(concept.descriptions)).present
    return [t for t, on in zip(neutral, keep.tolist()) if not on], read_texts(concept.target)


def fit(model, tok, spec: MethodSpec, source, target, modules: str) -> actsteer.Transport:
    return actsteer.fit_lm(model, tok, source, target, modules=modules, method=spec.method, pooling=spec.pooling,
                           support=spec.support, sequential=spec.sequential, progress=False)


METRICS = ["presence", "score", "perplexity", "perplexity_alone", "distinct_2"]
# A strength is "usable" when its continuations stay about as fluent and diverse as the unsteered ones.
BUDGET_PPL = 2.0
BUDGET_DISTINCT = 0.8


def headline(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per concept and method: the metrics at strength 1, and the strength with the highest presence among those
    within the fluency budget (None when no strength is), ties going to the smaller strength."""
    out = []
    for concept in dict.fromkeys(r["concept"] for r in table):
        rows = [r for r in table if r["concept"] == concept]
        base = next(r for r in rows if r["method"] == "unsteered")
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            at1 = next((r for r in mine if r["strength"] in (0.0, 1.0) and
                        (r["strength"] == 1.0 or method in ("unsteered", "prompting"))), mine[-1])
            ok = [r for r in mine if r["perplexity_alone"] <= BUDGET_PPL * base["perplexity_alone"]
                  and r["distinct_2"] >= BUDGET_DISTINCT * base["distinct_2"]]
            best = max(ok, key=lambda r: (r["presence"], r["score"], -r["strength"])) if ok else None
            out.append({
                "concept": concept, "method": method, "presence@1": at1["presence"],
                "ppl_alone@1": at1["perplexity_alone"], "distinct_2@1": at1["distinct_2"],
                "best strength": "none" if best is None else f"{best['strength']:g}",
                "presence@best": math.nan if best is None else best["presence"],
                "ppl_alone@best": math.nan if best is None else best["perplexity_alone"],
            })
    return out


def plot(table: list[dict[str, Any]], folder: Path) -> list[Path]:
    """One PNG per concept: presence and perplexity (alone) against strength, AcT-style methods on 0..1 (left) and
    the additive baselines on their own log scale (right). Needs matplotlib; returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        print("no figures: matplotlib is missing (pip install 'actsteer[plot]')")
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for concept in dict.fromkeys(r["concept"] for r in table):
        rows = [r for r in table if r["concept"] == concept]
        base = next(r for r in rows if r["method"] == "unsteered")
        fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharey="row")
        for col, additive in enumerate((False, True)):
            for method in dict.fromkeys(r["method"] for r in rows):
                spec = METHODS.get(method)
                if spec is None or (spec.strengths == UNBOUNDED) != additive:
                    continue
                mine = [r for r in rows if r["method"] == method]
                xs = [r["strength"] for r in mine] if additive else [0.0] + [r["strength"] for r in mine]
                chain = mine if additive else [base] + mine
                axes[0, col].plot(xs, [r["presence"] for r in chain], marker="o", label=method)
                axes[1, col].plot(xs, [r["perplexity_alone"] for r in chain], marker="o", label=method)
            for row in range(2):
                ax = axes[row, col]
                if additive:
                    ax.set_xscale("log", base=2)
                ref = base["presence"] if row == 0 else base["perplexity_alone"]
                ax.axhline(ref, color="gray", ls=":", lw=1, label="unsteered")
                prompting = next((r for r in rows if r["method"] == "prompting"), None)
                if prompting is not None:
                    ax.axhline(prompting["presence"] if row == 0 else prompting["perplexity_alone"], color="gray",
                               ls="--", lw=1, label="prompting")
                ax.set_xlabel("strength (unbounded scale)" if additive else "strength")
            axes[1, col].set_yscale("log")
            axes[0, col].legend(fontsize=7)
        axes[0, 0].set_ylabel("concept presence")
        axes[1, 0].set_ylabel("perplexity (unsteered model)")
        fig.suptitle(f"SmolLM2-135M-Instruct, concept induction: {concept}")
        fig.tight_layout()
        path = folder / f"induction_{concept}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def summary_rows(result, concept: str, label: str, **extra: Any) -> list[dict[str, Any]]:
    return [{"concept": concept, "method": label, **extra, **row} for row in result.summary]


def markdown(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) >= 10 else f"{v:.2f}"
        return str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default="food,sports")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--modules", default="all-norms", help="sites: all-norms, post-norms, mlp, auto")
    parser.add_argument("--prompts", type=int, default=12, help="how many held-out prompts (of 12)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--no-prompting", action="store_true", help="skip the prompting baseline")
    parser.add_argument("--out", default=None, help="folder for CSV files (per-generation and summary)")
    parser.add_argument("--figures", default=None, help="folder for PNG figures (needs matplotlib)")
    parser.add_argument("--plot-from", default=None, help="only draw the figures from an earlier run's summary.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.plot_from:
        table = json.loads(Path(args.plot_from).read_text())["table"]
        for path in plot(table, Path(args.figures or ".")):
            print(f"wrote {path}")
        return

    t_start = time.perf_counter()
    model, tok = load_model()
    prompts = read_texts(DATA / "prompts.txt")[: args.prompts]
    out = Path(args.out) if args.out else None
    table: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    for name in args.concepts.split(","):
        concept = CONCEPTS[name]
        desc = list(concept.descriptions)
        source, target = concept_data(name)
        print(f"\n## {name}: {len(source)} neutral -> {len(target)} {name} sentences, {len(prompts)} held-out prompts, "
              f"sites: {args.modules}", flush=True)
        common = dict(concept=desc, max_new_tokens=args.new_tokens)

        t0 = time.perf_counter()
        base = sweep(model, tok, None, prompts, label=f"{name}/unsteered", **common)
        table += summary_rows(base, name, "unsteered")
        if not args.no_prompting:
            instructed = [f"The following text is about {concept.topic}.\n{p}" for p in prompts]
            res = sweep(model, tok, None, instructed, label=f"{name}/prompting", **common)
            table += summary_rows(res, name, "prompting")
            if out:
                res.to_csv(out / f"{name}_prompting.csv")
        timings[f"{name}/baselines"] = time.perf_counter() - t0
        print(markdown(table[-2:], ["method", "strength"] + METRICS), flush=True)

        for label in args.methods.split(","):
            spec = METHODS[label]
            t0 = time.perf_counter()
            transport = fit(model, tok, spec, source, target, args.modules)
            t_fit = time.perf_counter() - t0
            res = sweep(model, tok, transport, prompts, spec.strengths, label=f"{name}/{label}", **common)
            timings[f"{name}/{label}"] = time.perf_counter() - t0
            rows = summary_rows(res, name, label)
            table += rows
            if out:
                res.to_csv(out / f"{name}_{label.replace('/', '_')}.csv")
            print(f"\n{label} (fit {t_fit:.0f}s, sweep {res.meta['seconds_total']:.0f}s)")
            print(markdown(rows, ["strength"] + METRICS), flush=True)
            best = max(res.rows, key=lambda r: r["score"] if r["strength"] == spec.strengths[-1] else -9)
            print(f"  e.g. strength {spec.strengths[-1]:g}: {best['prompt']}{' '.join(best['text'].split())[:160]}")

    total = time.perf_counter() - t_start
    print(f"\n# All results ({args.modules}, {len(prompts)} prompts x {args.new_tokens} tokens, greedy, "
          "repetition penalty 1.2)")
    print(markdown(table, ["concept", "method", "strength"] + METRICS))
    print("\n# Headline: strength 1 vs the best strength within the fluency budget "
          f"(ppl_alone <= {BUDGET_PPL:g}x unsteered, distinct_2 >= {BUDGET_DISTINCT:g}x unsteered)")
    print(markdown(headline(table), ["concept", "method", "presence@1", "ppl_alone@1", "distinct_2@1", "best strength",
                                     "presence@best", "ppl_alone@best"]))
    print(f"\nTotal {total:.0f}s; per block: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    if args.figures:
        for path in plot(table, Path(args.figures)):
            print(f"wrote {path}")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"args": vars(args), "seconds": total, "timings": timings,
                                                      "table": table}, indent=1))


if __name__ == "__main__":
    main()
