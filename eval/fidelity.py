"""Does a transport move held-out source activations onto the target? (`transport_fidelity`, `support_coverage`).

Held-out inputs are run through the model unsteered and steered; pooled activations are compared per site with
the normalised 1-D Wasserstein distance per unit (ACT_SPEC.md sections 1-3).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..core import ForwardContext, Transport, collect, in_support, record_sites, steer

# A unit whose target spread is below this is treated as having this spread, so W1 / std stays finite.
_MIN_STD = 1e-6


def wasserstein_1d(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Exact 1-D Wasserstein-1 distance per column between two empirical distributions.

    ``W1 = integral over q in [0, 1] of |F_source^-1(q) - F_target^-1(q)|``, computed on the common refinement of
    the two step quantile functions (so ``n != m`` is exact, no interpolation).

    Args:
        source (`torch.Tensor` of shape `(n, D)`): samples of the source, one row per input.
        target (`torch.Tensor` of shape `(m, D)`): samples of the target.

    Returns:
        `torch.Tensor` of shape `(D,)`, float64.

    Example:
        >>> wasserstein_1d(torch.tensor([[0.0], [1.0]]), torch.tensor([[2.0], [3.0]])).tolist()
        [2.0]
    """
    a = torch.as_tensor(source).double().sort(dim=0).values
    b = torch.as_tensor(target).double().sort(dim=0).values
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(
            f"Expected (n, D) and (m, D) samples with the same D, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    n, m = a.shape[0], b.shape[0]
    # breakpoints i/n and j/m on an integer grid of n*m steps, so there is no rounding
    ends = torch.unique(torch.cat([torch.arange(1, n + 1) * m, torch.arange(1, m + 1) * n]))
    starts = torch.cat([torch.zeros(1, dtype=ends.dtype), ends[:-1]])
    weights = (ends - starts).double() / (n * m)
    return (weights.unsqueeze(1) * (a[starts // m] - b[starts // n]).abs()).sum(0)


def normalised_w1(source: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over units of ``W1(source_u, target_u) / std(target_u)``: 0 = same distributions, scale-free."""
    std = torch.as_tensor(target).double().std(dim=0).clamp_min(_MIN_STD)
    return float((wasserstein_1d(source, target) / std).mean())


@dataclasses.dataclass(frozen=True)
class SiteFidelity:
    """One site of a `transport_fidelity` report: normalised W1 of source to target, before and after steering."""

    site: str
    before: float
    after: float

    @property
    def ratio(self) -> float:
        """``after / before``: below 1 the transport brought the held-out source closer to the target."""
        return self.after / self.before if self.before > 0 else math.nan


@dataclasses.dataclass(frozen=True)
class FidelityReport:
    """Per-site results of `transport_fidelity`, in the transport's site order."""

    sites: list[SiteFidelity]
    strength: float

    @property
    def mean_before(self) -> float:
        return sum(s.before for s in self.sites) / len(self.sites)

    @property
    def mean_after(self) -> float:
        return sum(s.after for s in self.sites) / len(self.sites)

    @property
    def closer(self) -> int:
        """How many sites end closer to the target than they started."""
        return sum(s.after < s.before for s in self.sites)

    def rows(self) -> list[dict[str, Any]]:
        return [{"site": s.site, "before": s.before, "after": s.after, "ratio": s.ratio} for s in self.sites]


def _runner(model: torch.nn.Module, tokenizer: Any, max_length: int) -> Callable[[Sequence[Any], ForwardContext], Any]:
    if tokenizer is not None:
        from ..hf_integration.lm import make_runner

        return make_runner(model, tokenizer, max_length)

    def run(items: Sequence[Any], ctx: ForwardContext) -> Any:
        return model(torch.stack([torch.as_tensor(x) for x in items]))

    return run


def _batches(items: Sequence[Any], batch_size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), batch_size):
        yield items[i : i + batch_size]


@torch.no_grad()
def _pooled(model, transport: Transport, items, run, batch_size: int, strength: float | None, tokenizer):
    pad = nullcontext() if tokenizer is None else _padding(tokenizer)
    scope = nullcontext() if strength is None else steer(model, transport, strength)
    with pad, scope, collect(model, transport.sites, pooling=transport.pooling) as rec:  # recorder after the hooks
        for chunk in _batches(list(items), batch_size):
            rec.ctx.mask = None
            run(chunk, rec.ctx)
    return rec.pooled()


def _padding(tokenizer):
    from ..hf_integration.lm import padding_ready

    return padding_ready(tokenizer)


def transport_fidelity(
    model: torch.nn.Module,
    transport: Transport,
    held_out_source: Sequence[Any],
    held_out_target: Sequence[Any],
    *,
    tokenizer: Any = None,
    strength: float = 1.0,
    batch_size: int = 32,
    max_length: int = 128,
) -> FidelityReport:
    """Per site: how far pooled held-out source activations are from the target's, unsteered vs steered.

    For each site, pooled activations (the transport's pooling, mean over real tokens for AcT) of the held-out
    target inputs are compared with those of the held-out source inputs, first unsteered (``before``) and then
    with the whole transport attached at ``strength`` (``after``; site l then also sees the maps of the sites
    before it, as when generating). The distance is the normalised 1-D Wasserstein distance, averaged over units:
    ``mean_u W1(source_u, target_u) / std(target_u)`` (`normalised_w1`). A transport that generalises pushes mu to
    nu on data not used for fitting: ``after < before`` at most sites.

    Args:
        model: the model the transport was fitted on (left unchanged).
        transport: a fitted `Transport`.
        held_out_source, held_out_target: inputs NOT used for fitting, at least 2 each: texts (with
            ``tokenizer``) or tensors that ``model`` takes stacked into a batch.
        tokenizer: for text inputs (a Hugging Face tokenizer; padding is masked out of the pooling).
        strength: the strength of the "after" measurement.
        batch_size: inputs per forward pass.
        max_length: texts are truncated to this many tokens.

    Returns:
        A `FidelityReport`: ``sites`` (each with ``before``, ``after``, ``ratio``), ``mean_before``, ``mean_after``.

    Example:
        >>> import torch, actsteer
        >>> model = torch.nn.Sequential(torch.nn.Identity())
        >>> shift = actsteer.Transport({"0": actsteer.UnitMap(torch.ones(2), torch.full((2,), 3.0))})
        >>> g = torch.Generator().manual_seed(0)
        >>> source, target = list(torch.randn(200, 2, generator=g)), list(3 + torch.randn(200, 2, generator=g))
        >>> report = transport_fidelity(model, shift, source, target)
        >>> report.sites[0].before > 2.5, report.sites[0].after < 0.3
        (True, True)
    """
    for name, items in (("held_out_source", held_out_source), ("held_out_target", held_out_target)):
        if isinstance(items, str) or len(items) < 2:
            raise ValueError(f"`{name}` must be a list of at least 2 inputs, got {items!r:.60}")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    run = _runner(model, tokenizer, max_length)
    target = _pooled(model, transport, held_out_target, run, batch_size, None, tokenizer)
    before = _pooled(model, transport, held_out_source, run, batch_size, None, tokenizer)
    after = _pooled(model, transport, held_out_source, run, batch_size, strength, tokenizer)
    sites = [
        SiteFidelity(s, normalised_w1(before[s], target[s]), normalised_w1(after[s], target[s]))
        for s in transport.sites if s in target
    ]
    if not sites:
        raise ValueError("None of the transport's sites ran on these inputs; check the model and the inputs")
    return FidelityReport(sites=sites, strength=float(strength))


@torch.no_grad()
def support_coverage(
    model: torch.nn.Module,
    transport: Transport,
    inputs: Sequence[Any],
    *,
    tokenizer: Any = None,
    strength: float = 1.0,
    batch_size: int = 32,
    max_length: int = 128,
) -> dict[str, float]:
    """Per site, the fraction of per-token activations that the map transports at ``strength``.

    The hook engine applies the support to every token while the maps and ranges are fitted on mean-pooled
    values (ACT_SPEC.md section 3, "per-token" semantics); tokens spread wider than their means, so some are left
    untouched. This measures how many are transported, with the fold's own support test (`UnitMap.fold`: the
    source support ``[lo, hi]`` for a strength >= 0, the target support for the reverse transport at a negative
    strength): each site's input to its map is recorded with the whole transport attached at ``strength`` (so
    upstream sites are steered, as when generating) and only real tokens count (padding is masked).
    ``strength=0`` measures the unsteered model against the source support.

    Args:
        model, transport: as for `transport_fidelity`.
        inputs: texts (with ``tokenizer``) or tensors; typically the source inputs (the target inputs for a
            negative strength).
        tokenizer, strength, batch_size, max_length: as for `transport_fidelity`.

    Returns:
        ``{site: fraction in [0, 1]}`` in the transport's order; 1.0 for a support of all reals.

    Example:
        >>> import torch, actsteer
        >>> model = torch.nn.Sequential(torch.nn.Identity())
        >>> t = actsteer.Transport({"0": actsteer.UnitMap(torch.ones(1), torch.ones(1), lo=torch.zeros(1),
        ...                         hi=torch.ones(1), target_lo=torch.ones(1), target_hi=torch.full((1,), 2.0))})
        >>> x = [torch.tensor([v]) for v in (0.2, 0.5, 0.8, 1.5)]  # source support [0, 1], target support [1, 2]
        >>> support_coverage(model, t, x, strength=1.0), support_coverage(model, t, x, strength=-1.0)
        ({'0': 0.75}, {'0': 0.25})
    """
    ctx = ForwardContext()
    run = _runner(model, tokenizer, max_length)
    folds = {site: transport[site].fold(strength) for site in transport.sites}
    inside_count: dict[str, float] = {}
    total: dict[str, float] = {}

    def on_output(site: str, x: torch.Tensor) -> None:
        if x.dim() == 4:  # (B, C, H, W): the spatial mean per channel is what gets transported
            x = x.mean(dim=(2, 3))
        fm = folds[site].to(x.device, x.dtype)  # the bounds the per-call path compares with, in x's dtype
        ok = in_support(x, fm.lo, fm.hi).float()  # (B, T, D) or (B, D)
        if x.dim() == 3 and ctx.mask is not None and tuple(ctx.mask.shape) == tuple(x.shape[:2]):
            w = ctx.mask.to(x.device, torch.float32).unsqueeze(-1)
            inside_count[site] = inside_count.get(site, 0.0) + float((ok * w).sum())
            total[site] = total.get(site, 0.0) + float(w.sum()) * x.shape[-1]
        else:
            inside_count[site] = inside_count.get(site, 0.0) + float(ok.sum())
            total[site] = total.get(site, 0.0) + float(ok.numel())

    pad = nullcontext() if tokenizer is None else _padding(tokenizer)
    # recorded BEFORE the steering hooks: the site's own map has not been applied yet when we look
    with record_sites(model, transport.sites, on_output, ctx=ctx), pad, steer(model, transport, strength):
        for chunk in _batches(list(inputs), batch_size):
            ctx.mask = None
            run(chunk, ctx)
    return {s: inside_count[s] / total[s] for s in transport.sites if total.get(s)}
