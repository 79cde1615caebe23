"""Style induction on the miniatures, the paper's protocol: plain captions -> the same captions with a style.

For every style of the miniature (few-step: pastel, sepia, dark, blurry, halftone, outlined; ten-step: striped,
speckled, outlined) a transport is fitted with `actsteer.fit_pipeline` on 32 captions (responses of the first
step; guidance 0 on the few-step model, the conditional half at guidance 3 on the ten-step one) and applied to 32
held-out captions x 3 seeds, the same seeds at every strength, so that every steered image has an unsteered twin.

Fits compared (``FITS``): Linear-AcT and Mean-AcT sequential with the observed and the all-reals support, Linear-AcT
at once, ITI-c (at once, all reals, its own scale), and any further AcT-family estimator this actsteer has
(`fewstep_common.known_methods`); each on the UNet norms (``unet``, the paper's SDXL sites), the text encoder's
final norm (``te``) and both. Measured per cell (`miniature.fewstep.metrics.score`): style presence, content kept
(shape and position equal to the twin's, colour too where the style keeps colours), judged accuracies, pixel and
judge-feature similarity. The prompt (", <style>") is the reference.

Run (one thread; see benchmarks/RESULTS.md, "Diffusion in miniature, few-step"):
    python -m benchmarks.diffusion_fewstep_style --model fewstep --out /work/scratch/fewstep/style_fewstep.jsonl
    python -m benchmarks.diffusion_fewstep_style --model tenstep --seeds 1 --out .../style_tenstep.jsonl
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from benchmarks import fewstep_common as C

logger = logging.getLogger("diffusion_fewstep_style")

# name -> fit_pipeline options (sites are crossed with these)
FITS: dict[str, dict[str, Any]] = {
    "linear-act": dict(method="linear-act", support="observed"),
    "linear-act all": dict(method="linear-act", support="all"),
    "linear-act all at-once": dict(method="linear-act", support="all", sequential=False),
    "linear-act at-once": dict(method="linear-act", support="observed", sequential=False),
    "mean-act": dict(method="mean-act", support="observed"),
    "mean-act all": dict(method="mean-act", support="all"),
    "itic": dict(method="itic", support="all", sequential=False),
}


def fits() -> dict[str, dict[str, Any]]:
    """`FITS`, the newer estimators this actsteer has (first step, observed and all-reals support), and per-step
    variants (``"... each"``: ``steps="each"``, the default since issue 23) of the AcT maps."""
    out = dict(FITS)
    for method in C.known_methods():
        if method not in ("linear-act", "mean-act", "itic"):
            out[method] = dict(method=method, support="observed")
            out[f"{method} all"] = dict(method=method, support="all")
    for name in [n for n in out if n in ("linear-act", "mean-act", "quantile")]:
        out[f"{name} each"] = dict(out[name], steps="each")  # (LinEAS refuses it: it trains through the model)
    return out


def run(args: argparse.Namespace) -> None:
    m = C.load(args.model, n_fit=args.n_fit, n_eval=args.n_eval, seeds=args.seeds)
    rows = C.Rows(args.out, {"model": args.model, "n_fit": args.n_fit, "n_eval": args.n_eval, "seeds": args.seeds,
                             "steps": m.steps, "guidance": m.guidance, "strengths": args.strengths})
    prompts = m.captions(m.eval_attrs)
    reference = C.generate(m, prompts)
    unet_sites = C.unet_site_names(m)
    chosen = fits()
    names = [n for n in chosen if not args.fits or n in args.fits]
    for style in args.styles or m.styles:
        base = dict(model=m.name, style=style)
        rows.add(**base, method="unsteered", sites="-", strength=0.0, **m.score(reference, reference, style))
        prompted = C.generate(m, m.captions(m.eval_attrs, f", {style}"))
        rows.add(**base, method="prompt", sites="-", strength=1.0, **m.score(prompted, reference, style))
        source, target = m.captions(m.fit_attrs), m.captions(m.fit_attrs, f", {style}")
        for name in names:
            for sites in args.sites:
                try:
                    transport = C.fit(m, source, target, sites=sites, unet_sites=unet_sites, **chosen[name])
                except Exception as exc:  # an estimator that refuses a setting: say so, go on
                    logger.warning("fit %s %s %s failed: %s", style, name, sites, exc)
                    continue
                strengths = args.itic_strengths if name == "itic" else args.strengths
                for s in strengths:
                    images = C.generate(m, prompts, transport, strength=s)
                    rows.add(**base, method=name, sites=sites, strength=s, **m.score(images, reference, style))


def main(argv: list[str] | None = None) -> None:
    def own(p: Any) -> None:
        p.add_argument("--fits", type=C.names, default=None)
        p.add_argument("--sites", type=C.names, default=list(C.SITE_SETS))
        p.add_argument("--strengths", type=C.floats, default=[0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
        p.add_argument("--itic-strengths", type=C.floats, default=[1.0, 2.0, 4.0, 8.0])

    C.cli(__doc__, run, argv, own=own)


if __name__ == "__main__":
    main()
