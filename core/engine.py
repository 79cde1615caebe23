"""The steering engine: request-scoped (`steer`) and model-wide (`attach`) steering through one dispatcher per module.

- `steer(model, t)`: only the forward calls made inside the ``with`` block, in this thread or asyncio task, are
  steered. The binding lives in a `contextvars.ContextVar`, so concurrent calls on the same model object in other
  threads or tasks see their own steering, or none.
- `attach(model, t)`: model-wide and long-lived: every call, in every thread, until ``handle.remove()``. Where both
  apply to one module, the model-wide transports run first, then the request's own.

The first binding that needs a module installs ONE dispatcher on it (`actsteer.core.dispatch`: a forward hook, plus
a forward pre-hook where a binding asked for a per-call callback); the last binding to leave removes it. Calls without steering pay a
context-variable read and a dict lookup while it is installed, nothing once it is gone. A deep copy of a model made
meanwhile is not steered by the original's bindings (dispatch is by module identity) but can be steered in its own
right like any model; it loses the original's dispatcher at its first call or when the original's steering ends.
Pickling writes a standard-library no-op in its place, so no actsteer state is saved (steering the loaded model
again removes those no-ops).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch

from .apply import RowLayout, make_applier, transport_traced
from .dispatch import CURRENT, DISPATCHERS, LOCK, PAUSED, ROWS, Frame, dispatcher_of, read
from .sites import element, iter_site_modules, replace_element, validate
from .steering import (
    SiteStrength,
    Steering,
    SteeringLike,
    as_steerings,
    check_site_strength,
    is_zero,
    site_strength,
)
from .folding import FoldedMap
from .transport import Transport

logger = logging.getLogger(__name__)

Scope = Literal["request", "model"]
CallHook = Callable[[torch.nn.Module, tuple, dict], None]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _device_of(module: torch.nn.Module | None) -> torch.device | None:
    """The device of a module's first parameter or buffer (None when it has neither)."""
    if module is None:
        return None
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return None if tensor is None else tensor.device


