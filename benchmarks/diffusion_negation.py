"""Concept negation on the miniature text-to-image model: remove "striped" or "red" with AcT vs a negative prompt.

The paper's negation protocol (Rodriguez et al., ICLR 2025, section 5: AcT fitted *with concept -> without
concept* and applied at strength 1, compared with negative prompts) on the model trained here (benchmarks/
miniature), judged with ground truth (tests/support/miniature/judges.py). Two concepts:

- **style "striped"**: fit from "<caption>, striped" to "<caption>"; held-out prompts ask for stripes.
  Measured: fraction still judged striped (lower is better), what style replaced it, shape/colour kept against
  the unsteered image of the same seed, pixel and judge-feature similarity.
- **colour "red"**: fit from "a small red circle on the left" to "a small circle on the left" (colour left open);
  held-out prompts ask for red. Measured: fraction still judged red, shape kept, similarities.

Compared (sites ``unet`` = every UNet norm, the paper's choice; ``te`` = the text encoder's final layer norm):
Linear-AcT at strengths 0.25..1 and 2 (sequential, observed support: the paper's negation support), Mean-AcT,
Linear-AcT fitted at once, Linear-AcT with the all-reals support, the negative prompt (``negative_prompt="striped"``
/ ``"red"`` under classifier-free guidance 3, and in the caption form the model was trained on: "a circle, striped"
/ "a red circle"), and, as a reference point, the prompt with the concept word removed.
For "striped" also the induction transport (flat -> striped, all reals) applied backwards (strength -1, -2).

Run (3 min wall on 2 CPU cores shared with other jobs, one thread; see benchmarks/RESULTS.md, "Diffusion in miniature"):
    .venv/bin/python -m benchmarks.diffusion_negation --out /tmp/actsteer/miniature_negation \
        --figures benchmarks/figures
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

logger = logging.getLogger("diffusion_negation")
COLUMNS = ["concept", "method", "sites", "support", "strength", "presence", "flat", "shape_acc", "shape_kept",
           "colour_kept", "pixel_sim", "feature_sim"]
TEXT_SITE = ["text_encoder.final_layer_norm"]
MAIN = [0.25, 0.5, 0.75, 1.0, 2.0]
# name -> (sites, fit_pipeline options, strengths)
FITS: dict[str, tuple[str, dict[str, Any], list[float]]] = {
    "linear-act": ("unet", dict(method="linear-act"), MAIN),
    "mean-act": ("unet", dict(method="mean-act"), [1.0, 2.0]),
    "linear-act at-once": ("unet", dict(method="linear-act", sequential=False), [1.0, 2.0]),
    "linear-act all": ("unet", dict(method="linear-act", support="all"), [1.0, 2.0]),
    "te linear-act": ("te", dict(method="linear-act", modules=TEXT_SITE), [1.0, 2.0]),
    "te linear-act all": ("te", dict(method="linear-act", support="all", modules=TEXT_SITE), MAIN),
}


def negate(
    pipe: Any, judges: Judges, *, concept: str, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """All rows of one concept ("striped" or "red"), and some images per method for the figure."""
    if concept == "striped":
        # flat attributes: `shapes.caption` would name a non-flat style itself; the suffix adds it once
        fit_attrs, eval_attrs = metrics.split_prompts(args.n_fit, args.n_eval, seed=args.seed)
        source, target = metrics.captions(fit_attrs, suffix=", striped"), metrics.captions(fit_attrs)
        prompts, without = metrics.captions(eval_attrs, suffix=", striped"), metrics.captions(eval_attrs)
        judged = {"style": "striped"}
    else:
        fit_attrs, eval_attrs = metrics.split_prompts(args.n_fit_red, args.n_eval_red, seed=args.seed, colour=concept)
        eval_attrs = eval_attrs * args.seeds_red  # several seeds per prompt: generate() uses seed + index
        source, target = metrics.captions(fit_attrs), metrics.captions(fit_attrs, colour=False)
        prompts, without = metrics.captions(eval_attrs), metrics.captions(eval_attrs, colour=False)
        judged = {"colour": concept}
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance)
    fit_kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, progress=False, seed=args.seed,
                  steps="first")  # the protocol of the tables in RESULTS.md

    def gen(prompt_list: list[str], **kw: Any) -> torch.Tensor:
        return metrics.generate(pipe, prompt_list, seed=1000 + args.seed, **call, **kw)

    reference = gen(prompts)
    rows: list[dict[str, Any]] = []
    figure: dict[str, torch.Tensor] = {"unsteered": reference}

    def measure(method: str, strength: float, images: torch.Tensor, sites: str = "-", support: str = "-") -> None:
        s = metrics.score(judges, images, eval_attrs, reference, **judged)
        presence = s.pop("style_presence") if "style_presence" in s else s.pop("colour_presence")
        row = {"concept": concept, "method": method, "sites": sites, "support": support, "strength": strength,
               "presence": presence,
               "flat": metrics.style_counts(judges, images)["flat"], **s}
        rows.append(row)
        logger.info("%s", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})

    measure("unsteered", 0.0, reference)
    images = gen(prompts, negative_prompt=[concept] * len(prompts))
    measure(f"negative prompt '{concept}'", 1.0, images)
    figure["negative prompt"] = images
    # the concept word alone is a caption the model never saw; the caption form ("a circle, striped") it did
    if concept == "striped":
        caption_form = [f"a {a.shape}, striped" for a in eval_attrs]
    else:
        caption_form = [f"a {concept} {a.shape}" for a in eval_attrs]
    measure("negative prompt, caption form", 1.0, gen(prompts, negative_prompt=caption_form))
    measure(f"prompt without '{concept}'", 1.0, gen(without))

    for name, (sites, kw, strengths) in FITS.items():
        transport = actsteer.fit_pipeline(pipe, source, target, **kw, **fit_kw)
        support = str(kw.get("support", "observed"))
        for s in strengths:
            with actsteer.steer(pipe, transport, strength=s):
                images = gen(prompts)
            measure(name, s, images, sites=sites, support=support)
            if name in ("linear-act", "te linear-act all") and s in (1.0, 2.0):
                figure[f"{name} {s:g}"] = images
    if concept == "striped":  # the induction transport (flat -> striped) backwards
        induction = actsteer.fit_pipeline(pipe, target, source, support="all", **fit_kw)
        for s in (-1.0, -2.0):
            with actsteer.steer(pipe, induction, strength=s):
                measure("linear-act all, induction reversed", s, gen(prompts), sites="unet", support="all")
    return rows, figure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/actsteer/miniature_negation"))
    parser.add_argument("--figures", type=Path, default=None, help="write miniature_negation_*.png here")
    parser.add_argument("--concepts", default="striped,red")
    parser.add_argument("--n-fit", type=int, default=32)
    parser.add_argument("--n-eval", type=int, default=32)
    parser.add_argument("--n-fit-red", type=int, default=8, help="of the 18 red combinations")
    parser.add_argument("--n-eval-red", type=int, default=10)
    parser.add_argument("--seeds-red", type=int, default=3, help="seeds per held-out red prompt")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--pipeline", type=Path, default=PIPELINE_DIR, help="a miniature diffusers folder")
    parser.add_argument("--judges", type=Path, default=JUDGES_FILE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    pipe, judges = load_pipeline(args.pipeline), Judges.load(args.judges)
    start, rows, figures = time.time(), [], {}
    for concept in args.concepts.split(","):
        concept_rows, figures[concept] = negate(pipe, judges, concept=concept, args=args)
        rows += concept_rows
    wall = round(time.time() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    table = metrics.markdown_table(rows, COLUMNS)
    (args.out / "negation.md").write_text(table + "\n")
    (args.out / "negation.json").write_text(json.dumps({"rows": rows, "wall_s": wall}, indent=1) + "\n")
    print(table)
    print(f"\nwall {wall} s")
    if args.figures is not None:
        args.figures.mkdir(parents=True, exist_ok=True)
        for concept, columns in figures.items():
            metrics.tile(columns, args.figures / f"miniature_negation_{concept}.png")


if __name__ == "__main__":
    main()
