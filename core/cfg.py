"""Where a steer enters classifier-free guidance (CFG): the placements every host offers (diffusers pipelines in
``hf_integration/cfg.py``, the ComfyUI Apply node in ``comfy_nodes/patching.py``).

Under CFG a denoiser predicts each step twice, with the prompt (the conditional branch ``c``) and with the negative
prompt (the unconditional branch ``u``), and the sampler follows ``u + g (c - u)``. A prompt's words reach ``c``
only, so the guidance scale ``g`` multiplies their effect. The placements:

- ``"conditional"`` (the default since issue 23): the conditional branch only, so guidance amplifies the steer as it
  amplifies the prompt. On the miniature trained for CFG, with per-step transports, it kept a style at guidance 3
  and 8 where "both" lost it (RESULTS.md, "Per-step fitting"), and gave more style for the same loss of content.
- ``"both"`` (the paper's reference code): every row of both branches at the strength. To first order the steer
  then reaches the guided output at weight 1 while the prompt gets weight ``g``.
- ``"guidance-aware"``: both branches at ``g`` times the strength (``g`` = 1 without CFG).

Without CFG (guidance <= 1; guidance-distilled models such as SDXL-Lightning and FLUX.1-schnell) the three are the
same. Measured in benchmarks/RESULTS.md ("Few-step miniature: guidance").

Example:
    >>> from actsteer.core import check_cfg
    >>> check_cfg(None), check_cfg("both")
    ('conditional', 'both')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

Cfg = Literal["both", "conditional", "guidance-aware"]
CFG_CHOICES: tuple[str, ...] = ("both", "conditional", "guidance-aware")
DEFAULT_CFG: Cfg = "conditional"


def check_cfg(cfg: Any, name: str = "cfg") -> Cfg:
    """``cfg`` checked: one of `CFG_CHOICES` (None: `DEFAULT_CFG`).

    Raises:
        ValueError: any other value; the message names ``name`` and the choices.
    """
    if cfg is None:
        return DEFAULT_CFG
    if cfg not in CFG_CHOICES:
        raise ValueError(
            f"Unknown `{name}={cfg!r}`; use 'conditional' (the prompt's branch of classifier-free guidance only, the "
            "default), 'both' (both branches alike, the paper's reference) or 'guidance-aware' (both at guidance scale "
            "x strength)"
        )
    return cfg


def guidance_scaled(strength: Any, guidance: float) -> Any:
    """A strength (a number, per-row tensor or ``{site: strength}`` mapping) times ``guidance``."""
    if isinstance(strength, Mapping):
        return {site: value * guidance for site, value in strength.items()}
    return strength * guidance
