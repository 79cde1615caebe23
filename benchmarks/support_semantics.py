"""Support of Linear-AcT on SmolLM2-135M-Instruct: observed vs all reals, pooled-range vs token-range semantics.

ACT_SPEC.md section 3: the maps and their observed range [min, max] are fitted on MEAN-POOLED activations, but
the hook engine applies the range to every token, and tokens spread wider than their means, so part of them is
left untouched ("pooled-range, applied per token": actsteer's default and the reference's). This benchmark
compares, for Linear-AcT (sequential, mean pooling, the same maps omega/beta everywhere):

- ``observed``: the pooled range, applied per token (actsteer's default);
- ``all``: no range (Q_inf, the paper's induction support);
- ``token-range``: the same maps with the range refitted on TOKEN-level source activations (min..max over every
  real token of the fitting sentences, recorded at each site with the earlier sites steered), so the range and
  the values it is applied to have the same semantics;
- ``token-band``: the same, 1%..99% quantiles of the token-level values (a quantile band).

Measured: the share of per-token activations inside the support at each site (held-out neutral sentences, whole
transport attached at strength 1, mean over sites), held-out transport fidelity (normalised W1 after steering),
and concept presence / perplexity / distinct-2 of the held-out prompts' continuations at strengths 0.5 and 1.
The token-level ranges live here, in benchmark code: actsteer's core fits ranges on pooled values only.

Run (2.5 minutes on 2 CPU cores):
    .venv/bin/python -m benchmarks.support_semantics --out /tmp/actsteer/support
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

import actsteer
from actsteer.core import ForwardContext
from actsteer.core.sites import iter_site_modules
from actsteer.eval import support_coverage, sweep, transport_fidelity
from actsteer.hf_integration.cli import read_texts
from actsteer.hf_integration.lm import make_runner, padding_ready
from benchmarks.concept_induction import CONCEPTS, DATA, concept_data, load_model, markdown

N_FIT = 30


@torch.no_grad()
def token_support(model, tok, transport: actsteer.Transport, texts: list[str], band: tuple[float, float] | None = None,
                  ) -> actsteer.Transport:
    """A copy of ``transport`` whose source range per unit is fitted on token-level activations of ``texts``.

    Each site's values are recorded before its own map with the whole transport attached at strength 1 (so the
    earlier sites are steered, as in the sequential fit), over real tokens only. ``band=None`` takes min..max,
    else the (q_lo, q_hi) quantiles. Only the source range changes; omega, beta and the target range are kept.
    """
    ctx = ForwardContext()
    values: dict[str, list[torch.Tensor]] = {s: [] for s in transport.sites}
    handles = []

    def make_hook(site: str):
        def hook(module, args, output):
            x = output.float()  # (B, T, D)
            real = ctx.mask.bool() if ctx.mask is not None else torch.ones(x.shape[:2], dtype=torch.bool)
            values[site].append(x[real].cpu())  # (tokens, D)

        return hook

    try:
        for site, _, _, module in iter_site_modules(model, transport.sites):  # before the steering hooks
            handles.append(module.register_forward_hook(make_hook(site)))
        with padding_ready(tok), actsteer.steer(model, transport, strength=1.0):
            make_runner(model, tok, 128)(texts, ctx)
    finally:
        for h in reversed(handles):
            h.remove()
    maps = {}
    for site, unit_map in transport.items():
        x = torch.cat(values[site])
        if band is None:
            lo, hi = x.amin(0), x.amax(0)
        else:
            lo, hi = torch.quantile(x, torch.tensor(band), dim=0)
        maps[site] = dataclasses.replace(unit_map, lo=lo, hi=hi)
    label = "token-range" if band is None else f"token-band {band[0]:g}-{band[1]:g}"
    return transport.replace(maps, support=label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default="food")
    parser.add_argument("--modules", default="all-norms")
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
    table: list[dict[str, Any]] = []
    for name in args.concepts.split(","):
        source, target = concept_data(name)
        fit_src, fit_tgt, held_src, held_tgt = source[:N_FIT], target[:N_FIT], source[N_FIT:], target[N_FIT:]
        desc = list(CONCEPTS[name].descriptions)
        print(f"\n## {name}: fit on {len(fit_src)} -> {len(fit_tgt)}, held out {len(held_src)} -> {len(held_tgt)}, "
              f"sites {args.modules}", flush=True)
        base = sweep(model, tok, None, prompts, concept=desc, max_new_tokens=args.new_tokens).at(0.0)
        table.append({"concept": name, "support": "unsteered", "strength": 0.0, **base})
        t0 = time.perf_counter()
        observed = actsteer.fit_lm(model, tok, fit_src, fit_tgt, modules=args.modules, progress=False)
        variants = {
            "observed": observed,
            "all": actsteer.fit_lm(model, tok, fit_src, fit_tgt, modules=args.modules, support="all", progress=False),
            "token-range": token_support(model, tok, observed, fit_src),
            "token-band 1-99%": token_support(model, tok, observed, fit_src, band=(0.01, 0.99)),
        }
        print(f"fitted 4 variants in {time.perf_counter() - t0:.0f}s", flush=True)
        for label, transport in variants.items():
            coverage = support_coverage(model, transport, held_src, tokenizer=tok)
            report = transport_fidelity(model, transport, held_src, held_tgt, tokenizer=tok)
            res = sweep(model, tok, transport, prompts, strengths, concept=desc, max_new_tokens=args.new_tokens)
            if out:
                res.to_csv(out / f"{name}_{label.replace(' ', '_').replace('%', '')}.csv")
            for s in strengths:
                table.append({"concept": name, "support": label, **res.at(s),
                              "coverage": sum(coverage.values()) / len(coverage),
                              "min coverage": min(coverage.values()), "W1 after": report.mean_after,
                              "W1 before": report.mean_before})
            print(markdown(table[-len(strengths):], ["support", "strength", "coverage", "W1 after", "presence", "score",
                                                     "perplexity_alone", "distinct_2"]), flush=True)

    total = time.perf_counter() - t_start
    print("\n# Summary (coverage: share of per-token activations inside the support, held-out neutral sentences, "
          "mean over sites; W1: held-out normalised W1 to the target at strength 1)")
    print(markdown(table, ["concept", "support", "strength", "coverage", "min coverage", "W1 before", "W1 after",
                           "presence", "score", "perplexity_alone", "distinct_2"]))
    print(f"\nTotal {total:.0f}s")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"args": vars(args), "seconds": total, "table": table}, indent=1))


if __name__ == "__main__":
    main()
