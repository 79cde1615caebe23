"""Where does the fluency cost of strength 1 come from? Site-by-site and layer-by-layer ablation (issue 22, item 2).

The transport of a site set (``all-norms``: the 60 decoder norms + the final norm; ``auto``: the MLP projections)
is fitted once, sequentially, as fit_lm does, then applied at strength 1 on a SUBSET of its sites only (per-site
strengths: 1 on the subset, 0 elsewhere): each layer alone, each kind of site alone, depth bands (the first k
layers, the last k layers). Each subset's continuations of the dev prompts are scored like the frontier cells:
presence and the mean judge margin gained over unsteered, and perplexity (alone, given the prompt) added, as
multiples of the unsteered values. These are the ingredients of the levers in `frontier_levers.py`.

Only the ``select`` concepts (food, music) and the 24 dev prompts are used here: the benchmark concepts sports
and ocean, the fresh concept space and the 48 held-out prompts check what is chosen from this.

    python -m benchmarks.frontier_sites --cache /tmp/actsteer/frontier --out /tmp/actsteer/sites.json
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from benchmarks import frontier_data as fd
from benchmarks.frontier import load_model, markdown
from benchmarks.frontier_arms import Steerer, actsteer_arm
from benchmarks.frontier_cells import NEW_TOKENS, Cache, decode, fingerprint, generate_ids, run_cell


def layer_of(site: str) -> int | None:
    m = re.search(r"layers\.(\d+)\.", site)
    return int(m.group(1)) if m else None


def kind_of(site: str) -> str:
    return "final norm" if layer_of(site) is None else site.split(".", 3)[-1]


def subsets(sites: list[str], per_layer: bool = True) -> dict[str, list[str]]:
    """Named site subsets: every kind alone, the first/last k layers, every layer alone (``per_layer``)."""
    layers = sorted({layer_of(s) for s in sites if layer_of(s) is not None})
    n = len(layers)
    out: dict[str, list[str]] = {"all": list(sites)}
    for kind in dict.fromkeys(kind_of(s) for s in sites):
        out[f"kind {kind}"] = [s for s in sites if kind_of(s) == kind]
    for k in range(n // 6, n, n // 6):
        out[f"first {k} layers"] = [s for s in sites if layer_of(s) is not None and layer_of(s) < k]
        out[f"last {n - k} layers (+final)"] = [s for s in sites if layer_of(s) is None or layer_of(s) >= k]
    for layer in layers if per_layer else []:
        out[f"layer {layer}"] = [s for s in sites if layer_of(s) == layer]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default="food,music")
    parser.add_argument("--modules", default="all-norms,auto")
    parser.add_argument("--prompts", default="dev")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--per-layer", default="all-norms", help="site sets that also get every layer alone")
    parser.add_argument("--cache", default="/tmp/actsteer/frontier")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    for name in args.concepts.split(","):
        if fd.CONCEPTS[name].role != "select":
            print(f"note: {name} is a {fd.CONCEPTS[name].role} concept, not one to choose defaults on")
    import actsteer

    model, tok = load_model()
    prompts = fd.prompts(args.prompts)
    cache = Cache(args.cache)
    prefix = f"{args.prompts}{len(prompts)}-t{args.new_tokens}"
    rows = []
    for name in args.concepts.split(","):
        desc = fd.CONCEPTS[name].descriptions
        base = run_cell(cache, f"{prefix}/{name}/unsteered", model, tok, prompts, desc,
                        lambda: decode(tok, generate_ids(model, tok, prompts, new_tokens=args.new_tokens)))["summary"]
        for modules in args.modules.split(","):
            arm = actsteer_arm(f"actsteer {modules}", modules=modules)
            steerer = Steerer(arm, name, model, tok, prompts, cache)
            t = steerer.transport
            t0 = time.perf_counter()
            groups = subsets(t.sites, modules in args.per_layer.split(","))
            for label, subset in groups.items():
                strength = {**{s: args.strength for s in subset}, "*": 0.0}

                def produce(strength=strength):
                    steering = actsteer.Steering(t, strength)
                    return decode(tok, generate_ids(model, tok, prompts, new_tokens=args.new_tokens,
                                                    steering=steering))

                key = f"{prefix}/{name}/sites/{arm.key(model)}/s{args.strength:g}-{fingerprint(sorted(subset))}"
                c = run_cell(cache, key, model, tok, prompts, desc, produce, meta={"subset": label})["summary"]
                rows.append({
                    "concept": name, "modules": modules, "subset": label, "n_sites": len(subset),
                    "presence": c["presence"], "d_presence": c["presence"] - base["presence"],
                    "d_score": c["score"] - base["score"], "ratio": c["ppl_alone"] / base["ppl_alone"],
                    "ratio_prompt": c["ppl"] / base["ppl"], "distinct_2": c["distinct_2"],
                })
            print(f"{name} / {modules}: {len(groups)} subsets ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
    cols = ["concept", "modules", "subset", "n_sites", "presence", "d_presence", "d_score", "ratio", "ratio_prompt",
            "distinct_2"]
    print(markdown(rows, cols))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return {"rows": rows}


if __name__ == "__main__":
    main()
