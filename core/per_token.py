"""One strength per token (or per batch row) from static tables: for servers that keep tensors at fixed addresses.

`token_tables` folds a map ONCE at strength +1 (and -1, for negative strengths), cast for the server's device and
dtype; `apply_per_token` then steers every row at its own strength with no refolding:
``out = x + s+ (T(x) - x) + s- (T^-1(x) - x)`` with ``s+ = max(s, 0)``, ``s- = max(-s, 0)``, which is the engine's
``T_s`` for every map kind (ACT_SPEC.md section 4: ``T_s(a) = a + s (T(a) - a)``, the reverse map at ``|s|`` for
``s < 0``), affine `UnitMap` or `QuantileMap` alike, each applied on its own support. A row at strength 0 comes out
bit for bit as it went in. Only the strength tensor changes between calls, so a CUDA graph or a torch.compile'd
model captures the tables once (the vLLM plugin's use).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .transport import UnitMap


@dataclasses.dataclass(frozen=True)
class TokenTables:
    """The folds `apply_per_token` reads: ``forward`` at strength +1, ``reverse`` at -1 (None: no negative strengths)."""

    forward: Any
    reverse: Any | None
    dim: int


def token_tables(unit_map: UnitMap, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 reverse: bool = True) -> TokenTables:
    """The static tables of ``unit_map`` for `apply_per_token`, on ``device`` for activations of ``dtype``.

    Example:
        >>> import torch, actsteer
        >>> m = actsteer.UnitMap(torch.full((2,), 2.0), torch.ones(2))
        >>> tables = token_tables(m)
        >>> apply_per_token(torch.ones(3, 2), tables, torch.tensor([0.0, 1.0, -1.0])).tolist()
        [[1.0, 1.0], [3.0, 3.0], [0.0, 0.0]]
    """
    forward = unit_map.fold(1.0, device=device).to(device, dtype)
    backward = unit_map.fold(-1.0, device=device).to(device, dtype) if reverse else None
    return TokenTables(forward, backward, unit_map.dim)


def apply_per_token(x: torch.Tensor, tables: TokenTables, strength: torch.Tensor) -> torch.Tensor:
    """Steer each row of ``x`` at its own strength (see the module docstring).

    Args:
        x (`torch.Tensor` of shape `(N, ..., D)`): activations, e.g. vLLM's flattened ``(num_tokens, D)``.
        tables: from `token_tables` (for ``x``'s device and dtype).
        strength (`torch.Tensor` of shape `(N,)`): one strength per row (0 = untouched); float32, on ``x``'s device.

    Returns:
        A new tensor shaped and typed like ``x``.

    Raises:
        ValueError: a width or row count that does not match, or a negative strength without ``reverse`` tables
            (checked eagerly only: under torch.compile/CUDA graphs a negative strength then reads the forward map).
    """
    if x.shape[-1] != tables.dim or strength.dim() != 1 or strength.shape[0] != x.shape[0]:
        raise ValueError(f"apply_per_token: expected x (N, ..., {tables.dim}) and strength (N,), got "
                         f"{tuple(x.shape)} and {tuple(strength.shape)}")
    s = strength.view((-1,) + (1,) * (x.dim() - 1)).to(torch.float32)
    xf = x.float()
    out = xf + s.clamp(min=0) * (tables.forward.apply_last(x).float() - xf)
    if tables.reverse is not None:
        out = out + (-s).clamp(min=0) * (tables.reverse.apply_last(x).float() - xf)
    elif not torch.compiler.is_compiling() and bool((strength < 0).any()):
        raise ValueError("apply_per_token: a negative strength needs token_tables(..., reverse=True)")
    # rows at 0 exactly as they came, even where a map overflowed (0 * inf is NaN)
    return torch.where(s != 0, out, xf).to(x.dtype)
