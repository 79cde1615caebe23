"""The parts of a LinEAS fit (`actsteer.core.lineas`): differentiable site hooks, the distributional loss, and the
proximal Adam step that makes the maps sparse.

Parameters are dimensionless: per site a ``(2, D)`` tensor ``theta``, and the map
``T(a) = a + theta[0] (a - center) + theta[1] scale`` (``center`` = the unsteered source mean, ``scale`` = the
target's std per unit): ``theta[0]`` scales around the source mean and ``theta[1]`` shifts it, which decouples the
two (better conditioned than ``omega``/``beta``), one learning rate and one penalty fit every site whatever its
activations' scale, and ``theta = 0`` is the identity. As a `UnitMap`: ``omega = 1 + theta[0]``,
``beta = theta[1] scale - theta[0] center``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch

from .pooling import pool
from .record import ForwardContext, record_sites


class StopForward(Exception):
    """Raised by a site hook once the last site a pass needs was recorded: the rest of the forward is not needed."""


class SiteMaps:
    """Forward hooks that apply each site's affine map (differentiably) and pool each site's activations.

    ``theta`` None applies nothing (the target pass). ``record="output"`` pools what the site passes on (after its
    own map, for the loss), ``"input"`` what the map receives (for the support ranges). Each pooled site is the mean
    of its active calls in the pass (``ctx.active``, ``ctx.rows``, ``ctx.mask`` as for `Recorder`).

    With a ``support`` rule other than all reals, maps move only the activations inside ``[lo, hi]``, as the
    engine will apply them: with ``update_ranges`` each call's ``lo``/``hi`` come from the pooled inputs of that
    call's rows (the training source inputs) by the support rule, else the last ones are reused (held-out passes).
    """

    def __init__(self, model: torch.nn.Module, sites: Sequence[str], pooling: str, ctx: ForwardContext) -> None:
        self.model = model
        self.sites = list(sites)
        self.pooling = pooling
        self.ctx = ctx
        self.theta: dict[str, torch.Tensor] | None = None
        self.scale: dict[str, torch.Tensor] = {}
        self.center: dict[str, torch.Tensor] = {}
        self.support: Any = "all"
        self.update_ranges = True
        self.ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.record = "output"
        self.stop_after: str | None = None
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.inputs: dict[str, torch.Tensor] = {}  # pooled inputs of the maps (detached), with record="output" too
        self.input_counts: dict[str, int] = {}
        self.order: list[str] = []
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> SiteMaps:
        # no ctx here: maps apply at every call (as when steering); `_add` records only the active ones
        self._stack.enter_context(record_sites(self.model, self.sites, self._on_output))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def reset(self) -> None:
        self.sums, self.counts, self.inputs, self.input_counts = {}, {}, {}, {}

    def pooled(self) -> dict[str, torch.Tensor]:
        return {s: self.sums[s] / self.counts[s] for s in self.sums}

    def pooled_inputs(self) -> dict[str, torch.Tensor]:
        return {s: self.inputs[s] / self.input_counts[s] for s in self.inputs}

    def set_ranges(self, inputs: dict[str, torch.Tensor]) -> None:
        """The support ranges from pooled map inputs ``{site: (N, D)}`` (all the training inputs of a step)."""
        from .estimators import _support_range

        for site, pooled in inputs.items():
            lo, hi = _support_range(pooled.detach().double().cpu().sort(dim=0).values, self.support)
            self.ranges[site] = (lo.float().to(pooled.device), hi.float().to(pooled.device))

    def _on_output(self, site: str, x: torch.Tensor) -> torch.Tensor | None:
        if self.record == "input":
            self._add(site, x)
        elif self.theta is not None and self.support != "all":
            self._add(site, x.detach(), self.inputs, self.input_counts)
        theta = None if self.theta is None else self.theta.get(site)
        new = None
        if theta is not None:
            bounds = self._bounds(site, x) if self.support != "all" else None
            new = steer_affine(x, theta, self.center[site], self.scale[site], bounds)
        if self.record == "output":
            self._add(site, x if new is None else new)
        if site == self.stop_after:
            raise StopForward
        return new

    def _bounds(self, site: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.update_ranges or site not in self.ranges:
            from .estimators import _support_range

            with torch.no_grad():
                rows, mask = self.ctx.rows, self.ctx.mask
                picked = x if rows is None else x[rows.to(x.device)]
                if mask is not None and rows is not None and mask.shape[0] != picked.shape[0]:
                    mask = mask[rows.to(mask.device)]
                pooled = pool(picked.detach(), mask=mask, how=self.pooling)
                lo, hi = _support_range(pooled.double().sort(dim=0).values, self.support)
            self.ranges[site] = (lo.float().to(x.device), hi.float().to(x.device))
        return self.ranges[site]

    def _add(self, site: str, x: torch.Tensor, sums: dict | None = None, counts: dict | None = None) -> None:
        sums = self.sums if sums is None else sums
        counts = self.counts if counts is None else counts
        ctx = self.ctx
        if not ctx.active:
            return
        if ctx.rows is not None:
            x = x[ctx.rows.to(x.device)]
        mask = ctx.mask
        if mask is not None and ctx.rows is not None and mask.shape[0] != x.shape[0]:
            mask = mask[ctx.rows.to(mask.device)]
        pooled = pool(x, mask=mask, how=self.pooling)  # float32, differentiable
        if site not in sums:
            sums[site], counts[site] = pooled, 1
            if site not in self.order:
                self.order.append(site)
        else:
            sums[site] = sums[site] + pooled
            counts[site] += 1


def steer_affine(x: torch.Tensor, theta: torch.Tensor, center: torch.Tensor, scale: torch.Tensor,
                 bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``x + theta[0] (x - center) + theta[1] scale`` on the unit axis, in float32, rounded once to ``x``'s dtype;
    on ``(B, C, H, W)`` the spatial mean is transported and the deviations kept (ACT_SPEC.md section 6). With
    ``bounds`` (lo, hi), values outside ``[lo, hi]`` (the spatial means, for 4-D) are left alone."""
    delta, beta = theta[0], theta[1] * scale - theta[0] * center
    if x.dim() == 4:
        mu = x.float().mean(dim=(2, 3))
        shift = mu * delta + beta
        if bounds is not None:
            shift = torch.where((mu >= bounds[0]) & (mu <= bounds[1]), shift, torch.zeros_like(shift))
        return (x.float() + shift[:, :, None, None]).to(x.dtype)
    xf = x.float()
    moved = torch.addcmul(xf + beta, xf, delta)
    if bounds is not None:
        moved = torch.where((xf >= bounds[0]) & (xf <= bounds[1]), moved, xf)
    return moved.to(x.dtype)


