"""Recording: `record_sites` (the one registrar of recording hooks), `ForwardContext` (what a runner tells the hooks),
`Recorder` (pooled rows) and `collect`. Fitting, `collect` and the evaluation metrics all record through here; only
pooled rows are kept, never per-token activations."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .pooling import check_pooling, pool
from .sites import element, iter_site_modules, replace_element


@dataclasses.dataclass
class ForwardContext:
    """What the runner tells the recording hooks about the batch it is about to run.

    Attributes:
        mask: ``(B, T)`` padding mask (1 = real token) for token outputs whose first dims match it.
        rows: indices of the output rows that belong to the batch's items, in item order (e.g. only the
            conditional half of a classifier-free-guidance batch); None = all rows, in order.
        active: while False, site calls are ignored (e.g. denoising steps outside the chosen window).
    """

    mask: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    active: bool = True


class Recorder:
    """Pooled activations per site, one ``(B, D)`` block of rows per batch (or per call).

    With ``per_call=False`` (fitting) the calls of a site within one batch are summed as they come and averaged by
    `end_batch` (e.g. several denoising steps give one row per item); with ``per_call=True`` (`collect`) every call
    appends its rows at once.

    Args:
        sites: the site names to expect.
        pooling: ``"mean"``, ``"last"``, ``"max"`` or ``"min"``; see `actsteer.core.pooling.pool`.
        per_call: keep each call's rows instead of averaging a batch's calls.
    """

    def __init__(self, sites: Sequence[str], pooling: str, *, per_call: bool = False) -> None:
        self.pooling = check_pooling(pooling)
        self.per_call = per_call
        self.batch_rows: int | None = None  # items in the current batch, to check the runner's output rows
        self.rows: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
        self.order: list[str] = []  # sites in the order they first ran (execution order)
        self._sum: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}
        self.ctx = ForwardContext()  # what `collect`'s caller tells the hooks about the next call

    def add(self, site: str, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Pool one call's output ``x`` of ``site`` (rows picked by ``ctx.rows``, padding by ``ctx.mask``)."""
        if ctx.rows is not None:
            x = x[ctx.rows.to(x.device)]
        mask = ctx.mask
        if mask is not None and ctx.rows is not None and mask.shape[0] != x.shape[0]:
            mask = mask[ctx.rows.to(mask.device)]
        if self.batch_rows is not None and x.shape[0] != self.batch_rows:
            raise ValueError(
                f"Site {site!r} produced {x.shape[0]} rows for a batch of {self.batch_rows} items; if the runner "
                "duplicates rows (e.g. classifier-free guidance), set ctx.rows to the indices of the items' rows"
            )
        pooled = pool(x, mask=mask, how=self.pooling).detach().cpu()
        if site not in self.order:
            self.order.append(site)
        if self.per_call:
            self.rows.setdefault(site, []).append(pooled)
        elif site not in self._sum:
            self._sum[site], self._count[site] = pooled, 1
        else:
            self._sum[site] = self._sum[site] + pooled
            self._count[site] += 1
        return pooled

    def count_call(self, site: str) -> None:
        """Count a call of ``site`` that was not recorded (to detect sites that run twice per pass)."""
        self._count[site] = self._count.get(site, 1) + 1

    def end_batch(self, expected: Sequence[str]) -> dict[str, int]:
        """Close the batch: one averaged row block per expected site; returns how often each site ran."""
        missing = [s for s in expected if s not in self._sum]
        if missing:
            raise RuntimeError(
                f"Site(s) {', '.join(map(repr, missing[:5]))} did not run during the forward pass; "
                "check that they are on the model's forward path for these inputs"
            )
        counts = dict(self._count)
        for site in expected:
            self.rows[site].append(self._sum[site] / self._count[site])
        self._sum.clear()
        self._count.clear()
        return counts

    def stacked(self, site: str) -> torch.Tensor:
        """``(N, D)``: every row recorded for ``site``."""
        return torch.cat(self.rows[site])

    def pooled(self) -> dict[str, torch.Tensor]:
        """``{site: (N, D) float32}`` for every site that ran (sites that did not run are left out)."""
        return {s: torch.cat(rows) for s, rows in self.rows.items() if rows}

    def clear(self) -> None:
        for rows in self.rows.values():
            rows.clear()
        self._sum.clear()
        self._count.clear()


