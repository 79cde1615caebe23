"""The exact 1-D transport per unit: the monotone quantile map ``T = Q_target o F_source`` (`QuantileMap`).

In one dimension the optimal transport map between two distributions is the increasing rearrangement: a source
value at quantile level ``q`` goes to the target's quantile at ``q``. Linear-AcT fits the best AFFINE map to that
coupling (ACT_SPEC.md section 2); the quantile map keeps its shape, which the paper (Rodriguez et al., ICLR 2025)
names as future work. Estimation runs in float64 on pooled activations, like the affine estimators.
"""

from __future__ import annotations

import dataclasses
import torch

from .quantile_folding import FoldedQuantile, fold_quantile, stack_quantile
from .transport import UnitMap

DEFAULT_KNOTS = 8


@dataclasses.dataclass(frozen=True)
class QuantileMap(UnitMap):
    """Per-unit monotone piecewise-linear transport on ``lo <= a <= hi``, with affine tails (ACT_SPEC.md section 2).

    The map of unit ``u`` goes through the points ``(knots[k, u], values[k, u])``: source quantiles and the target
    quantiles at the same levels, both non-decreasing in ``k``; it is linear between them and continues with slope
    ``omega[u]`` beyond the first and last knot. Strength ``s`` >= 0 gives ``T_s(a) = a + s (T(a) - a)``; a negative
    strength applies the inverse map (through ``(values, knots)``, target -> source) at ``|s|`` on the target
    support, as for `UnitMap`.

    Attributes (besides `UnitMap`'s):
        knots (`torch.Tensor` of shape `(K, D)`): the source's quantiles at ``K`` levels (min and max included).
        values (`torch.Tensor` of shape `(K, D)`): the target's quantiles at the same levels.
        omega, beta: the Linear-AcT fit of the same data: ``omega`` is the tails' slope, and ``omega a + beta`` the
            map's affine summary (what `actsteer inspect` shows).

    Example:
        >>> import torch
        >>> m = QuantileMap(omega=torch.ones(1), beta=torch.zeros(1), knots=torch.tensor([[0.0], [1.0], [3.0]]),
        ...                 values=torch.tensor([[0.0], [3.0], [4.0]]))
        >>> m(torch.tensor([[0.5, 1.0, 2.0, 5.0]]).T).flatten().tolist()  # tail slope 1 beyond the last knot
        [1.5, 3.0, 3.5, 6.0]
        >>> m(torch.tensor([[1.0]]), strength=0.5).item()  # 1 + 0.5 (3 - 1)
        2.0
    """

    knots: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        d = self.dim
        for field in ("knots", "values"):
            value = getattr(self, field)
            value = None if value is None else torch.as_tensor(value)
            if value is None or value.dim() != 2 or value.shape[1] != d or value.shape[0] < 2:
                shape = None if value is None else tuple(value.shape)
                raise ValueError(f"`{field}` must have shape (K, {d}) with K >= 2 knots, got {shape}")
            object.__setattr__(self, field, value.detach().to(device="cpu", dtype=torch.float32).clone())
        if self.knots.shape != self.values.shape:
            raise ValueError(f"`knots` {tuple(self.knots.shape)} and `values` {tuple(self.values.shape)} differ in shape")

    @property
    def num_knots(self) -> int:
        """K, the number of knots per unit."""
        return self.knots.shape[0]

    def problem(self) -> str | None:
        """What makes the map unusable (None when it is fine): non-finite knots or values, or knots or values that
        decrease (the map must be monotone)."""
        for field in ("knots", "values"):
            tensor = getattr(self, field)
            bad = ~torch.isfinite(tensor)
            if bad.any():
                return f"`{field}` has {int(bad.sum())} NaN/Inf value(s)"
            bad = (tensor[1:] < tensor[:-1]).any(dim=0)
            if bad.any():
                return (f"`{field}` decrease at {int(bad.sum())} unit(s) (first at unit {int(bad.nonzero()[0])}): "
                        "the map must be monotone")
        return None

    def _fold_scalar(self, value: float) -> FoldedQuantile:
        """This map at one scalar strength, uncached (`actsteer.core.folding.fold` checks and caches)."""
        return fold_quantile(self, value)

    def _stack_folds(self, folds: list[FoldedQuantile], values: tuple[float, ...]) -> FoldedQuantile:
        return stack_quantile(folds, values)

    def to_affine(self) -> UnitMap:
        """The affine summary (Linear-AcT fit of the same data) as a plain `UnitMap`."""
        return UnitMap(**{f.name: getattr(self, f.name) for f in dataclasses.fields(UnitMap)})

    def __repr__(self) -> str:
        return (f"QuantileMap(D={self.dim}, knots={self.num_knots}, support={'range' if self.has_support else 'all'}, "
                f"dead={int(self.dead.sum())})")


