"""The per-call path: the function that transports one site's output tensor, eager or under torch.compile.

Eagerly, `make_applier` binds ahead everything that does not depend on the call's values (the folded map cast to
the activation's device and dtype, the shape to expect), so that the common call is a shape check, a counter and
the one formula (`actsteer.core.folding.bind_affine`): one ``addcmul`` for support "all", plus ``clamp``, an
in-place compare and an in-place ``lerp`` for a support range, all float ops in the activation's dtype. While
torch.compile traces a model, `transport_traced` does the same work from the handle's folded map directly, with no
cache and no counter, so a compiled graph reads the current strength's tensors at every call and a strength
change never recompiles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from .folding import FoldedMap, bind_affine

Positions = Callable[[], "tuple[int, int] | None"]


RowLayout = Literal["exact", "interleaved"]


def _check(x: torch.Tensor, fm: FoldedMap, site: str, dim: int) -> int:
    """The unit axis of ``x`` after checking its shape against the map; raises naming the site."""
    nd = x.dim()
    axis = 1 if nd == 4 else -1
    if nd < 2 or x.shape[axis] != dim:
        raise ValueError(
            f"Site {site!r}: the transport has {dim} units but the model's output has shape {tuple(x.shape)} "
            f"(units on dim {axis}); the transport was fitted on a different model"
        )
    return axis


def rows_for(fm: FoldedMap, batch: int, site: str, layout: RowLayout) -> FoldedMap:
    """``fm`` with one strength per row of a batch of ``batch`` rows.

    Per-row strengths (``R`` of them) fit a batch of ``R`` rows; with ``layout="interleaved"`` also a batch of
    ``k * R`` rows, strength ``j`` going to rows ``j*k .. j*k + k - 1``: the layout of ``generate``'s beams and
    ``num_return_sequences`` (``repeat_interleave``).

    Raises:
        ValueError: the batch has another number of rows.
    """
    if fm.rows is None or fm.rows.shape[0] == batch:
        return fm
    given = fm.rows.shape[0]
    if layout == "interleaved" and batch % given == 0:
        return fm.with_rows(fm.rows.repeat_interleave(batch // given))
    spread = f" or a multiple of it ({given} x k rows)" if layout == "interleaved" else ""
    raise ValueError(f"Site {site!r}: {given} per-row strengths given but the batch has {batch} rows{spread}")


def _apply(fm: FoldedMap, x: torch.Tensor, apply_to: str, where: tuple[int, int] | None) -> torch.Tensor:
    """Transport ``x`` with ``fm`` (already cast like ``x``), on the tokens ``apply_to`` names."""
    moved = fm.apply_spatial(x) if x.dim() == 4 else fm.apply_last(x)
    if apply_to == "all":
        return moved
    if where is None or x.dim() != 3:
        raise ValueError(
            f"Steering with apply_to={apply_to!r} needs token positions: use it through "
            "model.generate(..., steering=...) after actsteer.enable_steering(model), on (B, T, D) outputs"
        )
    offset, prompt_length = where
    pos = torch.arange(offset, offset + x.shape[1], device=x.device)
    keep = pos < prompt_length if apply_to == "prompt" else pos >= prompt_length
    return torch.where(keep[None, :, None], moved, x)


def _cast(base: FoldedMap, x: torch.Tensor, site: str) -> FoldedMap:
    if not x.is_floating_point():
        raise TypeError(f"Site {site!r} returned a {x.dtype} tensor; only floating point outputs can be steered")
    try:
        return base.to(x.device, x.dtype)
    except ValueError as err:
        raise ValueError(f"Site {site!r}: {err}") from None


def make_applier(
    base: FoldedMap,
    x: torch.Tensor,
    *,
    site: str,
    dim: int,
    apply_to: str,
    positions: Positions,
    calls: dict[str, int],
    rows: RowLayout = "exact",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function that transports ``site``'s outputs shaped, typed and placed like ``x`` (eager calls).

    Args:
        base: the map folded at its strength (``(D,)`` tensors, or tables and ``rows`` for per-row strengths).
        x: an output of the site (only its dtype and device are used).
        site: the site name, for error messages and the ``calls`` counter.
        dim: the transport's number of units D.
        apply_to: ``"all"``, ``"prompt"`` or ``"generated"`` tokens; the last two read ``positions()``.
        positions: returns ``(offset, prompt_length)`` of the current call's tokens, or None when unknown.
        calls: counter incremented per transported call (``{site: n}``).
        rows: how per-row strengths spread over a batch with more rows (`rows_for`).

    Returns:
        ``apply(x) -> Tensor``: a new tensor, equal bit for bit to ``base.apply_last`` / ``apply_spatial``.

    Raises:
        TypeError: the site's output is not floating point.
        ValueError: (half precision) the map leaves the dtype's range on its support.

    Example:
        >>> import torch, actsteer
        >>> m = actsteer.UnitMap(torch.full((2,), 2.0), torch.ones(2), lo=torch.zeros(2), hi=torch.ones(2))
        >>> x, calls = torch.tensor([[[0.5, 3.0]]]), {}
        >>> apply = make_applier(m.fold(1.0), x, site="s", dim=2, apply_to="all", positions=lambda: None,
        ...                      calls=calls)
        >>> apply(x), calls  # 0.5 is inside [0, 1]: 2 * 0.5 + 1; 3.0 is outside: kept
        (tensor([[[2., 3.]]]), {'s': 1})
    """
    fm = _cast(base, x, site)

    per_batch: dict[int, FoldedMap] = {}  # batch rows -> the per-row map spread over them, made once

    def general(x: torch.Tensor) -> torch.Tensor:
        _check(x, fm, site, dim)
        fitted = fm
        if fm.rows is not None:
            fitted = per_batch.get(x.shape[0])
            if fitted is None:
                fitted = per_batch[x.shape[0]] = rows_for(fm, x.shape[0], site, rows)
        calls[site] = calls.get(site, 0) + 1
        return _apply(fitted, x, apply_to, positions() if apply_to != "all" else None)

    if fm.rows is not None or apply_to != "all" or not isinstance(fm, FoldedMap):
        return general  # per-row strengths, token positions, or a piecewise map (`FoldedQuantile.apply_last`)
    # the common case, specialised so that a call is a shape check, a counter and the formula with its tensors bound
    # (`bind_affine`: one addcmul; plus clamp, an in-place compare and an in-place lerp for a support range)
    kernel = bind_affine(fm.weight, fm.bias, fm.lo if fm.masked else None, fm.hi if fm.masked else None, x.dtype)

    def fast(x: torch.Tensor) -> torch.Tensor:
        # (B, T, D) or (N, D) token outputs; anything else (4-D spatial, a wrong width) takes the general path
        if x.dim() not in (2, 3) or x.shape[-1] != dim:
            return general(x)
        calls[site] = calls.get(site, 0) + 1
        return kernel(x)

    return fast


def transport_traced(
    base: FoldedMap | None,
    x: torch.Tensor,
    *,
    site: str,
    dim: int,
    apply_to: str,
    where: tuple[int, int] | None,
    rows: RowLayout = "exact",
) -> torch.Tensor:
    """The per-call work for a graph that torch.compile traces: no cache, no counter, nothing kept.

    The folded tensors are read from ``base`` (the handle's current fold) at each call, so the compiled graph
    takes them as inputs: a strength change gives new tensors of the same shapes, which needs no recompilation.
    ``base`` None is strength 0 (the output is returned untouched).
    """
    if base is None:
        return x
    fm = _cast(base, x, site)
    _check(x, fm, site, dim)
    return _apply(rows_for(fm, x.shape[0], site, rows), x, apply_to, where)
