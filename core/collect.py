"""Recording pooled activations with streaming hooks (`collect`): one pooled row per input, no token storage."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from .fit import ForwardContext
from .pooling import check_pooling, pool
from .sites import element, iter_site_modules


class Collector:
    """Pooled rows per site, appended at every (active) call; ``ctx.mask`` sets the padding mask for the next call."""

    def __init__(self, sites: Sequence[str], pooling: str) -> None:
        self.ctx = ForwardContext()
        self.pooling = check_pooling(pooling)
        self._rows: dict[str, list[torch.Tensor]] = {s: [] for s in sites}

    def _add(self, site: str, x: torch.Tensor) -> None:
        if not self.ctx.active:
            return
        if self.ctx.rows is not None:
            x = x[self.ctx.rows.to(x.device)]
        self._rows[site].append(pool(x, mask=self.ctx.mask, how=self.pooling).detach().cpu())

    def pooled(self) -> dict[str, torch.Tensor]:
        """``{site: (N, D) float32}`` for every site that ran (sites that did not run are left out)."""
        return {s: torch.cat(rows) for s, rows in self._rows.items() if rows}

    def clear(self) -> None:
        for rows in self._rows.values():
            rows.clear()


@contextlib.contextmanager
def collect(model: torch.nn.Module, sites: Sequence[str], *, pooling: str = "mean") -> Iterator[Collector]:
    """Record pooled activations of ``sites`` during the ``with`` block; hooks are removed on exit.

    Registered after any steering hooks, so under `steer` it records the steered activations.

    Example:
        >>> import torch
        >>> from actsteer.core.collect import collect
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
        >>> with collect(model, ["0"]) as rec:
        ...     _ = model(torch.zeros(4, 3))
        >>> rec.pooled()["0"].shape
        torch.Size([4, 2])
    """
    collector = Collector(list(sites), pooling)
    handles = []
    try:
        for site, _, k, module in iter_site_modules(model, sites):
            def hook(mod, args, output, site=site, k=k):
                collector._add(site, element(output, k, site))

            handles.append(module.register_forward_hook(hook))
        yield collector
    finally:
        for h in reversed(handles):
            h.remove()
