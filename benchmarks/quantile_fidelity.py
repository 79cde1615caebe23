"""Held-out fidelity of the per-unit maps on SmolLM2's pooled activations: Linear-AcT vs the quantile map (knots).

For each concept, the pooled (mean over real tokens) activations of every site are recorded once, unsteered, for
the neutral source sentences and the concept's target sentences. Over random half/half splits of each side, every
estimator is fitted on the training halves (per site, independently) and applied to the HELD-OUT source half; the
score is the normalised 1-D Wasserstein distance to the held-out target half (``mean_u W1 / std_target``), averaged
over sites and splits. ``floor`` is the distance between the two target halves themselves (the best any map can do
on samples this small); ``none`` leaves the source as it is.

Run (about 2 min on 2 shared cores):
    python -m benchmarks.quantile_fidelity --concepts food,sports --modules all-norms --splits 10
"""

from __future__ import annotations

import argparse
import os

import torch

import actsteer
from actsteer.core import collect
from actsteer.eval.fidelity import normalised_w1
from actsteer.hf_integration.lm import make_runner, padding_ready
from actsteer.hf_integration.presets import lm_sites

from benchmarks.concept_induction import concept_data, load_model


def pooled(model, tok, sites, texts):
    with torch.no_grad(), padding_ready(tok), collect(model, sites) as rec:
        run = make_runner(model, tok, 128)
        for i in range(0, len(texts), 32):
            rec.ctx.mask = None
            run(texts[i : i + 32], rec.ctx)
    return {s: v.double() for s, v in rec.pooled().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default="food,sports")
    parser.add_argument("--modules", default="all-norms")
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--knots", default="2,4,8,16,32,64")
    parser.add_argument("--support", default="all")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("ACTSTEER_THREADS", "1")))
    model, tok = load_model()
    sites = lm_sites(model, args.modules)
    knots = [int(k) for k in args.knots.split(",")]
    methods = ["none", "linear-act"] + [f"quantile/{k}" for k in knots] + ["floor"]
    print(f"| concept | sites | {' | '.join(methods)} |")
    print("|---|---|" + "---|" * len(methods))
    for concept in args.concepts.split(","):
        source, target = concept_data(concept)
        acts_s, acts_t = pooled(model, tok, sites, source), pooled(model, tok, sites, target)
        g = torch.Generator().manual_seed(0)
        totals = dict.fromkeys(methods, 0.0)
        for _ in range(args.splits):
            ps, pt = torch.randperm(len(source), generator=g), torch.randperm(len(target), generator=g)
            fs, hs = ps[: len(ps) // 2], ps[len(ps) // 2 :]
            ft, ht = pt[: len(pt) // 2], pt[len(pt) // 2 :]
            for site in sites:
                a, b = acts_s[site], acts_t[site]
                held_s, held_t = a[hs], b[ht]
                totals["none"] += normalised_w1(held_s, held_t)
                totals["floor"] += normalised_w1(b[ft], held_t)
                m = actsteer.estimate(a[fs], b[ft], method="linear-act", support=args.support)
                totals["linear-act"] += normalised_w1(m(held_s.float()).double(), held_t)
                for k in knots:
                    m = actsteer.estimate(a[fs], b[ft], method="quantile", support=args.support, knots=k)
                    totals[f"quantile/{k}"] += normalised_w1(m(held_s.float()).double(), held_t)
        n = args.splits * len(sites)
        print(f"| {concept} | {args.modules} ({len(sites)}) | " + " | ".join(f"{totals[m] / n:.3f}" for m in methods)
              + " |", flush=True)


if __name__ == "__main__":
    main()