def coupling(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The monotone coupling of n and m sorted samples: ``(source index, target index, weight)`` per piece (K,)."""
    ends = torch.unique(torch.cat([torch.arange(1, n + 1) * m, torch.arange(1, m + 1) * n]))
    starts = torch.cat([torch.zeros(1, dtype=ends.dtype), ends[:-1]])
    return starts // m, starts // n, (ends - starts).double() / (n * m)


class W2Loss:
    """The squared 1-D Wasserstein distance per unit between steered source rows and the target rows of one site,
    divided by the target's variance (scale-free) and averaged over units.

    ``W2^2 = sum_k w_k (a_(i_k) - b_(j_k))^2`` over the monotone coupling of the sorted samples (exact for n != m).
    """

    def __init__(self, target: torch.Tensor) -> None:
        self.target = target.sort(dim=0).values.float()
        var = target.double().var(dim=0) if target.shape[0] > 1 else torch.zeros(target.shape[1], dtype=torch.float64)
        floor = 1e-6 * (var.mean() + target.double().mean(dim=0).pow(2).mean()).clamp_min(1e-12)
        self.inv_var = (1.0 / var.clamp_min(float(floor))).float()
        self._couplings: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, source: torch.Tensor) -> torch.Tensor:
        n = source.shape[0]
        if n not in self._couplings:
            ia, ib, w = coupling(n, self.target.shape[0])
            self._couplings[n] = (ia, ib, w.float())
        ia, ib, w = (t.to(source.device) for t in self._couplings[n])
        target = self.target.to(source.device)
        diff = source.sort(dim=0).values[ia] - target[ib]  # (K, D)
        return (w.unsqueeze(1) * diff.pow(2)).sum(dim=0).mul(self.inv_var.to(source.device)).mean()


class ProximalAdam:
    """Adam steps followed by the proximal steps of ``l1 * mean|theta| + group * mean over sites of RMS(theta_site)``.

    The proximal operators use Adam's diagonal metric ``P = sqrt(v_hat) + eps``: soft-thresholding by
    ``lr * c / P`` per coordinate (L1), then shrinking each site's whole ``theta`` towards 0 by
    ``lr * c_site / (mean(P) * ||theta||)`` (group lasso; exactly 0 when below the threshold), as in LinEAS's
    Algorithm 1 (Rodriguez et al., NeurIPS 2025) with Adam's preconditioning. A fixed point satisfies the plain
    optimality condition ``0 in grad + penalty subgradient`` whatever the metric; ``v`` forgets fast (``beta2 = 0.99``)
    so that ``P`` follows the current gradients and coordinates that stop paying reach exactly 0.
    """

    def __init__(self, thetas: dict[str, torch.Tensor], *, lr: float, l1: float, group: float,
                 betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-12) -> None:
        self.thetas = thetas
        self.lr, self.betas, self.eps = lr, betas, eps
        total = sum(t.numel() for t in thetas.values())
        self.c1 = l1 / total
        self.cg = {s: group / (len(thetas) * math.sqrt(t.numel())) for s, t in thetas.items()}
        self.m = {s: torch.zeros_like(t) for s, t in thetas.items()}
        self.v = {s: torch.zeros_like(t) for s, t in thetas.items()}
        self.t = 0

    @torch.no_grad()
    def penalty(self) -> float:
        """The value of the sparsity penalty at the current parameters."""
        l1 = sum(float(t.abs().sum()) for t in self.thetas.values()) * self.c1
        return l1 + sum(float(t.norm()) * self.cg[s] for s, t in self.thetas.items())

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor], lr_factor: float = 1.0) -> None:
        self.t += 1
        b1, b2 = self.betas
        lr = self.lr * lr_factor
        for s, theta in self.thetas.items():
            g = grads[s]
            self.m[s].mul_(b1).add_(g, alpha=1 - b1)
            self.v[s].mul_(b2).addcmul_(g, g, value=1 - b2)
            p = (self.v[s] / (1 - b2 ** self.t)).sqrt_().add_(self.eps)
            theta.addcdiv_(self.m[s] / (1 - b1 ** self.t), p, value=-lr)
            if self.c1 > 0:
                theta.copy_(theta.sign() * (theta.abs() - lr * self.c1 / p).clamp_min(0))
            if self.cg[s] > 0:
                norm = theta.norm()
                shrink = (1 - lr * self.cg[s] / (p.mean() * norm.clamp_min(1e-30))).clamp_min(0)
                theta.mul_(shrink)


def schedule(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``: the learning-rate factor."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