# The one registrar of recording hooks ------------------------------------------------------------------------------
SiteCall = Callable[[str, torch.Tensor], "torch.Tensor | None"]


@contextlib.contextmanager
def record_sites(
    model: torch.nn.Module, sites: Sequence[str], on_output: SiteCall, *, ctx: ForwardContext | None = None
) -> Iterator[None]:
    """Call ``on_output(site, x)`` with each site's output tensor at every forward call, while the ``with`` block runs.

    The one way recording hooks are registered (fitting, `collect`, the evaluation metrics): one forward hook per
    module, sites of a module in the order given; a tensor returned by ``on_output`` replaces that site's output
    (fitting transports the source rows onward this way), None keeps it. While ``ctx.active`` is False the hooks do
    nothing. Hooks are removed on exit, also when the body raises.

    Raises:
        KeyError: a site's module does not exist (the message names near misses).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU())
        >>> seen = []
        >>> with record_sites(model, ["0", "1"], lambda site, x: seen.append((site, tuple(x.shape)))):
        ...     _ = model(torch.zeros(4, 3))
        >>> seen
        [('0', (4, 2)), ('1', (4, 2))]
    """
    plans: dict[int, tuple[torch.nn.Module, list[tuple[str, int | None]]]] = {}
    for site, _, k, module in iter_site_modules(model, sites):
        plans.setdefault(id(module), (module, []))[1].append((site, k))
    handles = []
    try:
        for module, plan in plans.values():
            handles.append(module.register_forward_hook(_site_hook(plan, on_output, ctx)))
        yield
    finally:
        for h in reversed(handles):
            h.remove()


def _site_hook(plan: list[tuple[str, int | None]], on_output: SiteCall, ctx: ForwardContext | None) -> Callable:
    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        if ctx is not None and not ctx.active:
            return None
        out = output
        for site, k in plan:
            new = on_output(site, element(out, k, site))
            if new is not None:
                out = replace_element(out, k, new)
        return None if out is output else out

    return hook


@contextlib.contextmanager
def collect(model: torch.nn.Module, sites: Sequence[str], *, pooling: str = "mean") -> Iterator[Recorder]:
    """Record pooled activations of ``sites`` during the ``with`` block (one pooled row per input and call); hooks
    are removed on exit.

    Registered after any steering hooks, so under `steer` it records the steered activations. The recorder's
    ``ctx`` (a `ForwardContext`) sets the padding mask and rows for the next call; ``ctx.active = False`` skips calls.

    Example:
        >>> import torch
        >>> from actsteer.core import collect
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
        >>> with collect(model, ["0"]) as rec:
        ...     _ = model(torch.zeros(4, 3))
        >>> rec.pooled()["0"].shape
        torch.Size([4, 2])
    """
    recorder = Recorder(list(sites), pooling, per_call=True)
    ctx = recorder.ctx

    def on_output(site: str, x: torch.Tensor) -> None:
        recorder.add(site, x, ctx)

    with record_sites(model, sites, on_output, ctx=ctx):
        yield recorder


def check_fit_inputs(sites: Any, source: Any, target: Any, *, pooling: str,
                     batch_size: int | None) -> tuple[list[str], list, list]:
    """What every fit checks before anything runs (`actsteer.core.fit`, `fit_lineas`): a known pooling, at least one
    site (duplicates dropped, order kept), at least 2 inputs a side, a positive integer ``batch_size`` or None.

    Returns:
        ``(sites, source, target)`` as lists.

    Raises:
        ValueError: naming what is wrong and what to pass.
    """
    check_pooling(pooling)
    sites = list(dict.fromkeys(sites))
    if not sites:
        raise ValueError("No sites to fit; pass module names or patterns (see actsteer.list_sites(model))")
    source, target = list(source), list(target)
    for name, items in (("source", source), ("target", target)):
        if len(items) < 2:
            raise ValueError(f"Need at least 2 {name} inputs to estimate a distribution, got {len(items)}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"`batch_size` must be a positive integer or None, got {batch_size!r}")
    return sites, source, target
