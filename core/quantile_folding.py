"""Folding a `QuantileMap` (a monotone piecewise-linear map per unit) for a strength, and its per-call formula.

Per unit, a folded map has ``K`` knots (sorted) and ``K + 1`` pieces: the left tail, the ``K - 1`` segments between
knots, the right tail. Piece ``j`` is the line through its anchor ``(anchor_x[j], anchor_y[j])`` with slope
``slope[j]``; an activation ``a`` falls in piece ``#(knots <= a)`` (one ``searchsorted``), and
``out = anchor_y + slope (a - anchor_x)`` (anchored, so a steep segment loses no precision). Outside the support
``[lo, hi]`` the activation is left alone. The knots are the source's quantiles, so their spacing follows the data
(a skewed or heavy-tailed unit keeps its resolution where its samples are); benchmarks/quantile_apply_cost.py
measures this against the affine map and a uniform-grid lookup.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from .folding import HALF_DTYPES as _HALF

if TYPE_CHECKING:
    from .quantile import QuantileMap

# Units whose omega (tail slope) is this small cannot be inverted for the reverse transport (as for UnitMap).
_MIN_INVERTIBLE_OMEGA = 1e-6


def piece_index(x: torch.Tensor, knots: torch.Tensor) -> torch.Tensor:
    """``#(knots[u] <= x[..., u])`` per element: ``(..., D)`` int64 in ``[0, K]`` (NaN gives K, a right tail).

    Args:
        x (`torch.Tensor` of shape `(..., D)`): float32/float64 activations.
        knots (`torch.Tensor` of shape `(D, K)`): sorted per unit, same dtype as ``x``.
    """
    d = knots.shape[0]
    flat = x.reshape(-1, d).T.contiguous()  # (D, N): searchsorted searches the last dim per leading index
    return torch.searchsorted(knots, flat, right=True).T.reshape(x.shape)


def piecewise_linear(
    x: torch.Tensor,
    index: torch.Tensor,
    anchor_x: torch.Tensor,
    anchor_y: torch.Tensor,
    slope: torch.Tensor,
    offsets: torch.Tensor,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
) -> torch.Tensor:
    """``anchor_y[j] + slope[j] (a - anchor_x[j])`` with ``j = index`` per element; ``a`` itself outside ``[lo, hi]``.

    Args:
        x (`torch.Tensor` of shape `(..., D)`): activations; computed in float32 when half precision (rounded once to
            ``x``'s dtype at the end), else in ``x``'s dtype.
        index: `piece_index` of ``x`` (int64, ``(..., D)``).
        anchor_x, anchor_y, slope (`torch.Tensor` of shape `(U * D * (K + 1),)`): the pieces, unit-major, one
            ``(D, K + 1)`` block per distinct strength, in the computation dtype.
        offsets (int64, broadcastable to ``x``): ``u * (K + 1)`` per unit, plus ``block * D * (K + 1)`` per row.
        lo, hi: the support (broadcastable to ``x``); None = all reals.
    """
    a = x.float() if x.dtype in _HALF else x
    i = index + offsets
    out = torch.addcmul(anchor_y.take(i), a - anchor_x.take(i), slope.take(i))
    if lo is not None:
        # a where a is outside [lo, hi] (or NaN), as in `masked_affine`: 1.0 / 0.0 weights of an in-place lerp
        out.lerp_(a, torch.clamp(a, lo, hi).ne_(a).to(out.dtype))
    return out if out.dtype == x.dtype else out.to(x.dtype)


@dataclasses.dataclass(frozen=True)
class FoldedQuantile:
    """A `QuantileMap` folded for one strength (or one per batch row): what the per-call path evaluates.

    ``knots`` ``(D, K)`` are the source's quantiles (forward) or the target's (reverse, for negative strengths).
    With per-row strengths, ``reverse_knots`` holds the other set when the rows' strengths differ in sign,
    ``negative`` ``(U,)`` says which table rows are reverse, and ``rows`` ``(R,)`` picks each batch row's table row;
    ``anchor_x``/``anchor_y``/``slope`` are ``(U, D, K + 1)`` and ``lo``/``hi`` ``(U, D)``. For a scalar strength
    they are ``(D, K + 1)`` and ``(D,)``. ``masked`` is False when the support is all reals.
    """

    knots: torch.Tensor
    anchor_x: torch.Tensor
    anchor_y: torch.Tensor
    slope: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    masked: bool
    rows: torch.Tensor | None = None
    reverse_knots: torch.Tensor | None = None
    negative: torch.Tensor | None = None

    def with_rows(self, rows: torch.Tensor) -> FoldedQuantile:
        return dataclasses.replace(self, rows=rows)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.knots, self.anchor_x, self.anchor_y, self.slope, self.lo, self.hi

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FoldedQuantile:
        """The map ready for activations of ``dtype`` on ``device`` (float32 tables for half precision)."""
        dtype = torch.float32 if dtype in _HALF or dtype is None else dtype
        dev = None if device is None else torch.device(device)
        moved = [t for t in (*self.tensors(), self.reverse_knots) if t is not None]
        if all(t.dtype == dtype and (dev is None or t.device == dev) for t in moved) and (
                self.rows is None or dev is None or self.rows.device == dev):
            return self

        def cast(t):
            return None if t is None else t.to(device=dev, dtype=dtype)

        return FoldedQuantile(*(cast(t) for t in self.tensors()), self.masked,
                              None if self.rows is None else self.rows.to(device=dev), cast(self.reverse_knots),
                              None if self.negative is None else self.negative.to(device=dev))

    def apply_last(self, x: torch.Tensor) -> torch.Tensor:
        """Apply on the last dim of ``x`` (..., D); a per-row map broadcasts its rows over dims 1..-2."""
        a = x.float() if x.dtype in _HALF else x
        d, pieces = self.anchor_x.shape[-2], self.anchor_x.shape[-1]
        units = torch.arange(d, device=x.device) * pieces
        index = piece_index(a, self.knots)
        lo, hi = self.lo, self.hi
        if self.rows is None:
            offsets = units
        else:
            rows = self.rows
            shape = (rows.shape[0],) + (1,) * (x.dim() - 2)
            if self.reverse_knots is not None:  # rows of both signs: each row looks up its own knots
                reverse = self.negative.index_select(0, rows).view(shape + (1,))
                index = torch.where(reverse, piece_index(a, self.reverse_knots), index)
            offsets = (rows * (d * pieces)).view(shape + (1,)) + units
            lo, hi = (t.index_select(0, rows).view(shape + (d,)) for t in (lo, hi))
        return piecewise_linear(x, index, self.anchor_x.reshape(-1), self.anchor_y.reshape(-1), self.slope.reshape(-1),
                                offsets, lo if self.masked else None, hi if self.masked else None)

    def apply_spatial(self, x: torch.Tensor) -> torch.Tensor:
        """The 4-D rule (ACT_SPEC.md section 6): transport the spatial mean per channel of ``x`` (B, C, H, W) and
        keep the spatial deviations: ``out = x + (T(mu) - mu)`` with ``mu = x.mean((2, 3))``."""
        mu = x.mean(dim=(2, 3))
        delta = self.apply_last(mu) - mu
        return x + delta[:, :, None, None]


def fold_pieces(knots: torch.Tensor, values: torch.Tensor, tail: torch.Tensor, s: float) -> tuple[torch.Tensor, ...]:
    """The ``(D, K + 1)`` pieces of ``a + s (T(a) - a)`` for the map through ``(knots[k], values[k])`` (``(K, D)``,
    float64) with tails of slope ``tail`` ``(D,)``: returns ``(knots (D, K), anchor_x, anchor_y, slope)``."""
    width = knots[1:] - knots[:-1]
    inner = torch.where(width > 0, (values[1:] - values[:-1]) / torch.where(width > 0, width, torch.ones_like(width)),
                        torch.zeros_like(width))  # a zero-width segment is never selected (see `piece_index`)
    slope = torch.cat([tail.unsqueeze(0), inner, tail.unsqueeze(0)])  # (K + 1, D)
    anchor_x = torch.cat([knots[:1], knots])  # piece j > 0 starts at knot j - 1; the left tail ends at knot 0
    anchor_y = torch.cat([values[:1], values])
    anchor_y = anchor_x + s * (anchor_y - anchor_x)
    slope = 1 + s * (slope - 1)
    return knots.T.contiguous(), anchor_x.T.contiguous(), anchor_y.T.contiguous(), slope.T.contiguous()


def fold_quantile(qmap: QuantileMap, s: float) -> FoldedQuantile:
    """``qmap`` at the scalar strength ``s``: ``a + s (T(a) - a)`` on the source support for ``s >= 0``; the inverse
    map (through ``(values, knots)``, tails of slope ``1 / omega``) at ``|s|`` on the target support for ``s < 0``.
    At ``s = 0`` the support is empty (NaN bounds), so every value comes out bit for bit."""
    knots, values, omega = qmap.knots.double(), qmap.values.double(), qmap.omega.double()
    if s >= 0:
        tail, lo, hi = omega, qmap.lo.double(), qmap.hi.double()
    else:
        s = -s
        knots, values = values, knots
        invertible = omega > _MIN_INVERTIBLE_OMEGA
        tail = torch.where(invertible, 1.0 / torch.where(invertible, omega, torch.ones_like(omega)),
                           torch.ones_like(omega))
        lo, hi = qmap.target_lo.double(), qmap.target_hi.double()
    pieces = fold_pieces(knots, values, tail, s)
    if s == 0:
        lo, hi = torch.full_like(lo, float("nan")), torch.full_like(hi, float("nan"))
    masked = s == 0 or bool(torch.isfinite(lo).any() or torch.isfinite(hi).any())
    return FoldedQuantile(*(t.float() for t in pieces), lo.float(), hi.float(), masked)


def stack_quantile(folds: list[FoldedQuantile], values: tuple[float, ...]) -> FoldedQuantile:
    """The per-row tables of ``folds`` (one per distinct strength in ``values``): forward knots, and the reverse
    ones too when the strengths differ in sign (rows at 0 are the identity whatever knots they look up)."""
    forward = [f for f, v in zip(folds, values) if v > 0]
    backward = [f for f, v in zip(folds, values) if v < 0]
    mixed = bool(forward and backward)
    knots = forward[0].knots if mixed else (backward or forward or folds)[0].knots
    negative = torch.tensor([v < 0 for v in values], device=knots.device) if mixed else None
    stacked = [torch.stack(ts) for ts in zip(*(f.tensors()[1:] for f in folds))]
    return FoldedQuantile(knots, *stacked, any(f.masked for f in folds), None,
                          backward[0].knots if mixed else None, negative)
