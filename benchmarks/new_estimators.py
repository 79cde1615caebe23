"""The quantile map and LinEAS against Linear-AcT on SmolLM2: fit cost, held-out fidelity, presence and perplexity.

For each concept (neutral sentences -> the concept's sentences, `concept_induction.concept_data`) and each method:

- fit cost: wall seconds (this machine is shared: compare within one run only) and forward/backward calls;
- held-out fidelity: LinEAS's own objective, the mean over sites of the per-unit squared 1-D Wasserstein distance
  between pooled steered source activations and the target's, divided by the target's variance, on a quarter of
  the source sentences (seed 0) that no method is fitted on, against all target sentences ("train": the same on
  the sentences they were fitted on). Every method is fitted once, on the other three quarters and all target
  sentences (LinEAS holds a quarter of its share out again, for early stopping);
- presence / perplexity of 32 greedy tokens on the 12 held-out prompts at strengths 0.25..1 (`actsteer.eval.sweep`,
  the protocol of `concept_induction.py`).

Run (2 shared CPU cores: ~10 min for linear-act and quantile, 20-40 min per LinEAS fit):
    python -m benchmarks.new_estimators --concepts food,sports --methods linear-act,quantile,lineas
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

import actsteer
from actsteer.core import ForwardContext, record_sites
from actsteer.core.lineas import _split
from actsteer.core.lineas_parts import W2Loss
from actsteer.core.pooling import pool
from actsteer.eval import sweep
from actsteer.hf_integration.cli import read_texts
from actsteer.hf_integration.lm import make_runner, padding_ready
from actsteer.hf_integration.presets import lm_sites
from benchmarks.concept_induction import CONCEPTS, DATA, concept_data, load_model, markdown

STRENGTHS = (0.25, 0.5, 0.75, 1.0)


def pooled(model, tok, sites, texts, transport=None) -> dict[str, torch.Tensor]:
    """Mean-pooled (real tokens) activations of ``sites``, after the transport's maps when one is given."""
    run, ctx, rows = make_runner(model, tok, 128), ForwardContext(), {}

    def on_output(site, x):
        rows[site] = pool(x, mask=ctx.mask, how="mean")

    scope = actsteer.steer(model, transport, 1.0) if transport is not None else contextlib.nullcontext()
    with torch.no_grad(), padding_ready(tok), scope, record_sites(model, sites, on_output):
        run(texts, ctx)
    return rows


def objective(model, tok, sites, texts, target_rows, transport=None) -> float:
    got = pooled(model, tok, sites, texts, transport)
    return float(torch.stack([W2Loss(target_rows[s])(got[s]) for s in sites]).mean())


def fit(model, tok, method, source, target, modules, options):
    t0 = time.perf_counter()
    transport = actsteer.fit_lm(model, tok, source, target, modules=modules, method=method, progress=False,
                                options=options)
    return transport, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default="food,sports")
    parser.add_argument("--methods", default="linear-act,quantile,lineas")
    parser.add_argument("--modules", default="all-norms")
    parser.add_argument("--lineas", default="{}", help="LinEAS options as JSON (LineasConfig fields)")
    parser.add_argument("--no-sweep", action="store_true", help="fit cost and held-out fidelity only")
    parser.add_argument("--out", default=None, help="a JSON file for the results")
    args = parser.parse_args()
    model, tok = load_model()
    prompts = read_texts(DATA / "prompts.txt")
    sites = lm_sites(model, args.modules)
    results = []
    for concept in args.concepts.split(","):
        source, target = concept_data(concept)
        train_idx, val_idx = _split(len(source), 0.25, 0)
        train, val = [source[i] for i in train_idx], [source[i] for i in val_idx]
        target_rows = pooled(model, tok, sites, target)
        row = {"concept": concept, "method": "unsteered", "held_out": objective(model, tok, sites, val, target_rows)}
        results.append(row)
        print(json.dumps(row), flush=True)
        for method in args.methods.split(","):
            options = json.loads(args.lineas) if method == "lineas" else None
            full, secs = fit(model, tok, method, train, target, args.modules, options)
            fit_stats = full.extra["fit"]
            row = {
                "concept": concept, "method": method, "fit_s": round(secs, 1),
                "forward_calls": fit_stats["forward_calls"], "backward_calls": fit_stats.get("backward_calls", 0),
                "sites": len(full), "held_out": objective(model, tok, sites, val, target_rows, full),
                "train": objective(model, tok, sites, train, target_rows, full),
            }
            if method == "lineas":
                row.update(units_moved=fit_stats["units_moved"], steps_run=fit_stats["steps_run"],
                           best_step=fit_stats["best_step"])
            if not args.no_sweep:
                res = sweep(model, tok, full, prompts, STRENGTHS, concept=list(CONCEPTS[concept].descriptions),
                            max_new_tokens=32)
                row["sweep"] = [{k: r[k] for k in ("strength", "presence", "perplexity", "perplexity_alone")}
                                for r in res.summary]
            results.append(row)
            print(json.dumps(row), flush=True)
    print(markdown([{k: v for k, v in r.items() if k != "sweep"} for r in results],
                   ["concept", "method", "fit_s", "forward_calls", "backward_calls", "sites", "train", "held_out"]))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
