"""`collect`: record pooled activations of chosen sites with streaming hooks (one pooled row per input and call)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from .record import ForwardContext, Recorder
from .sites import element, iter_site_modules


class Collector(Recorder):
    """A `Recorder` of every (active) call's pooled rows; ``ctx.mask``/``ctx.rows`` set the padding mask and rows
    for the next call, ``ctx.active = False`` skips calls."""

    def __init__(self, sites: Sequence[str], pooling: str) -> None:
        super().__init__(sites, pooling, per_call=True)
        self.ctx = ForwardContext()

    def _add(self, site: str, x: torch.Tensor) -> None:
        if self.ctx.active:
            self.add(site, x, self.ctx)


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
