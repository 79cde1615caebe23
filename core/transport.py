"""Fitted transport maps: `UnitMap` (one site, per-unit affine map) and `Transport` (site -> UnitMap).

The math is ACT_SPEC.md sections 3-4: T(a) = omega * a + beta on the support [lo, hi], and the strength
lambda interpolates, T_lambda(a) = a + lambda * ((omega - 1) a + beta), folded ahead into one multiply-add.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import torch

from .folding import FoldedMap, fold, fold_affine, stack_affine
from .validation import printable, shorten

Strength = Union[float, torch.Tensor]


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
        by default); see `actsteer.core.folding.fold`.

        A negative strength folds the inverse map ``a = (z - beta) / omega`` at ``|s|`` on the target support;
        units with ``omega`` ~ 0 cannot be inverted and stay the identity. ``strength`` may be a tensor of shape
        ``(R,)`` (one per batch row). Folds are cached per map, strength and device; the returned tensors are
        shared with the cache: treat them as read-only.
        """
        return fold(self, strength, device=device)

    def _fold_scalar(self, value: float) -> FoldedMap:
        """This map at one scalar strength, uncached (`fold` caches; a `QuantileMap` folds its own kind)."""
        return fold_affine(self, value)

    def _stack_folds(self, folds: list[FoldedMap], values: tuple[float, ...]) -> FoldedMap:
        """Per-row tables of this map's folds at ``values`` (one per distinct strength)."""
        return stack_affine(folds, values)

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


def map_from_tensors(**tensors: torch.Tensor) -> UnitMap:
    """The map whose fields are exactly ``tensors``: a `UnitMap`, or the subclass with those extra fields (a
    `actsteer.core.QuantileMap` for ``knots`` and ``values``); what `Transport.load` builds each site with.

    Raises:
        ValueError: no kind of map has these fields.
    """
    names = set(tensors)
    for cls in (UnitMap, *UnitMap.__subclasses__()):
        if {f.name for f in dataclasses.fields(cls)} == names:
            return cls(**tensors)
    raise ValueError(f"no kind of map has the tensors {sorted(names)}")


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
        # metadata as a saved file holds it (tuples become lists, keys strings), so that a transport equals its
        # save/load round trip; non-JSON metadata fails now, not at save time
        self.model = json.loads(json.dumps(dict(model or {})))
        self.description = description
        self.extra = json.loads(json.dumps(dict(extra or {})))
        json.dumps(self.metadata())

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
        from .io import read_transport

        from .validation import check_stages

        path, maps, metadata = read_transport(path, map_from_tensors)
        try:
            transport = cls(maps, **metadata)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: the transport metadata is invalid ({shorten(str(err), 200)})") from None
        check_stages(transport, str(path))
        return transport

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Transport):
            return NotImplemented
        if self.metadata() != other.metadata():
            return False
        return all(type(self[s]) is type(other[s]) and all(
            torch.equal(a, b) for a, b in zip(self[s].to_tensors().values(), other[s].to_tensors().values()))
            for s in self)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        units = sum(m.dim for m in self._maps.values())
        first = ", ".join(list(self._maps)[:3]) + (", ..." if len(self) > 3 else "")
        from .provenance import model_name

        hint = printable(model_name(self) or "?", 120)
        return (
            f"Transport(method={self.method!r}, sites={len(self)} [{first}], units={units}, "
            f"pooling={self.pooling!r}, support={self.support!r}, mode={self.mode!r}, "
            f"n_source={self.n_source}, n_target={self.n_target}, model={hint!r})"
        )
