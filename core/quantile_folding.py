"""Folding a `QuantileMap` (a monotone piecewise-linear map per unit) for a strength, and its per-call formula.

Per unit, a folded map is a sum of clamped segments over its ``K`` knots ``x_k`` (sorted), plus affine tails:

    T(a) = start + tail (min(a - x_0, 0) + max(a - x_{K-1}, 0)) + sum_k rise_k clamp((a - x_k) / (x_{k+1} - x_k), 0, 1)

with ``start = T(x_0)`` and ``rise_k = T(x_{k+1}) - T(x_k)``; outside the support ``[lo, hi]`` the activation is left
alone. Every term is bounded by its rise, so a steep segment (a jump between tied quantiles) loses no precision. The
form uses float ops only (no search, no gather: on CPU those, and bool ops, cost several float ops each), about four
per knot, which torch.compile/inductor fuses into one kernel. The knots are the source's quantiles, so their
spacing follows the data (a skewed or heavy-tailed unit keeps its resolution where its samples are).
benchmarks/quantile_apply_cost.py measures this against the affine map and the forms that were not chosen.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from .folding import HALF_DTYPES as _HALF
from .folding import inverse_affine

if TYPE_CHECKING:
    from .quantile import QuantileMap

# 1 / width of a zero-width segment (tied quantiles): a finite slope so that (a - x_k) * inv_width stays a number
_STEEP = 1e30


def clamped_segments(
    x: torch.Tensor,
    knots: torch.Tensor,
    inv_width: torch.Tensor,
    rise: torch.Tensor,
    start: torch.Tensor,
    tail: torch.Tensor,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-call formula (see the module docstring) on the last dim of ``x``.

    Args:
        x (`torch.Tensor` of shape `(..., D)`): activations; computed in float32 when half precision (rounded once to
            ``x``'s dtype at the end), else in ``x``'s dtype.
        knots (`(K, D)`), inv_width, rise (`(K - 1, D)`), start, tail (`(D,)`): the folded map, in the computation
            dtype; with one strength per row, each has a leading row dimension broadcastable to ``x``
            (``(R, K, 1, ..., D)`` and ``(R, 1, ..., D)``), the knot index then being dim 1.
        lo, hi: the support (broadcastable to ``x``); None = all reals.
    """
    a = x.float() if x.dtype in _HALF else x
    per_row = knots.dim() > 2
    first, last = (knots[:, 0], knots[:, -1]) if per_row else (knots[0], knots[-1])
    out = torch.addcmul(start, (a - first).clamp_(max=0).add_((a - last).clamp_(min=0)), tail)
    term = torch.empty_like(out)
    for k in range(rise.shape[1] if per_row else rise.shape[0]):
        x_k, w_k, r_k = (knots[:, k], inv_width[:, k], rise[:, k]) if per_row else (knots[k], inv_width[k], rise[k])
        torch.sub(a, x_k, out=term)
        out.addcmul_(term.mul_(w_k).clamp_(0, 1), r_k)
    if lo is not None:
        # a where a is outside [lo, hi] (or NaN), as in `bind_affine`: 1.0 / 0.0 weights of an in-place lerp
        out.lerp_(a, torch.clamp(a, lo, hi).ne_(a).to(out.dtype))
    return out if out.dtype == x.dtype else out.to(x.dtype)


