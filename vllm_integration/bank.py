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
  worker set on the host for this forward (`Plan`: the steered tokens, grouped by the transports and strengths
  they share, a request's tokens as one slice) and returns at once when none is. Each site folds a group's maps
  once per plan (`actsteer.core.fold_rows`) and applies them to the group's tokens only
  (`actsteer.core.apply_folded`, the same arithmetic as the fused formula, bit for bit). A CUDA graph would freeze
  that host-side plan, so ``"op"`` is for CPU (the default there) and eager GPU runs. The sites vLLM steers return
  fresh tensors (norms, projections, the embedding), so transporting them in place has the effect of replacing
  the output, which is what the fused kind does.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch

from ..core import (
    Transport,
    apply_folded,
    element,
    fold_rows,
    iter_site_modules,
    parse_site,
    replace_element,
    stack_directions,
    stacked_affine,
)

logger = logging.getLogger("vllm." + __name__)  # under "vllm", so that vLLM's logging config applies

KINDS = ("fused", "op")
_BANKS: dict[int, weakref.ref[Bank]] = {}  # the address of a bank's ``rows`` buffer -> the bank (for the op)
_LOST: list[int] = []  # an op call whose bank was not found (logged once)


def _steer_inplace(x: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor, lo: torch.Tensor,
                   hi: torch.Tensor) -> None:
    """``torch.ops.actsteer.steer_``: transport the steered tokens of ``x`` in place, by the plan of the bank that owns
    ``rows`` (the compiled graph passes the bank's buffers, so the bank is found by their address)."""
    ref = _BANKS.get(rows.data_ptr())
    bank = ref() if ref is not None else None
    if bank is None:
        if not _LOST:
            _LOST.append(rows.data_ptr())
            logger.error("actsteer: the steering buffers moved after start-up (was the model moved to another "
                         "device?); steering is OFF in this worker: restart vLLM")
        return
    plan = bank.plan if bank.used else None
    if plan is None or plan.end > x.shape[0]:  # nothing steered, or not the planned forward (vLLM's dummy runs)
        return
    site = bank.tables_of.get(delta.data_ptr())
    folded = site.folded(plan) if site is not None else plan.fold(delta, bias, lo, hi)
    for (where, _), maps in zip(plan.groups, folded):
        part = x[where] if isinstance(where, slice) else x.index_select(0, where)
        for weight, shift, low, high in maps:
            part = apply_folded(part, weight, shift, low, high)
        if isinstance(where, slice):
            x[where] = part
        else:
            x.index_copy_(0, where, part)


class Plan:
    """The op's plan of one forward: the steered tokens in groups that share their (row, amount) pairs, each group
    as one slice when its tokens are contiguous (a request's tokens are), else an index.

    Attributes:
        groups: ``(where, pairs)`` per group: ``pairs`` the ``(row, amount)`` of each composition position in order
            (``amount`` a 0-d float32 tensor).
        end: one past the last steered token (a forward with fewer rows is not the planned one).
        version: a number of its own, for the per-site caches of folded maps.
    """

    _count = 0

    def __init__(self, groups: list[tuple[slice | torch.Tensor, tuple[tuple[int, torch.Tensor], ...]]],
                 end: int) -> None:
        Plan._count += 1
        self.groups, self.end, self.version = groups, end, Plan._count

    def fold(self, delta: torch.Tensor, bias: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> list[list[Any]]:
        """The folded maps (`actsteer.core.fold_rows`) of each group's pairs from one site's tables."""
        return [[fold_rows(delta, bias, lo, hi, row, amount) for row, amount in pairs] for _, pairs in self.groups]

    @classmethod
    def of(cls, rows: torch.Tensor, amount: torch.Tensor, used: int, device: torch.device) -> Plan | None:
        """The plan of per-token ``rows`` and ``amount`` ``(depth, n)`` (host tensors); None when nothing is steered."""
        if not used:
            return None
        rows, amount = rows[:used], amount[:used]
        steered = amount.ne(0).any(0)
        if not bool(steered.any()):
            return None
        keys = torch.cat([rows.double(), amount.double()])[:, steered]  # a token's pairs, one column each
        tokens = torch.nonzero(steered).flatten()
        unique, inverse = torch.unique(keys, dim=1, return_inverse=True)
        groups = []
        for g in range(unique.shape[1]):
            index = tokens[inverse == g]
            first, last = int(index[0]), int(index[-1]) + 1
            where: slice | torch.Tensor = slice(first, last) if last - first == index.numel() else index.to(device)
            column = int(index[0])
            pairs = tuple((int(rows[c, column]), amount[c, column].to(device)) for c in range(used)
                          if amount[c, column] != 0)
            groups.append((where, pairs))
        return cls(groups, int(tokens[-1]) + 1)


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
        self._folded: tuple[int, list[list[Any]]] = (0, [])  # (plan version, its folded maps for this site)

    def folded(self, plan: Plan) -> list[list[Any]]:
        """The plan's folded maps from this site's tables, computed once per plan (a decode step of an unchanged
        batch reuses them)."""
        if self._folded[0] != plan.version:
            self._folded = (plan.version, plan.fold(self.delta, self.bias, self.lo, self.hi))
        return self._folded[1]

    def write(self, slot: int, tables: tuple[torch.Tensor, ...] | None) -> None:
        """Write slot ``slot``'s forward and reverse rows in place (None: the identity)."""
        rows = slice(2 * slot - 1, 2 * slot + 1)
        self._folded = (0, [])  # new maps: fold again
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
        self.plan: Plan | None = None  # the op's plan of the next forward (`set_tokens`)
        self.tables_of = {bank.delta.data_ptr(): bank for bank in self.sites}  # the op finds its site's cache
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
        self.plan = Plan.of(rows, amount, used, self.rows.device) if self.kind == "op" else None

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
