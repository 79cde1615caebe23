"""How well the miniature model follows its captions, judged with ground truth, and a figure of its samples.

Generates one image per caption for every (shape, colour, style) combination with random position and size
(60 captions, one seed each), judges them (benchmarks/miniature/judges.py) and reports the judged accuracy of
each attribute, per style. The same judges on real procedural images give the ceiling (their held-out accuracy).

Run (about 2 min on 2 shared CPU cores):
    .venv/bin/python -m benchmarks.miniature.evaluate --figure benchmarks/figures/miniature_samples.png
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
    rows, images, attrs = adherence(load_pipeline(args.pipeline), Judges.load(args.judges), seed=args.seed,
                                    steps=args.steps)
    table = metrics.markdown_table(rows, ["style", "n", "style_acc", "shape_acc", "colour_acc"])
    print(table)
    print(f"\nwall {time.time() - start:.0f} s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "adherence.json").write_text(json.dumps(rows, indent=1) + "\n")
    if args.figure is not None:
        per_style = len(shapes.SHAPES) * len(shapes.COLOURS)
        columns = {style: images[i * per_style:(i + 1) * per_style:2] for i, style in enumerate(shapes.STYLES)}
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        metrics.tile(columns, args.figure, rows=8)


if __name__ == "__main__":
    main()
