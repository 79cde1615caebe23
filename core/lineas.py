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

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .estimate import Support, _dead_units, _support_range
from .lineas_parts import ProximalAdam, SiteMaps, StopForward, W2Loss, schedule
from .pooling import check_pooling
from .record import ForwardContext
from .sites import iter_site_modules
from .transport import Transport, UnitMap

logger = logging.getLogger(__name__)

Runner = Callable[[Sequence[Any], ForwardContext], Any]


@dataclasses.dataclass(frozen=True)
class LineasConfig:
    """How LinEAS trains (every default was chosen on held-out data, see benchmarks/RESULTS.md "LinEAS").

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
    l1: float = 0.02
    group: float = 0.02
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


@contextlib.contextmanager
def grad_enabled(model: torch.nn.Module, resolved: Sequence[tuple]) -> Iterator[None]:
    """Turn autograd on inside ``model`` (and inside the components holding the sites) for the forward calls made in
    the block, whatever the host does around them: diffusers pipelines run under ``torch.no_grad()`` and ComfyUI
    under ``torch.inference_mode()``; tensors that such a host made in inference mode (a module's inputs) are
    cloned into ordinary ones where they enter, since autograd cannot save inference tensors. Nothing else changes,
    and every hook is removed on exit."""
    names = {name.split(".")[0] for _, name, _, _ in resolved if name}
    modules = [model] + [m for n, m in model.named_children() if n in names]
    saved: list[tuple[bool, Any]] = []

    def before(module, args, kwargs):
        cm = torch.inference_mode(False) if torch.is_inference_mode_enabled() else None
        if cm is not None:
            cm.__enter__()
        saved.append((torch.is_grad_enabled(), cm))
        torch.set_grad_enabled(True)
        if any(_is_inference(v) for v in (*args, *kwargs.values())):
            return tuple(_ordinary(v) for v in args), {k: _ordinary(v) for k, v in kwargs.items()}
        return None

    def after(module, args, output):
        grad, cm = saved.pop()
        torch.set_grad_enabled(grad)
        if cm is not None:
            cm.__exit__(None, None, None)

    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(m.register_forward_hook(after, always_call=True))
        with torch.enable_grad():
            yield
    finally:
        for h in reversed(handles):
            h.remove()


def _is_inference(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_inference()


def _ordinary(value: Any) -> Any:
    return value.clone() if _is_inference(value) else value


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
    progress: bool = True,
    model_info: dict[str, Any] | None = None,
    description: str = "",
) -> Transport:
    """Train LinEAS maps at ``sites`` from source to target inputs (see the module docstring).

    Args:
        model, sites, source, target, run, pooling, progress, model_info, description: as for
            `actsteer.core.fit.fit` (``run(items, ctx)`` runs the model on a list of items; here it is called on
            source items only, or target items only, and with autograd on).
        support: where the trained maps apply afterwards: ``"observed"`` (default), ``"all"``, or a quantile band.
        config: a `LineasConfig` (the defaults need no tuning).

    Returns:
        A `Transport` with ``method="lineas"`` holding only the sites the penalties kept, in execution order;
        ``extra["fit"]`` records the cost (``forward_calls``, ``backward_calls``, ``seconds``) and the training
        (``steps_run``, ``best_step``, losses, ``units_moved``).

    Raises:
        ValueError: too few inputs, or every site pruned (lower ``l1``/``group``).
    """
    cfg = config or LineasConfig()
    check_pooling(pooling)
    sites = list(dict.fromkeys(sites))
    if not sites:
        raise ValueError("No sites to fit; pass module names or patterns (see actsteer.list_sites(model))")
    source, target = list(source), list(target)
    for name, items in (("source", source), ("target", target)):
        if len(items) < 2:
            raise ValueError(f"Need at least 2 {name} inputs to estimate a distribution, got {len(items)}")
    resolved = iter_site_modules(model, sites)
    train_idx, val_idx = _split(len(source), cfg.held_out, cfg.seed)
    train, val = [source[i] for i in train_idx], [source[i] for i in val_idx]
    if not val:
        logger.warning("actsteer: LinEAS with %d source inputs holds none out: it stops on the training loss", len(source))
    ctx = ForwardContext()
    stats = {"forward_calls": 0, "backward_calls": 0}
    t0 = time.perf_counter()
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with SiteMaps(resolved, pooling, ctx) as maps:
            targets, order, once = _record_targets(maps, run, ctx, target, stats)
            with torch.no_grad():  # the unsteered source mean per unit: the center the maps scale around
                centers = {s: v.detach().mean(dim=0) for s, v in _pass(maps, run, ctx, source, stats).items()}
            return _train(model, resolved, maps, run, ctx, train, val, source, targets, centers, order, once, cfg, support,
                          stats, t0, progress, model_info, description, pooling)
    finally:
        for module, mode in modes.items():
            module.training = mode


def _pass(maps: SiteMaps, run: Runner, ctx: ForwardContext, items: Sequence[Any], stats: dict) -> dict[str, torch.Tensor]:
    maps.reset()
    ctx.mask, ctx.rows, ctx.active = None, None, True
    stats["forward_calls"] += 1
    try:
        run(items, ctx)
    except StopForward:
        pass
    missing = [s for s, *_ in maps.resolved if s not in maps.sums]
    if missing:
        raise RuntimeError(f"Site(s) {', '.join(map(repr, missing[:5]))} did not run during the forward pass; check "
                           "that they are on the model's forward path for these inputs")
    return maps.pooled()


def _record_targets(maps, run, ctx, target, stats):
    maps.theta, maps.record, maps.stop_after = None, "output", None
    with torch.no_grad():
        pooled = _pass(maps, run, ctx, target, stats)
    once = max(maps.counts.values()) <= 1
    return {s: v.detach() for s, v in pooled.items()}, list(maps.order), once


def _loss(pooled: dict[str, torch.Tensor], losses: dict[str, W2Loss]) -> torch.Tensor:
    return torch.stack([losses[s](pooled[s]) for s in losses]).mean()


def _train(model, resolved, maps, run, ctx, train, val, source, targets, centers, order, once, cfg, support, stats, t0,
           progress, model_info, description, pooling) -> Transport:
    losses = {s: W2Loss(targets[s]) for s in order}
    devices = {s: targets[s].device for s in order}
    scale = {s: targets[s].double().std(dim=0).clamp_min(1e-12).float() if targets[s].shape[0] > 1
             else torch.ones(targets[s].shape[1]) for s in order}
    maps.scale = {s: scale[s].to(devices[s]) for s in order}
    maps.center = {s: centers[s].float().to(devices[s]) for s in order}
    thetas = {s: torch.zeros(2, targets[s].shape[1], device=devices[s], requires_grad=True) for s in order}
    opt = ProximalAdam(thetas, lr=cfg.lr, l1=cfg.l1, group=cfg.group)
    maps.theta, maps.record, maps.support = thetas, "output", support
    maps.stop_after = order[-1] if once else None
    warmup = max(1, round(cfg.warmup * cfg.steps))
    best = {"loss": float("inf"), "step": 0, "theta": {s: t.detach().clone() for s, t in thetas.items()}, "ranges": {}}
    history: list[dict[str, float]] = []
    bad_evals = 0
    bar = tqdm(range(cfg.steps), desc="actsteer: LinEAS", disable=not progress, leave=False)
    with grad_enabled(model, resolved):
        for step in bar:
            maps.update_ranges = True  # the support follows the training inputs as the maps change them
            loss = _loss(_pass(maps, run, ctx, train, stats), losses)
            grads = dict(zip(thetas, torch.autograd.grad(loss, list(thetas.values()))))
            loss = float(loss.detach())
            stats["backward_calls"] += 1
            opt.step(grads, schedule(step, cfg.steps, warmup))
            if (step + 1) % cfg.eval_every and step + 1 != cfg.steps:
                continue
            maps.update_ranges = False
            if val:
                with torch.no_grad():
                    held = float(_loss(_pass(maps, run, ctx, val, stats), losses))
            else:
                held = loss
            history.append({"step": step + 1, "train": loss, "held_out": held, "penalty": opt.penalty()})
            bar.set_postfix(train=f"{loss:.3f}", held_out=f"{held:.3f}")
            if not history[:-1] or held < best["loss"] - 1e-6 * abs(best["loss"]):
                best = {"loss": held, "step": step + 1, "theta": {s: t.detach().clone() for s, t in thetas.items()},
                        "ranges": dict(maps.ranges)}
                bad_evals = 0
            else:
                bad_evals += 1
                if bad_evals >= cfg.patience:
                    break
    bar.close()
    steps_run = step + 1
    # support ranges: pooled source activations reaching each site with the trained maps upstream (no grad)
    maps.theta, maps.record, maps.stop_after = best["theta"], "input", (order[-1] if once else None)
    maps.ranges, maps.update_ranges = best["ranges"], not best["ranges"]
    with torch.no_grad():
        inputs = _pass(maps, run, ctx, source, stats)
    unit_maps: dict[str, UnitMap] = {}
    moved = 0
    for s in order:
        theta = best["theta"][s].double().cpu()
        if not bool(theta.any()):
            continue  # the group penalty switched this site off
        moved += int((theta != 0).any(dim=0).sum())
        a, b = inputs[s].double().cpu(), targets[s].double().cpu()
        lo, hi = _support_range(a.sort(dim=0).values, support)
        t_lo, t_hi = _support_range(b.sort(dim=0).values, support)
        beta = theta[1] * scale[s].double().cpu() - theta[0] * centers[s].double().cpu()
        unit_maps[s] = UnitMap(omega=1 + theta[0], beta=beta, lo=lo, hi=hi,
                               target_lo=t_lo, target_hi=t_hi, dead=_dead_units(a, b) & (theta != 0).any(dim=0))
    if not unit_maps:
        raise ValueError(
            f"LinEAS moved no unit: the sparsity penalties (l1={cfg.l1}, group={cfg.group}) switched every site off; "
            "lower them (LineasConfig(l1=..., group=...))"
        )
    seconds = time.perf_counter() - t0
    logger.info("actsteer: fitted lineas on %d of %d sites (%d units moved) in %.1fs: %d steps, best at %d, "
                "%d forward and %d backward calls", len(unit_maps), len(order), moved, seconds, steps_run,
                best["step"], stats["forward_calls"], stats["backward_calls"])
    fit_stats = {
        **stats, "seconds": round(seconds, 3), "steps_run": steps_run, "best_step": best["step"],
        "held_out_loss": best["loss"], "history": history[-20:], "units_moved": moved,
        "sites_kept": len(unit_maps), "sites_given": len(order), "n_train": len(train), "n_held_out": len(val),
        "config": dataclasses.asdict(cfg),
    }
    return Transport(unit_maps, method="lineas", pooling=pooling, support=support, mode="end-to-end",
                     n_source=len(source), n_target=len(targets[order[0]]), model=model_info or {"class": type(model).__name__},
                     description=description, extra={"fit": fit_stats})
