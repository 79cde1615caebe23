"""What the miniature benchmarks measure: prompt sets, batched generation, and judged scores of generated images.

- `prompt_set`: captions with their intended attributes, drawn without repeats from the 90 (shape, colour,
  position, size) combinations; fitting and evaluation use disjoint sets (`split_prompts`).
- `generate`: one batched pipeline call, one seed per prompt, images ``(N, 3, 32, 32)`` in [-1, 1].
- `score`: judged attributes of the images against the intended ones and against unsteered reference images of
  the same prompts and seeds: presence of a style or colour, shape/colour accuracy, shape/colour kept, pixel
  similarity (1 - mean absolute difference in [0, 1] units) and feature similarity (cosine of the judges'
  pooled features, the miniature's stand-in for the paper's CLIP similarity).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import model as M
from . import shapes
from .judges import Judges


def all_attributes(style: str = "flat") -> list[shapes.Attributes]:
    """The 90 (shape, colour, position, size) combinations with one style, in a fixed order."""
    return [shapes.Attributes(shape, colour, style, position, size)
            for shape, colour, position, size in itertools.product(shapes.SHAPES, shapes.COLOURS, shapes.POSITIONS,
                                                                   shapes.SIZES)]


def split_prompts(n_fit: int, n_eval: int, *, seed: int = 0, style: str = "flat", **fixed: str
                  ) -> tuple[list[shapes.Attributes], list[shapes.Attributes]]:
    """Disjoint fit and evaluation attribute sets, shuffled with ``seed``; ``fixed`` filters (``colour="red"``).

    Raises:
        ValueError: fewer combinations than ``n_fit + n_eval``.
    """
    pool = [a for a in all_attributes(style) if all(getattr(a, k) == v for k, v in fixed.items())]
    if n_fit + n_eval > len(pool):
        raise ValueError(f"Only {len(pool)} combinations match {fixed or 'all'}; asked for {n_fit} + {n_eval}")
    order = np.random.default_rng(seed).permutation(len(pool))
    chosen = [pool[i] for i in order[: n_fit + n_eval]]
    return chosen[:n_fit], chosen[n_fit:]


def captions(attrs: Sequence[shapes.Attributes], *, suffix: str = "", **drop: bool) -> list[str]:
    """Full captions (``drop`` leaves attributes out: ``colour=False``), plus ``suffix`` (``", striped"``)."""
    return [shapes.caption(a, **drop) + suffix for a in attrs]


@torch.no_grad()
def generate(pipe: Any, prompts: Sequence[str], *, seed: int = 0, **call_kwargs: Any) -> torch.Tensor:
    """Images ``(N, 3, 32, 32)`` in [-1, 1]; prompt ``i`` starts from the noise of ``seed + i``."""
    kwargs = M.call_kwargs([seed + i for i in range(len(prompts))], **call_kwargs)
    if len(prompts) == 1:
        kwargs["generator"] = [kwargs["generator"]]
    return pipe(list(prompts), **kwargs).images.float() * 2 - 1


def score(
    judges: Judges,
    images: torch.Tensor,
    intended: Sequence[shapes.Attributes],
    reference: torch.Tensor | None = None,
    *,
    style: str | None = None,
    colour: str | None = None,
) -> dict[str, float]:
    """Judged scores of ``images`` (see the module docstring); ``style``/``colour`` add their presence.

    Returns:
        ``style_presence`` / ``colour_presence`` (fraction judged that style or colour), ``shape_acc`` and
        ``colour_acc`` (judged == intended), and with ``reference``: ``shape_kept``, ``colour_kept``,
        ``pixel_sim``, ``feature_sim``.
    """
    pred = judges.predict(images)
    out: dict[str, float] = {}
    if style is not None:
        out["style_presence"] = float(np.mean([p == style for p in pred["style"]]))
    if colour is not None:
        out["colour_presence"] = float(np.mean([p == colour for p in pred["colour"]]))
    out["shape_acc"] = float(np.mean([p == a.shape for p, a in zip(pred["shape"], intended)]))
    out["colour_acc"] = float(np.mean([p == a.colour for p, a in zip(pred["colour"], intended)]))
    if reference is not None:
        ref = judges.predict(reference)
        out["shape_kept"] = float(np.mean([p == r for p, r in zip(pred["shape"], ref["shape"])]))
        out["colour_kept"] = float(np.mean([p == r for p, r in zip(pred["colour"], ref["colour"])]))
        out["pixel_sim"] = float(1 - (images - reference).abs().mean() / 2)
        out["feature_sim"] = float((judges.features(images) * judges.features(reference)).sum(-1).mean())
    return out


def style_counts(judges: Judges, images: torch.Tensor) -> dict[str, float]:
    """Fraction of images judged as each style."""
    pred = judges.predict(images)["style"]
    return {s: float(np.mean([p == s for p in pred])) for s in shapes.STYLES}


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` (dicts) with ``columns``; floats get 2 decimals."""

    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def tile(columns: dict[str, torch.Tensor], path: Any, *, rows: int = 6, scale: int = 3) -> None:
    """Save a PNG with one labelled column per entry of ``columns`` (images in [-1, 1]) and ``rows`` rows."""
    from PIL import Image, ImageDraw

    size = shapes.SIZE * scale
    pad = 14
    width = max(size, 8 * max(len(k) for k in columns) // 2 + 4)
    canvas = Image.new("RGB", (width * len(columns), pad + size * rows), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (name, images) in enumerate(columns.items()):
        draw.text((c * width + 2, 1), name, fill="black")
        for r, arr in enumerate(shapes.from_tensor(images[:rows])):
            tile_image = Image.fromarray(arr).resize((size, size), Image.NEAREST)
            canvas.paste(tile_image, (c * width + (width - size) // 2, pad + r * size))
    canvas.save(path)
