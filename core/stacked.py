"""The stacked per-token formula: several transports resident at once, each token picking its own, in one graph.

The per-call formula (`masked_affine`, ``folding.py``) applies one folded map to a whole tensor. A server that
batches requests with different transports and strengths needs the map chosen per token, with tensors whose
shapes and addresses never change (compiled graphs, CUDA graphs). Each transport's maps are stacked as table rows
(`stack_directions`: a forward row for positive strengths, a reverse row for negative ones), and each token
carries (row, ``|strength|``) pairs, applied in order (`stacked_affine`). ACT_SPEC.md section 4: at strength
``s >= 0``, ``weight = 1 + s (omega - 1)`` and ``bias = s beta`` on the source support; at ``s < 0`` the same with
the inverse map on the target support.
"""

from __future__ import annotations

import torch

from typing import TYPE_CHECKING

from .folding import inverse_affine

if TYPE_CHECKING:
    from .transport import UnitMap

Tables = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def stack_directions(unit_map: UnitMap, *, device: torch.device | str | None = None) -> Tables:
    """One map as two table rows: ``(delta, bias, lo, hi)``, each ``(2, D)`` float32; row 0 is the forward map
    (``delta = omega - 1``, ``beta``, source support), row 1 the reverse map (``1/omega - 1``, ``-beta/omega``,
    target support; units with ``omega`` ~ 0 stay the identity, as `UnitMap.fold` does).

    Example:
        >>> import torch, actsteer
        >>> delta, bias, lo, hi = stack_directions(actsteer.UnitMap(torch.tensor([2.0]), torch.tensor([1.0])))
        >>> delta.tolist(), bias.tolist()
        ([[1.0], [-0.5]], [[1.0], [-0.5]])
    """
    omega, beta = unit_map.omega.double(), unit_map.beta.double()
    inv_omega, inv_beta = inverse_affine(omega, beta)
    delta = torch.stack([omega - 1, inv_omega - 1]).float()
    bias = torch.stack([beta, inv_beta]).float()
    lo = torch.stack([unit_map.lo, unit_map.target_lo]).float()
    hi = torch.stack([unit_map.hi, unit_map.target_hi]).float()
    return tuple(t.to(device) for t in (delta, bias, lo, hi))  # type: ignore[return-value]


def stacked_affine(x: torch.Tensor, rows: torch.Tensor, amount: torch.Tensor, delta: torch.Tensor,
                   bias: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Transport each token of ``x`` with its own maps, composed in order.

    Args:
        x: ``(N, D)`` activations (one row per token).
        rows: ``(C, N)`` int64 table rows per composition position and token (0: the identity).
        amount: ``(C, N)`` float32 ``|strength|`` per position and token (0: untouched).
        delta, bias, lo, hi: ``(S, D)`` float32 tables (`stack_directions` rows; row 0 the identity).

    Returns:
        A new ``(N, D)`` tensor in ``x``'s dtype: at each position ``c``,
        ``x = where(lo[r] <= x <= hi[r], x * (1 + a * delta[r]) + a * bias[r], x)`` with ``r = rows[c]``,
        ``a = amount[c]``; the multiply-add runs in float32 and is rounded once. A token at amount 0 is returned
        bit for bit. Only tensor ops, no data-dependent Python: one graph for every strength and slot.

    Example:
        >>> import torch
        >>> d, b = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [1.0]])
        >>> lo, hi = torch.full((2, 1), -float("inf")), torch.full((2, 1), float("inf"))
        >>> x = torch.tensor([[3.0], [3.0]])  # token 0 at full strength of row 1 (2x + 1), token 1 untouched
        >>> stacked_affine(x, torch.tensor([[1, 0]]), torch.tensor([[1.0, 0.0]]), d, b, lo, hi).tolist()
        [[7.0], [3.0]]
    """
    out = x
    for c in range(rows.shape[0]):
        out = apply_folded(out, *fold_rows(delta, bias, lo, hi, rows[c], amount[c].unsqueeze(1)))
    return out


def fold_rows(delta: torch.Tensor, bias: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, rows: torch.Tensor | int,
              amount: torch.Tensor) -> Tables:
    """The weight, bias and support of table rows ``rows`` at ``|strength|`` ``amount``: ``(1 + amount * delta[rows],
    amount * bias[rows], lo[rows], hi[rows])``, in float32 (``amount`` a float32 tensor that broadcasts against the
    rows: ``(N, 1)`` for one row per token, 0-d for one row for all)."""
    return 1 + amount * delta[rows], amount * bias[rows], lo[rows], hi[rows]


def apply_folded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, lo: torch.Tensor,
                 hi: torch.Tensor) -> torch.Tensor:
    """``where(lo <= x <= hi, x * weight + bias, x)``: the multiply-add in float32, rounded once to ``x``'s dtype
    (`fold_rows` gives the arguments; `stacked_affine` is this, position by position)."""
    wide = x.float()
    moved = (wide * weight + bias).to(x.dtype)
    return torch.where((wide >= lo) & (wide <= hi), moved, x)