class SteeringHandle:
    """Live steering of one model by a list of `Steering` entries; returned by `attach` and `steer`.

    Attributes:
        scope: ``"request"`` (from `steer`: calls in the ``with`` block, this thread/task) or ``"model"`` (from
            `attach`: every call until ``remove()``).
        rows: ``"exact"`` or ``"interleaved"``: how per-row strengths meet a batch with more rows (see `bind`).
        strength: read/write; setting it validates, then re-folds every site (cheap, no forward pass).
        active: set False to pause all steering of this handle without removing anything.
        calls: how many times each site was transported (``{site: int}``); calls at strength 0, of switched-off
            entries and while paused are not counted (nothing is computed then).

    ``remove()`` is idempotent; afterwards the model is exactly as before.
    """

    def __init__(
        self, model: torch.nn.Module, steerings: list[Steering], scope: Scope, rows: RowLayout = "exact"
    ) -> None:
        self.scope = scope
        self.rows = rows
        self._steerings = list(steerings)
        self._enabled = [True] * len(self._steerings)
        self._folded: dict[tuple[int, str], FoldedMap | None] = {}
        # per (entry index, site, dtype, device): the bound per-call function
        self._cast: dict[tuple[int, str, torch.dtype, torch.device], Callable[[torch.Tensor], torch.Tensor]] = {}
        self._plans: dict[torch.nn.Module, tuple[tuple[int, str, int | None], ...]] = {}
        self._site_modules: dict[str, torch.nn.Module] = {}
        self._key = object()  # this handle's entry in a context's paused modules (`set_active(under=...)`)
        self._entries_key = object()  # ... and in a context's switched-off entries (`set_entries_off`)
        self._staged = False  # set_entries_off(...) was used: look up the context's switched-off entries per call
        self._windowed = False  # set_active(under=...) was used: look up the context's paused modules per call
        self._rowed = False  # set_rows(...) was used: look up the context's row selections per call
        self._under: dict[str, frozenset[int]] = {}  # set_active's prefix -> ids of the modules it names
        self._callbacks: dict[torch.nn.Module, list[CallHook]] = {}
        self._positions: tuple[int, int] | None = None
        self._attached = False
        self.active = True
        self.seen = False  # a call of the model reached this (request-scoped) binding
        self._checked: str | None = None  # the last site whose first steered call stayed finite (`_check_finite`)
        self.calls: dict[str, int] = {}
        plans: dict[torch.nn.Module, list[tuple[int, str, int | None]]] = {}
        for i, st in enumerate(self._steerings):
            for site, _, k, module in iter_site_modules(model, st.transport):
                plans.setdefault(module, []).append((i, site, k))
                self._site_modules[site] = module
        self._plans = {m: tuple(p) for m, p in plans.items()}
        self._refold()

    # strength ----------------------------------------------------------------------------------------
    @property
    def strength(self) -> SiteStrength | list[SiteStrength]:
        """The strength (one value, or a list with one per composed transport)."""
        values = [s.strength for s in self._steerings]
        return values[0] if len(values) == 1 else values

    @strength.setter
    def strength(self, value: SiteStrength | list[SiteStrength]) -> None:
        if isinstance(value, list) and len(self._steerings) > 1:
            if len(value) != len(self._steerings):
                raise ValueError(f"Got {len(value)} strengths for {len(self._steerings)} composed transports")
            checked = [check_site_strength(v, s.transport) for v, s in zip(value, self._steerings)]
            for i, v in enumerate(checked):
                self._replace(i, v)
            self._refold()
            return
        self.set_strength(value)

    def set_strength(self, value: SiteStrength, *, index: int | None = None) -> None:
        """Set the strength of every composed transport, or only of ``self.transports[index]``.

        The value is validated first (finite numbers, a 1-D tensor for per-row strengths, or a per-site
        mapping); a refused value leaves the handle exactly as it was.
        """
        targets = list(range(len(self._steerings))) if index is None else [self._check_index(index)]
        checked = [check_site_strength(value, self._steerings[i].transport) for i in targets]
        for i, v in zip(targets, checked):
            self._replace(i, v)
        self._refold(targets)

    def _replace(self, i: int, strength: SiteStrength) -> None:
        st = self._steerings[i]
        self._steerings[i] = Steering(st.transport, strength, st.apply_to)

    def _check_index(self, index: int) -> int:
        if not isinstance(index, int) or not -len(self._steerings) <= index < len(self._steerings):
            raise IndexError(f"`index` {index!r} out of range: this handle composes {len(self._steerings)} transport(s)")
        return index % len(self._steerings)

    def _refold(self, indices: list[int] | None = None) -> None:
        indices = list(range(len(self._steerings))) if indices is None else indices
        folded = dict(self._folded)
        for i in indices:
            st = self._steerings[i]
            for site, unit_map in st.transport.items():
                s = site_strength(st.strength, site)
                device = _device_of(self._site_modules.get(site))  # folds live where the site runs (CUDA graphs)
                folded[(i, site)] = None if is_zero(s) else unit_map.fold(s, device=device)
        self._folded = folded
        self._cast = {k: v for k, v in self._cast.items() if k[0] not in indices}
        self._checked = None  # every first call is checked again, in execution order

    # switches -----------------------------------------------------------------------------------------
    def set_enabled(self, index: int, enabled: bool) -> None:
        """Switch one composed transport on or off for the next calls, without re-folding (e.g. step windows)."""
        self._enabled[self._check_index(index)] = bool(enabled)

    def set_active(self, active: bool, *, under: str | None = None) -> None:
        """Pause (False) or resume steering; with ``under``, only of the sites whose name starts with it
        (e.g. ``"unet."``: the denoiser of a pipeline, outside a step window), and only for the calls made in this
        thread or asyncio task: a step window belongs to one pipeline call, so concurrent calls steered by one
        model-wide handle never move each other's windows."""
        if under is None:
            self.active = bool(active)
            return
        modules = self._under.get(under)
        if modules is None:  # hosts switch the same part at every call (step windows): look it up once
            modules = self._under[under] = frozenset(
                id(m) for site, m in self._site_modules.items() if site.startswith(under)
            )
        paused = PAUSED.get()
        now = paused.get(self._key, frozenset())
        new = now - modules if active else now | modules
        if new != now:
            PAUSED.set({**paused, self._key: new})
        self._windowed = True

    def set_entries_off(self, indices: frozenset[int]) -> None:
        """Switch these composed entries off (all others on) for the calls made in this thread or asyncio task: the
        per-call counterpart of `set_enabled`. Hosts use it for per-step transports (`actsteer.core.steps`), whose
        stages are composed entries of one handle and each steers its own denoising steps only."""
        off = frozenset(self._check_index(i) for i in indices)
        paused = PAUSED.get()
        if paused.get(self._entries_key, frozenset()) != off:
            PAUSED.set({**paused, self._entries_key: off})
        self._staged = True

    def set_rows(self, rows: torch.Tensor | None, *, under: str | None = None) -> None:
        """Transport only these batch rows (a 1-D index tensor; None: every row) of the sites whose name starts
        with ``under`` (all sites when None), for the calls made in this thread or asyncio task; the other rows
        pass through unchanged. Hosts use it for the conditional half of a classifier-free-guidance batch.
        Per-row strengths then count the selected rows only. An empty selection leaves the outputs untouched.

        Example:
            >>> import torch, actsteer
            >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
            >>> t = actsteer.Transport({"0": actsteer.UnitMap(torch.ones(2), torch.ones(2))})
            >>> x = torch.zeros(4, 2)
            >>> plain = model(x)
            >>> with actsteer.steer(model, t) as handle:
            ...     handle.set_rows(torch.tensor([2, 3]))
            ...     moved = model(x) - plain
            >>> moved[:, 0].tolist()
            [0.0, 0.0, 1.0, 1.0]
        """
        key = under or ""
        modules = self._under.get(key)
        if modules is None:
            modules = self._under[key] = frozenset(
                id(m) for site, m in self._site_modules.items() if site.startswith(key)
            )
        if rows is not None:
            rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        selections = ROWS.get()
        mine = tuple(sel for sel in selections.get(self._key, ()) if sel[0] != modules)
        if rows is not None:
            mine = ((modules, rows), *mine)
        others = {k: v for k, v in selections.items() if k is not self._key}
        ROWS.set({**others, self._key: mine} if mine else others)
        self._rowed = True

    def _rows_of(self, module: torch.nn.Module) -> torch.Tensor | None:
        for modules, rows in read(ROWS).get(self._key, ()):
            if id(module) in modules:
                return rows
        return None

    def set_positions(self, offset: int, prompt_length: int) -> None:
        """Tell the hooks where the next forward's tokens sit: token ``j`` of the call is at position
        ``offset + j``; positions below ``prompt_length`` are prompt tokens (for ``apply_to``)."""
        self._positions = (int(offset), int(prompt_length))

    def on_call(self, module: torch.nn.Module, callback: CallHook) -> None:
        """Run ``callback(module, args, kwargs)`` before each forward of ``module`` that this handle steers
        (its thread/task for a request-scoped handle); hosts use it to set positions, windows or row strengths."""
        if not self._attached:
            raise RuntimeError("on_call() needs an attached handle")
        with LOCK:
            first = module not in self._callbacks
            self._callbacks.setdefault(module, []).append(callback)
            if first:
                d = dispatcher_of(module)
                d.acquire("call", request=self.scope == "request")
                if self.scope == "model":
                    d.model_calls = d.model_calls + (self,)
        if first and self.scope == "request":
            frame = CURRENT.get()
            calls = dict(frame.calls)
            calls[module] = calls.get(module, ()) + (self,)
            CURRENT.set(Frame(frame.sites, calls))

    def _before(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._attached:
            for callback in self._callbacks.get(module, ()):
                callback(module, args, kwargs)

    # introspection -------------------------------------------------------------------------------------
    @property
    def transports(self) -> list[Transport]:
        return [s.transport for s in self._steerings]

    @property
    def sites(self) -> list[str]:
        seen: dict[str, None] = {}
        for st in self._steerings:
            seen.update(dict.fromkeys(st.transport))
        return list(seen)

    @property
    def is_attached(self) -> bool:
        return self._attached

    # the per-call path -----------------------------------------------------------------------------------
    def _run(self, module: torch.nn.Module, output: Any) -> Any:
        if not (self.active and self._attached):
            return output
        if self._windowed and id(module) in read(PAUSED).get(self._key, ()):
            return output
        rows = self._rows_of(module) if self._rowed else None
        if rows is not None and rows.numel() == 0:
            return output
        off = read(PAUSED).get(self._entries_key, ()) if self._staged else ()
        if torch.compiler.is_compiling():
            return self._run_traced(module, output, rows, off)
        out = output
        enabled, cast = self._enabled, self._cast
        for i, site, k in self._plans[module]:
            if not enabled[i] or i in off:
                continue
            x = out if k is None and isinstance(out, torch.Tensor) else element(out, k, site)
            part = x if rows is None else x.index_select(0, rows.to(x.device))
            apply = cast.get((i, site, part.dtype, part.device))
            if apply is None:  # the first call of this fold, dtype and device: check what it gives once
                apply = self._transport(i, site, part)
                new = apply(part)
                _check_finite(self, i, site, part, new)
            else:
                new = apply(part)
            if new is part:
                continue
            if rows is not None:
                new = x.index_copy(0, rows.to(x.device), new)
            out = new if k is None else replace_element(out, k, new)
        return out

    def _run_traced(self, module: torch.nn.Module, output: Any, rows: torch.Tensor | None = None,
                    off: Any = ()) -> Any:
        """`_run` while torch.compile traces: no lazily filled cache and no counter (dynamo would guard on them and
        recompile per call); the current fold's tensors become graph inputs, so a new strength never recompiles."""
        out = output
        for i, site, k in self._plans[module]:
            if not self._enabled[i] or i in off:
                continue
            st = self._steerings[i]
            x = element(out, k, site)
            part = x if rows is None else x.index_select(0, rows.to(x.device))
            where = self._positions if st.apply_to != "all" else None  # never guard on positions needlessly
            new = transport_traced(self._folded[(i, site)], part, site=site, dim=st.transport[site].dim,
                                   apply_to=st.apply_to, where=where, rows=self.rows)
            if new is part:
                continue
            if rows is not None:
                new = x.index_copy(0, rows.to(x.device), new)
            out = replace_element(out, k, new)
        return out

    def _transport(self, i: int, site: str, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The applier for ``site`` and ``x``'s dtype and device, built once and kept until the next refold."""
        apply = self._cast[(i, site, x.dtype, x.device)] = self._build_applier(i, site, x)
        return apply

    def _build_applier(self, i: int, site: str, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        base = self._folded[(i, site)]
        if base is None:  # strength 0: nothing to compute, the output is passed through untouched
            return _identity
        st = self._steerings[i]
        return make_applier(base, x, site=site, dim=st.transport[site].dim, apply_to=st.apply_to,
                            positions=lambda: self._positions, calls=self.calls, rows=self.rows)

    # binding ---------------------------------------------------------------------------------------------
    def _bind(self) -> None:
        """Install dispatchers and register this handle (model-wide, or in the current context)."""
        with LOCK:
            if self.scope == "model":
                for module in self._plans:
                    owner = DISPATCHERS.get(module)
                    owner = owner.model_handle if owner is not None else None
                    if owner is not None and owner._attached:
                        raise RuntimeError(
                            f"Site {self._site_of(module)!r} is already steered model-wide by another handle "
                            f"({owner!r}); remove it first, or pass a list of transports to one attach() call"
                        )
            else:
                frame = CURRENT.get()
                for module in self._plans:
                    owner = frame.sites.get(module)
                    if owner is not None and owner._attached:
                        raise RuntimeError(
                            f"Site {self._site_of(module)!r} is already steered in this thread/task by {owner!r}; "
                            "pass a list of transports to one steer() call to compose them instead of nesting"
                        )
            for module in self._plans:
                d = dispatcher_of(module)
                d.acquire("site", request=self.scope == "request")
                if self.scope == "model":
                    d.model_handle = self
            self._attached = True
        if self.scope == "request":
            frame = CURRENT.get()
            sites = dict(frame.sites)
            sites.update(dict.fromkeys(self._plans, self))
            CURRENT.set(Frame(sites, frame.calls))
        logger.debug("actsteer: %s steering of %d sites", self.scope, len(self.sites))

    def _site_of(self, module: torch.nn.Module) -> str:
        return self._plans[module][0][1]

    def remove(self) -> None:
        """Stop steering and remove every hook this handle needed; safe to call twice.

        A request-scoped handle is normally removed by its ``with`` block; removed from another thread or task,
        it stops steering at once and its context forgets it when that context ends.
        """
        with LOCK:
            if not self._attached:
                return
            self._attached = False
            for module in self._plans:
                d = DISPATCHERS.get(module)
                if d is None:
                    continue
                if d.model_handle is self:
                    d.model_handle = None
                d.release("site", request=self.scope == "request")
            for module in self._callbacks:
                d = DISPATCHERS.get(module)
                if d is None:
                    continue
                d.model_calls = tuple(h for h in d.model_calls if h is not self)
                d.release("call", request=self.scope == "request")
        paused = PAUSED.get()
        if self._key in paused or self._entries_key in paused:
            PAUSED.set({k: v for k, v in paused.items() if k is not self._key and k is not self._entries_key})
        selections = ROWS.get()
        if self._key in selections:
            ROWS.set({k: v for k, v in selections.items() if k is not self._key})
        if self.scope == "request":
            frame = CURRENT.get()
            if any(h is self for h in frame.sites.values()) or any(self in hs for hs in frame.calls.values()):
                sites = {m: h for m, h in frame.sites.items() if h is not self}
                calls = {m: tuple(h for h in hs if h is not self) for m, hs in frame.calls.items()}
                CURRENT.set(Frame(sites, {m: hs for m, hs in calls.items() if hs}))

    def close_request(self) -> None:
        """Remove a request-scoped handle at the end of its ``with`` block (`steer`), first warning where steering
        was silently lost: the block ended in another thread/task than it began (a generator pulled item by item
        by a server), or no call of the model ever reached it (the calls ran in other threads or tasks)."""
        if self._attached and self.scope == "request":
            frame = CURRENT.get()
            if not any(h is self for h in frame.sites.values()):
                logger.warning(
                    "actsteer: a steer() block ended in another thread or task than the one it began in (a generator "
                    "pulled item by item by a server, as Starlette's StreamingResponse does, runs each item in a "
                    "fresh context): the calls made after its first item were NOT steered. Wrap the generator in "
                    "actsteer.keep_context(...), or steer inside each item (README: 'Streaming servers')"
                )
            elif not self.seen:
                logger.warning(
                    "actsteer: a steer() block ended without steering any call of its model (sites %s): calls made "
                    "in other threads or tasks (loop.run_in_executor, a Thread running generate() for a "
                    "TextIteratorStreamer, a server's thread pool) were NOT steered. Pass steering= to generate() in "
                    "that thread, or run the work in contextvars.copy_context().run (README: 'Streaming servers')",
                    ", ".join(self.sites[:3]) + (", ..." if len(self.sites) > 3 else ""),
                )
        self.remove()

    def __enter__(self) -> SteeringHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"SteeringHandle(scope={self.scope!r}, sites={len(self.sites)}, strength={self.strength!r}, "
            f"attached={self.is_attached})"
        )


def _check_finite(handle: SteeringHandle, i: int, site: str, x: torch.Tensor, new: torch.Tensor) -> None:
    """Refuse a fold whose first call turns finite activations into inf/NaN (beyond the dtype's range): a model
    would otherwise run on, silently producing NaN logits or black images. One host sync per fold, dtype and
    device (never per call); skipped while a CUDA graph is captured. Activations that reach a steered site
    already non-finite are blamed on steering only where an earlier steered site of this handle stayed finite
    (steered values that fit the dtype can still overflow the layers between two sites, e.g. the product of an
    MLP's steered gate and up projections); a model whose own activations were non-finite before any steered site
    is not blamed. The applier is forgotten, so every later call is refused too.

    Raises:
        ValueError: naming the site, the strength and what to do.
    """
    if new is x or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    if bool(torch.isfinite(new).all()):
        handle._checked = site
        return
    upstream, reached = handle._checked, bool(torch.isfinite(x).all())
    if not reached and (upstream is None or upstream == site):
        return  # the model's own activations were not finite before steering touched them
    handle._cast.pop((i, site, x.dtype, x.device), None)
    st = handle._steerings[i]
    strength = site_strength(st.strength, site)
    shown = f"{strength:g}" if isinstance(strength, float) else "the per-row strengths"
    if not reached:
        raise ValueError(
            f"Site {site!r}: at strength {shown} the activations reaching it are inf/NaN: steering at {upstream!r} "
            f"(upstream) stays within {x.dtype} but the layers in between overflow its range "
            f"(+-{torch.finfo(x.dtype).max:.3g}); run the model in float32 (if it runs in half precision) or use a "
            "smaller strength, or check the transport's omega and beta (actsteer inspect FILE)"
        )
    raise ValueError(
        f"Site {site!r}: at strength {shown} the transport sends this call's finite activations beyond the range of "
        f"{x.dtype} (+-{torch.finfo(x.dtype).max:.3g}: inf/NaN outputs); run the model in float32 (if it runs in half "
        "precision) or use a smaller strength, or check the transport's omega and beta (actsteer inspect FILE)"
    )


def bind(
    model: torch.nn.Module,
    transport: SteeringLike,
    strength: SiteStrength = 1.0,
    *,
    scope: Scope = "request",
    rows: RowLayout = "exact",
) -> SteeringHandle:
    """Validate, fold and bind a `SteeringHandle` (what `attach` and `steer` are made of, for host layers).

    ``scope="request"`` binds to the current thread/task: the caller must ``remove()`` it there (use `steer`
    unless a host needs the handle across a callback API); ``scope="model"`` is `attach`. ``rows="interleaved"``
    spreads per-row strengths over a batch of ``k`` times as many rows, ``k`` consecutive rows each (what
    ``generate`` makes of beams and ``num_return_sequences``; `actsteer.core.apply.rows_for`); ``"exact"`` (the
    default) refuses a batch with another number of rows.
    """
    if scope not in ("request", "model"):
        raise ValueError(f"`scope` must be 'request' or 'model', got {scope!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"Expected a torch.nn.Module (or a diffusers pipeline via actsteer.steer/attach), got {type(model).__name__}"
        )
    steerings = as_steerings(transport, strength)
    for st in steerings:
        validate(model, st.transport)
    handle = SteeringHandle(model, steerings, scope, rows)
    handle._bind()
    return handle


def attach(model: torch.nn.Module, transport: SteeringLike, strength: SiteStrength = 1.0) -> SteeringHandle:
    """Steer EVERY call of ``model``, in every thread, until ``handle.remove()`` (model-wide, long-lived).

    Use it in notebooks and where one process owns the model (e.g. a vLLM worker). To steer one request of a
    shared model, use `steer`: it steers only the calls made inside its ``with`` block, in that thread or task.
    Model-wide and request-scoped steering compose on the same sites: the model-wide transports run first.

    Args:
        model: any module whose submodule names match the transport's sites.
        transport: a `Transport`, a `Steering`, or a list of them (applied in order, so concepts compose).
        strength: strength for bare transports (see `Steering`).

    Returns:
        A `SteeringHandle` (``.strength`` is settable live; ``.remove()``).

    Raises:
        KeyError / ValueError / TypeError: before anything is attached, for a missing site, a wrong width or a
            bad strength.
        RuntimeError: a site is already steered model-wide by another handle (pass a list instead).

    Example:
        >>> import torch, actsteer
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3))
        >>> t = actsteer.Transport({"0": actsteer.UnitMap(torch.ones(3), torch.full((3,), 5.0))})
        >>> x = torch.zeros(1, 3)
        >>> plain = model(x)
        >>> handle = actsteer.attach(model, t, strength=0.5)
        >>> torch.allclose(model(x), plain + 2.5)
        True
        >>> handle.strength = 1.0
        >>> torch.allclose(model(x), plain + 5.0)
        True
        >>> handle.remove()
        >>> torch.equal(model(x), plain)
        True
    """
    return bind(model, transport, strength, scope="model")


@contextlib.contextmanager
def steer(model: torch.nn.Module, transport: SteeringLike, strength: SiteStrength = 1.0) -> Iterator[SteeringHandle]:
    """Steer the calls of ``model`` made inside the ``with`` block, in this thread or asyncio task only.

    Other threads and tasks using the same model object at the same time are not affected; hooks are removed
    on exit, also when the body raises. Work handed to another thread inside the block is not steered unless
    it runs in a copy of this context (``contextvars.copy_context().run``, ``asyncio.to_thread``); a generator
    that opens the block and is pulled item by item in fresh contexts (a server's streamed response) needs
    `actsteer.keep_context`. A block that ends without steering any call of the model, or in another thread or
    task than it began in, logs a warning that says so (steering was lost).

    Example:
        >>> import torch, actsteer
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
        >>> t = actsteer.Transport({"1": actsteer.UnitMap(torch.ones(3), torch.ones(3))})
        >>> x = torch.randn(2, 3)
        >>> with actsteer.steer(model, t, strength=1.0):
        ...     steered = model(x)
        >>> torch.allclose(steered, model(x) + 1)
        True
    """
    handle = bind(model, transport, strength, scope="request")
    try:
        yield handle
    except BaseException:
        handle.remove()
        raise
    handle.close_request()


def steering_of(module: torch.nn.Module) -> list[SteeringHandle]:
    """The live handles that would steer a call of ``module`` or any submodule made here (model-wide, then
    this thread/task's own); fitting refuses to run on a model that is being steered."""
    frame = CURRENT.get()
    found: dict[int, SteeringHandle] = {}
    for m in module.modules():
        d = DISPATCHERS.get(m)
        for h in (d.model_handle if d is not None else None, frame.sites.get(m)):
            if h is not None and h._attached:
                found[id(h)] = h
    return list(found.values())
