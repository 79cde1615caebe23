"""Folding: a `UnitMap` at one strength, ready for the per-call path, and the one per-call formula.

- `fold` turns a map and a strength (a number, or one per batch row) into a `FoldedMap` (ACT_SPEC.md section 4:
  ``weight = 1 + s(omega - 1)``, ``bias = s beta``; a negative strength folds the inverse map on the target
  support), cached so that each distinct strength is folded once;
- `masked_affine` / `bind_affine` are the formula every steered call runs:
  ``where(lo <= x <= hi, x * weight + bias, x)``, written with float ops only.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .transport import UnitMap

HALF_DTYPES = (torch.float16, torch.bfloat16)  # folds keep float32 weights for these (see `FoldedMap.to`)
# Units whose omega is this small cannot be inverted for the reverse (target -> source) transport.
_MIN_INVERTIBLE_OMEGA = 1e-6


def _round_inwards(bound: torch.Tensor, dtype: torch.dtype, *, up: bool) -> torch.Tensor:
    """``bound`` in ``dtype``, rounded up (lower bounds) or down (upper bounds) where it is not exact, so that
    comparing a ``dtype`` value with it agrees with comparing against the exact bound. Infinities stay."""
    out = bound.to(dtype)
    back = out.to(bound.dtype)
    wrong = (back < bound) if up else (back > bound)
    wrong &= torch.isfinite(bound)
    # branch-free while torch.compile traces (no data-dependent Python `if`); eager skips the work when exact
    if torch.compiler.is_compiling() or bool(wrong.any()):
        toward = torch.full_like(out, float("inf") if up else float("-inf"))
        out = torch.where(wrong, torch.nextafter(out, toward), out)
    return out



def bind_affine(weight: torch.Tensor, bias: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None,
                dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-call formula with its tensors bound, for activations of ``dtype``: ``x -> where(lo <= x <= hi,
    x * weight + bias, x)`` (no bounds: ``x * weight + bias``), a new tensor in ``dtype``.

    This is the one formula of the per-call path (ACT_SPEC.md section 4), written with float ops only: on CPU, ops
    that produce or read a bool tensor (``==``, ``where``) are not vectorised and cost 3-6x a float op at
    diffusion/prefill sizes. ``clamp(x, lo, hi) != x`` becomes 1.0/0.0 in place, and ``moved.lerp_(x, 0.0)`` is
    ``moved + 0 * (x - moved) = moved`` and ``moved.lerp_(x, 1.0)`` is ``x - (x - moved) * 0 = x`` exactly, so
    the result equals the ``where`` form (``torch.equal``; a zero may change sign) for every finite ``x`` (NaN
    stays outside and is kept); a ``+-inf`` activation outside the support (a model that has already
    overflowed) comes out NaN. In place into the two fresh buffers: large CPU allocations cost page faults.
    Weights may be float32 for half-precision ``x``: the multiply-add runs in float32 and is rounded once.
    Each variant is its own function, so that a call costs the ops and nothing else.
    """
    cast = torch.promote_types(weight.dtype, dtype) != dtype
    if lo is None:
        if cast:
            return lambda x: torch.addcmul(bias, x, weight).to(dtype)
        return lambda x: torch.addcmul(bias, x, weight)
    # outside = 1.0 where x is outside [lo, hi] (or NaN), else 0.0; moved.lerp_(x, outside) keeps moved or takes x
    if cast:
        return lambda x: torch.addcmul(bias, x, weight).to(dtype).lerp_(x, torch.clamp(x, lo, hi).ne_(x))
    return lambda x: torch.addcmul(bias, x, weight).lerp_(x, torch.clamp(x, lo, hi).ne_(x))


def masked_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, lo: torch.Tensor | None,
                  hi: torch.Tensor | None) -> torch.Tensor:
    """``where(lo <= x <= hi, x * weight + bias, x)`` in ``x``'s dtype (no bounds: ``x * weight + bias``); see
    `bind_affine`, which this calls."""
    return bind_affine(weight, bias, lo, hi, x.dtype)(x)


