"""Steering that lives inside vLLM's compiled graph: stacked transport slots and per-token buffers at fixed addresses.

At start-up the worker puts one forward hook on each steerable site of the model (the sites of the transports
found in the folder), before vLLM compiles it. The hook runs `stacked_affine` on the site's output with tensors
that never move (the core's per-token formula, `actsteer.core.stacked_affine`):

- per site, the maps of ``slots`` resident transports stacked like vLLM's LoRA slots: table row 0 is the
  identity, row ``2k - 1`` the forward map of slot ``k`` and row ``2k`` its reverse map (negative strengths);
- per token, ``depth`` pairs (table row, ``|strength|``): the transports its request composes, in order.

Before each step the worker writes these in place (`Bank.load_slot`, `Bank.set_tokens`); a strength change or
another set of active transports is a new value in the same buffers, so ``torch.compile`` (vLLM's piecewise
graphs) never recompiles and a CUDA graph replays them as captured. Unsteered tokens read row 0 at amount 0: their
output equals the input bit for bit. Run eagerly (``enforce_eager``), the hook skips the composition positions
the current batch does not use, and returns at once when no token is steered.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..core import (
    Transport,
    element,
    iter_site_modules,
    parse_site,
    replace_element,
    stack_directions,
    stacked_affine,
)

logger = logging.getLogger("vllm." + __name__)  # under "vllm", so that vLLM's logging config applies


class SiteBank(torch.nn.Module):
    """The stacked maps of one site: ``(2 * slots + 1, width)`` tables of ``delta`` (weight - 1 at strength 1),
    ``bias``, ``lo`` and ``hi``; row 0 is the identity."""

    def __init__(self, site: str, width: int, slots: int, device: torch.device) -> None:
        super().__init__()
        self.site = site
        self.width = width
        rows = 2 * slots + 1
        self.register_buffer("delta", torch.zeros(rows, width, device=device), persistent=False)
        self.register_buffer("bias", torch.zeros(rows, width, device=device), persistent=False)
        self.register_buffer("lo", torch.full((rows, width), float("-inf"), device=device), persistent=False)
        self.register_buffer("hi", torch.full((rows, width), float("inf"), device=device), persistent=False)

    def write(self, slot: int, tables: tuple[torch.Tensor, ...] | None) -> None:
        """Write slot ``slot``'s forward and reverse rows in place (None: the identity)."""
        rows = slice(2 * slot - 1, 2 * slot + 1)
        if tables is None:
            self.delta[rows].zero_()
            self.bias[rows].zero_()
            self.lo[rows].fill_(float("-inf"))
            self.hi[rows].fill_(float("inf"))
            return
        for buffer, value in zip((self.delta, self.bias, self.lo, self.hi), tables):
            buffer[rows].copy_(value, non_blocking=True)


class Bank(torch.nn.Module):
    """Every steered site of one model, and the per-token rows and amounts they share.

    Args:
        widths: site -> units on this rank, in the order the hooks are installed.
        slots: resident transports (K).
        depth: transports one token may compose (C).
        max_tokens: the most tokens one forward can have (vLLM's ``max_num_batched_tokens``, or larger).
        device: where the model runs.
    """

    def __init__(self, widths: dict[str, int], slots: int, depth: int, max_tokens: int, device: torch.device) -> None:
        super().__init__()
        self.slots, self.depth, self.max_tokens = slots, depth, max_tokens
        self.sites = torch.nn.ModuleList(SiteBank(site, w, slots, device) for site, w in widths.items())
        self.index = {bank.site: i for i, bank in enumerate(self.sites)}
        self.register_buffer("rows", torch.zeros(depth, max_tokens, dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("amount", torch.zeros(depth, max_tokens, device=device), persistent=False)
        self.used = 0  # composition positions the current batch uses (read by eager calls only)
        self._filled = 0  # tokens written by the last `set_tokens` (the rest are zero)

    def load_slot(self, slot: int, transport: Transport | None) -> None:
        """Write a transport (sites in this bank's names, widths of this rank) into slot ``slot`` (1..K), in place.

        Sites of the bank that the transport does not steer get identity rows. None clears the slot.
        """
        if not 1 <= slot <= self.slots:
            raise IndexError(f"slot {slot} is not in 1..{self.slots}")
        for bank in self.sites:
            unit_map = None if transport is None else transport.get(bank.site)
            bank.write(slot, None if unit_map is None else stack_directions(unit_map, device=bank.delta.device))

    def set_tokens(self, rows: torch.Tensor, amount: torch.Tensor, used: int) -> None:
        """Set the per-token table rows ``(depth, n)`` and amounts ``(depth, n)`` of the next forward, in place;
        tokens past ``n`` (padding, or none) get row 0 at amount 0."""
        n = rows.shape[1]
        if n > self.max_tokens:
            raise ValueError(f"a forward of {n} tokens; the steering buffers hold {self.max_tokens}")
        self.rows[:, :n].copy_(rows, non_blocking=True)
        self.amount[:, :n].copy_(amount, non_blocking=True)
        if self._filled > n:
            self.rows[:, n:self._filled].zero_()
            self.amount[:, n:self._filled].zero_()
        self._filled, self.used = n, used

    def clear_tokens(self) -> None:
        """No token steered (what dummy runs and unsteered steps see)."""
        if self._filled:
            self.rows[:, :self._filled].zero_()
            self.amount[:, :self._filled].zero_()
        self._filled, self.used = 0, 0


def _make_hook(bank: Bank, site_bank: SiteBank, k: int | None, site: str) -> Any:
    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        compiling = torch.compiler.is_compiling()
        if not compiling and bank.used == 0:
            return None  # eager and nothing steered: the output as it is
        x = element(output, k, site)
        if compiling:
            # every position runs (strengths are data, not code); the token count is symbolic, and slicing the
            # buffers by it would specialise the graph to one size: gather the first n columns instead
            tokens = torch.arange(x.shape[0], device=x.device)
            rows, amount = bank.rows.index_select(1, tokens), bank.amount.index_select(1, tokens)
        else:
            rows, amount = bank.rows[:bank.used, :x.shape[0]], bank.amount[:bank.used, :x.shape[0]]
        y = stacked_affine(x, rows, amount, site_bank.delta, site_bank.bias, site_bank.lo, site_bank.hi)
        return replace_element(output, k, y)

    return hook


def install(model: torch.nn.Module, widths: dict[str, int], *, slots: int, depth: int, max_tokens: int,
            device: torch.device) -> tuple[Bank, list[Any]]:
    """Put a `Bank` on ``model`` (as ``model.actsteer_bank``, non-persistent buffers only) and one forward hook per
    site; returns the bank and the hook handles.

    Raises:
        KeyError: a site that is not a module of ``model``.
    """
    bank = Bank(widths, slots, depth, max_tokens, device)
    handles = []
    try:
        for site, name, k, module in iter_site_modules(model, list(widths)):
            site_bank = bank.sites[bank.index[site]]
            handles.append(module.register_forward_hook(_make_hook(bank, site_bank, k, site)))
    except Exception:
        for h in handles:
            h.remove()
        raise
    model.actsteer_bank = bank
    return bank, handles


def site_names(sites: list[str]) -> list[str]:
    """The module names of sites (``"a.b:0"`` -> ``"a.b"``), deduplicated in order."""
    return list(dict.fromkeys(parse_site(s)[0] for s in sites))
