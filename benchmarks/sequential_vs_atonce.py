"""Sequential (causal) vs at-once estimation of Linear-AcT on SmolLM2-135M-Instruct (ACT_SPEC.md section 5).

For each concept, Linear-AcT is fitted on 30 neutral -> 30 concept sentences both ways: sequentially (each site
fitted with the maps of the earlier sites applied, the paper's choice) and at once (every site fitted on unsteered
activations). Measured:

- transport fidelity per site on HELD-OUT sentences (`actsteer.eval.transport_fidelity`): the normalised 1-D
  Wasserstein distance ``mean_u W1(source_u, target_u) / std(target_u)`` between pooled held-out target activations
  and held-out source activations, unsteered (``before``) and with the whole transport at strength 1 (``after``);
- concept presence, perplexity and distinct-2 of continuations of the held-out prompts at strengths 0.5 and 1;
- the fitting cost (forward calls, seconds).

Run (2.5 minutes on 2 CPU cores):
    .venv/bin/python -m benchmarks.sequential_vs_atonce --out /tmp/actsteer/sequential
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import actsteer
from actsteer.eval import sweep, transport_fidelity
from actsteer.hf_integration.cli import read_texts
from benchmarks.concept_induction import CONCEPTS, DATA, concept_data, load_model, markdown

N_FIT = 30


def layer_of(site: str) -> str:
    m = re.search(r"layers\.(\d+)\.", site)
    return m.group(1) if m else site


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default="food,sports")
    parser.add_argument("--modules", default="all-norms")
    parser.add_argument("--support", default="observed", choices=["observed", "all"])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--strengths", default="0.5,1")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    strengths = [float(s) for s in args.strengths.split(",")]

    t_start = time.perf_counter()
    model, tok = load_model()
    prompts = read_texts(DATA / "prompts.txt")[: args.prompts]
    out = Path(args.out) if args.out else None
    summary: list[dict[str, Any]] = []
    per_site: list[dict[str, Any]] = []
    for name in args.concepts.split(","):
        source, target = concept_data(name)
        fit_src, fit_tgt, held_src, held_tgt = source[:N_FIT], target[:N_FIT], source[N_FIT:], target[N_FIT:]
        desc = list(CONCEPTS[name].descriptions)
        print(f"\n## {name}: fit on {len(fit_src)} -> {len(fit_tgt)}, held out {len(held_src)} -> {len(held_tgt)}, "
              f"sites {args.modules}, support {args.support}", flush=True)
        base = sweep(model, tok, None, prompts, concept=desc, max_new_tokens=args.new_tokens).at(0.0)
        summary.append({"concept": name, "mode": "unsteered", "strength": 0.0, **_metrics(base)})
        reports = {}
        for mode in ("sequential", "at-once"):
            t0 = time.perf_counter()
            transport = actsteer.fit_lm(model, tok, fit_src, fit_tgt, modules=args.modules, support=args.support,
                                        sequential=mode == "sequential", progress=False)
            t_fit = time.perf_counter() - t0
            report = reports[mode] = transport_fidelity(model, transport, held_src, held_tgt, tokenizer=tok)
            res = sweep(model, tok, transport, prompts, strengths, concept=desc, max_new_tokens=args.new_tokens)
            if out:
                res.to_csv(out / f"{name}_{mode}.csv")
            for s in strengths:
                summary.append({
                    "concept": name, "mode": mode, "strength": s, **_metrics(res.at(s)),
                    "W1 before": report.mean_before, "W1 after": report.mean_after,
                    "sites closer": f"{report.closer}/{len(report.sites)}",
                    "fit s": t_fit, "forward calls": transport.extra["fit"]["forward_calls"],
                })
            print(markdown(summary[-len(strengths):], ["mode", "strength", "presence", "score", "perplexity_alone",
                                                       "distinct_2", "W1 before", "W1 after", "sites closer", "fit s"]),
                  flush=True)
        for seq, once in zip(reports["sequential"].sites, reports["at-once"].sites):
            per_site.append({"concept": name, "site": seq.site, "layer": layer_of(seq.site), "before": seq.before,
                             "after sequential": seq.after, "after at-once": once.after})

    print("\n# Summary (held-out fidelity at strength 1; generations on held-out prompts)")
    print(markdown(summary, ["concept", "mode", "strength", "presence", "score", "perplexity_alone", "distinct_2",
                             "W1 before", "W1 after", "sites closer", "fit s", "forward calls"]))
    print("\n# Held-out W1/std per layer (mean of the layer's norms; every 5th layer and the final norm)")
    rows = []
    for name in args.concepts.split(","):
        mine = [r for r in per_site if r["concept"] == name]
        for layer in dict.fromkeys(r["layer"] for r in mine):
            group = [r for r in mine if r["layer"] == layer]
            if layer.isdigit() and int(layer) % 5 and int(layer) != 29:
                continue
            rows.append({"concept": name, "layer": layer, **{
                k: sum(r[k] for r in group) / len(group) for k in ("before", "after sequential", "after at-once")}})
    print(markdown(rows, ["concept", "layer", "before", "after sequential", "after at-once"]))
    total = time.perf_counter() - t_start
    print(f"\nTotal {total:.0f}s")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        with (out / "per_site.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(per_site[0]))
            writer.writeheader()
            writer.writerows(per_site)
        summary_json = {"args": vars(args), "seconds": total, "summary": summary}
        (out / "summary.json").write_text(json.dumps(summary_json, indent=1))


def _metrics(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("presence", "score", "perplexity", "perplexity_alone", "distinct_2")}


if __name__ == "__main__":
    main()
