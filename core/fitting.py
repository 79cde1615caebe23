"""The model-agnostic fitting driver: record pooled activations with streaming hooks and estimate maps.

`fit` is what `fit_lm`, `fit_pipeline` and the ComfyUI Learn node build on. Sequential (causal)
estimation, ACT_SPEC.md section 5, fits each site on activations produced with the maps of all
EARLIER sites (execution order, seen at run time) applied to the source inputs:

- all inputs in one batch: ONE forward pass (each hook fits its map on the spot, then transports the
  source rows and lets the pass continue);
- several batches: one full pass over the data, then per further site one pass over the data that
  stops right after that site, i.e. about ``batches * (1 + sum of the sites' depth fractions)`` forward
  equivalents, ~(L+1)/2 passes for L evenly spread sites, like the reference. Use one batch when memory allows.

Target rows are never transported while fitting: the map of a later site must reach the target
distribution the model really produces (the reference steers the target rows too).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .engine import steering_of
from .estimators import Support, canonical_method, estimate
from .lineas import fit_lineas, lineas_config
from .provenance import model_record
from .record import ForwardContext, Recorder, check_fit_inputs, record_sites
from .sites import iter_site_modules
from .folding import FoldedMap
from .transport import Transport, UnitMap

logger = logging.getLogger(__name__)


Runner = Callable[[Sequence[Any], ForwardContext], Any]


class _EarlyStop(Exception):
    """Raised inside a hook to end a forward pass once the site being fitted was recorded."""


def _select_source_rows(x: torch.Tensor, ctx: ForwardContext, is_source: torch.Tensor, fm: FoldedMap) -> torch.Tensor:
    rows = torch.arange(x.shape[0], device=x.device) if ctx.rows is None else ctx.rows.to(x.device)
    idx = rows[is_source.to(x.device)]
    fm = fm.to(x.device, x.dtype)
    part = x[idx]
    new = x.clone()
    new[idx] = fm.apply_spatial(part) if x.dim() == 4 else fm.apply_last(part)
    return new


def _refuse_steered(model: torch.nn.Module) -> None:
    """A fit records the model's own activations: refuse a model that a call made here would steer."""
    handles = steering_of(model)
    if handles:
        sites = [s for h in handles for s in h.sites]
        raise RuntimeError(
            f"The model is being steered ({', '.join(sites[:3])}{', ...' if len(sites) > 3 else ''}: "
            f"{' and '.join(sorted({'attach()' if h.scope == 'model' else 'steer()' for h in handles}))}); remove its "
            "steering (leave the steer() block, or handle.remove()) before fitting: a fit records the model's own "
            "activations"
        )


