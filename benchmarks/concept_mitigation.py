"""Concept mitigation on SmolLM2-135M-Instruct: steer prompts that bring up a topic away from it.

The paper's mitigation setting (toxicity, ACT_SPEC.md sections 3 and 7) in miniature, without toxic data: prompts
that naturally lead into a topic (benchmarks/data/mitigation_<concept>.txt, e.g. "The fisherman pushed his boat
into the") are continued while a transport moves concept activations (source: sentences about the concept) to
neutral ones (target: neutral sentences not about it), with the OBSERVED support Q_o, so activations outside the
concept's range are left alone. Methods on the same sites (all-norms):

- ``linear-act``, ``mean-act``: fitted concept -> neutral, sequential, mean pooling, observed support, strength 0..1;
- ``aura``: AurA, the paper's mitigation baseline (dampen units by their AUROC for the concept; max pooling);
- ``itic``: ITI-c, additive, unbounded scale;
- ``linear-act reverse``: the INDUCTION transport (neutral -> concept) at negative strength, i.e. its inverse map on
  the concept's observed range (actsteer's two-way slider).

Measured: presence of the concept in the continuation (lower is better here), perplexity of the continuation alone
under the unsteered model, distinct-2.

Run (6.5 minutes on 2 CPU cores):
    .venv/bin/python -m benchmarks.concept_mitigation --out /tmp/actsteer/mitigation
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import actsteer
from actsteer.eval import sweep
from actsteer.hf_integration.cli import read_texts
from benchmarks.concept_induction import BOUNDED, CONCEPTS, concept_data, load_model, markdown

METHODS: dict[str, dict[str, Any]] = {
    "linear-act": dict(method="linear-act", pooling="mean", support="observed", strengths=BOUNDED),
    "mean-act": dict(method="mean-act", pooling="mean", support="observed", strengths=BOUNDED),
    "aura": dict(method="aura", pooling="max", support="all", sequential=False, strengths=BOUNDED),
    "itic": dict(method="itic", pooling="mean", support="all", sequential=False, strengths=(0.5, 1.0, 2.0, 4.0)),
    "linear-act reverse": dict(method="linear-act", pooling="mean", support="observed", strengths=(-0.5, -1.0),
                               reverse=True),
}
COLS = ["method", "strength", "presence", "score", "perplexity_alone", "distinct_2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default="ocean,food")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--modules", default="all-norms")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    t_start = time.perf_counter()
    model, tok = load_model()
    out = Path(args.out) if args.out else None
    table: list[dict[str, Any]] = []
    for name in args.concepts.split(","):
        concept = CONCEPTS[name]
        desc = list(concept.descriptions)
        neutral, texts = concept_data(name)
        prompts = read_texts(concept.mitigation_prompts)
        print(f"\n## {name}: {len(texts)} {name} -> {len(neutral)} neutral sentences, {len(prompts)} prompts that "
              f"bring up {concept.topic}, sites {args.modules}", flush=True)
        base = sweep(model, tok, None, prompts, concept=desc, max_new_tokens=args.new_tokens)
        table.append({"concept": name, "method": "unsteered", **base.at(0.0)})
        print(markdown(table[-1:], COLS), flush=True)
        for label in args.methods.split(","):
            spec = dict(METHODS[label])
            strengths = spec.pop("strengths")
            reverse = spec.pop("reverse", False)
            t0 = time.perf_counter()
            src, tgt = (neutral, texts) if reverse else (texts, neutral)
            try:
                transport = actsteer.fit_lm(model, tok, src, tgt, modules=args.modules, progress=False, **spec)
            except ValueError as err:  # report a method that cannot be fitted on this data, and go on
                print(f"\n{label}: fit failed: {err}", flush=True)
                table.append({"concept": name, "method": label, "strength": "fit failed"})
                continue
            res = sweep(model, tok, transport, prompts, strengths, concept=desc, max_new_tokens=args.new_tokens)
            if out:
                res.to_csv(out / f"{name}_{label.replace(' ', '_')}.csv")
            table += [{"concept": name, "method": label, **row} for row in res.summary]
            print(f"\n{label} ({time.perf_counter() - t0:.0f}s)")
            print(markdown(table[-len(strengths):], COLS), flush=True)
            least = min(res.rows, key=lambda r: r["score"] if r["strength"] == strengths[-1] else 9)
            print(f"  e.g. strength {strengths[-1]:g}: {least['prompt']} {' '.join(least['text'].split())[:160]}")

    total = time.perf_counter() - t_start
    print(f"\n# All results ({args.modules}, {args.new_tokens} new tokens, greedy, rep. penalty 1.2; presence: lower = "
          "better mitigation)")
    print(markdown(table, ["concept"] + COLS))
    print(f"\nTotal {total:.0f}s")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"args": vars(args), "seconds": total, "table": table}, indent=1))


if __name__ == "__main__":
    main()
