"""How well the few-step miniature follows its captions, judged with ground truth, and a figure of its samples.

- `adherence`: one image per caption for every (style, shape, colour) combination (random position and size; 105
  captions, one seed each), sampled with 1, 2 and 4 Euler steps at guidance 0 (and 4 steps at guidance 3),
  judged per attribute and per style. The judges' accuracy on these captioned samples is reported beside their
  held-out accuracy on procedural images.
- `first_step`: what the first step draws. The x0 prediction of the first step (t = 999, from pure noise, no
  guidance) for captions of each style, judged: the fraction judged that style, and its mean distance to the
  caption's average procedural image relative to the plain caption's. AcT fits on this step (``steps="first"``).

Run (one CPU thread):
    python -m tests.support.miniature.fewstep.evaluate --figure benchmarks/figures/fewstep_samples.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import metrics, styles  # noqa: E402
from .judges import JUDGES_FILE, Judges, colour_defined  # noqa: E402
from .model import PIPELINE_DIR, load_pipeline  # noqa: E402

logger = logging.getLogger("miniature.fewstep.evaluate")
SETTINGS = ((1, 0.0), (2, 0.0), (4, 0.0), (4, 3.0))  # (steps, guidance)


def _attrs(seed: int) -> list[styles.Attributes]:
    rng = np.random.default_rng(seed)
    return [styles.sample_attributes(rng, shape=sh, colour=c, style=st)
            for st in styles.STYLES for sh in styles.SHAPES for c in styles.COLOURS]


def adherence(pipe, judges: Judges, *, seed: int = 0, steps: int = 4, guidance: float = 0.0
              ) -> tuple[list[dict], torch.Tensor, list[styles.Attributes]]:
    """Judged accuracy per attribute, per style and overall, of one sample per (style, shape, colour) caption."""
    attrs = _attrs(seed)
    images = metrics.generate(pipe, [styles.caption(a) for a in attrs], seed=seed, num_inference_steps=steps,
                              guidance_scale=guidance)
    pred = judges.predict(images)
    rows = []
    for style in (*styles.STYLES, "all"):
        idx = [i for i, a in enumerate(attrs) if style in ("all", a.style)]
        row: dict = {"steps": steps, "guidance": guidance, "style": style, "n": len(idx)}
        for name in ("style", "shape", "colour", "position"):
            keep = [i for i in idx if name != "colour" or colour_defined(attrs[i])]
            row[f"{name}_acc"] = float(np.mean([pred[name][i] == getattr(attrs[i], name) for i in keep])) \
                if keep else float("nan")
        rows.append(row)
    return rows, images, attrs


@torch.no_grad()
def first_step(pipe, judges: Judges, *, n: int = 30, seed: int = 0) -> list[dict]:
    """Per style: the first step's x0 prediction (t=999, pure noise, no CFG) judged, and its distance to the
    captions' mean procedural image relative to that of the plain captions' prediction (< 1: closer)."""
    rng = np.random.default_rng(seed)
    base = [styles.sample_attributes(rng, style="plain") for _ in range(n)]
    noise = torch.randn(n, 3, styles.SIZE, styles.SIZE, generator=torch.Generator().manual_seed(seed))
    t = int(pipe.scheduler.config.num_train_timesteps) - 1
    alpha = pipe.scheduler.alphas_cumprod[t]

    def x0(attrs: list[styles.Attributes]) -> torch.Tensor:
        ids = pipe.tokenizer([styles.caption(a) for a in attrs], padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        v = pipe.unet(noise, torch.tensor(t), pipe.text_encoder(ids)[0]).sample
        return alpha.sqrt() * noise - (1 - alpha).sqrt() * v  # v-prediction -> x0

    def mean_image(attrs: list[styles.Attributes], draws: int = 32) -> torch.Tensor:
        r = np.random.default_rng(seed + 1)
        return torch.stack([styles.to_tensor([styles.render(a, r) for _ in range(draws)]).mean(0) for a in attrs])

    plain_pred = x0(base)
    rows = []
    for style in styles.STYLES:
        attrs = [styles.Attributes(a.shape, a.colour, a.position, a.size, style) for a in base]
        pred, truth = x0(attrs), mean_image(attrs)
        judged = judges.predict(pred)["style"]
        rows.append({
            "style": style, "judged_style": float(np.mean([j == style for j in judged])),
            "dist_to_mean": float((pred - truth).abs().mean()),
            "plain_dist_to_mean": float((plain_pred - truth).abs().mean()),
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, default=PIPELINE_DIR)
    parser.add_argument("--judges", type=Path, default=JUDGES_FILE)
    parser.add_argument("--figure", type=Path, default=None, help="PNG of the 4-step samples (a column per style)")
    parser.add_argument("--out", type=Path, default=None, help="write adherence.json here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    from ..metrics import markdown_table, tile

    start = time.time()
    pipe, judges = load_pipeline(args.pipeline), Judges.load(args.judges)
    all_rows, figure_images = [], None
    for steps, guidance in SETTINGS:
        rows, images, attrs = adherence(pipe, judges, seed=args.seed, steps=steps, guidance=guidance)
        all_rows += rows
        if (steps, guidance) == (4, 0.0):
            figure_images = images
    cols = ["steps", "guidance", "style", "n", "style_acc", "shape_acc", "colour_acc", "position_acc"]
    print(markdown_table(all_rows, cols))
    early = first_step(pipe, judges, seed=args.seed)
    print("\nThe first step's x0 prediction (t=999, no CFG):\n")
    print(markdown_table(early, ["style", "judged_style", "dist_to_mean", "plain_dist_to_mean"]))
    print(f"\nwall {time.time() - start:.0f} s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "adherence.json").write_text(json.dumps({"adherence": all_rows, "first_step": early}, indent=1))
    if args.figure is not None:
        per_style = len(styles.SHAPES) * len(styles.COLOURS)
        columns = {s: figure_images[i * per_style:(i + 1) * per_style:2] for i, s in enumerate(styles.STYLES)}
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        tile(columns, args.figure, rows=8)


if __name__ == "__main__":
    main()
