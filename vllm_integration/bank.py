"""Steering that lives inside vLLM's compiled graph: stacked transport slots and per-token buffers at fixed addresses.

At start-up the worker puts one forward hook on each steerable site of the model (the sites of the transports
found in the folder), before vLLM compiles it. The hook runs `stacked_affine` on the site's output with tensors
that never move (the core's per-token formula, `actsteer.core.stacked_affine`):

- per site, the maps of ``slots`` resident transports stacked like vLLM's LoRA slots: table row 0 is the
  identity, row ``2k - 1`` the forward map of slot ``k`` and row ``2k`` its reverse map (negative strengths);
- per token, ``depth`` pairs (table row, ``|strength|``): the transports its request composes, in order.

Before each step the worker writes these in place (`Bank.load_slot`, `Bank.set_tokens`); a strength change or
another set of active transports is a new value in the same buffers, so ``torch.compile`` (one graph on CPU, vLLM's
piecewise graphs on GPU) never recompiles and a CUDA graph replays them as captured. Unsteered tokens read row 0 at
amount 0: their output equals the input bit for bit. Run eagerly (``enforce_eager``), the hook skips the composition
positions the current batch does not use, and returns at once when no token is steered.

How the formula enters the compiled graph is the bank's ``kind``:

- ``"fused"``: the hook's tensor ops are traced into the graph and fused by the compiler with their neighbours; every
  token runs every composition position (strengths are data). What CUDA graphs need, but it enlarges the graph that
  vLLM compiles at start-up (about 35 ops per site).
- ``"op"``: the hook calls one opaque operator, ``torch.ops.actsteer.steer_``, that transports the site's output in
  place. The graph holds one node per site, so it compiles about as fast as stock; each call reads the plan the
  worker set on the host for this forward (`Bank.plan`: which tokens are steered, their rows and amounts) and
  returns at once when none is. A CUDA graph would freeze that host-side plan, so ``"op"`` is for CPU (vLLM's
  default there) and eager GPU runs. The sites vLLM steers return fresh tensors (norms, projections, the
  embedding), so transporting them in place changes what a replaced output would (the fused kind's semantics).
"""

from __future__ import annotations

import logging
import weakref
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

KINDS = ("fused", "op")
_BANKS: dict[int, weakref.ref[Bank]] = {}  # the address of a bank's ``rows`` buffer -> the bank (for the op)


def _steer_inplace(x: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor, lo: torch.Tensor,
                   hi: torch.Tensor) -> None:
    """``torch.ops.actsteer.steer_``: transport the steered tokens of ``x`` in place, by the plan of the bank that owns
    ``rows`` (the compiled graph passes the bank's buffers, so the bank is found by their address)."""
    ref = _BANKS.get(rows.data_ptr())
    bank = ref() if ref is not None else None
    if bank is None or not bank.used or bank.plan is None:
        return
    where, rows_, amount, end = bank.plan
    if end > x.shape[0]:  # a forward that is not the planned one (vLLM's dummy runs): untouched
        return
    if isinstance(where, slice):
        part = x[where]
        part.copy_(stacked_affine(part, rows_, amount, delta, bias, lo, hi))
    else:
        x.index_copy_(0, where, stacked_affine(x.index_select(0, where), rows_, amount, delta, bias, lo, hi))


def _define_op() -> None:
    """Register ``actsteer::steer_`` once per process (the low-level API: a call costs about 2 us when nothing is
    steered, against about 20 us for ``torch.library.custom_op``)."""
    try:
        torch.ops.actsteer.steer_.default  # noqa: B018 - defined already (this module loaded twice)
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("actsteer", "DEF")
    lib.define("steer_(Tensor(a!) x, Tensor rows, Tensor delta, Tensor bias, Tensor lo, Tensor hi) -> ()")
    lib.impl("steer_", _steer_inplace, "CompositeExplicitAutograd")
    torch.library.register_fake("actsteer::steer_", lambda x, rows, delta, bias, lo, hi: None, lib=lib)
    _LIBRARY.append(lib)  # a Library deregisters its ops when collected


_LIBRARY: list[torch.library.Library] = []
_define_op()


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
        kind: ``"fused"`` or ``"op"`` (the module docstring).
    """

    def __init__(self, widths: dict[str, int], slots: int, depth: int, max_tokens: int, device: torch.device,
                 kind: str = "fused") -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.slots, self.depth, self.max_tokens, self.kind = slots, depth, max_tokens, kind
        self.sites = torch.nn.ModuleList(SiteBank(site, w, slots, device) for site, w in widths.items())
        self.index = {bank.site: i for i, bank in enumerate(self.sites)}
        self.register_buffer("rows", torch.zeros(depth, max_tokens, dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("amount", torch.zeros(depth, max_tokens, device=device), persistent=False)
        self.used = 0  # composition positions the current batch uses (read by eager calls and the op)
        self._filled = 0  # tokens written by the last `set_tokens` (the rest are zero)
        # the op's plan: (steered tokens as a slice or an index, their rows and amounts (used, m), tokens planned)
        self.plan: tuple[slice | torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None
        _BANKS[self.rows.data_ptr()] = weakref.ref(self)

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
        self.plan = None
        steered = torch.nonzero(amount[:used].ne(0).any(0)).flatten() if used else rows.new_zeros(0)
        if steered.numel():  # the op's plan: only the steered tokens, one slice when they are contiguous
            first, last = int(steered[0]), int(steered[-1]) + 1
            where: slice | torch.Tensor = slice(first, last) if last - first == steered.numel() else steered
            device = self.rows.device
            self.plan = (where if isinstance(where, slice) else where.to(device),
                         rows[:used, where].to(device), amount[:used, where].to(device), last)

    def clear_tokens(self) -> None:
        """No token steered (what dummy runs and unsteered steps see)."""
        if self._filled:
            self.rows[:, :self._filled].zero_()
            self.amount[:, :self._filled].zero_()
        self._filled, self.used, self.plan = 0, 0, None


def _make_hook(bank: Bank, site_bank: SiteBank, k: int | None, site: str) -> Any:
    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        compiling = torch.compiler.is_compiling()
        if not compiling and bank.used == 0:
            return None  # eager and nothing steered: the output as it is
        x = element(output, k, site)
        if bank.kind == "op":  # one opaque node in the graph; it reads the bank's plan when it runs
            torch.ops.actsteer.steer_(x, bank.rows, site_bank.delta, site_bank.bias, site_bank.lo, site_bank.hi)
            return None
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
            device: torch.device, kind: str = "fused") -> tuple[Bank, list[Any]]:
    """Put a `Bank` on ``model`` (as ``model.actsteer_bank``, non-persistent buffers only) and one forward hook per
    site; returns the bank and the hook handles.

    Raises:
        KeyError: a site that is not a module of ``model``.
    """
    bank = Bank(widths, slots, depth, max_tokens, device, kind)
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