@dataclasses.dataclass(frozen=True)
class FoldedQuantile:
    """A `QuantileMap` folded for one strength (or one per batch row): what the per-call path evaluates.

    Shapes: ``knots`` ``(K, D)``, ``inv_width``/``rise`` ``(K - 1, D)``, ``start``/``tail``/``lo``/``hi`` ``(D,)`` for a
    scalar strength; with one strength per row every table has a leading ``(U, ...)`` dimension, one entry per
    distinct strength, and ``rows`` ``(R,)`` picks each batch row's (the reverse map has its own knots, the target's
    quantiles, so rows of either sign mix freely). ``masked`` is False when the support is all reals.
    """

    knots: torch.Tensor
    inv_width: torch.Tensor
    rise: torch.Tensor
    start: torch.Tensor
    tail: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    masked: bool
    rows: torch.Tensor | None = None

    def with_rows(self, rows: torch.Tensor) -> FoldedQuantile:
        return dataclasses.replace(self, rows=rows)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.knots, self.inv_width, self.rise, self.start, self.tail, self.lo, self.hi

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FoldedQuantile:
        """The map ready for activations of ``dtype`` on ``device`` (float32 tables for half precision)."""
        dtype = torch.float32 if dtype in _HALF or dtype is None else dtype
        dev = None if device is None else torch.device(device)
        if all(t.dtype == dtype and (dev is None or t.device == dev) for t in self.tensors()) and (
                self.rows is None or dev is None or self.rows.device == dev):
            return self
        return FoldedQuantile(*(t.to(device=dev, dtype=dtype) for t in self.tensors()), self.masked,
                              None if self.rows is None else self.rows.to(device=dev))

    def apply_last(self, x: torch.Tensor) -> torch.Tensor:
        """Apply on the last dim of ``x`` (..., D); a per-row map broadcasts its rows over dims 1..-2."""
        tables = self.tensors()
        if self.rows is not None:
            ones = (1,) * (x.dim() - 2)
            tables = [t.index_select(0, self.rows) for t in tables]
            tables = [t.view(t.shape[:2] + ones + t.shape[2:]) if t.dim() == 3 else t.view(t.shape[:1] + ones + t.shape[1:])
                      for t in tables]
        knots, inv_width, rise, start, tail, lo, hi = tables
        return clamped_segments(x, knots, inv_width, rise, start, tail, lo if self.masked else None,
                                hi if self.masked else None)

    def apply_spatial(self, x: torch.Tensor) -> torch.Tensor:
        """The 4-D rule (ACT_SPEC.md section 6): transport the spatial mean per channel of ``x`` (B, C, H, W) and
        keep the spatial deviations: ``out = x + (T(mu) - mu)`` with ``mu = x.mean((2, 3))``."""
        mu = x.mean(dim=(2, 3))
        delta = self.apply_last(mu) - mu
        return x + delta[:, :, None, None]


def fold_quantile(qmap: QuantileMap, s: float) -> FoldedQuantile:
    """``qmap`` at the scalar strength ``s``: ``a + s (T(a) - a)`` on the source support for ``s >= 0``; the inverse
    map (through ``(values, knots)``, tails of slope ``1 / omega``) at ``|s|`` on the target support for ``s < 0``.
    At ``s = 0`` the support is empty (NaN bounds), so every value comes out bit for bit."""
    knots, values, omega = qmap.knots.double(), qmap.values.double(), qmap.omega.double()
    if s >= 0:
        tail, lo, hi = omega, qmap.lo.double(), qmap.hi.double()
    else:
        s = -s
        knots, values = values, knots  # the inverse map: through (target quantile, source quantile)
        tail = inverse_affine(omega, torch.zeros_like(omega))[0]  # 1 / omega (1 where omega ~ 0, as for UnitMap)
        lo, hi = qmap.target_lo.double(), qmap.target_hi.double()
    values = knots + s * (values - knots)  # T_s at the knots
    width = knots[1:] - knots[:-1]
    inv_width = torch.where(width > 0, 1.0 / torch.where(width > 0, width, torch.ones_like(width)),
                            torch.full_like(width, _STEEP))
    if s == 0:
        lo, hi = torch.full_like(lo, float("nan")), torch.full_like(hi, float("nan"))
    masked = s == 0 or bool(torch.isfinite(lo).any() or torch.isfinite(hi).any())
    return FoldedQuantile(knots.float(), inv_width.float(), (values[1:] - values[:-1]).float(), values[0].float(),
                          (1 + s * (tail - 1)).float(), lo.float(), hi.float(), masked)


def stack_quantile(folds: list[FoldedQuantile], values: tuple[float, ...]) -> FoldedQuantile:
    """The per-row tables of ``folds`` (one per distinct strength in ``values``), stacked on a leading dimension."""
    stacked = [torch.stack(ts) for ts in zip(*(f.tensors() for f in folds))]
    return FoldedQuantile(*stacked, any(f.masked for f in folds))
