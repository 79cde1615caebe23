"""How well the miniature model follows its captions, judged with ground truth, and a figure of its samples.

Generates one image per caption for every (shape, colour, style) combination with random position and size
(60 captions, one seed each), judges them (tests/support/miniature/judges.py) and reports the judged accuracy of
each attribute, per style. The same judges on real procedural images give the ceiling (their held-out accuracy).

It also measures what the model draws at its noisiest steps (`stripe_contrast`): the stripe contrast of the UNet's
x0 prediction from pure noise at t = 999, 899, 799, 599 for striped and flat captions, against the contrast of
the captions' true average image. AcT fits diffusion maps on these early responses (``steps="first"``).

Run (15 s on one CPU thread):
    .venv/bin/python -m tests.support.miniature.evaluate --figure benchmarks/figures/miniature_samples.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import metrics, shapes  # noqa: E402
from .judges import JUDGES_FILE, Judges  # noqa: E402
from .model import PIPELINE_DIR, load_pipeline  # noqa: E402

logger = logging.getLogger("miniature.evaluate")


def adherence(pipe, judges: Judges, *, seed: int = 0, steps: int = 20, guidance: float = 3.0
              ) -> tuple[list[dict], torch.Tensor, list[shapes.Attributes]]:
    """Judged accuracy per attribute and style for captions of every (shape, colour, style) combination."""
    rng = np.random.default_rng(seed)
    attrs = [shapes.sample_attributes(rng, shape=sh, colour=c, style=st)
             for st in shapes.STYLES for sh in shapes.SHAPES for c in shapes.COLOURS]
    images = metrics.generate(pipe, [shapes.caption(a) for a in attrs], seed=seed, num_inference_steps=steps,
                              guidance_scale=guidance)
    pred = judges.predict(images)
    rows = []
    for style in (*shapes.STYLES, "all"):
        idx = [i for i, a in enumerate(attrs) if style in ("all", a.style)]
        row = {"style": style, "n": len(idx)}
        for name in ("style", "shape", "colour"):
            row[f"{name}_acc"] = float(np.mean([pred[name][i] == getattr(attrs[i], name) for i in idx]))
        rows.append(row)
    return rows, images, attrs


_ON_ROWS = (torch.arange(shapes.SIZE) // 2) % 2 == 0  # the rows that carry the colour in a striped shape


def stripe_contrast(x0: torch.Tensor) -> float:
    """Mean darkness of the stripe rows minus that of the other rows, for ``(N, 3, 32, 32)`` images in [-1, 1]."""
    dark = -x0.float().mean(dim=1)  # coloured pixels are darker than the white background
    return float(dark[:, _ON_ROWS, :].mean() - dark[:, ~_ON_ROWS, :].mean())


@torch.no_grad()
def early_stripes(pipe, *, n: int = 24, seed: int = 0, timesteps: tuple[int, ...] = (999, 899, 799, 599)) -> list[dict]:
    """Stripe contrast of the x0 prediction from pure noise at ``timesteps`` (no CFG), striped vs flat captions."""
    rng = np.random.default_rng(seed)
    attrs = [shapes.sample_attributes(rng, style="striped") for _ in range(n)]
    data = stripe_contrast(shapes.to_tensor([shapes.render(a, rng) for a in attrs]))
    noise = torch.randn(n, 3, shapes.SIZE, shapes.SIZE, generator=torch.Generator().manual_seed(seed))
    rows = []
    for t in timesteps:
        row = {"t": t, "data (striped)": data}
        alpha = pipe.scheduler.alphas_cumprod[t]
        for style in ("striped", "flat"):
            texts = [shapes.caption(dataclasses.replace(a, style=style)) for a in attrs]
            ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            v = pipe.unet(noise, torch.tensor(t), pipe.text_encoder(ids)[0]).sample
            row[style] = stripe_contrast(alpha.sqrt() * noise - (1 - alpha).sqrt() * v)  # v-prediction -> x0
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, default=PIPELINE_DIR)
    parser.add_argument("--judges", type=Path, default=JUDGES_FILE)
    parser.add_argument("--figure", type=Path, default=None, help="PNG of the samples (a row per style)")
    parser.add_argument("--out", type=Path, default=None, help="write adherence.json here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    start = time.time()
    pipe = load_pipeline(args.pipeline)
    rows, images, attrs = adherence(pipe, Judges.load(args.judges), seed=args.seed, steps=args.steps)
    table = metrics.markdown_table(rows, ["style", "n", "style_acc", "shape_acc", "colour_acc"])
    print(table)
    early = early_stripes(pipe, seed=args.seed)
    print("\nStripe contrast of the x0 prediction from pure noise (no CFG):\n")
    print(metrics.markdown_table(early, ["t", "striped", "flat", "data (striped)"]))
    print(f"\nwall {time.time() - start:.0f} s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {"adherence": rows, "early_stripes": early}
        (args.out / "adherence.json").write_text(json.dumps(payload, indent=1) + "\n")
    if args.figure is not None:
        per_style = len(shapes.SHAPES) * len(shapes.COLOURS)
        columns = {style: images[i * per_style:(i + 1) * per_style:2] for i, style in enumerate(shapes.STYLES)}
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        metrics.tile(columns, args.figure, rows=8)


if __name__ == "__main__":
    main()
