"""The hook engine: `attach`/`steer` apply transports to a model's sites with forward hooks.

Per-strength work happens once (folding, ACT_SPEC.md section 4); the per-call path is one
``addcmul`` (inside a ``where`` when a support range applies) in the activation's dtype and device.
Hooks never edit outputs in place and never keep references to them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, Union

import torch

from .sites import infer_width, iter_site_modules, missing_site_message
from .transport import FoldedMap, Strength, Transport

logger = logging.getLogger(__name__)

SiteStrength = Union[Strength, Mapping[str, Strength]]
ApplyTo = Literal["all", "prompt", "generated"]

# model -> its live handle; steering the same model twice must go through one handle (a list).
_ACTIVE: weakref.WeakKeyDictionary[torch.nn.Module, SteeringHandle] = weakref.WeakKeyDictionary()
# hooked module -> the handle whose hook it carries (catches nesting through a parent or child module)
_HOOKED: weakref.WeakKeyDictionary[torch.nn.Module, SteeringHandle] = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class Steering:
    """A transport with the strength to apply it at; lists of these compose, applied in order.

    Args:
        transport: the fitted `Transport`.
        strength: 0 identity, 1 full transport, negative = reverse (target -> source) at ``|strength|``,
            above 1 extrapolation. A 1-D tensor gives one strength per batch row; a mapping
            ``{site: strength}`` sets sites individually (``"*"`` is the default for the others, else 1.0).
        apply_to: ``"all"`` tokens (default, as in the paper), only the ``"prompt"`` tokens, or only the
            ``"generated"`` ones. The last two need to know token positions, which ``generate(..., steering=...)``
            provides (`actsteer.enable_steering`); they apply to token outputs ``(B, T, D)``.

    Example:
        >>> import torch, actsteer
        >>> t = actsteer.Transport({"0": actsteer.UnitMap(torch.ones(2), torch.ones(2))})
        >>> actsteer.Steering(t, strength=0.5, apply_to="generated").apply_to
        'generated'
    """

    transport: Transport
    strength: SiteStrength = 1.0
    apply_to: ApplyTo = "all"

    def __post_init__(self) -> None:
        if not isinstance(self.transport, Transport):
            raise TypeError(f"Steering needs a Transport, got {type(self.transport).__name__}")
        if self.apply_to not in ("all", "prompt", "generated"):
            raise ValueError(f"`apply_to` must be 'all', 'prompt' or 'generated', got {self.apply_to!r}")


SteeringLike = Union[Transport, Steering, Sequence[Union[Transport, Steering]]]


def as_steerings(steering: SteeringLike, strength: SiteStrength = 1.0) -> list[Steering]:
    """Normalise a Transport, a Steering, or a list of them; bare transports take ``strength``."""
    items = [steering] if isinstance(steering, (Transport, Steering)) else list(steering)
    if not items:
        raise ValueError("Nothing to steer with: got an empty list of transports")
    out = []
    for item in items:
        if isinstance(item, Transport):
            out.append(Steering(item, strength))
        elif isinstance(item, Steering):
            out.append(item)
        else:
            raise TypeError(f"Expected a Transport or a Steering, got {type(item).__name__}")
    return out


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _site_strength(strength: SiteStrength, site: str) -> Strength:
    if isinstance(strength, Mapping):
        return strength.get(site, strength.get("*", 1.0))
    return strength


def _is_zero(strength: Strength) -> bool:
    return not isinstance(strength, torch.Tensor) and float(strength) == 0.0


class SteeringHandle:
    """Live steering of one model; returned by `attach`. ``remove()`` is idempotent.

    Attributes:
        strength: read/write; setting it re-folds every site of every transport (cheap, no forward).
        active: set False to pause steering without removing the hooks (used for step windows).
        calls: how many times each site was transported since attach (``{site: int}``); calls at strength 0
            and while paused are not counted (nothing is computed then).
    """

    def __init__(self, model: torch.nn.Module, steerings: list[Steering]) -> None:
        self._model_ref = weakref.ref(model)
        self._steerings = list(steerings)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._folded: dict[tuple[int, str], FoldedMap | None] = {}
        # per (transport index, site, dtype, device): the bound per-call function
        self._cast: dict[tuple[int, str, torch.dtype, torch.device], Callable[[torch.Tensor], torch.Tensor]] = {}
        self.active = True
        self.calls: dict[str, int] = {}
        self._positions: tuple[int, int] | None = None
        self._refold()

    # strength ----------------------------------------------------------------------------------
    @property
    def strength(self) -> SiteStrength | list[SiteStrength]:
        """The strength (one value, or a list with one per composed transport)."""
        values = [s.strength for s in self._steerings]
        return values[0] if len(values) == 1 else values

    @strength.setter
    def strength(self, value: SiteStrength) -> None:
        self.set_strength(value)

    def set_strength(self, value: SiteStrength, *, index: int | None = None) -> None:
        """Set the strength of every composed transport, or only of ``self.transports[index]``."""
        targets = list(range(len(self._steerings))) if index is None else [index]
        for i in targets:
            self._steerings[i] = dataclasses.replace(self._steerings[i], strength=value)
        self._refold(targets)

    def _refold(self, indices: list[int] | None = None) -> None:
        """Fold the strengths of the given composed transports (all by default); others keep their folds."""
        indices = list(range(len(self._steerings))) if indices is None else indices
        folded = dict(self._folded) if hasattr(self, "_folded") else {}
        for i in indices:
            st = self._steerings[i]
            for site, unit_map in st.transport.items():
                s = _site_strength(st.strength, site)
                folded[(i, site)] = None if _is_zero(s) else unit_map.fold(s)
        self._folded = folded
        self._cast = {k: v for k, v in self._cast.items() if k[0] not in indices}

    def set_positions(self, offset: int, prompt_length: int) -> None:
        """Tell the hooks where the next forward's tokens sit: token ``j`` of the call is at position
        ``offset + j``; positions below ``prompt_length`` are prompt tokens (for ``apply_to``)."""
        self._positions = (int(offset), int(prompt_length))

    @property
    def transports(self) -> list[Transport]:
        return [s.transport for s in self._steerings]

    @property
    def sites(self) -> list[str]:
        seen: dict[str, None] = {}
        for st in self._steerings:
            seen.update(dict.fromkeys(st.transport))
        return list(seen)

    # hooks -------------------------------------------------------------------------------------
    def _transport_tensor(self, i: int, site: str, x: torch.Tensor) -> torch.Tensor:
        key = (i, site, x.dtype, x.device)
        apply = self._cast.get(key)
        if apply is None:
            apply = self._cast[key] = self._build_applier(i, site, x)
        return apply(x)

    def _build_applier(self, i: int, site: str, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The per-call function for one site, dtype and device, with everything it needs bound ahead
        (the hot path is a shape check, a counter and one addcmul, inside a where when a range applies)."""
        base = self._folded[(i, site)]
        if base is None:  # strength 0: nothing to compute, the output is passed through untouched
            return _identity
        if not x.is_floating_point():
            raise TypeError(f"Site {site!r} returned a {x.dtype} tensor; only floating point outputs can be steered")
        fm = base.to(x.device, x.dtype)
        w, b, lo, hi, masked = fm.weight, fm.bias, fm.lo, fm.hi, fm.masked
        d = self._steerings[i].transport[site].dim
        apply_to = self._steerings[i].apply_to
        simple = w.dim() == 1 and apply_to == "all"
        calls = self.calls

        def general(x: torch.Tensor) -> torch.Tensor:
            nd = x.dim()
            axis = 1 if nd == 4 else -1
            if nd < 2 or x.shape[axis] != d:
                raise ValueError(
                    f"Site {site!r}: the transport has {d} units but the model's output has shape {tuple(x.shape)} "
                    f"(units on dim {axis}); the transport was fitted on a different model"
                )
            if w.dim() == 2 and w.shape[0] != x.shape[0]:
                raise ValueError(f"Site {site!r}: {w.shape[0]} per-row strengths given but the batch has {x.shape[0]} rows")
            calls[site] = calls.get(site, 0) + 1
            moved = fm.apply_spatial(x) if nd == 4 else fm.apply_last(x)
            if apply_to == "all":
                return moved
            if self._positions is None or nd != 3:
                raise ValueError(
                    f"Steering with apply_to={apply_to!r} needs token positions: use it through "
                    "model.generate(..., steering=...) after actsteer.enable_steering(model), on (B, T, D) outputs"
                )
            offset, prompt_length = self._positions
            pos = torch.arange(offset, offset + x.shape[1], device=x.device)
            keep = pos < prompt_length if apply_to == "prompt" else pos >= prompt_length
            return torch.where(keep[None, :, None], moved, x)

        def fast(x: torch.Tensor) -> torch.Tensor:
            if x.dim() == 4 or x.dim() < 2 or x.shape[-1] != d:
                return general(x)
            calls[site] = calls.get(site, 0) + 1
            moved = torch.addcmul(b, x, w)
            return torch.where(torch.clamp(x, lo, hi) == x, moved, x) if masked else moved

        return fast if simple else general

    def _make_hook(self, plan: list[tuple[int, str, int | None]]):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if not self.active:
                return None
            out = output
            for i, site, k in plan:
                if k is None:
                    if not isinstance(out, torch.Tensor):
                        raise TypeError(
                            f"Site {site!r} returned a {type(out).__name__}; name the element to steer as '{site}:k'"
                        )
                    out = self._transport_tensor(i, site, out)
                else:
                    if not isinstance(out, (tuple, list)) or k >= len(out):
                        got = type(out).__name__ + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
                        raise TypeError(f"Site {site!r} selects element {k} but the module returned a {got}")
                    new = self._transport_tensor(i, site, out[k])
                    if new is not out[k]:
                        items = list(out)
                        items[k] = new
                        out = type(out)(items) if isinstance(out, list) else tuple(items)
            return None if out is output else out

        return hook

    def _register(self) -> None:
        model = self._model_ref()
        plans: dict[str, tuple[torch.nn.Module, list[tuple[int, str, int | None]]]] = {}
        for i, st in enumerate(self._steerings):
            for site, name, k, module in iter_site_modules(model, st.transport):
                plans.setdefault(name, (module, []))[1].append((i, site, k))
        try:
            for name, (module, plan) in plans.items():
                self._handles.append(module.register_forward_hook(self._make_hook(plan)))
                _HOOKED[module] = self
                logger.debug("actsteer: hooked %s", name)
        except BaseException:
            self.remove()
            raise
        _ACTIVE[model] = self

    def remove(self) -> None:
        """Remove every hook; safe to call twice. The model is then exactly as before."""
        for h in reversed(self._handles):
            h.remove()
        self._handles.clear()
        for module in [m for m, owner in _HOOKED.items() if owner is self]:
            del _HOOKED[module]
        model = self._model_ref()
        if model is not None and _ACTIVE.get(model) is self:
            del _ACTIVE[model]

    @property
    def is_attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> SteeringHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"SteeringHandle(sites={len(self.sites)}, strength={self.strength!r}, attached={self.is_attached})"


