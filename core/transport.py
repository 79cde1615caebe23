"""Fitted transport maps: `UnitMap` (one site, per-unit affine map) and `Transport` (site -> UnitMap).

The math is ACT_SPEC.md sections 3-4: T(a) = omega * a + beta on the support [lo, hi], and the strength
lambda interpolates, T_lambda(a) = a + lambda * ((omega - 1) a + beta), folded ahead into one multiply-add.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import weakref
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import torch

Strength = Union[float, torch.Tensor]

_HALF = (torch.float16, torch.bfloat16)


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

# Units whose omega is this small cannot be inverted for the reverse (target -> source) transport.
_MIN_INVERTIBLE_OMEGA = 1e-6


def masked_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, lo: torch.Tensor | None,
                  hi: torch.Tensor | None) -> torch.Tensor:
    """``where(lo <= x <= hi, x * weight + bias, x)`` in ``x``'s dtype (no bounds: ``x * weight + bias``).

    The one formula of the per-call path (ACT_SPEC.md section 4), written with float ops only: on CPU, ops that
    produce or read a bool tensor (``==``, ``where``) are not vectorised and cost 3-6x a float op at
    diffusion/prefill sizes. ``clamp(x, lo, hi) != x`` becomes 1.0/0.0 in place, and ``moved.lerp_(x, 0.0)`` is
    ``moved + 0 * (x - moved) = moved`` and ``moved.lerp_(x, 1.0)`` is ``x - (x - moved) * 0 = x`` exactly, so
    the result equals the ``where`` form (``torch.equal``; a zero may change sign) for every finite ``x`` (NaN
    stays outside and is kept); a ``+-inf`` activation outside the support (a model that has already
    overflowed) comes out NaN.
    Weights may be float32 for half-precision ``x``: the multiply-add runs in float32 and is rounded once.
    """
    moved = torch.addcmul(bias, x, weight)
    if moved.dtype != x.dtype:
        moved = moved.to(x.dtype)
    if lo is None:
        return moved
    # outside = 1.0 where x is outside [lo, hi] (or NaN), else 0.0; moved.lerp_(x, outside) keeps moved or takes x.
    # In place into the two fresh buffers: large CPU allocations cost page faults, and this saves one per call.
    return moved.lerp_(x, torch.clamp(x, lo, hi).ne_(x))


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

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FoldedMap:
        """The map ready for activations of ``dtype`` on ``device``.

        float32/float64 activations get weights and bounds in their own dtype. Half-precision ones (float16,
        bfloat16) keep weight and bias in float32, so the multiply-add runs in float32 (a large slope and its
        offset nearly cancel: rounding them to 8-11 mantissa bits first loses the result), and get bounds rounded
        inwards to the half dtype, so that ``lo <= x <= hi`` gives the same answer as in float32 for every
        half-precision ``x``.

        Raises:
            ValueError: in half precision, when the map sends a finite end of its support beyond the dtype's range
                (checked eagerly; while torch.compile traces, the check is left to the eager calls).
        """
        rows = None if self.rows is None else self.rows.to(device=device)
        if dtype not in _HALF:
            if (rows is self.rows and (dtype is None or dtype == self.weight.dtype)
                    and (device is None or torch.device(device) == self.weight.device)):
                return self  # already there: no copies, no new object
            return FoldedMap(*(t.to(device=device, dtype=dtype) for t in self.tensors()), self.masked, rows)
        weight, bias = self.weight.to(device=device, dtype=torch.float32), self.bias.to(device=device, dtype=torch.float32)
        lo, hi = self.lo.to(device=device, dtype=torch.float32), self.hi.to(device=device, dtype=torch.float32)
        if self.masked and not torch.compiler.is_compiling():
            limit = torch.finfo(dtype).max
            for end in (lo, hi):
                finite = torch.isfinite(end)
                mapped = torch.where(finite, torch.addcmul(bias, end, weight), torch.zeros_like(bias))
                if bool((mapped.abs() > limit).any()):
                    worst = float(mapped.abs().max())
                    raise ValueError(
                        f"at this strength the map sends values up to {worst:.3g}, beyond the range of {dtype} "
                        f"({limit:.3g}); run the model in float32 or use a smaller strength"
                    )
        return FoldedMap(weight, bias, _round_inwards(lo, dtype, up=True), _round_inwards(hi, dtype, up=False),
                         self.masked, rows)

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
        del cache[next(iter(cache))]  # oldest first
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


@dataclasses.dataclass(frozen=True)
class UnitMap:
    """Per-unit affine transport for one site: ``T(a) = omega * a + beta`` on ``lo <= a <= hi``.

    Every tensor has shape ``(D,)`` and dtype float32 (estimation itself runs in float64).

    Attributes:
        omega: slope per unit (1 for mean shifts, the damping factor for AurA).
        beta: offset per unit.
        lo, hi: the source support; values outside are left alone (``-inf``/``+inf`` for all reals).
        target_lo, target_hi: the target support computed with the same rule; the reverse
            (target -> source) transport applies there.
        dead: True for units whose source values were (near-)constant; they were mapped as a pure
            mean shift instead of getting a huge omega.

    Example:
        >>> import torch, actsteer
        >>> m = actsteer.UnitMap(omega=torch.tensor([2.0]), beta=torch.tensor([1.0]))
        >>> m(torch.tensor([[3.0]])), m(torch.tensor([[3.0]]), strength=0.5)
        (tensor([[7.]]), tensor([[5.]]))
    """

    omega: torch.Tensor
    beta: torch.Tensor
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    target_lo: torch.Tensor | None = None
    target_hi: torch.Tensor | None = None
    dead: torch.Tensor | None = None

    def __post_init__(self) -> None:
        omega = torch.as_tensor(self.omega)
        if omega.dim() != 1:
            raise ValueError(f"`omega` must have shape (D,), got {tuple(omega.shape)}")
        d = omega.shape[0]
        inf = torch.full((d,), float("inf"))
        defaults = {"lo": -inf, "hi": inf, "target_lo": -inf, "target_hi": inf}
        for field in ("omega", "beta", "lo", "hi", "target_lo", "target_hi"):
            value = getattr(self, field)
            value = defaults[field] if value is None else torch.as_tensor(value)
            if value.shape != (d,):
                raise ValueError(f"`{field}` must have shape ({d},) like `omega`, got {tuple(value.shape)}")
            # clone: never share memory with the caller's tensors or between fields (safetensors refuses that)
            object.__setattr__(self, field, value.detach().to(device="cpu", dtype=torch.float32).clone())
        dead = torch.zeros(d, dtype=torch.bool) if self.dead is None else torch.as_tensor(self.dead)
        if dead.shape != (d,):
            raise ValueError(f"`dead` must have shape ({d},), got {tuple(dead.shape)}")
        object.__setattr__(self, "dead", dead.detach().to(device="cpu", dtype=torch.bool).clone())

    @property
    def dim(self) -> int:
        """Number of units D."""
        return self.omega.shape[0]

    @property
    def has_support(self) -> bool:
        """False when the map applies on all reals (no range check needed)."""
        return bool(torch.isfinite(self.lo).any() or torch.isfinite(self.hi).any())

    def fold(self, strength: Strength = 1.0, *, device: torch.device | str | None = None) -> FoldedMap:
        """Fold a strength into ``weight = 1 + s(omega - 1)``, ``bias = s * beta`` (float32, on ``device``: CPU
        by default).

        A negative strength folds the inverse map ``a = (z - beta) / omega`` at ``|s|`` on the target
        support; units with ``omega`` ~ 0 cannot be inverted and stay the identity. ``strength`` may be
        a tensor of shape ``(R,)`` (one per batch row): the result holds one table row per distinct strength
        and ``rows`` (see `FoldedMap`); each batch row gets exactly the fold of its own scalar strength.
        Folds are cached per map, strength and device, so going back to a recent strength costs a dictionary
        lookup and no copy to the device. The returned tensors are shared with the cache: treat them as read-only.
        """
        device = None if device is None or torch.device(device).type in ("cpu", "meta") else torch.device(device)
        if isinstance(strength, torch.Tensor) and strength.dim() == 1:
            values, rows = _row_table(strength, device)
            return self._fold_rows(values, rows, device)
        s = torch.as_tensor(strength, dtype=torch.float64)
        if s.dim() > 1:
            raise ValueError(f"`strength` must be a float or a 1-D tensor (one per batch row), got shape {tuple(s.shape)}")
        if not torch.isfinite(s).all():
            raise ValueError(f"`strength` must be finite, got {strength!r}")
        if s.dim() == 1:
            values, rows = _row_table(s, device)
            return self._fold_rows(values, rows, device)
        return self._fold_value(float(s), device)

    def _fold_value(self, value: float, device: torch.device | None = None) -> FoldedMap:
        cache = _fold_cache(self)
        folded = cache.get((value, device))
        if folded is None:
            folded = FoldedMap(*self._fold_scalar(torch.tensor(value, dtype=torch.float64)))
            if device is not None:
                folded = folded.to(device)
            folded = _remember(cache, (value, device), folded)
        return folded

    def _fold_rows(self, values: tuple[float, ...], rows: torch.Tensor, device: torch.device | None = None) -> FoldedMap:
        cache = _fold_cache(self)
        tables = cache.get((values, device))
        if tables is None:
            folds = [self._fold_value(v, device) for v in values]
            signs = {v > 0 for v in values if v != 0}
            if len(signs) < 2:  # one support for every row (rows at 0 are the identity whatever the bounds)
                shared = folds[values.index(next((v for v in values if v != 0), values[0]))]
                lo, hi, masked = shared.lo, shared.hi, shared.masked
            else:
                lo, hi = torch.stack([f.lo for f in folds]), torch.stack([f.hi for f in folds])
                masked = any(f.masked for f in folds)
            tables = _remember(cache, (values, device), FoldedMap(
                torch.stack([f.weight for f in folds]), torch.stack([f.bias for f in folds]), lo, hi, masked))
        return dataclasses.replace(tables, rows=rows)

    def _fold_scalar(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        omega, beta = self.omega.double(), self.beta.double()
        if s >= 0:
            weight, bias, lo, hi = 1 + s * (omega - 1), s * beta, self.lo, self.hi
        else:
            a = -s
            invertible = omega > _MIN_INVERTIBLE_OMEGA
            safe = torch.where(invertible, omega, torch.ones_like(omega))
            inv_omega = torch.where(invertible, 1.0 / safe, torch.ones_like(omega))
            inv_beta = torch.where(invertible, -beta / safe, torch.zeros_like(beta))
            weight, bias, lo, hi = 1 + a * (inv_omega - 1), a * inv_beta, self.target_lo, self.target_hi
        masked = bool(torch.isfinite(lo).any() or torch.isfinite(hi).any())
        return weight.float(), bias.float(), lo.float().clone(), hi.float().clone(), masked

    def __call__(self, x: torch.Tensor, strength: Strength = 1.0) -> torch.Tensor:
        """Transport the last dim of ``x`` (..., D) at ``strength``; returns a new tensor in ``x``'s dtype.

        0 is the identity, 1 the full map, values in (0, 1) interpolate, a negative value applies the reverse
        (target -> source) map at ``|strength|``; values above 1 extrapolate past the target.
        """
        if x.shape[-1] != self.dim:
            raise ValueError(f"Expected a tensor whose last dim is {self.dim} units, got shape {tuple(x.shape)}")
        return self.fold(strength).to(x.device, x.dtype).apply_last(x)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The map's tensors by field name (what `Transport.save` writes)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __repr__(self) -> str:
        o = self.omega
        return (
            f"UnitMap(D={self.dim}, omega=[{o.min().item():.3g}, {o.max().item():.3g}], "
            f"mean|beta|={self.beta.abs().mean().item():.3g}, support={'range' if self.has_support else 'all'}, "
            f"dead={int(self.dead.sum())})"
        )


UNITMAP_FIELDS = tuple(f.name for f in dataclasses.fields(UnitMap))


class Transport(Mapping[str, UnitMap]):
    """An ordered mapping site name -> `UnitMap`, plus metadata. Immutable; transforms return new objects.

    Site names are dotted module paths with an optional ``:k`` selecting element k of a tuple output.
    Order is the execution order of the sites when known (sequential estimation depends on it).

    Args:
        maps: site -> UnitMap, in order.
        method: estimator name (see `actsteer.estimate`).
        pooling: how activations were pooled per input (``"mean"``, ``"last"``, ``"max"``, ...).
        support: the support rule used (``"observed"``, ``"all"`` or ``[q_lo, q_hi]``).
        mode: ``"sequential"`` or ``"at-once"`` estimation.
        n_source, n_target: how many inputs each side had.
        model: hint about the model it was fitted on (class, hidden sizes, name_or_path, ...).
        description: free text.
        extra: any other JSON-serialisable metadata.

    Example:
        >>> import torch, actsteer
        >>> t = actsteer.Transport({"0": actsteer.UnitMap(torch.ones(4), torch.zeros(4))}, method="mean-act")
        >>> list(t), len(t), t.method
        (['0'], 1, 'mean-act')
    """

    def __init__(
        self,
        maps: Mapping[str, UnitMap] | Iterable[tuple[str, UnitMap]],
        *,
        method: str = "linear-act",
        pooling: str = "mean",
        support: Any = "observed",
        mode: str = "sequential",
        n_source: int = 0,
        n_target: int = 0,
        model: Mapping[str, Any] | None = None,
        description: str = "",
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        items = list(maps.items()) if isinstance(maps, Mapping) else list(maps)
        self._maps: dict[str, UnitMap] = {}
        for name, unit_map in items:
            if not isinstance(unit_map, UnitMap):
                raise TypeError(f"Transport values must be UnitMap, got {type(unit_map).__name__} for site {name!r}")
            if name in self._maps:
                raise ValueError(f"Site {name!r} appears twice in the transport")
            self._maps[str(name)] = unit_map
        self.method = method
        self.pooling = pooling
        self.support = list(support) if isinstance(support, (tuple, list)) else support
        self.mode = mode
        self.n_source = int(n_source)
        self.n_target = int(n_target)
        self.model = dict(model or {})
        self.description = description
        self.extra = dict(extra or {})
        json.dumps(self.metadata())  # fail now, not at save time, on non-JSON metadata

    # Mapping protocol
    def __getitem__(self, site: str) -> UnitMap:
        try:
            return self._maps[site]
        except KeyError:
            raise KeyError(f"Site {site!r} is not in this transport; it has: {', '.join(self._maps) or '(none)'}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)

    @property
    def sites(self) -> list[str]:
        """Site names in order."""
        return list(self._maps)

    def metadata(self) -> dict[str, Any]:
        """All metadata as a JSON-serialisable dict (what `save` writes in the header); a copy."""
        return copy.deepcopy({
            "method": self.method,
            "pooling": self.pooling,
            "support": self.support,
            "mode": self.mode,
            "sites": self.sites,
            "n_source": self.n_source,
            "n_target": self.n_target,
            "model": self.model,
            "description": self.description,
            "extra": self.extra,
        })

    def replace(self, maps: Mapping[str, UnitMap] | None = None, **metadata: Any) -> Transport:
        """A copy with some maps or metadata fields replaced."""
        meta = self.metadata()
        meta.pop("sites")
        meta.update(metadata)
        return Transport(self._maps if maps is None else maps, **meta)

    def select(self, sites: Iterable[str] | str) -> Transport:
        """A new transport with only the given sites (a list of names, or one regex matched in full), in this
        transport's order."""
        import re

        if isinstance(sites, str):
            pattern = re.compile(sites)
            keep = [s for s in self._maps if pattern.fullmatch(s)]
            if not keep:
                raise ValueError(f"Pattern {sites!r} matches no site of this transport ({len(self)} sites)")
        else:
            wanted = set(sites)
            for s in wanted:
                self[s]  # raises a KeyError naming the sites
            keep = [s for s in self._maps if s in wanted]
        return self.replace({s: self._maps[s] for s in keep})

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write to a ``.safetensors`` file (refuses to overwrite unless ``overwrite=True``). See `actsteer.core.io`."""
        from .io import save_transport

        return save_transport(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> Transport:
        """Read a file written by `save` (``.safetensors`` may be left out). Never unpickles anything."""
        from .io import load_transport

        return load_transport(path)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Transport):
            return NotImplemented
        if self.metadata() != other.metadata():
            return False
        return all(
            torch.equal(getattr(self[s], f), getattr(other[s], f)) for s in self for f in UNITMAP_FIELDS
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        units = sum(m.dim for m in self._maps.values())
        first = ", ".join(list(self._maps)[:3]) + (", ..." if len(self) > 3 else "")
        hint = self.model.get("name_or_path") or self.model.get("class") or "?"
        return (
            f"Transport(method={self.method!r}, sites={len(self)} [{first}], units={units}, "
            f"pooling={self.pooling!r}, support={self.support!r}, mode={self.mode!r}, "
            f"n_source={self.n_source}, n_target={self.n_target}, model={hint!r})"
        )
