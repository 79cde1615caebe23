"""Where the steer enters a classifier-free-guidance batch, measured on both miniatures across guidance 0-8.

For every style, a few transports (``FITS``) are fitted once with the miniature's protocol (see
`diffusion_fewstep_style.py`) and applied to the held-out captions at guidance 0/1 (no CFG batch) and 2, 3, 5, 8,
with three placements (`fewstep_common.PLACEMENTS`): both halves at the strength, the conditional half only, and
both halves at guidance x strength. The prompt (", <style>") at the same guidance is the reference. Per cell:
style presence, content kept and similarities against the unsteered twin AT THE SAME GUIDANCE; the keep-ratio is
presence at guidance g over presence without guidance (computed by `fewstep_tables.py`).

Run (one thread):
    python -m benchmarks.diffusion_fewstep_guidance --model fewstep --out .../guidance_fewstep.jsonl
    python -m benchmarks.diffusion_fewstep_guidance --model tenstep --seeds 1 --out .../guidance_tenstep.jsonl
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from benchmarks import fewstep_common as C

logger = logging.getLogger("diffusion_fewstep_guidance")

FITS: dict[str, tuple[str, dict[str, Any]]] = {
    "linear-act": ("unet", dict(method="linear-act", support="observed")),
    "linear-act all": ("unet", dict(method="linear-act", support="all")),
    "te linear-act all": ("te", dict(method="linear-act", support="all")),
    "both linear-act all": ("both", dict(method="linear-act", support="all")),
}


def run(args: argparse.Namespace) -> None:
    m = C.load(args.model, n_fit=args.n_fit, n_eval=args.n_eval, seeds=args.seeds)
    rows = C.Rows(args.out, {"model": args.model, "guidances": args.guidances, "strengths": args.strengths,
                             "placements": args.placements, "n_eval": args.n_eval, "seeds": args.seeds})
    prompts = m.captions(m.eval_attrs)
    unet_sites = C.unet_site_names(m)
    names = [n for n in FITS if not args.fits or n in args.fits]
    for style in args.styles or m.styles:
        source, target = m.captions(m.fit_attrs), m.captions(m.fit_attrs, f", {style}")
        transports = {n: C.fit(m, source, target, sites=FITS[n][0], unet_sites=unet_sites, **FITS[n][1])
                      for n in names}
        for g in args.guidances:
            base = dict(model=m.name, style=style, guidance=g)
            reference = C.generate(m, prompts, guidance=g)
            rows.add(**base, method="unsteered", sites="-", placement="-", strength=0.0,
                     **m.score(reference, reference, style))
            prompted = C.generate(m, m.captions(m.eval_attrs, f", {style}"), guidance=g)
            rows.add(**base, method="prompt", sites="-", placement="-", strength=1.0,
                     **m.score(prompted, reference, style))
            for name in names:
                for placement in args.placements if g > 1 else ["both"]:
                    for s in args.strengths:
                        images = C.generate(m, prompts, transports[name], strength=s, placement=placement, guidance=g)
                        rows.add(**base, method=name, sites=FITS[name][0], placement=placement if g > 1 else "-",
                                 strength=s, **m.score(images, reference, style))


def main(argv: list[str] | None = None) -> None:
    def own(p: Any) -> None:
        p.add_argument("--fits", type=C.names, default=None)
        p.add_argument("--placements", type=C.names, default=list(C.PLACEMENTS))
        p.add_argument("--guidances", type=C.floats, default=[0.0, 2.0, 3.0, 5.0, 8.0])
        p.add_argument("--strengths", type=C.floats, default=[1.0])

    C.cli(__doc__, run, argv, own=own)


if __name__ == "__main__":
    main()
