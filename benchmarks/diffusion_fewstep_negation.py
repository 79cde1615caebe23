"""Style negation on the miniatures: remove a style with AcT (fitted "<caption>, <style>" -> "<caption>") vs negative
prompts, the paper's negation protocol, judged with ground truth.

Held-out captions ask for the style (32 captions x 3 seeds); the unsteered image of the same caption and seed is the
twin. Per cell: the fraction still judged the style (lower is better), the fraction judged plain, content kept
against the twin (shape and position; colour too except where the style hides it), similarities. Compared: the fits
of ``FITS`` at strengths 0.5, 1, 2; the induction transport (plain -> style) at strength -1; negative prompts (the
word, and the caption form "a circle, <style>") at guidance 3 against the guidance-3 twin (the few-step model
samples at guidance 0, where a negative prompt does nothing); and the caption without the word.

Run (one thread):
    python -m benchmarks.diffusion_fewstep_negation --model fewstep --out .../negation_fewstep.jsonl
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from benchmarks import fewstep_common as C

logger = logging.getLogger("diffusion_fewstep_negation")

FITS: dict[str, tuple[str, dict[str, Any]]] = {
    "linear-act": ("unet", dict(method="linear-act", support="observed")),
    "linear-act all": ("unet", dict(method="linear-act", support="all")),
    "linear-act at-once": ("unet", dict(method="linear-act", support="observed", sequential=False)),
    "mean-act": ("unet", dict(method="mean-act", support="observed")),
    "te linear-act": ("te", dict(method="linear-act", support="observed")),
    "te linear-act all": ("te", dict(method="linear-act", support="all")),
    "both linear-act": ("both", dict(method="linear-act", support="observed")),
    "both linear-act all": ("both", dict(method="linear-act", support="all")),
}


def run(args: argparse.Namespace) -> None:
    m = C.load(args.model, n_fit=args.n_fit, n_eval=args.n_eval, seeds=args.seeds)
    rows = C.Rows(args.out, {"model": args.model, "strengths": args.strengths, "n_eval": args.n_eval,
                             "seeds": args.seeds})
    unet_sites = C.unet_site_names(m)
    names = [n for n in FITS if not args.fits or n in args.fits]
    for style in args.styles or m.styles:
        base = dict(model=m.name, style=style)
        prompts = m.captions(m.eval_attrs, f", {style}")
        reference = C.generate(m, prompts)

        def add(method: str, sites: str, strength: float, images, ref=reference, **extra: Any) -> None:
            flat = C.fmetrics.style_counts(m.judges, images, (m.plain,))[m.plain]
            rows.add(**base, method=method, sites=sites, strength=strength, plain=flat, **extra,
                     **m.score(images, ref, style))

        add("unsteered", "-", 0.0, reference)
        add("prompt without the word", "-", 1.0, C.generate(m, m.captions(m.eval_attrs)))
        g = args.negative_guidance
        ref_g = C.generate(m, prompts, guidance=g)
        add("unsteered", "-", 0.0, ref_g, ref=ref_g, guidance=g)
        add("negative prompt", "-", 1.0, C.generate(m, prompts, guidance=g, negative=[style] * len(prompts)),
            ref=ref_g, guidance=g)
        caption_form = [f"a {a.shape}, {style}" for a in m.eval_attrs]
        add("negative prompt, caption form", "-", 1.0, C.generate(m, prompts, guidance=g, negative=caption_form),
            ref=ref_g, guidance=g)
        source, target = m.captions(m.fit_attrs, f", {style}"), m.captions(m.fit_attrs)
        for name in names:
            sites, options = FITS[name]
            transport = C.fit(m, source, target, sites=sites, unet_sites=unet_sites, **options)
            for s in args.strengths:
                add(name, sites, s, C.generate(m, m.captions(m.eval_attrs, f", {style}"), transport, strength=s))
        for name in ("linear-act", "te linear-act all"):
            sites, options = FITS[name]
            induction = C.fit(m, target, source, sites=sites, unet_sites=unet_sites, **options)
            add(f"{name}, induction reversed", sites, -1.0, C.generate(m, prompts, induction, strength=-1.0))


def main(argv: list[str] | None = None) -> None:
    def own(p: Any) -> None:
        p.add_argument("--fits", type=C.names, default=None)
        p.add_argument("--strengths", type=C.floats, default=[0.5, 1.0, 2.0])
        p.add_argument("--negative-guidance", type=float, default=3.0)

    C.cli(__doc__, run, argv, own=own)


if __name__ == "__main__":
    main()