def validate(model: torch.nn.Module, transport: Transport) -> None:
    """Check that every site of ``transport`` exists in ``model`` with the right width, before touching it.

    Raises:
        KeyError: a site's module is missing (the message names near misses).
        ValueError: a module's width differs from the transport's (names expected vs actual).
    """
    problems = []
    for site, unit_map in transport.items():
        try:
            (_, name, k, module), = iter_site_modules(model, [site])
        except KeyError:
            raise KeyError(
                missing_site_message(model, site.split(":")[0]) + _fitted_on(transport)
            ) from None
        width = infer_width(module) if k is None else None
        if width is not None and width != unit_map.dim:
            problems.append(f"{site!r}: transport has {unit_map.dim} units, {type(module).__name__} outputs {width}")
    if problems:
        raise ValueError(
            f"Transport does not match {type(model).__name__}: " + "; ".join(problems[:5])
            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "") + _fitted_on(transport)
        )


def _fitted_on(transport: Transport) -> str:
    hint = transport.model.get("name_or_path") or transport.model.get("class")
    return f" (the transport was fitted on {hint!r})" if hint else ""


def attach(model: torch.nn.Module, transport: SteeringLike, strength: SiteStrength = 1.0) -> SteeringHandle:
    """Steer ``model`` until ``handle.remove()``: forward hooks apply the transport(s) to their sites.

    Args:
        model: any module whose submodule names match the transport's sites.
        transport: a `Transport`, a `Steering`, or a list of them (applied in order, so concepts compose).
        strength: strength for bare transports (see `Steering`).

    Returns:
        A `SteeringHandle` (``.strength`` is settable live; ``.remove()``).

    Raises:
        KeyError / ValueError: before anything is attached, if a site is missing or has the wrong width.
        RuntimeError: if ``model`` is already steered (pass a list instead of nesting).

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
    steerings = as_steerings(transport, strength)
    if model in _ACTIVE:
        raise RuntimeError(
            f"{type(model).__name__} is already steered by {_ACTIVE[model]!r}; pass a list of transports to one "
            "attach()/steer() call to compose them, or remove the first handle"
        )
    for st in steerings:
        validate(model, st.transport)
        if isinstance(st.strength, Mapping):
            unknown = sorted(set(st.strength) - set(st.transport) - {"*"})
            if unknown:
                raise KeyError(
                    f"Per-site strengths name site(s) {unknown[:3]} that are not in the transport; its sites are "
                    f"{st.transport.sites[:3]}{'...' if len(st.transport) > 3 else ''} ('*' sets the default)"
                )
    for st in steerings:  # a handle on a parent or child module would put two maps on one site
        for site, name, _, module in iter_site_modules(model, st.transport):
            owner = _HOOKED.get(module)
            if owner is not None and owner.is_attached:
                raise RuntimeError(
                    f"Site {site!r} is already steered by another handle ({owner!r}, attached to an enclosing or inner "
                    "module); remove it first, or pass all transports as one list"
                )
    handle = SteeringHandle(model, steerings)
    handle._register()
    return handle


@contextlib.contextmanager
def steer(model: torch.nn.Module, transport: SteeringLike, strength: SiteStrength = 1.0) -> Iterator[SteeringHandle]:
    """Context manager form of `attach`: hooks are removed on exit, also when the body raises.

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
    handle = attach(model, transport, strength)
    try:
        yield handle
    finally:
        handle.remove()