def fit(
    model: torch.nn.Module,
    sites: Sequence[str],
    source: Sequence[Any],
    target: Sequence[Any],
    *,
    run: Runner,
    method: str = "linear-act",
    pooling: str = "mean",
    support: Support = "observed",
    sequential: bool = True,
    batch_size: int | None = None,
    one_pass: bool | None = None,
    progress: bool = True,
    model_info: dict[str, Any] | None = None,
    description: str = "",
    estimate_options: dict[str, Any] | None = None,
    log_summary: bool = True,
) -> Transport:
    """Fit one `UnitMap` per site from two collections of inputs (or train them all at once: ``method="lineas"``).

    Args:
        model: the module whose submodules are hooked (site names are relative to it).
        sites: site names (``"module.path"`` or ``"module.path:k"``); see `actsteer.core.sites.resolve_sites`.
        source, target: the inputs (any objects the runner understands, e.g. texts), at least 2 each.
        run: ``run(items, ctx)`` runs the model on a list of items (source items first, then target ones,
            within a batch). It may set ``ctx.mask``/``ctx.rows``/``ctx.active`` before the forward call.
        method, support: passed to `actsteer.estimate`; ``method="lineas"`` instead trains every site's affine map
            jointly through the model (`actsteer.core.lineas.fit_lineas`; ``sequential``/``one_pass`` do not apply,
            ``estimate_options`` are `LineasConfig` fields such as ``{"steps": 100}``).
        pooling: ``"mean"`` (default), ``"last"``, ``"max"``, ``"min"``; see `actsteer.core.pooling.pool`.
        sequential: causal estimation in execution order (default) or all sites at once.
        batch_size: items per forward call; None = all in one call (cheapest for sequential fitting).
        one_pass: with one batch, fit sequentially inside one forward pass (None/True, the default) or force
            the pass-per-site mode (False): needed when a site runs several times per forward (e.g. every
            denoising step) and its calls must be averaged.
        progress: show tqdm progress bars.
        model_info: hint stored in the transport's metadata (class, name_or_path, hidden size, ...).
        description: free text stored in the metadata.
        estimate_options: extra options for the estimator (e.g. ``{"pair": 0}`` for actadd, ``{"knots": 8}`` for
            quantile, `LineasConfig` fields for lineas).
        log_summary: log the one ``info`` line "fitted ... in N s" (hosts that time the parts of a longer run,
            e.g. the ComfyUI Learn node, log their own line instead).

    Returns:
        A `Transport` whose sites are in execution order. ``transport.extra["fit"]`` records the cost:
        ``forward_calls`` (runner calls) and ``forward_equivalents`` (calls weighted by how far they ran).

    Raises:
        KeyError: a site's module does not exist. ValueError: fewer than 2 inputs a side, a bad batch size.
        RuntimeError: the model is being steered here (`steer`/`attach`): the fit would record steered activations.

    Example:
        >>> import torch, actsteer
        >>> from actsteer.core import fit
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4)).eval()
        >>> src, tgt = list(torch.randn(16, 4)), list(torch.randn(16, 4) + 1)
        >>> t = fit(model, ["0", "2"], src, tgt, run=lambda items, ctx: model(torch.stack(items)), progress=False)
        >>> t.sites, t.mode
        (['0', '2'], 'sequential')
    """
    method = canonical_method(method)
    sites, source, target = check_fit_inputs(sites, source, target, pooling=pooling, batch_size=batch_size)
    iter_site_modules(model, sites)  # KeyError with near misses on a bad name, before anything runs
    _refuse_steered(model)
    if method == "lineas":
        return fit_lineas(model, sites, source, target, run=run, pooling=pooling, support=support,
                          config=lineas_config(estimate_options), batch_size=batch_size, progress=progress,
                          model_info=model_info or model_record(model), description=description,
                          log_summary=log_summary)
    items = source + target
    labels = torch.tensor([True] * len(source) + [False] * len(target))
    bs = len(items) if batch_size is None else min(batch_size, len(items))
    batches = [(items[i : i + bs], labels[i : i + bs]) for i in range(0, len(items), bs)]
    opts = dict(estimate_options or {})
    stats = {"forward_calls": 0, "forward_equivalents": 0.0}
    t0 = time.perf_counter()

    def fit_site(site: str, pooled: torch.Tensor, is_source: torch.Tensor) -> UnitMap:
        try:
            return estimate(pooled[is_source], pooled[~is_source], method, support, **opts)
        except ValueError as err:
            raise ValueError(f"Site {site!r}: {err}") from None

    modes = {m: m.training for m in model.modules()}  # restore each submodule's own mode afterwards
    model.eval()
    try:
        if sequential and len(batches) == 1 and one_pass is not False:
            maps, order = _fit_one_pass(model, sites, batches[0], run, pooling, fit_site, progress)
            stats["forward_calls"], stats["forward_equivalents"] = 1, 1.0
        else:
            maps, order = _fit_passes(model, sites, batches, run, pooling, fit_site, sequential, progress, stats)
    finally:
        for module, mode in modes.items():
            module.training = mode
    if log_summary:
        logger.info(
            "actsteer: fitted %s on %d sites (%s) from %d source / %d target inputs in %.1fs, %d forward calls",
            method, len(order), "sequential" if sequential else "at once", len(source), len(target),
            time.perf_counter() - t0, stats["forward_calls"],
        )
    return Transport(
        {s: maps[s] for s in order},
        method=method,
        pooling=pooling,
        support=support,
        mode="sequential" if sequential else "at-once",
        n_source=len(source),
        n_target=len(target),
        model=model_info or model_record(model),
        description=description,
        extra={"fit": {**stats, "batch_size": bs, "batches": len(batches)}},
    )