def in_support(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The support test of the formula: True where ``lo <= x <= hi`` (False for NaN), as `bind_affine` decides."""
    return torch.clamp(x, lo, hi) == x


@dataclasses.dataclass(frozen=True)
class FoldedMap:
    """A `UnitMap` folded for one strength: ``out = where(lo <= x <= hi, x * weight + bias, x)``.

    Shapes are ``(D,)`` for a scalar strength. For one strength per batch row, ``rows`` ``(R,)`` gives each
    row's index into ``(U, D)`` tables of ``weight``/``bias`` (and of ``lo``/``hi`` when the rows' strengths
    differ in sign; else those stay ``(D,)``), one table row per distinct strength in order of first
    appearance; the rows are gathered when the map is applied, so a new per-row strength costs no ``(R, D)``
    work until then. ``masked`` is False when the support is all reals, so the hot path skips the compare.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    masked: bool
    rows: torch.Tensor | None = None
    # (device, half dtype) -> (weight, bias, lo, hi) cast by `to`; shared with the per-row folds of the same tables,
    # so a new per-row strength (a new ``rows``) does not cast, range-check and round the tables again
    casts: dict = dataclasses.field(default_factory=dict, init=False, compare=False, repr=False)

    def with_rows(self, rows: torch.Tensor) -> FoldedMap:
        """These tables with another per-row index (and the casts already made of them)."""
        folded = dataclasses.replace(self, rows=rows)
        object.__setattr__(folded, "casts", self.casts)
        return folded

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FoldedMap:
        """The map ready for activations of ``dtype`` on ``device``.

        float32/float64 activations get weights and bounds in their own dtype. Half-precision ones (float16,
        bfloat16) keep weight and bias in float32, so the multiply-add runs in float32 (a large slope and its
        offset nearly cancel: rounding them to 8-11 mantissa bits first loses the result), and get bounds rounded
        inwards to the half dtype, so that ``lo <= x <= hi`` gives the same answer as in float32 for every
        half-precision ``x``.

        Raises:
            ValueError: in half precision, when the map sends a finite end of its support (all reals: 0 or 1)
                beyond the dtype's range (checked eagerly; while torch.compile traces, the check is left to the
                eager calls).
        """
        rows = None if self.rows is None else self.rows.to(device=device)
        if dtype not in HALF_DTYPES:
            if (rows is self.rows and (dtype is None or dtype == self.weight.dtype)
                    and (device is None or torch.device(device) == self.weight.device)):
                return self  # already there: no copies, no new object
            return FoldedMap(*(t.to(device=device, dtype=dtype) for t in self.tensors()), self.masked, rows)
        compiling = torch.compiler.is_compiling()
        key = (str(device), dtype)
        cast = None if compiling else self.casts.get(key)
        if cast is None:
            cast = self._cast_half(device, dtype, check=not compiling)
            if not compiling:
                self.casts[key] = cast
        return FoldedMap(*cast, self.masked, rows)

    def _cast_half(self, device: torch.device | str | None, dtype: torch.dtype, *, check: bool) -> tuple:
        weight, bias = self.weight.to(device=device, dtype=torch.float32), self.bias.to(device=device, dtype=torch.float32)
        lo, hi = self.lo.to(device=device, dtype=torch.float32), self.hi.to(device=device, dtype=torch.float32)
        if check:
            limit = torch.finfo(dtype).max
            # a ranged map: where it sends the finite ends of its support; an all-reals map: where it sends 0 (its
            # offset) and 1 (a slope beyond the range overflows every activation of size 1 or more). Outputs of the
            # first call are checked too (`actsteer.core.engine`), for all-reals maps on real activations.
            ends = (lo, hi) if self.masked else (torch.zeros_like(bias), torch.ones_like(bias))
            for end in ends:
                finite = torch.isfinite(end)
                mapped = torch.where(finite, torch.addcmul(bias, end, weight), torch.zeros_like(bias))
                if bool((mapped.abs() > limit).any()):
                    worst = float(mapped.abs().max())
                    raise ValueError(
                        f"at this strength the map sends values up to {worst:.3g}, beyond the range of {dtype} "
                        f"({limit:.3g}); run the model in float32 or use a smaller strength"
                    )
        return weight, bias, _round_inwards(lo, dtype, up=True), _round_inwards(hi, dtype, up=False)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.weight, self.bias, self.lo, self.hi

    def per_row(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(weight, bias, lo, hi)`` with one row per batch row: the tables gathered by ``rows`` (``(R, D)``, or
        ``(D,)`` for what all rows share); the tensors themselves for a scalar strength."""
        w, b, lo, hi = self.weight, self.bias, self.lo, self.hi
        rows = self.rows
        if rows is not None:
            w, b = w.index_select(0, rows), b.index_select(0, rows)
            if lo.dim() == 2:
                lo, hi = lo.index_select(0, rows), hi.index_select(0, rows)
        return w, b, lo, hi

    def apply_last(self, x: torch.Tensor) -> torch.Tensor:
        """Apply on the last dim of ``x`` (..., D); a per-row map broadcasts its rows over dims 1..-2."""
        w, b, lo, hi = self.per_row()
        if x.dim() > 2 and (w.dim() == 2 or lo.dim() == 2):  # per-row strengths: (R, D) -> (R, 1, ..., 1, D)
            ones = (1,) * (x.dim() - 2)
            w, b, lo, hi = (t.view((t.shape[0],) + ones + (t.shape[1],)) if t.dim() == 2 else t for t in (w, b, lo, hi))
        return masked_affine(x, w, b, lo, hi) if self.masked else masked_affine(x, w, b, None, None)

    def apply_spatial(self, x: torch.Tensor) -> torch.Tensor:
        """The 4D rule (ACT_SPEC.md section 6): transport the spatial mean per channel of ``x`` (B, C, H, W),
        keep the spatial deviations: ``out = x + (T(mu) - mu)`` with ``mu = x.mean((2, 3))``.
        """
        mu = x.mean(dim=(2, 3))  # (B, C)
        delta = self.apply_last(mu) - mu
        return x + delta[:, :, None, None]


# Folding caches: per UnitMap (by id, dropped when the map is collected), the folds of recent strengths and the
# per-row tables of recent strength sets. A server that sets one strength per token before every forward folds
# each distinct value once, not once per call (folds are immutable: callers never write into them).
_FOLDS: dict[int, dict[Any, FoldedMap]] = {}
_FOLDS_PER_MAP = 16
_ROWS_CACHE: list[Any] = [None]  # (weakref to the last 1-D strength, a copy of it, values, {device: rows})


def _fold_cache(unit_map: UnitMap) -> dict[Any, FoldedMap]:
    key = id(unit_map)
    cache = _FOLDS.get(key)
    if cache is None:
        cache = _FOLDS[key] = {}
        weakref.finalize(unit_map, _FOLDS.pop, key, None)
    return cache


def _remember(cache: dict[Any, FoldedMap], key: Any, value: FoldedMap) -> FoldedMap:
    if len(cache) >= _FOLDS_PER_MAP:
        cache.pop(next(iter(cache), None), None)  # oldest first; pop, not del: another thread may evict it too
    cache[key] = value
    return value


def _row_table(strength: torch.Tensor, device: torch.device | None = None) -> tuple[tuple[float, ...], torch.Tensor]:
    """The distinct values of a 1-D strength in order of first appearance, and each row's index into them (on
    ``device``, CPU when None).

    Every site of a handle folds the same strength tensor: the answer for the last tensor (the same object, with
    the same values; inference tensors have no version counter to tell) is reused, copied to a device once.

    Raises:
        ValueError: a value is not finite.
    """
    last = _ROWS_CACHE[0]
    if last is None or last[0]() is not strength or not torch.equal(last[1], strength):
        flat = strength.tolist()
        bad = [v for v in flat if not math.isfinite(v)]
        if bad:
            raise ValueError(f"`strength` must be finite, got {bad[0]} in a per-row strength")
        index: dict[float, int] = {}
        rows = [index.setdefault(v, len(index)) for v in flat]
        last = _ROWS_CACHE[0] = (weakref.ref(strength), strength.detach().clone(), tuple(index),
                                 {None: torch.tensor(rows, dtype=torch.int64)})
    on_device = last[3].get(device)
    if on_device is None:
        on_device = last[3][device] = last[3][None].to(device)
    return last[2], on_device


# Folding ----------------------------------------------------------------------------------------------------
def fold(unit_map: UnitMap, strength: Any = 1.0, *, device: torch.device | str | None = None) -> Any:
    """``unit_map`` at ``strength``: ``weight = 1 + s(omega - 1)``, ``bias = s * beta`` (float32, on ``device``: CPU
    by default), with the support the strength's direction uses. A `QuantileMap` folds into a
    `actsteer.core.quantile_folding.FoldedQuantile` instead (its own ``_fold_scalar``/``_stack_folds``); the strength
    checks and the caches here are shared.

    A negative strength folds the inverse map ``a = (z - beta) / omega`` at ``|s|`` on the target support; units
    with ``omega`` ~ 0 cannot be inverted and stay the identity. ``strength`` may be a tensor of shape ``(R,)``
    (one per batch row): the result holds one table row per distinct strength and ``rows`` (see `FoldedMap`); each
    batch row gets exactly the fold of its own scalar strength. Folds are cached per map, strength and device, so
    going back to a recent strength costs a dictionary lookup and no copy to the device. The returned tensors are
    shared with the cache: treat them as read-only.

    Raises:
        ValueError: a strength that is not finite, or not a number or a 1-D tensor.

    Example:
        >>> import torch, actsteer
        >>> m = actsteer.UnitMap(torch.tensor([2.0]), torch.tensor([1.0]), lo=torch.zeros(1), hi=torch.ones(1))
        >>> f = fold(m, 0.5)
        >>> f.weight, f.bias, f.masked
        (tensor([1.5000]), tensor([0.5000]), True)
    """
    device = None if device is None or torch.device(device).type in ("cpu", "meta") else torch.device(device)
    if isinstance(strength, torch.Tensor) and strength.dim() == 1:
        values, rows = _row_table(strength, device)
        return _fold_rows(unit_map, values, rows, device)
    s = torch.as_tensor(strength, dtype=torch.float64)
    if s.dim() > 1:
        raise ValueError(f"`strength` must be a float or a 1-D tensor (one per batch row), got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all():
        raise ValueError(f"`strength` must be finite, got {strength!r}")
    if s.dim() == 1:
        values, rows = _row_table(s, device)
        return _fold_rows(unit_map, values, rows, device)
    return _fold_value(unit_map, float(s), device)


def _fold_value(unit_map: UnitMap, value: float, device: torch.device | None = None) -> Any:
    cache = _fold_cache(unit_map)
    folded = cache.get((value, device))
    if folded is None:
        folded = unit_map._fold_scalar(value)  # the map's own kind: affine here, piecewise for a QuantileMap
        if device is not None:
            folded = folded.to(device)
        folded = _remember(cache, (value, device), folded)
    return folded


def _fold_rows(unit_map: UnitMap, values: tuple[float, ...], rows: torch.Tensor,
               device: torch.device | None = None) -> Any:
    cache = _fold_cache(unit_map)
    tables = cache.get((values, device))
    if tables is None:
        folds = [_fold_value(unit_map, v, device) for v in values]
        tables = _remember(cache, (values, device), unit_map._stack_folds(folds, values))
    return tables.with_rows(rows)


def stack_affine(folds: list[FoldedMap], values: tuple[float, ...]) -> FoldedMap:
    """The per-row tables of affine folds, one row per distinct strength in ``values`` (see `FoldedMap`)."""
    signs = {v > 0 for v in values if v != 0}
    if len(signs) < 2:  # one support for every row (rows at 0 are the identity whatever the bounds)
        shared = folds[values.index(next((v for v in values if v != 0), values[0]))]
        lo, hi, masked = shared.lo, shared.hi, shared.masked
    else:
        lo, hi = torch.stack([f.lo for f in folds]), torch.stack([f.hi for f in folds])
        masked = any(f.masked for f in folds)
    return FoldedMap(torch.stack([f.weight for f in folds]), torch.stack([f.bias for f in folds]), lo, hi, masked)


def fold_affine(unit_map: UnitMap, value: float) -> FoldedMap:
    """The affine ``unit_map`` at the scalar strength ``value`` (not cached; `fold` caches)."""
    return FoldedMap(*_fold_scalar(unit_map, torch.tensor(value, dtype=torch.float64)))


def inverse_affine(omega: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reverse (target -> source) map's slope and offset, ``1/omega`` and ``-beta/omega``; units with ``omega``
    ~ 0 cannot be inverted and stay the identity (slope 1, offset 0)."""
    invertible = omega > _MIN_INVERTIBLE_OMEGA
    safe = torch.where(invertible, omega, torch.ones_like(omega))
    inv_omega = torch.where(invertible, 1.0 / safe, torch.ones_like(omega))
    return inv_omega, torch.where(invertible, -beta / safe, torch.zeros_like(beta))


def _fold_scalar(unit_map: UnitMap, s: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(weight, bias, lo, hi, masked)`` of ``unit_map`` at the scalar strength ``s`` (float64 math, float32 out)."""
    omega, beta = unit_map.omega.double(), unit_map.beta.double()
    if s >= 0:
        weight, bias, lo, hi = 1 + s * (omega - 1), s * beta, unit_map.lo, unit_map.hi
    else:
        a = -s
        inv_omega, inv_beta = inverse_affine(omega, beta)
        weight, bias, lo, hi = 1 + a * (inv_omega - 1), a * inv_beta, unit_map.target_lo, unit_map.target_hi
    masked = bool(torch.isfinite(lo).any() or torch.isfinite(hi).any())
    return weight.float(), bias.float(), lo.float().clone(), hi.float().clone(), masked
