"""What to steer with: `Steering` (a transport, its strength, which tokens), and strength validation.

Strengths are checked where they enter (a `Steering`, ``handle.strength = ...``), before anything changes:
a number or a 0-d tensor, a 1-D tensor with one strength per batch row, or a mapping ``{site: strength}``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import torch

from .steps import Window, split_stages, stage_of
from .transport import Strength, Transport
from .validation import shorten

SiteStrength = Union[Strength, Mapping[str, Strength]]
ApplyTo = Literal["all", "prompt", "generated"]

# Far beyond any useful strength (1 is full transport; the additive baselines use tens at most); past this,
# folded slopes reach 1e3+ and a half-precision model overflows. A typo like 1e30 fails here, not in the logits.
MAX_STRENGTH = 1000.0


def check_strength(value: Any, *, what: str = "strength") -> Strength:
    """Validate one strength: a finite real number, or a 1-D tensor/array of them (one per batch row).

    Returns a ``float`` or a float32 CPU tensor of shape ``(R,)``; never modifies ``value``.

    Raises:
        TypeError: strings, None, booleans, lists, or tensors that are not 0-d or 1-D (with what to pass).
        ValueError: NaN, infinity, or a magnitude above `MAX_STRENGTH`.

    Example:
        >>> check_strength(0.5), check_strength(torch.tensor([0.0, 1.0]))
        (0.5, tensor([0., 1.]))
    """
    if isinstance(value, bool) or value is None or isinstance(value, (str, bytes)):
        hint = (
            f"; pass the number itself, e.g. {what}={value.strip()}" if isinstance(value, str) and _is_number(value)
            else "; 0 switches steering off, 1 is full transport"
        )
        raise TypeError(f"`{what}` must be a number, got {type(value).__name__} {value!r}{hint}")
    if isinstance(value, (list, tuple)):
        raise TypeError(
            f"`{what}` must be a number, got a {type(value).__name__}; for one strength per batch row pass "
            f"torch.tensor({list(value)!r}), for one per composed transport use a list of Steering objects"
        )
    if isinstance(value, numbers.Real):
        out: Strength = float(value)
    elif isinstance(value, torch.Tensor) or hasattr(value, "__array__"):
        try:
            tensor = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"`{what}` could not be read as numbers ({err})") from None
        if tensor.dim() > 1 or not (tensor.is_floating_point() or tensor.dtype in _INT_DTYPES):
            raise TypeError(
                f"`{what}` must be a number or a 1-D tensor (one strength per batch row), got a {tensor.dtype} "
                f"tensor of shape {tuple(tensor.shape)}"
            )
        tensor = tensor.detach().to("cpu", torch.float64)
        out = float(tensor) if tensor.dim() == 0 else tensor
    else:
        raise TypeError(f"`{what}` must be a number or a 1-D tensor, got {type(value).__name__}")
    values = [out] if isinstance(out, float) else out.tolist()
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"`{what}` must be finite, got {bad[0]}; 0 switches steering off, 1 is full transport")
    big = [v for v in values if abs(v) > MAX_STRENGTH]
    if big:
        raise ValueError(
            f"`{what}` = {big[0]:g} is far outside any useful range (|strength| <= {MAX_STRENGTH:g}; 1 is full "
            "transport, values above 1 extrapolate)"
        )
    if isinstance(out, torch.Tensor):
        if out.numel() == 0:
            raise ValueError(f"`{what}` is an empty tensor; give one strength per batch row")
        out = out.float()
    return out


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_site_strength(value: Any, transport: Transport | None = None, *, what: str = "strength") -> SiteStrength:
    """`check_strength` for a value or a ``{site: strength}`` mapping (``"*"`` is the default for other sites).

    With ``transport``, mapping keys that name none of its sites are refused (a typo must not be ignored).
    """
    if not isinstance(value, Mapping):
        return check_strength(value, what=what)
    out = {}
    for site, s in value.items():
        if not isinstance(site, str):
            raise TypeError(f"Per-site strength keys must be site names (str), got {site!r}")
        out[site] = check_strength(s, what=f"{what}[{site!r}]")
    if transport is not None:  # a per-step transport's sites also answer to their unmarked names (every stage)
        unknown = sorted(set(out) - set(transport) - {stage_of(site)[0] for site in transport} - {"*"})
        if unknown:
            raise KeyError(
                f"Per-site strengths name site(s) {unknown[:3]} that are not in the transport; its sites are "
                f"{transport.sites[:3]}{'...' if len(transport) > 3 else ''} ('*' sets the default)"
            )
    return out


def site_strength(strength: SiteStrength, site: str) -> Strength:
    """The strength of one site: its own entry, else ``"*"``, else 1.0."""
    if isinstance(strength, Mapping):
        return strength.get(site, strength.get("*", 1.0))
    return strength


def is_zero(strength: Strength) -> bool:
    """True for a scalar strength of exactly 0 (the identity: nothing to compute)."""
    return not isinstance(strength, torch.Tensor) and strength == 0.0


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

    Raises:
        TypeError / ValueError: a transport that is not a `Transport`, a strength that is not a finite number
            (or 1-D tensor, or mapping of them), an unknown per-site key, or an unknown ``apply_to``.

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
            raise TypeError(
                f"Steering needs a Transport, got {type(self.transport).__name__}; load one with "
                "actsteer.Transport.load(path)"
            )
        object.__setattr__(self, "strength", check_site_strength(self.strength, self.transport))
        if self.apply_to not in ("all", "prompt", "generated"):
            raise ValueError(f"`apply_to` must be 'all', 'prompt' or 'generated', got {self.apply_to!r}")


SteeringLike = Union[Transport, Steering, Sequence[Union[Transport, Steering]]]


def as_steerings(steering: SteeringLike, strength: SiteStrength = 1.0) -> list[Steering]:
    """Normalise a Transport, a Steering, or a list of them; bare transports take ``strength``."""
    if steering is None:
        raise TypeError("Nothing to steer with: got None; pass a Transport, a Steering, or a list of them")
    if isinstance(steering, Mapping) and not isinstance(steering, Transport):
        raise TypeError(
            "Expected a Transport, a Steering or a list of them, got a dict; for per-site strengths pass "
            "Steering(transport, strength={site: value}) ('*' sets the default)"
        )
    if isinstance(steering, (str, bytes, Path)):
        raise TypeError(
            f"Expected a Transport, a Steering or a list of them, got a {type(steering).__name__} {shorten(str(steering))!r}; "
            "load the file first: actsteer.Transport.load(path)"
        )
    if not isinstance(steering, (Transport, Steering, Iterable)):
        hint = "; the strength is its own argument (or Steering(transport, strength))" if isinstance(steering, numbers.Real) else ""
        raise TypeError(f"Expected a Transport, a Steering or a list of them, got a {type(steering).__name__}{hint}")
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
            raise TypeError(
                f"Expected a Transport or a Steering, got {type(item).__name__}; load a file with "
                "actsteer.Transport.load(path)"
            )
    return out


def expand_stages(steerings: Sequence[Steering]) -> tuple[list[Steering], list[Window | Literal["all"]]]:
    """Steerings with every per-step transport split into its parts (`split_stages`), and each entry's window.

    Hosts with a denoising schedule bind the returned steerings as one handle's composed entries and switch each on
    only inside its window (``"all"``: always). A per-site strength mapping is translated for each part: ``"*"``
    and unmarked site names (``"unet.x"``: every stage) carry over, marked ones (``"unet.x@2"``) go to their stage.

    Example:
        >>> import torch, actsteer
        >>> m = actsteer.UnitMap(torch.ones(2), torch.ones(2))
        >>> t = actsteer.Transport({"unet.a@0": m, "unet.a@1": m}, extra={"stages": [[0, 0.5], [0.5, 1]]})
        >>> parts, windows = expand_stages([actsteer.Steering(t, 0.5)])
        >>> [(p.strength, list(p.transport)) for p in parts], windows
        ([(0.5, ['unet.a']), (0.5, ['unet.a'])], [(0.0, 0.5), (0.5, 1.0)])
    """
    out: list[Steering] = []
    windows: list[Window | Literal["all"]] = []
    for st in steerings:
        parts = split_stages(st.transport)
        if len(parts) == 1 and parts[0][0] == "all":
            out.append(st)
            windows.append("all")
            continue
        for window, part in parts:
            strength = st.strength
            if isinstance(strength, Mapping):  # "*", unmarked names (every stage), then this stage's own marks
                stage = None if window == "all" else part.extra.get("stage")
                marked = {stage_of(key)[0]: v for key, v in strength.items()
                          if stage is not None and stage_of(key)[1] == stage}
                strength = {**{key: v for key, v in strength.items() if stage_of(key)[1] is None}, **marked}
                strength = {key: v for key, v in strength.items() if key == "*" or key in part}
            out.append(Steering(part, strength, st.apply_to))
            windows.append(window)
    return out, windows
