"""Per-step fitting (``fit_pipeline(steps="each")``) against the first-step fit (the paper's rule), through
actsteer's own API, on fresh captions and seeds: the evidence for issue 23's default.

Parts (``--parts``, each writes rows to ``--out``):
- ``style``: induction plain -> style on the few-step miniature for each ``--split`` (the fit/held-out caption split
  and the noise differ per split: split 0 is the protocol of `diffusion_fewstep_style.py`, split 1 new captions and
  seeds), fits ``first`` and ``each`` (Linear-AcT, sequential, observed support, the ``auto`` UNet norms: every
  other setting at the artist's defaults), strengths ``--strengths``; the prompt as reference;
- ``guidance``: the same fits at strength 1 under guidance 3 and 8, placements ``both`` and ``conditional`` (split 0);
- ``negation``: remove dark / sepia, fitted "<caption>, <style>" -> "<caption>", strengths 0.5 and 1 (split 0);
- ``tenstep``: the first miniature (10 DDIM steps, trained for CFG), striped and speckled, ``first`` vs ``each`` at
  strengths 1 and 2, both placements, at guidances ``--tenstep-guidances`` (its protocol: 3; 1 = no guidance).

Run (one thread per process; parts can run in separate processes):
    python -m benchmarks.diffusion_fewstep_each --parts style --out .../each_style.jsonl
    python -m benchmarks.diffusion_fewstep_each --parts guidance,negation,tenstep --out .../each_rest.jsonl
    python -m benchmarks.diffusion_fewstep_each --out .../each_style.jsonl --plot benchmarks/figures/fewstep_each.png
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from benchmarks import fewstep_common as C

logger = logging.getLogger("diffusion_fewstep_each")
FITS = ("first", "each")
SPLIT_NOISE = {0: 1000, 1: 5000}  # the generation seed of each split (prompt i from seed + i)


def _fit(m: C.Mini, source: list[str], target: list[str], fit: str) -> Any:
    return C.fit(m, source, target, sites="unet", method="linear-act", support="observed", steps=fit)


def style(args: argparse.Namespace, rows: C.Rows) -> None:
    for split in args.splits:
        m = C.load("fewstep", n_fit=args.n_fit, n_eval=args.n_eval, seeds=args.seeds, seed=split)
        seed = SPLIT_NOISE[split]
        prompts = m.captions(m.eval_attrs)
        reference = C.generate(m, prompts, seed=seed)
        for name in args.styles:
            base = dict(part="style", model=m.name, split=split, style=name)
            rows.add(**base, fit="unsteered", strength=0.0, **m.score(reference, reference, name))
            prompted = C.generate(m, m.captions(m.eval_attrs, f", {name}"), seed=seed)
            rows.add(**base, fit="prompt", strength=1.0, **m.score(prompted, reference, name))
            source, target = m.captions(m.fit_attrs), m.captions(m.fit_attrs, f", {name}")
            for fit in FITS:
                transport = _fit(m, source, target, fit)
                for s in args.strengths:
                    images = C.generate(m, prompts, transport, strength=s, seed=seed)
                    rows.add(**base, fit=fit, strength=s, **m.score(images, reference, name))


def guidance(args: argparse.Namespace, rows: C.Rows) -> None:
    m = C.load("fewstep", n_fit=args.n_fit, n_eval=args.n_eval, seeds=1)
    prompts = m.captions(m.eval_attrs)
    for name in args.styles:
        source, target = m.captions(m.fit_attrs), m.captions(m.fit_attrs, f", {name}")
        transports = {fit: _fit(m, source, target, fit) for fit in FITS}
        for g in (0.0, 3.0, 8.0):
            base = dict(part="guidance", model=m.name, style=name, guidance=g)
            reference = C.generate(m, prompts, guidance=g)
            prompted = C.generate(m, m.captions(m.eval_attrs, f", {name}"), guidance=g)
            rows.add(**base, fit="prompt", placement="-", **m.score(prompted, reference, name))
            for fit, transport in transports.items():
                for placement in (("both",) if g == 0 else ("both", "cond")):
                    images = C.generate(m, prompts, transport, strength=1.0, guidance=g, placement=placement)
                    rows.add(**base, fit=fit, placement=placement, **m.score(images, reference, name))


def negation(args: argparse.Namespace, rows: C.Rows) -> None:
    m = C.load("fewstep", n_fit=args.n_fit, n_eval=args.n_eval, seeds=args.seeds)
    for name in ("dark", "sepia"):
        prompts = m.captions(m.eval_attrs, f", {name}")
        reference = C.generate(m, prompts)
        base = dict(part="negation", model=m.name, style=name)
        rows.add(**base, fit="unsteered", strength=0.0, **m.score(reference, reference, name))
        source, target = m.captions(m.fit_attrs, f", {name}"), m.captions(m.fit_attrs)
        for fit in FITS:
            transport = _fit(m, source, target, fit)
            for s in (0.5, 1.0):
                rows.add(**base, fit=fit, strength=s, **m.score(C.generate(m, prompts, transport, strength=s),
                                                                reference, name))


def tenstep(args: argparse.Namespace, rows: C.Rows) -> None:
    m = C.load("tenstep", n_fit=args.n_fit, n_eval=args.n_eval, seeds=1)
    prompts = m.captions(m.eval_attrs)
    for g in args.tenstep_guidances:
        reference = C.generate(m, prompts, guidance=g)
        for name in ("striped", "speckled"):
            base = dict(part="tenstep", model=m.name, style=name, guidance=g)
            rows.add(**base, fit="unsteered", strength=0.0, placement="-", **m.score(reference, reference, name))
            prompted = C.generate(m, m.captions(m.eval_attrs, f", {name}"), guidance=g)
            rows.add(**base, fit="prompt", strength=1.0, placement="-", **m.score(prompted, reference, name))
            source, target = m.captions(m.fit_attrs), m.captions(m.fit_attrs, f", {name}")
            for fit in FITS:
                transport = _fit(m, source, target, fit)
                for s in (1.0, 2.0):
                    for placement in ("both", "cond") if g > 1 else ("both",):
                        images = C.generate(m, prompts, transport, strength=s, placement=placement, guidance=g)
                        rows.add(**base, fit=fit, strength=s, placement=placement, **m.score(images, reference, name))


PARTS = {"style": style, "guidance": guidance, "negation": negation, "tenstep": tenstep}


def plot(rows_path: Path, out: Path) -> None:
    """Presence (solid) and content kept (dashed) against strength, first-step vs per-step fits, one panel per style,
    both caption splits (the ``style`` part's rows); the prompt's presence as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in C.read_rows(rows_path) if r.get("part") == "style"]
    styles = list(dict.fromkeys(r["style"] for r in rows))
    fig, axes = plt.subplots(1, len(styles), figsize=(3.2 * len(styles), 3.0), sharey=True)
    for ax, name in zip(axes, styles):
        for fit, colour in (("first", "tab:gray"), ("each", "tab:blue")):
            for split, marker in ((0, "o"), (1, "s")):
                cells = sorted(((0.0, r) for r in rows if r["style"] == name and r["split"] == split
                                and r["fit"] == "unsteered"), key=lambda c: c[0])
                cells += sorted(((float(r["strength"]), r) for r in rows if r["style"] == name
                                 and r["split"] == split and r["fit"] == fit), key=lambda c: c[0])
                xs = [c[0] for c in cells]
                ax.plot(xs, [c[1]["style_presence"] for c in cells], marker=marker, color=colour,
                        label=f"{fit}, split {split}")
                ax.plot(xs, [c[1]["content_kept"] for c in cells], marker=marker, color=colour, ls="--", alpha=0.5)
        prompt = [r["style_presence"] for r in rows if r["style"] == name and r["fit"] == "prompt"]
        ax.axhline(sum(prompt) / len(prompt), color="k", ls=":", lw=1)
        ax.set_title(name)
        ax.set_xlabel("strength")
    axes[0].set_ylabel("presence (solid), content kept (dashed)")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> None:
    def own(p: Any) -> None:
        p.add_argument("--parts", type=C.names, default=list(PARTS))
        p.add_argument("--splits", type=lambda t: [int(v) for v in t.split(",") if v], default=[0, 1])
        p.add_argument("--strengths", type=C.floats, default=[0.5, 1.0, 1.5])
        p.add_argument("--tenstep-guidances", type=C.floats, default=[3.0])
        p.add_argument("--plot", type=Path, default=None,
                       help="only draw the style part's plot from the rows in --out into this PNG")

    def run(args: Any) -> None:
        if args.plot is not None:
            plot(args.out, args.plot)
            return
        args.styles = args.styles or ["dark", "sepia", "pastel", "halftone"]
        rows = C.Rows(args.out, {"parts": args.parts, "styles": args.styles, "splits": args.splits,
                                 "strengths": args.strengths, "n_eval": args.n_eval, "seeds": args.seeds})
        for part in args.parts:
            PARTS[part](args, rows)

    C.cli(__doc__, run, argv, own=own, seeds=2, model=False)


if __name__ == "__main__":
    main()
