"""What the few-step benchmarks measure: prompt sets, batched generation and judged scores of generated images.

- `split_prompts`: disjoint fit and held-out (shape, colour, position, size) combinations (90 in all);
- `generate`: one batched pipeline call, prompt ``i`` from the noise of ``seed + i``;
- `score`: judged attributes against the intended ones and against the unsteered twins (same prompt, same seed):
  presence of a style, accuracy of shape/colour/position, and **content kept**: the fraction of images whose judged
  shape and position equal the twin's, and the colour too where the style keeps colours (``colour_kept=True``);
  pixel similarity (1 - mean absolute difference in [0, 1] units) and feature similarity (cosine of the judges'
  pooled features, the miniature's stand-in for the paper's CLIP similarity).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import model as M
from . import styles


def all_attributes(style: str = "plain") -> list[styles.Attributes]:
    """The 90 (shape, colour, position, size) combinations with one style, in a fixed order."""
    return [styles.Attributes(shape, colour, position, size, style)
            for shape, colour, position, size in itertools.product(styles.SHAPES, styles.COLOURS, styles.POSITIONS,
                                                                   styles.SIZES)]


def split_prompts(n_fit: int, n_eval: int, *, seed: int = 0, **fixed: str
                  ) -> tuple[list[styles.Attributes], list[styles.Attributes]]:
    """Disjoint fit and held-out attribute sets (plain style), shuffled with ``seed``; ``fixed`` filters.

    Raises:
        ValueError: fewer combinations than ``n_fit + n_eval``.
    """
    pool = [a for a in all_attributes() if all(getattr(a, k) == v for k, v in fixed.items())]
    if n_fit + n_eval > len(pool):
        raise ValueError(f"Only {len(pool)} combinations match {fixed or 'all'}; asked for {n_fit} + {n_eval}")
    order = np.random.default_rng(seed).permutation(len(pool))
    chosen = [pool[i] for i in order[: n_fit + n_eval]]
    return chosen[:n_fit], chosen[n_fit:]


def captions(attrs: Sequence[styles.Attributes], *, suffix: str = "", **drop: bool) -> list[str]:
    """Captions of ``attrs`` (``drop`` leaves attributes out: ``colour=False``), plus ``suffix`` (``", sepia"``)."""
    return [styles.caption(a, **drop) + suffix for a in attrs]


@torch.no_grad()
def generate(pipe: Any, prompts: Sequence[str], *, seed: int = 0, **call_kwargs: Any) -> torch.Tensor:
    """Images ``(N, 3, 32, 32)`` in [-1, 1]; prompt ``i`` starts from the noise of ``seed + i`` (4 steps, guidance 0
    unless ``call_kwargs`` say otherwise)."""
    kwargs = M.call_kwargs([seed + i for i in range(len(prompts))], **call_kwargs)
    if len(prompts) == 1:
        kwargs["generator"] = [kwargs["generator"]]
    return pipe(list(prompts), **kwargs).images.float() * 2 - 1


def _frac(values: Sequence[bool]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def score(
    judges: Any,
    images: torch.Tensor,
    intended: Sequence[Any],
    reference: torch.Tensor | None = None,
    *,
    style: str | None = None,
    colour_kept: bool = True,
) -> dict[str, float]:
    """Judged scores of ``images`` (see the module docstring).

    Args:
        judges: anything with ``predict(images) -> {attribute: [label, ...]}`` and ``features(images)``; the
            attributes used are those it predicts among style, shape, colour and position.
        images: ``(N, 3, 32, 32)`` in [-1, 1].
        intended: the attributes each prompt asked for (``.shape``, ``.colour``, ``.position``).
        reference: the unsteered twins (same prompts and seeds), for the ``*_kept`` and similarity scores.
        style: add ``style_presence``, the fraction judged this style.
        colour_kept: whether content kept includes the colour (False for styles that change colours).
    """
    pred = judges.predict(images)
    out: dict[str, float] = {}
    if style is not None:
        out["style_presence"] = _frac([p == style for p in pred["style"]])
    for name in ("shape", "colour", "position"):
        if name in pred:
            out[f"{name}_acc"] = _frac([p == getattr(a, name) for p, a in zip(pred[name], intended)])
    if reference is not None:
        ref = judges.predict(reference)
        same = {name: [p == r for p, r in zip(pred[name], ref[name])]
                for name in ("shape", "colour", "position") if name in pred}
        for name, values in same.items():
            out[f"{name}_kept"] = _frac(values)
        keys = [k for k in ("shape", "position") if k in same]
        keys += ["colour"] if colour_kept and "colour" in same else []
        out["content_kept"] = _frac([all(same[k][i] for k in keys) for i in range(len(images))])
        out["pixel_sim"] = float(1 - (images - reference).abs().mean() / 2)
        out["feature_sim"] = float((judges.features(images) * judges.features(reference)).sum(-1).mean())
    return out


def style_counts(judges: Any, images: torch.Tensor, labels: Sequence[str] = styles.STYLES) -> dict[str, float]:
    """Fraction of images judged as each style."""
    pred = judges.predict(images)["style"]
    return {s: _frac([p == s for p in pred]) for s in labels}
