"""The per-call path: one function per (site, dtype, device) that transports a site's output tensor.

Everything that does not depend on the call's values is bound ahead (folded weights cast to the activation's
device and dtype, the support bounds, the shape to expect), so that the common call is a shape check, a counter
and one ``addcmul`` (inside a ``where`` when a support range applies), in the activation's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .transport import FoldedMap

Positions = Callable[[], "tuple[int, int] | None"]


def make_applier(
    base: FoldedMap,
    x: torch.Tensor,
    *,
    site: str,
    dim: int,
    apply_to: str,
    positions: Positions,
    calls: dict[str, int],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function that transports ``site``'s outputs shaped, typed and placed like ``x``.

    Args:
        base: the map folded at its strength (``(D,)`` tensors, or ``(R, D)`` for per-row strengths).
        x: an output of the site (only its dtype and device are used).
        site: the site name, for error messages and the ``calls`` counter.
        dim: the transport's number of units D.
        apply_to: ``"all"``, ``"prompt"`` or ``"generated"`` tokens; the last two read ``positions()``.
        positions: returns ``(offset, prompt_length)`` of the current call's tokens, or None when unknown.
        calls: counter incremented per transported call (``{site: n}``).

    Raises:
        TypeError: the site's output is not floating point.
        ValueError: (half precision) the map leaves the dtype's range on its support.
    """
    if not x.is_floating_point():
        raise TypeError(f"Site {site!r} returned a {x.dtype} tensor; only floating point outputs can be steered")
    try:
        fm = base.to(x.device, x.dtype)
    except ValueError as err:
        raise ValueError(f"Site {site!r}: {err}") from None
    w, b, lo, hi, masked = fm.weight, fm.bias, fm.lo, fm.hi, fm.masked
    simple = w.dim() == 1 and apply_to == "all" and w.dtype == x.dtype

    def general(x: torch.Tensor) -> torch.Tensor:
        nd = x.dim()
        axis = 1 if nd == 4 else -1
        if nd < 2 or x.shape[axis] != dim:
            raise ValueError(
                f"Site {site!r}: the transport has {dim} units but the model's output has shape {tuple(x.shape)} "
                f"(units on dim {axis}); the transport was fitted on a different model"
            )
        if w.dim() == 2 and w.shape[0] != x.shape[0]:
            raise ValueError(f"Site {site!r}: {w.shape[0]} per-row strengths given but the batch has {x.shape[0]} rows")
        calls[site] = calls.get(site, 0) + 1
        moved = fm.apply_spatial(x) if nd == 4 else fm.apply_last(x)
        if apply_to == "all":
            return moved
        where = positions()
        if where is None or nd != 3:
            raise ValueError(
                f"Steering with apply_to={apply_to!r} needs token positions: use it through "
                "model.generate(..., steering=...) after actsteer.enable_steering(model), on (B, T, D) outputs"
            )
        offset, prompt_length = where
        pos = torch.arange(offset, offset + x.shape[1], device=x.device)
        keep = pos < prompt_length if apply_to == "prompt" else pos >= prompt_length
        return torch.where(keep[None, :, None], moved, x)

    def fast(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 or x.dim() < 2 or x.shape[-1] != dim:
            return general(x)
        calls[site] = calls.get(site, 0) + 1
        moved = torch.addcmul(b, x, w)
        return torch.where(torch.clamp(x, lo, hi) == x, moved, x) if masked else moved

    return fast if simple else general
