"""Style induction on the miniature text-to-image model: "flat" shapes -> "striped" ones, judged with ground truth.

The paper's diffusion style protocol (Rodriguez et al., ICLR 2025, section 5; ACT_SPEC.md section 7) on a model
trained here (tests/support/miniature): fit a transport from plain captions ("a small red circle on the left") to the
same captions with the style (", striped") through `actsteer.fit_pipeline` (responses from the first, noisiest
step, conditional half of the CFG batch), generate held-out captions (never used for fitting) with the same seeds
at several strengths through `actsteer.steer`, and judge every image with CNNs trained on the procedural data
(tests/support/miniature/judges.py):

- style presence: fraction of images judged "striped" (the paper's CLIP zero-shot presence);
- content: shape/colour accuracy against the caption, shape/colour kept against the unsteered image of the same
  seed, pixel similarity and judge-feature cosine similarity to it (the paper's CLIP similarity).

Variants (one row per strength):
- sites: ``unet`` = every UNet norm (``modules="auto"``, the paper's SDXL choice, 39 sites here) or ``te`` = the
  text encoder's ``final_layer_norm`` (its output is what the UNet cross-attends to);
- Linear-AcT and Mean-AcT with the observed support (actsteer's default) and all reals (the paper's induction
  support), fitted sequentially; Linear-AcT fitted at once; ITI-c (at once, all reals, its own scale);
- Linear-AcT applied to the conditional half of the CFG batch only (per-row strengths), and in timestep windows;
- the prompt-only baseline (", striped" appended: the model's own route to the style).
Strengths run 0..1 and, as extrapolation, 1.5 and 2. The other styles (``--other-styles speckled,outlined``) get
the prompt baseline and three variants at strengths 1, 1.5 and 2.

Run (5 min wall on 2 CPU cores shared with other jobs, one thread; see benchmarks/RESULTS.md, "Diffusion in
miniature"):
    .venv/bin/python -m benchmarks.diffusion_style --out /tmp/actsteer/miniature_style --figures benchmarks/figures
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import actsteer  # noqa: E402
from tests.support.miniature import metrics  # noqa: E402
from tests.support.miniature.judges import JUDGES_FILE, Judges  # noqa: E402
from tests.support.miniature.model import PIPELINE_DIR, load_pipeline  # noqa: E402

logger = logging.getLogger("diffusion_style")
STYLE = "striped"
TEXT_SITE = ["text_encoder.final_layer_norm"]
COLUMNS = ["method", "sites", "support", "strength", "style_presence", "shape_acc", "colour_acc", "shape_kept",
           "colour_kept", "pixel_sim", "feature_sim"]
# name -> (sites, fit_pipeline options); strengths come from the command line (ITI-c: --itic-strengths)
FITS: dict[str, tuple[str, dict[str, Any]]] = {
    "linear-act": ("unet", dict(method="linear-act")),
    "linear-act all": ("unet", dict(method="linear-act", support="all")),
    "mean-act all": ("unet", dict(method="mean-act", support="all")),
    "linear-act all at-once": ("unet", dict(method="linear-act", support="all", sequential=False)),
    "itic": ("unet", dict(method="itic", support="all", sequential=False)),
    "te linear-act": ("te", dict(method="linear-act", modules=TEXT_SITE)),
    "te linear-act all": ("te", dict(method="linear-act", support="all", modules=TEXT_SITE)),
    "te mean-act all": ("te", dict(method="mean-act", support="all", modules=TEXT_SITE)),
}


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def run(args: argparse.Namespace) -> dict[str, Any]:
    pipe, judges = load_pipeline(args.pipeline), Judges.load(args.judges)
    fit_attrs, eval_attrs = metrics.split_prompts(args.n_fit, args.n_eval, seed=args.seed)
    source, target = metrics.captions(fit_attrs), metrics.captions(fit_attrs, suffix=f", {STYLE}")
    prompts = metrics.captions(eval_attrs)
    n = len(prompts)
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance)
    fit_kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, progress=False, seed=args.seed,
                  steps="first")  # the protocol of the tables in RESULTS.md

    def gen(prompt_list: list[str]) -> torch.Tensor:
        return metrics.generate(pipe, prompt_list, seed=1000 + args.seed, **call)

    start = time.time()
    reference = gen(prompts)
    rows: list[dict[str, Any]] = []

    def measure(method: str, sites: str, support: str, strength: float, images: torch.Tensor) -> None:
        row = {"method": method, "sites": sites, "support": support, "strength": strength,
               **metrics.score(judges, images, eval_attrs, reference, style=STYLE)}
        rows.append(row)
        logger.info("%s", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})

    measure("unsteered", "-", "-", 0.0, reference)
    measure("prompt ', striped'", "-", "-", 1.0, gen(metrics.captions(eval_attrs, suffix=f", {STYLE}")))

    transports, fit_s = {}, {}
    for name, (sites, kw) in FITS.items():
        t0 = time.time()
        transports[name] = actsteer.fit_pipeline(pipe, source, target, **kw, **fit_kw)
        fit_s[name] = round(time.time() - t0, 2)
    logger.info("fitted %d transports (%s s)", len(FITS), fit_s)

    for name, (sites, kw) in FITS.items():
        support = str(kw.get("support", "observed"))
        for s in args.itic_strengths if name == "itic" else args.strengths:
            if s != 0:
                with actsteer.steer(pipe, transports[name], strength=s):
                    measure(name, sites, support, s, gen(prompts))
    # CFG batches are [unconditional, conditional]: per-row strengths steer the conditional half only
    for s in args.strengths:
        if s != 0:
            with actsteer.steer(pipe, transports["linear-act all"], strength=torch.tensor([0.0] * n + [s] * n)):
                measure("linear-act all, conditional half", "unet", "all", s, gen(prompts))
    for window in ((0.0, 0.25), (0.0, 0.5), (0.5, 1.0)):
        with actsteer.steer(pipe, transports["linear-act all"], strength=args.window_strength, steps=window):
            measure(f"linear-act all, steps {window[0]:g}-{window[1]:g}", "unet", "all", args.window_strength,
                    gen(prompts))
    rows += other_styles(pipe, judges, fit_attrs, eval_attrs, reference, args)
    wall = time.time() - start
    return {"rows": rows, "fit_s": fit_s, "wall_s": round(wall, 1),
            "sites": {name: len(t.sites) for name, t in transports.items()}, "n_fit": len(source),
            "n_eval": n, "transports": transports, "prompts": prompts, "pipe": pipe}


def other_styles(pipe: Any, judges: Judges, fit_attrs: list, eval_attrs: list, reference: torch.Tensor,
                 args: argparse.Namespace) -> list[dict[str, Any]]:
    """The other styles (``--other-styles``) with a few variants: is the main style's picture specific to it?"""
    rows = []
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance)
    fit_kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, progress=False, seed=args.seed,
                  steps="first")  # the protocol of the tables in RESULTS.md
    for style in args.other_styles:
        source, target = metrics.captions(fit_attrs), metrics.captions(fit_attrs, suffix=f", {style}")
        prompted = metrics.generate(pipe, metrics.captions(eval_attrs, suffix=f", {style}"), seed=1000 + args.seed,
                                    **call)
        rows.append({"method": f"prompt ', {style}'", "sites": "-", "support": "-", "strength": 1.0,
                     **metrics.score(judges, prompted, eval_attrs, reference, style=style), "style": style})
        for name in ("linear-act", "linear-act all", "te linear-act all"):
            sites, kw = FITS[name]
            transport = actsteer.fit_pipeline(pipe, source, target, **kw, **fit_kw)
            for s in (1.0, 1.5, 2.0):
                with actsteer.steer(pipe, transport, strength=s):
                    images = metrics.generate(pipe, metrics.captions(eval_attrs), seed=1000 + args.seed, **call)
                rows.append({"method": name, "sites": sites, "support": str(kw.get("support", "observed")),
                             "strength": s, **metrics.score(judges, images, eval_attrs, reference, style=style),
                             "style": style})
                logger.info("%s", rows[-1])
    return rows


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "style" not in r]
    base = next(r for r in rows if r["method"] == "unsteered")
    prompt = next(r for r in rows if r["method"].startswith("prompt"))
    keys = (("style_presence", "judged striped"), ("shape_acc", "shape accuracy"), ("feature_sim", "feature sim."))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for method, fmt in (("linear-act", "o-"), ("linear-act all", "s-"), ("mean-act all", "s--"),
                        ("linear-act all at-once", "d:"), ("linear-act all, conditional half", "v-"),
                        ("te linear-act all", "^-"), ("te mean-act all", "^--")):
        pts = [base] + sorted((r for r in rows if r["method"] == method), key=lambda r: r["strength"])
        for ax, (key, _) in zip(axes, keys):
            ax.plot([r["strength"] for r in pts], [r[key] for r in pts], fmt, ms=4, label=method)
    for ax, (key, title) in zip(axes, keys):
        ax.axhline(prompt[key], color="grey", lw=1, label="prompt ', striped'")
        ax.axvline(1.0, color="lightgrey", lw=0.8, ls=":")
        ax.set_title(title)
        ax.set_xlabel("strength (> 1: extrapolation)")
        ax.set_ylim(0, 1.02)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grid(result: dict[str, Any], path: Path, args: argparse.Namespace) -> None:
    """Strength grids (`actsteer.strength_grid`) of four held-out prompts, UNet then text-encoder sites, 4x."""
    from PIL import Image

    parts = []
    for name in ("linear-act all", "te linear-act all"):
        parts.append(actsteer.strength_grid(
            result["pipe"], result["prompts"][:4], result["transports"][name], strengths=args.strengths,
            seed=1000 + args.seed, num_inference_steps=args.steps, guidance_scale=args.guidance))
    canvas = Image.new("RGB", (parts[0].width, sum(p.height for p in parts) + 6), "grey")
    canvas.paste(parts[0], (0, 0))
    canvas.paste(parts[1], (0, parts[0].height + 6))
    canvas.resize((canvas.width * 4, canvas.height * 4), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/actsteer/miniature_style"))
    parser.add_argument("--figures", type=Path, default=None, help="write miniature_style_*.png here")
    parser.add_argument("--pipeline", type=Path, default=PIPELINE_DIR, help="a miniature diffusers folder")
    parser.add_argument("--judges", type=Path, default=JUDGES_FILE)
    parser.add_argument("--n-fit", type=int, default=32)
    parser.add_argument("--n-eval", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (fitting: the first one)")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--strengths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
    parser.add_argument("--itic-strengths", type=_floats, default=[0.5, 1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--window-strength", type=float, default=2.0)
    parser.add_argument("--other-styles", type=lambda t: [v for v in t.split(",") if v],
                        default=["speckled", "outlined"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    main_rows = [r for r in result["rows"] if "style" not in r]
    table = metrics.markdown_table(main_rows, COLUMNS)
    others = [r for r in result["rows"] if "style" in r]
    if others:
        table += "\n\nOther styles (flat -> style):\n\n" + metrics.markdown_table(others, ["style", *COLUMNS])
    (args.out / "style.md").write_text(table + "\n")
    (args.out / "style.json").write_text(json.dumps(
        {k: v for k, v in result.items() if k not in ("transports", "pipe")}, indent=1) + "\n")
    print(table)
    print(f"\nsites {result['sites']}, {result['n_fit']} fit pairs, {result['n_eval']} held-out prompts; fit s "
          f"{result['fit_s']}; wall {result['wall_s']} s")
    if args.figures is not None:
        args.figures.mkdir(parents=True, exist_ok=True)
        plot(result, args.figures / "miniature_style_curves.png")
        grid(result, args.figures / "miniature_style_grid.png", args)


if __name__ == "__main__":
    main()
