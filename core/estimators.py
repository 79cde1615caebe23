"""Estimators: pooled source/target activations ``(n, D)``/``(m, D)`` -> a per-unit `UnitMap`.

One small function per method behind a registry; all numerics in float64 (ACT_SPEC.md section 2).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, Union

import torch

from .quantile import DEFAULT_KNOTS, quantile_map
from .transport import UnitMap

logger = logging.getLogger(__name__)

Method = Literal["linear-act", "quantile", "mean-act", "gaussian-ot", "actadd", "caa", "itic", "aura", "lineas"]
Support = Union[Literal["observed", "all"], Sequence[float]]

# A source unit whose spread is below this fraction of the data's scale is treated as constant ("dead").
_DEAD_RTOL = 1e-6

_Estimator = Callable[..., "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]
ESTIMATORS: dict[str, _Estimator] = {}

# Paper names and common spellings accepted for each method.
_ALIASES = {
    "linear_ot": "linear-act", "linear": "linear-act", "linearact": "linear-act",
    "mean_ot": "mean-act", "mean": "mean-act", "meanact": "mean-act",
    "gaussian_ot": "gaussian-ot", "gaussian": "gaussian-ot",
    "iti-c": "itic", "iti_c": "itic", "act-add": "actadd",
    "quantile-act": "quantile", "quantile_act": "quantile", "monotone": "quantile",
    "linear-eas": "lineas", "lin-eas": "lineas",
}

# Methods that are not a per-site estimator: they train every site at once through the model (`actsteer.core.fit`).
FIT_METHODS = ("lineas",)


# Per-method defaults when the caller does not choose (one owner for fit_lm, fit_pipeline and the ComfyUI
# Learn node): the paper's pooling, and the support that keeps strength 1 safe for the transport maps versus
# the additive baselines' usual all-reals application (their strength is an unbounded multiplier).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear-act": {"pooling": "mean", "support": "observed"},
    "quantile": {"pooling": "mean", "support": "observed"},
    "lineas": {"pooling": "mean", "support": "observed"},
    "mean-act": {"pooling": "mean", "support": "observed"},
    "gaussian-ot": {"pooling": "mean", "support": "observed"},
    "actadd": {"pooling": "last", "support": "all"},
    "caa": {"pooling": "last", "support": "all"},
    "itic": {"pooling": "last", "support": "all"},
    "aura": {"pooling": "max", "support": "all"},
}


def _register(name: str) -> Callable[[_Estimator], _Estimator]:
    def deco(fn: _Estimator) -> _Estimator:
        ESTIMATORS[name] = fn
        return fn

    return deco


def canonical_method(method: str) -> str:
    """Normalise a method name (``"Linear-AcT"`` -> ``"linear-act"``); raise with the list when unknown."""
    if not isinstance(method, str):
        raise TypeError(f"`method` must be a method name such as 'linear-act', got {type(method).__name__}")
    key = method.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in ESTIMATORS and key not in FIT_METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of: {', '.join([*ESTIMATORS, *FIT_METHODS])}")
    return key


def method_defaults(method: str, *, spatial: bool = False) -> dict[str, Any]:
    """The default ``pooling`` and ``support`` of an estimation method (a new dict; aliases accepted).

    Args:
        method: a method name or alias (see `estimate`).
        spatial: True where inputs are images or prompt tokens of a diffusion model (`fit_pipeline`, the
            ComfyUI Learn node): "last token" has no meaning there, so those methods pool the mean instead.

    Raises:
        ValueError: an unknown method (the message lists the known ones).

    Example:
        >>> method_defaults("Linear-AcT")
        {'pooling': 'mean', 'support': 'observed'}
        >>> method_defaults("caa"), method_defaults("caa", spatial=True)
        ({'pooling': 'last', 'support': 'all'}, {'pooling': 'mean', 'support': 'all'})
    """
    defaults = dict(METHOD_DEFAULTS[canonical_method(method)])
    if spatial and defaults["pooling"] == "last":
        defaults["pooling"] = "mean"
    return defaults


def quantiles(sorted_x: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Linear-interpolated quantiles of each column of an already sorted ``(N, D)`` tensor.

    Uses position ``q * (N - 1)`` like ``torch.quantile(..., interpolation="linear")``, without its
    2**24-element limit. Returns ``(len(qs), D)``.
    """
    n = sorted_x.shape[0]
    pos = qs.to(sorted_x.dtype).clamp(0, 1) * (n - 1)
    return _interp_rows(sorted_x, pos)