def _fit_one_pass(model, sites, batch, run, pooling, fit_site, progress):
    """Sequential fit inside ONE forward pass: each site's hook estimates its map, then transports the source rows."""
    items, is_source = batch
    ctx = ForwardContext()
    recorder = Recorder(sites, pooling)
    recorder.batch_rows = len(items)
    maps: dict[str, UnitMap] = {}
    folded: dict[str, FoldedMap] = {}
    bar = tqdm(total=len(sites), desc="actsteer: fitting sites", disable=not progress, leave=False)

    def on_output(site: str, x: torch.Tensor) -> torch.Tensor:
        if site not in maps:
            pooled = recorder.add(site, x, ctx)
            maps[site] = fit_site(site, pooled, is_source)
            folded[site] = maps[site].fold(1.0)
            bar.update(1)
        else:
            recorder.count_call(site)
        return _select_source_rows(x, ctx, is_source, folded[site])

    try:
        with record_sites(model, sites, on_output, ctx=ctx), torch.no_grad():
            run(items, ctx)
    finally:
        bar.close()
    counts = recorder.end_batch(sites)
    repeated = [s for s, c in counts.items() if c > 1]
    if repeated:
        raise RuntimeError(
            f"Site(s) {', '.join(map(repr, repeated[:3]))} ran more than once in one forward pass, so the one-pass "
            "sequential fit would see them half-steered; fit with sequential=False, or give a batch_size"
        )
    return maps, recorder.order


def _fit_passes(model, all_sites, batches, run, pooling, fit_site, sequential, progress, stats):
    """At-once fitting (one pass over the data), or sequential fitting with one early-stopping pass per site."""
    ctx = ForwardContext()
    labels = torch.cat([lab for _, lab in batches])
    state: dict[str, Any] = {"is_source": None, "record": set(all_sites), "stop_after": None, "calls": {}}
    maps: dict[str, UnitMap] = {}
    folded: dict[str, FoldedMap] = {}
    recorder = Recorder(all_sites, pooling)

    def on_output(site: str, x: torch.Tensor) -> torch.Tensor | None:
        if site in state["record"]:
            recorder.add(site, x, ctx)
            if site == state["stop_after"]:
                raise _EarlyStop
            return None
        return _select_source_rows(x, ctx, state["is_source"], folded[site]) if site in folded else None

    def run_pass(record: list[str], stop_after: str | None, desc: str) -> None:
        state["record"], state["stop_after"] = set(record), stop_after
        for site in record:
            recorder.rows[site] = []
        for items, is_source in tqdm(batches, desc=desc, disable=not progress, leave=False):
            state["is_source"] = is_source
            recorder.batch_rows = len(items)
            ctx.mask, ctx.rows, ctx.active = None, None, True
            stats["forward_calls"] += 1
            try:
                run(items, ctx)
                stats["forward_equivalents"] += 1.0
            except _EarlyStop:
                # depth of the stopping site in execution order approximates how much of the pass ran
                stats["forward_equivalents"] += (order.index(stop_after) + 1) / (len(order) + 1)
            counts = recorder.end_batch(record)
            for site, c in counts.items():
                state["calls"][site] = max(state["calls"].get(site, 0), c)

    order: list[str] = []
    with record_sites(model, all_sites, on_output, ctx=ctx), torch.no_grad():
        run_pass(all_sites, None, "actsteer: recording")
        order = list(recorder.order)
        # A site that runs several times per batch (e.g. every denoising step) is averaged over its calls,
        # so later passes must run to the end instead of stopping at the site's first call.
        may_stop = max(state["calls"].values(), default=1) <= 1
        first = order if not sequential else order[:1]
        for site in first:
            maps[site] = fit_site(site, recorder.stacked(site), labels)
            folded[site] = maps[site].fold(1.0)
        if sequential:
            for site in tqdm(order[1:], desc="actsteer: sequential sites", disable=not progress):
                run_pass([site], site if may_stop else None, f"actsteer: {site}")
                maps[site] = fit_site(site, recorder.stacked(site), labels)
                folded[site] = maps[site].fold(1.0)
    return maps, order
