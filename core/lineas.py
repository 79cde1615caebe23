"""LinEAS: the per-unit affine maps of every site trained JOINTLY, end to end, with a distributional loss.

Rodriguez et al., "LinEAS: End-to-end Learning of Activation Steering with a Distributional Loss" (NeurIPS 2025), the
AcT authors' follow-up. Linear-AcT fits each site on its own (ACT_SPEC.md section 5); LinEAS instead runs the source
inputs through the model with ALL maps applied and backpropagates one loss: the sum over sites of the 1-D Wasserstein
distance per unit between the steered source activations and the (unsteered) target activations. Sparsity penalties
(L1 per unit, a group penalty per site, both applied by proximal steps) switch off the units and sites that do not
pay for themselves. The result is an ordinary affine `Transport`: every host applies it unchanged.

Semantics (decided here, ACT_SPEC.md sections 1 and 3): the loss compares POOLED activations, one sample per input
(the transport's ``pooling``, the mean over real tokens by default), like the AcT estimators; the maps act per token,
in training as when steering. With a ``support`` other than all reals they move, in training too, only the tokens
inside each site's range (set by the support rule from the pooled training inputs reaching the site at that step),
so the maps are trained for the way the engine applies them; the saved ranges come from all source inputs reaching
each site with the trained maps upstream, as for sequential Linear-AcT.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .estimators import Support, _dead_units, _support_range
from .grad_scope import grad_enabled
from .lineas_parts import ProximalAdam, SiteMaps, StopForward, W2Loss, schedule
from .record import ForwardContext, check_fit_inputs
from .transport import Transport, UnitMap

logger = logging.getLogger(__name__)

Runner = Callable[[Sequence[Any], ForwardContext], Any]


@dataclasses.dataclass(frozen=True)
class LineasConfig:
    """How LinEAS trains (the defaults are provisional, measured on two concepts: benchmarks/RESULTS.md section 7).

    Attributes:
        steps: the most optimisation steps (one forward and backward pass over the training source inputs each).
        lr: Adam's peak learning rate on the dimensionless parameters (``omega - 1`` and ``beta`` / target std).
        l1: L1 penalty on the parameters (mean over all units): units whose move does not lower the loss by about
            this much per unit of move stay the identity.
        group: group penalty per site (mean over sites of the RMS of its parameters): whole sites switch off.
        held_out: fraction of the source inputs held out for early stopping (at least 4 inputs; none below 8).
        eval_every: steps between held-out evaluations.
        patience: held-out evaluations without improvement before stopping.
        warmup: fraction of ``steps`` with a linearly rising learning rate (then cosine decay to 0).
        seed: for the held-out split.
    """

    steps: int = 150
    lr: float = 0.1
    l1: float = 0.5
    group: float = 0.5
    held_out: float = 0.25
    eval_every: int = 5
    patience: int = 10
    warmup: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "eval_every", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LinEAS `{name}` must be a positive integer, got {value!r}")
        for name in ("lr", "l1", "group", "held_out", "warmup"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"LinEAS `{name}` must be a number >= 0, got {value!r}")
        if self.lr <= 0 or self.held_out >= 1 or self.warmup >= 1:
            raise ValueError(f"LinEAS needs lr > 0, held_out < 1 and warmup < 1; got {self}")


def lineas_config(options: dict[str, Any] | LineasConfig | None) -> LineasConfig:
    """A `LineasConfig` from a dict of its fields (None: the defaults); unknown names are refused with the list."""
    if options is None or isinstance(options, LineasConfig):
        return options or LineasConfig()
    known = [f.name for f in dataclasses.fields(LineasConfig)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"Unknown LinEAS option(s) {unknown}; the options are: {', '.join(known)}")
    return LineasConfig(**options)


def _split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    if n < 8 or fraction == 0:
        return list(range(n)), []
    k = max(4, round(n * fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[k:]), sorted(perm[:k])


def fit_lineas(
    model: torch.nn.Module,
    sites: Sequence[str],
    source: Sequence[Any],
    target: Sequence[Any],
    *,
    run: Runner,
    pooling: str = "mean",
    support: Support = "observed",
    config: LineasConfig | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    model_info: dict[str, Any] | None = None,
    description: str = "",
    log_summary: bool = True,
) -> Transport:
    """Train LinEAS maps at ``sites`` from source to target inputs (see the module docstring).

    Args:
        model, sites, source, target, run, pooling, progress, model_info, description, log_summary: as for
            `actsteer.core.fit` (``run(items, ctx)`` runs the model on a list of items; here it is called on source
            items only, or target items only, and with autograd on).
        support: where the maps apply (in training too): ``"observed"`` (default), ``"all"``, or a quantile band.
        config: a `LineasConfig` (the defaults need no tuning).
        batch_size: items per forward call; None = all at once (cheapest). With batches, a step runs the training
            inputs twice: once without autograd to get the loss's gradient with respect to the pooled activations,
            then batch by batch with autograd for that gradient's product with each batch (exact, in the memory of
            one batch); the support ranges then come from the previous pass over all batches.

    Returns:
        A `Transport` with ``method="lineas"`` and ``mode="end-to-end"`` holding only the sites the penalties kept,
        in execution order; ``extra["fit"]`` records the cost (``forward_calls``, ``backward_calls``, ``seconds``)
        and the training (``steps_run``, ``best_step``, losses, ``units_moved``).

    Raises:
        ValueError: too few inputs, or every site pruned (lower ``l1``/``group``).
        RuntimeError: a site did not run.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(2, 2), torch.nn.Identity())
        >>> g = torch.Generator().manual_seed(0)
        >>> source, target = list(torch.randn(32, 2, generator=g)), list(3 + torch.randn(32, 2, generator=g))
        >>> t = fit_lineas(model, ["0", "2"], source, target, run=lambda items, ctx: model(torch.stack(items)),
        ...                progress=False, config=LineasConfig(steps=40))
        >>> t.method, t.mode, bool((t["0"].beta > 1).all())
        ('lineas', 'end-to-end', True)
    """
    cfg = config or LineasConfig()
    sites, source, target = check_fit_inputs(sites, source, target, pooling=pooling, batch_size=batch_size)
    job = _Fit(model, sites, run, pooling, support, cfg, batch_size)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        # out of a host's inference mode (ComfyUI runs nodes in it): the loss and the parameters need autograd too
        with torch.inference_mode(False), job.maps:
            transport = job.train(source, target, progress)
    except RuntimeError as err:
        if "modified by an inplace operation" not in str(err):
            raise
        raise RuntimeError(
            f"LinEAS cannot backpropagate through {type(model).__name__}: its forward updates activations in place "
            "(ComfyUI's FLUX blocks do `img += ...`), which autograd cannot go through. Use method 'linear-act' or "
            "'quantile' here, or fit LinEAS on the diffusers pipeline (actsteer.fit_pipeline) and translate it with "
            "actsteer.to_comfy"
        ) from err
    finally:
        for module, mode in modes.items():
            module.training = mode
    fit = transport.extra["fit"]
    if log_summary:
        logger.info("actsteer: fitted lineas on %d of %d sites (%d units moved) from %d source / %d target inputs in "
                    "%.1fs: %d steps, best at %d, %d forward and %d backward calls", fit["sites_kept"],
                    fit["sites_given"], fit["units_moved"], len(source), len(target), fit["seconds"], fit["steps_run"],
                    fit["best_step"], fit["forward_calls"], fit["backward_calls"])
    return transport.replace(model=model_info or {"class": type(model).__name__}, description=description)


class _Fit:
    """One LinEAS fit: the hooks, the forward passes and the optimisation loop."""

    def __init__(self, model, sites, run, pooling, support, cfg, batch_size) -> None:
        self.model, self.run, self.cfg, self.batch_size, self.support = model, run, cfg, batch_size, support
        self.ctx = ForwardContext()
        self.maps = SiteMaps(model, sites, pooling, self.ctx)
        self.stats = {"forward_calls": 0, "backward_calls": 0}

    def chunks(self, items: list) -> list[list]:
        size = len(items) if self.batch_size is None else self.batch_size
        return [items[i : i + size] for i in range(0, len(items), size)]

    def forward(self, items: list) -> dict[str, torch.Tensor]:
        """One pass over ``items`` (batch by batch): the pooled rows per site, and ``maps.inputs`` of all batches."""
        outputs, inputs = [], []
        for chunk in self.chunks(items):
            self.maps.reset()
            self.ctx.mask, self.ctx.rows, self.ctx.active = None, None, True
            self.stats["forward_calls"] += 1
            try:
                self.run(chunk, self.ctx)
            except StopForward:
                pass
            missing = [s for s in self.maps.sites if s not in self.maps.sums]
            if missing:
                raise RuntimeError(f"Site(s) {', '.join(map(repr, missing[:5]))} did not run during the forward pass; "
                                   "check that they are on the model's forward path for these inputs")
            outputs.append(self.maps.pooled())
            inputs.append(self.maps.pooled_inputs())
        self.last_inputs = {s: torch.cat([p[s] for p in inputs]) for s in inputs[0]}
        return {s: torch.cat([p[s] for p in outputs]) for s in outputs[0]}

    def loss(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.losses[s](pooled[s]) for s in self.losses]).mean()

    def gradients(self, train: list) -> tuple[float, list[torch.Tensor]]:
        thetas = list(self.thetas.values())
        if len(self.chunks(train)) == 1:
            self.maps.update_ranges = True  # the support follows the training inputs as the maps change them
            loss = self.loss(self.forward(train))
            self.stats["backward_calls"] += 1
            return float(loss.detach()), list(torch.autograd.grad(loss, thetas))
        self.maps.update_ranges = False
        with torch.no_grad():
            pooled = self.forward(train)
        if self.support != "all":
            self.maps.set_ranges(self.last_inputs)
        leaves = {s: v.detach().requires_grad_(True) for s, v in pooled.items()}
        loss = self.loss(leaves)
        grad_pooled = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        total = [torch.zeros_like(t) for t in thetas]
        start = 0
        for chunk in self.chunks(train):
            part = self.forward(chunk)
            rows = slice(start, start + part[next(iter(part))].shape[0])
            start = rows.stop
            surrogate = sum((part[s] * grad_pooled[s][rows]).sum() for s in part)
            for acc, g in zip(total, torch.autograd.grad(surrogate, thetas, allow_unused=True)):
                if g is not None:
                    acc.add_(g)
            self.stats["backward_calls"] += 1
        return float(loss.detach()), total

    def train(self, source: list, target: list, progress: bool) -> Transport:
        cfg, maps = self.cfg, self.maps
        t0 = time.perf_counter()
        train_idx, val_idx = _split(len(source), cfg.held_out, cfg.seed)
        train, val = [source[i] for i in train_idx], [source[i] for i in val_idx]
        if not val:
            logger.warning("actsteer: LinEAS with %d source inputs holds none out: it stops on the training loss",
                           len(source))
        maps.theta, maps.record, maps.stop_after = None, "output", None
        with torch.no_grad():
            targets = {s: v.detach() for s, v in self.forward(target).items()}
            order, once = list(maps.order), max(maps.counts.values()) <= 1
            # the unsteered source mean per unit: the center the maps scale around
            centers = {s: v.detach().mean(dim=0) for s, v in self.forward(source).items()}
        self.losses = {s: W2Loss(targets[s]) for s in order}
        scale = {s: targets[s].double().std(dim=0).clamp_min(1e-12).float() if targets[s].shape[0] > 1
                 else torch.ones(targets[s].shape[1], device=targets[s].device) for s in order}
        maps.scale, maps.center = scale, {s: centers[s].float() for s in order}
        self.thetas = {s: torch.zeros(2, targets[s].shape[1], device=targets[s].device, requires_grad=True)
                       for s in order}
        opt = ProximalAdam(self.thetas, lr=cfg.lr, l1=cfg.l1, group=cfg.group)
        maps.theta, maps.support = self.thetas, self.support
        maps.stop_after = order[-1] if once and self.batch_size is None else None
        warmup = max(1, round(cfg.warmup * cfg.steps))
        best = {"loss": float("inf"), "step": 0, "theta": {s: t.detach().clone() for s, t in self.thetas.items()},
                "ranges": {}}
        history: list[dict[str, float]] = []
        bad_evals, step = 0, -1
        bar = tqdm(range(cfg.steps), desc="actsteer: LinEAS", disable=not progress, leave=False)
        with grad_enabled(self.model, maps.sites):
            for step in bar:
                loss, grads = self.gradients(train)
                opt.step(dict(zip(self.thetas, grads)), schedule(step, cfg.steps, warmup))
                if (step + 1) % cfg.eval_every and step + 1 != cfg.steps:
                    continue
                maps.update_ranges = False
                if val:
                    with torch.no_grad():
                        held = float(self.loss(self.forward(val)))
                else:
                    held = loss
                history.append({"step": step + 1, "train": loss, "held_out": held, "penalty": opt.penalty()})
                bar.set_postfix(train=f"{loss:.3f}", held_out=f"{held:.3f}")
                if len(history) == 1 or held < best["loss"] - 1e-6 * abs(best["loss"]):
                    best = {"loss": held, "step": step + 1, "ranges": dict(maps.ranges),
                            "theta": {s: t.detach().clone() for s, t in self.thetas.items()}}
                    bad_evals = 0
                else:
                    bad_evals += 1
                    if bad_evals >= cfg.patience:
                        break
        bar.close()
        # the saved support: pooled source activations reaching each site with the best maps upstream (no grad)
        maps.theta, maps.record = best["theta"], "input"
        maps.ranges, maps.update_ranges = best["ranges"], not best["ranges"]
        with torch.no_grad():
            inputs = self.forward(source)
        unit_maps, moved = {}, 0
        for s in order:
            theta = best["theta"][s].double().cpu()
            if not bool(theta.any()):
                continue  # the group penalty switched this site off
            moved += int((theta != 0).any(dim=0).sum())
            a, b = inputs[s].double().cpu(), targets[s].double().cpu()
            lo, hi = _support_range(a.sort(dim=0).values, self.support)
            t_lo, t_hi = _support_range(b.sort(dim=0).values, self.support)
            beta = theta[1] * scale[s].double().cpu() - theta[0] * centers[s].double().cpu()
            unit_maps[s] = UnitMap(omega=1 + theta[0], beta=beta, lo=lo, hi=hi, target_lo=t_lo, target_hi=t_hi,
                                   dead=_dead_units(a, b) & (theta != 0).any(dim=0))
        if not unit_maps:
            raise ValueError(
                f"LinEAS moved no unit: the sparsity penalties (l1={cfg.l1}, group={cfg.group}) switched every site "
                "off; lower them (LineasConfig(l1=..., group=...))"
            )
        fit_stats = {
            **self.stats, "seconds": round(time.perf_counter() - t0, 3), "steps_run": step + 1,
            "best_step": best["step"], "held_out_loss": best["loss"], "history": history[-20:], "units_moved": moved,
            "sites_kept": len(unit_maps), "sites_given": len(order), "n_train": len(train), "n_held_out": len(val),
            "batch_size": self.batch_size, "config": dataclasses.asdict(cfg),
        }
        return Transport(unit_maps, method="lineas", pooling=maps.pooling, support=self.support, mode="end-to-end",
                         n_source=len(source), n_target=len(target), extra={"fit": fit_stats})
