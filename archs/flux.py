"""The FLUX output rule: what FLUX blocks return in diffusers (by version) and in ComfyUI.

Double blocks return ``(encoder_hidden_states, hidden_states)`` = (text, image) in diffusers and (image, text) in
ComfyUI (ACT_SPEC.md section 6, REFERENCE_NOTES.md section 4). Single blocks return a (text, image) tuple in
diffusers since 0.35, one ``cat([text; image])`` tensor along the token dim before that and in ComfyUI.
"""

from __future__ import annotations

import re

FLUX_DOUBLE_OUTPUT = "tuple(text, image)"
FLUX_SINGLE_TUPLE = "tuple(text, image)"
FLUX_SINGLE_CONCAT = "tensor cat(text, image)"


def diffusers_version() -> str:
    """The installed diffusers' version (imports diffusers)."""
    import diffusers

    return diffusers.__version__


def flux_single_block_output(version: str | None = None) -> str:
    """What ``single_transformer_blocks.{i}`` return in diffusers ``version`` (default: the installed one).

    Example:
        >>> flux_single_block_output("0.34.0"), flux_single_block_output("0.35.1")
        ('tensor cat(text, image)', 'tuple(text, image)')
    """
    version = diffusers_version() if version is None else version
    major_minor = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    return FLUX_SINGLE_TUPLE if major_minor >= (0, 35) else FLUX_SINGLE_CONCAT
