"""Pooling: one vector per input from a site's output (ACT_SPEC.md section 1).

Rules: ``(B, D)`` is kept; ``(B, T, D)`` is pooled over tokens, honouring a ``(B, T)`` padding mask
(1 = real token) when its shape matches; ``(B, C, H, W)`` is pooled over the spatial dims per channel.
Results are float32 whatever the model dtype, so half-precision sums do not overflow.
"""

from __future__ import annotations

from typing import Literal

import torch

Pooling = Literal["mean", "last", "max", "min"]
POOLINGS: tuple[str, ...] = ("mean", "last", "max", "min")


def check_pooling(how: str) -> str:
    if how not in POOLINGS:
        raise ValueError(f"Unknown pooling {how!r}; choose one of: {', '.join(POOLINGS)}")
    return how


def pool(x: torch.Tensor, *, mask: torch.Tensor | None = None, how: Pooling = "mean") -> torch.Tensor:
    """Pool ``x`` to ``(B, D)`` float32.

    Args:
        x: ``(B, D)``, ``(B, T, D)`` or ``(B, C, H, W)``.
        mask (`torch.Tensor` of shape `(B, T)`, optional): 1 for real tokens, 0 for padding; used for 3-D ``x``
            when its first two dims match. Works for left and right padding: ``"last"`` takes the last real
            token, ``"mean"``/``"max"``/``"min"`` ignore padding.
        how: ``"mean"`` (AcT's choice), ``"last"``, ``"max"`` or ``"min"``.

    Example:
        >>> import torch
        >>> x = torch.tensor([[[1.0], [3.0], [100.0]]])
        >>> pool(x, mask=torch.tensor([[1, 1, 0]])), pool(x, mask=torch.tensor([[1, 1, 0]]), how="last")
        (tensor([[2.]]), tensor([[3.]]))
    """
    check_pooling(how)
    # Always a fresh tensor: the recorder keeps it while later modules may modify their inputs in place.
    if x.dim() == 2:
        return x.to(torch.float32, copy=True)
    if x.dim() == 4:
        if how == "last":
            raise ValueError("Pooling 'last' has no meaning for (B, C, H, W) outputs; use 'mean' or 'max'")
        flat = x.flatten(2).float()  # (B, C, HW)
        return {"mean": lambda: flat.mean(-1), "max": lambda: flat.amax(-1), "min": lambda: flat.amin(-1)}[how]()
    if x.dim() != 3:
        raise ValueError(f"Cannot pool an output of shape {tuple(x.shape)}; expected (B, D), (B, T, D) or (B, C, H, W)")
    b, t, _ = x.shape
    if mask is None or tuple(mask.shape) != (b, t):
        mask = None
    else:
        mask = mask.to(device=x.device, dtype=torch.bool)
    if how == "last":
        if mask is None:
            return x[:, -1].to(torch.float32, copy=True)
        positions = torch.arange(t, device=x.device).expand(b, t)
        last = torch.where(mask, positions, -1).amax(dim=1).clamp(min=0)
        return x[torch.arange(b, device=x.device), last].to(torch.float32, copy=True)
    if how == "mean":
        if mask is None:
            return x.float().mean(dim=1)
        m = mask.unsqueeze(-1).float()
        return (x.float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
    xf = x.float()
    if mask is not None:
        fill = float("-inf") if how == "max" else float("inf")
        xf = xf.masked_fill(~mask.unsqueeze(-1), fill)
    return xf.amax(dim=1) if how == "max" else xf.amin(dim=1)