def _interp_rows(sorted_x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    n = sorted_x.shape[0]
    lo = pos.floor().long().clamp(0, n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo.to(pos.dtype)).unsqueeze(-1)
    return sorted_x[lo] * (1 - frac) + sorted_x[hi] * frac


def _monotone_coupling(sorted_a: torch.Tensor, sorted_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact 1-D optimal (monotone) coupling of two empirical distributions with n and m atoms.

    The unit interval is cut at every i/n and j/m; each piece pairs one source atom with one target atom
    and weighs its length. Returns ``(a_pairs, b_pairs, weights)`` with shapes ``(K, D)``, ``(K, D)``, ``(K,)``,
    ``K <= n + m - 1``; with n == m it is ``(sorted_a, sorted_b, 1/n)``.
    """
    n, m = sorted_a.shape[0], sorted_b.shape[0]
    if n == m:
        return sorted_a, sorted_b, torch.full((n,), 1.0 / n, dtype=sorted_a.dtype)
    # integer breakpoints on a grid of n*m steps, so there is no rounding
    ends = torch.unique(torch.cat([torch.arange(1, n + 1) * m, torch.arange(1, m + 1) * n]))
    starts = torch.cat([torch.zeros(1, dtype=ends.dtype), ends[:-1]])
    weights = (ends - starts).to(sorted_a.dtype) / (n * m)
    return sorted_a[starts // m], sorted_b[starts // n], weights


def _dead_units(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Units whose source spread is ~0 relative to the scale of the data (ACT_SPEC.md section 2)."""
    std_a = a.std(dim=0)
    scale = b.std(dim=0) + a.mean(dim=0).abs() + b.mean(dim=0).abs()
    return std_a <= _DEAD_RTOL * scale


@_register("linear-act")
def _linear_act(a: torch.Tensor, b: torch.Tensor, **_: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear-AcT: least squares of sorted target on sorted source, per unit.

    ``omega = sum(a~ b~) / sum(a~^2)`` (the denominator is the SOURCE spread), ``beta = m_b - omega m_a``,
    with ``a~ = a_(i) - m_a``, ``b~ = b_(i) - m_b`` over the sorted pairs. With unequal counts the pairs are
    the exact monotone coupling of the two samples, weighted (the same answer as replicating both samples
    to a common count). ``m_a``/``m_b`` are the sample means, so the transported source mean equals the
    target mean.
    """
    qa, qb, w = _monotone_coupling(a.sort(dim=0).values, b.sort(dim=0).values)
    w = w.unsqueeze(1)
    ca = qa - a.mean(dim=0)  # the coupling's weighted means are the sample means
    cb = qb - b.mean(dim=0)
    dead = _dead_units(a, b)
    denom = (w * ca * ca).sum(dim=0)
    omega = torch.where(dead, torch.ones_like(denom), (w * ca * cb).sum(dim=0) / torch.where(dead, torch.ones_like(denom), denom))
    omega = omega.clamp(min=0.0)  # >= 0 in exact arithmetic (Chebyshev); guard rounding
    beta = b.mean(dim=0) - omega * a.mean(dim=0)
    return omega, beta, dead


@_register("mean-act")
def _mean_act(a: torch.Tensor, b: torch.Tensor, **_: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean-AcT: ``omega = 1``, ``beta = m_b - m_a`` (OT between equal-variance Gaussians)."""
    beta = b.mean(dim=0) - a.mean(dim=0)
    return torch.ones_like(beta), beta, torch.zeros_like(beta, dtype=torch.bool)


@_register("gaussian-ot")
def _gaussian_ot(a: torch.Tensor, b: torch.Tensor, **_: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian OT: ``omega = s_b / s_a`` (unbiased stds), ``beta = m_b - omega m_a``; dead units shift."""
    dead = _dead_units(a, b)
    s_a, s_b = a.std(dim=0), b.std(dim=0)
    omega = torch.where(dead, torch.ones_like(s_a), s_b / torch.where(dead, torch.ones_like(s_a), s_a))
    return omega, b.mean(dim=0) - omega * a.mean(dim=0), dead


@_register("actadd")
def _actadd(a: torch.Tensor, b: torch.Tensor, *, pair: int = 0, **_: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ActAdd: the difference of ONE source/target pair (row ``pair`` of each), added: ``omega = 1``."""
    if not -min(a.shape[0], b.shape[0]) <= pair < min(a.shape[0], b.shape[0]):
        raise ValueError(f"`pair={pair}` is out of range for {a.shape[0]} source and {b.shape[0]} target rows")
    beta = b[pair] - a[pair]
    return torch.ones_like(beta), beta, torch.zeros_like(beta, dtype=torch.bool)


@_register("caa")
def _caa(a: torch.Tensor, b: torch.Tensor, **_: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CAA / ITI-M: difference of means added, ``omega = 1`` (usually on last-token pooling)."""
    return _mean_act(a, b)


@_register("itic")
def _itic(
    a: torch.Tensor, b: torch.Tensor, *, l2: float = 1e-2, max_iter: int = 200, **_: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ITI-c: shift along the direction ``u`` of a logistic probe separating source from target,
    scaled by the std of all activations projected on ``u``: ``beta = std(x @ u) * u``, ``omega = 1``.
    """
    x = torch.cat([a, b])
    y = torch.cat([torch.zeros(a.shape[0]), torch.ones(b.shape[0])]).to(x)
    mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-12)
    z = (x - mean) / std  # standardise so the L2 penalty treats units alike
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    c = torch.zeros((), dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + c, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    direction = w.detach() / std  # back to the raw activation space
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        # e.g. a site where every input looks the same (the last token of the first layer): nothing to shift
        logger.warning("itic: the linear probe found no direction separating source from target; zero shift")
        zero = torch.zeros(x.shape[1], dtype=x.dtype)
        return torch.ones_like(zero), zero, torch.zeros_like(zero, dtype=torch.bool)
    u = direction / norm
    beta = (x @ u).std() * u
    return torch.ones_like(beta), beta, torch.zeros_like(beta, dtype=torch.bool)


@_register("aura")
def _aura(a: torch.Tensor, b: torch.Tensor, **_: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AurA: dampen each unit by its AUROC ``r`` for the source class: ``omega = 1 - 2(r - 0.5)`` where
    ``r > 0.5``, else 1; ``beta = 0``. (Usually on max pooling.)
    """
    auroc = source_auroc(a, b)
    omega = torch.where(auroc > 0.5, 1 - 2 * (auroc - 0.5), torch.ones_like(auroc))
    return omega, torch.zeros_like(omega), torch.zeros_like(omega, dtype=torch.bool)


@_register("quantile")
def _quantile(a: torch.Tensor, b: torch.Tensor, **_: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The quantile map's affine part: Linear-AcT's fit (the tails' slope and the affine summary); `estimate` adds
    the knots (`actsteer.core.quantile.quantile_map`)."""
    return _linear_act(a, b)


def source_auroc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-unit AUROC of telling source (positive) from target by the raw value: P(a > b) + P(a == b) / 2."""
    sb = b.sort(dim=0).values.T.contiguous()  # (D, m)
    at = a.T.contiguous()  # (D, n)
    below = torch.searchsorted(sb, at, side="left")
    upto = torch.searchsorted(sb, at, side="right")
    wins = below.to(a.dtype) + 0.5 * (upto - below).to(a.dtype)
    return wins.sum(dim=1) / (a.shape[0] * b.shape[0])


def _check_inputs(name: str, x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"`{name}` must have shape (n, D) (one pooled row per input), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"`{name}` must be a floating point tensor, got {x.dtype}")
    if x.shape[0] < 2:
        raise ValueError(f"`{name}` needs at least 2 rows to estimate a distribution, got {x.shape[0]}; add more inputs")
    x = x.detach().to(device="cpu", dtype=torch.float64)
    bad = ~torch.isfinite(x).all(dim=0)
    if bad.any():
        idx = bad.nonzero().flatten().tolist()
        shown = ", ".join(map(str, idx[:8])) + (", ..." if len(idx) > 8 else "")
        raise ValueError(
            f"`{name}` contains NaN/Inf in {len(idx)} of {x.shape[1]} units (units {shown}); the model produced "
            "non-finite activations: run it in float32, or check the inputs"
        )
    return x


def _support_range(sorted_x: torch.Tensor, support: Support) -> tuple[torch.Tensor, torch.Tensor]:
    d = sorted_x.shape[1]
    if isinstance(support, str):
        if support == "all":
            inf = torch.full((d,), math.inf, dtype=torch.float64)
            return -inf, inf
        if support == "observed":
            return sorted_x[0], sorted_x[-1]
        raise ValueError(f"Unknown support {support!r}; use 'observed', 'all', or a quantile band (q_lo, q_hi)")
    band = list(support)
    if len(band) != 2 or not 0.0 <= band[0] < band[1] <= 1.0:
        raise ValueError(f"A quantile band support must be (q_lo, q_hi) with 0 <= q_lo < q_hi <= 1, got {support!r}")
    lo, hi = quantiles(sorted_x, torch.tensor(band, dtype=torch.float64))
    return lo, hi


def estimate(
    source: torch.Tensor,
    target: torch.Tensor,
    method: Method | str = "linear-act",
    support: Support = "observed",
    **options: Any,
) -> UnitMap:
    """Estimate a per-unit transport from pooled source to pooled target activations.

    Args:
        source (`torch.Tensor` of shape `(n, D)`): one pooled activation row per source input.
        target (`torch.Tensor` of shape `(m, D)`): one row per target input; ``m`` may differ from ``n``.
        method: ``"linear-act"`` (the paper's Linear-AcT, default), ``"quantile"`` (the exact monotone 1-D map per
            unit, a `QuantileMap`), ``"mean-act"``, ``"gaussian-ot"``, or the baselines ``"actadd"``, ``"caa"``,
            ``"itic"``, ``"aura"`` (ACT_SPEC.md section 2). ``"lineas"`` is not a per-site estimator: it trains all
            sites through the model (`actsteer.core.fit`).
        support: where the map applies: ``"observed"`` (source min..max, Q_o, default: safe at strength 1),
            ``"all"`` (all reals, Q_inf), or a quantile band ``(q_lo, q_hi)`` of the source.
        **options: method options (``pair`` for actadd, ``l2``/``max_iter`` for itic, ``knots`` for quantile:
            the number of quantile levels, default 8).

    Returns:
        A `UnitMap` with float32 tensors of shape ``(D,)`` (a `QuantileMap` for ``"quantile"``).

    Raises:
        ValueError: on NaN/Inf, fewer than 2 rows, mismatched widths, or an unknown method/support.

    Example:
        >>> import torch, actsteer
        >>> g = torch.Generator().manual_seed(0)
        >>> src, tgt = torch.randn(1000, 3, generator=g), 2 + 3 * torch.randn(1000, 3, generator=g)
        >>> m = actsteer.estimate(src, tgt, support="all")
        >>> bool(((m.omega - 3).abs() < 0.15).all())  # omega ~ sigma_target / sigma_source = 3
        True
    """
    name = canonical_method(method)
    if name in FIT_METHODS:
        raise ValueError(
            f"{name!r} trains every site at once through the model, not one site from pooled activations: use "
            f"actsteer.fit_lm/fit_pipeline(..., method={name!r}) or actsteer.core.fit(..., method={name!r})"
        )
    options = dict(options)
    knots = options.pop("knots", DEFAULT_KNOTS) if name == "quantile" else None
    if knots is not None and (isinstance(knots, bool) or not isinstance(knots, int) or knots < 2):
        raise ValueError(f"`knots` must be an integer >= 2, got {knots!r}")
    a, b = _check_inputs("source", source), _check_inputs("target", target)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"`source` has {a.shape[1]} units but `target` has {b.shape[1]}; they must come from the same site")
    omega, beta, dead = ESTIMATORS[name](a, b, **options)
    sa, sb = a.sort(dim=0).values, b.sort(dim=0).values
    lo, hi = _support_range(sa, support)
    target_lo, target_hi = _support_range(sb, support)
    if dead.any():
        logger.warning(
            "%s: %d of %d units have (near-)constant source values; mapped as a pure mean shift instead of "
            "dividing by ~0", name, int(dead.sum()), dead.numel(),
        )
    bounds = {"lo": lo, "hi": hi, "target_lo": target_lo, "target_hi": target_hi}
    if name == "quantile":
        return quantile_map(a, b, omega=omega, beta=beta, dead=dead, bounds=bounds, knots=knots)
    return UnitMap(omega=omega, beta=beta, dead=dead, **bounds)