def _at_levels(sorted_x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Linear-interpolated quantiles (position ``q (n - 1)``) of each column of ``sorted_x`` (n, D) at ``levels`` (K,)."""
    n = sorted_x.shape[0]
    pos = levels.to(sorted_x.dtype) * (n - 1)
    lo = pos.floor().long().clamp(0, n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo.to(pos.dtype)).unsqueeze(1)
    return sorted_x[lo] * (1 - frac) + sorted_x[hi] * frac


def quantile_map(
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    omega: torch.Tensor,
    beta: torch.Tensor,
    dead: torch.Tensor,
    bounds: dict[str, torch.Tensor],
    knots: int = DEFAULT_KNOTS,
) -> QuantileMap:
    """The monotone quantile map per unit from float64 samples (what `actsteer.estimate(method="quantile")` returns).

    At ``K = knots`` levels ``q_k = k / (K - 1)`` the source quantile ``Q_source(q_k)`` is mapped to the target
    quantile ``Q_target(q_k)`` (both linear between order statistics, so with ``K = n = m`` the knots are the sorted
    samples themselves, paired in order); the map is linear in between. With two Gaussians it approaches the affine
    OT map (``omega = sigma_t / sigma_s``). Dead units (a constant source) become a pure mean shift, like
    Linear-AcT's, on a unit-wide range around their value.

    Args:
        source (`torch.Tensor` of shape `(n, D)`), target (`torch.Tensor` of shape `(m, D)`): float64 samples.
        omega, beta, dead: the Linear-AcT fit of the same samples (tails and affine summary).
        bounds: ``lo``, ``hi``, ``target_lo``, ``target_hi`` from the support rule.
        knots: K >= 2 quantile levels (default 8). More follow the samples more closely and vary more between
            samples, and each costs about four float ops per steered value: on SmolLM2's pooled activations (24 a
            side) 8 and 16 generalise alike, on skewed samples of 200+ 16 is closer (benchmarks/RESULTS.md).
    """
    if isinstance(knots, bool) or not isinstance(knots, int) or knots < 2:
        raise ValueError(f"`knots` must be an integer >= 2, got {knots!r}")
    levels = torch.linspace(0, 1, knots, dtype=torch.float64)
    x = _at_levels(source.sort(dim=0).values, levels)  # (K, D)
    y = _at_levels(target.sort(dim=0).values, levels)
    # a constant (dead) unit has no range to put knots on: a unit-wide one around its value, mapped as a shift
    spread = (levels - 0.5).unsqueeze(1)
    mean_a, shift = source.mean(dim=0), target.mean(dim=0) - source.mean(dim=0)
    x = torch.where(dead, mean_a + spread, x)
    y = torch.where(dead, mean_a + spread + shift, y)
    # monotone also after rounding to float32
    x, y = torch.cummax(x.float(), dim=0).values, torch.cummax(y.float(), dim=0).values
    return QuantileMap(omega=torch.where(dead, torch.ones_like(omega), omega), beta=beta, dead=dead,
                       knots=x, values=y, **bounds)
