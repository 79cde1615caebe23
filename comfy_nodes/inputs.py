"""Inputs the AcT nodes share (strength, schedule window, layer choices, outputs) and their queue-time checks.

Every input and output carries a tooltip (an artist reads them on hover). The queue-time checks back the nodes'
V3 ``validate_inputs``: `number_problem` returns None when a value is fine, else one line saying what to change;
`input_check` returns what ``validate_inputs`` must return (True, or that line). Both accept None for an input fed
by a link (its value is only known when the graph runs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from comfy_api.latest import io

from ..core import CFG_CHOICES, DEFAULT_CFG, shorten
from .presets import APPLY_GROUPS, GROUP_TOOLTIP

CATEGORY = "model_patches/steering (AcT)"
Transport = io.Custom("ACT_TRANSPORT")

STRENGTH_MIN, STRENGTH_MAX = -3.0, 3.0
STRENGTH_TIP = (
    "0 = no effect, 1 = full transport (the paper's setting; start here: on a few-step test model it added palette "
    "styles to 80-100% of images and removed them to 9%), values in between interpolate; negative values apply the "
    "reverse transport (target -> source); above 1 extrapolates (1.5 can finish a partial style) and may break images"
)
TRANSPORT_IN_TIP = "The transport to apply: from AcT Learn Transport or AcT Load Transport"
TRANSPORT_OUT_TIP = "The learned transport (per-layer maps); connect it to AcT Apply, Save or Strength Sweep"
MODEL_IN_TIP = "The diffusion MODEL to steer (SDXL-family UNet or FLUX), e.g. from Load Checkpoint or a LoRA loader"


def strength_input(default: float = 1.0) -> io.Float.Input:
    return io.Float.Input(
        "strength", default=default, min=STRENGTH_MIN, max=STRENGTH_MAX, step=0.05,
        display_mode=io.NumberDisplay.slider, tooltip=STRENGTH_TIP,
    )


def window_inputs() -> list[io.Float.Input]:
    return [
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Start steering at this fraction of the sampling schedule (0 = first step; 0.2 keeps "
                               "the layout and changes the rendering)"),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Stop steering after this fraction of the sampling schedule (1 = last step)"),
    ]


def layer_filter_inputs() -> list[io.Input]:
    """The optional ``layers`` regex (kept first for saved workflows) and the ``layer_group`` picker."""
    return [
        io.String.Input(
            "layers", default="", optional=True,
            tooltip="Optional regex: apply only the transport's layers whose name contains a match (e.g. "
                    "'input_blocks' or 'double_blocks'); empty = all layers. Easier: pick a layer_group",
        ),
        io.Combo.Input("layer_group", options=list(APPLY_GROUPS), default="all", optional=True, tooltip=GROUP_TOOLTIP),
    ]


CFG_PLACEMENT_TIP = (
    "Where the steer enters CFG. conditional (default): the positive branch only, so CFG amplifies the steer as it "
    "amplifies the prompt (on our CFG-trained test model it kept styles at CFG 3-8 that both lost); both: the positive "
    "and negative branches alike, as in the paper (at high CFG the prompt outweighs the steer; try it if the style "
    "comes out too strong or the picture changes too much); guidance-aware: both branches at CFG x strength. All the "
    "same at CFG 1 (Lightning, schnell)"
)


def cfg_placement_input() -> io.Combo.Input:
    """The Apply node's and the Sweep's CFG placement (optional and last: saved workflows keep their values)."""
    return io.Combo.Input("cfg_placement", options=list(CFG_CHOICES), default=DEFAULT_CFG, optional=True,
                          tooltip=CFG_PLACEMENT_TIP)


def cfg_placement_problem(cfg_placement: Any) -> str | None:
    if cfg_placement is None or cfg_placement in CFG_CHOICES:
        return None
    return (f"cfg_placement: {shorten(str(cfg_placement), 40)!r} is not one of its choices; pick one of: "
            f"{', '.join(CFG_CHOICES)}")


def number_problem(name: str, value: Any, lo: float, hi: float) -> str | None:
    """What is wrong with a number widget's value (not a number, NaN, infinity, out of range), or None.

    Never raises: ComfyUI calls ``validate_inputs`` with the raw value when its own conversion failed (a text such
    as ``"1,5"`` sent over the API), and an exception there would be reported on the next node instead.

    Example:
        >>> number_problem("strength", "1,5", -3, 3)
        "strength is '1,5', not a number; set a number between -3 and 3"
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return f"{name} is {shorten(value, 40)!r}, not a number; set a number between {lo:g} and {hi:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} is a {type(value).__name__}, not a number; set a number between {lo:g} and {hi:g}"
    if not math.isfinite(value):
        return f"{name} is {value}; set a number between {lo:g} and {hi:g}"
    if not lo <= value <= hi:
        return f"{name} = {value:g} is outside {lo:g} to {hi:g}; set a number in that range"
    return None


def int_problem(name: str, value: Any, lo: int, hi: int) -> str | None:
    """`number_problem` for a whole-number widget (``2.5`` or ``"20 steps"`` sent over the API are refused)."""
    problem = number_problem(name, value, lo, hi)
    if problem is None and value is not None and float(value) != int(float(value)):
        return f"{name} = {value} is not a whole number; set a whole number between {lo} and {hi}"
    return problem


def window_problem(start: Any, end: Any) -> str | None:
    """What is wrong with a ``start_percent``/``end_percent`` pair (each 0..1, start not after end), or None.

    Example:
        >>> window_problem(0.8, 0.2)
        'start_percent (0.8) is after end_percent (0.2), so no step would be steered; set start_percent below end_percent'
    """
    problem = number_problem("start_percent", start, 0.0, 1.0) or number_problem("end_percent", end, 0.0, 1.0)
    if problem or start is None or end is None:
        return problem
    if float(start) > float(end):
        return (f"start_percent ({float(start):g}) is after end_percent ({float(end):g}), so no step would be steered; "
                "set start_percent below end_percent")
    return None


def regex_problem(name: str, pattern: Any, fix: str) -> str | None:
    """What is wrong with a regex typed into the text input ``name`` (None when it compiles, or is a link's None).

    Example:
        >>> regex_problem("layers", "input_blocks.(", "or clear it to steer every layer")
        "layers: 'input_blocks.(' is not a valid regex (missing ), unterminated subpattern at position 13); fix it, or clear it to steer every layer"
    """
    if pattern is None or not str(pattern).strip():
        return None
    try:
        re.compile(str(pattern).strip())
    except re.error as err:
        return f"{name}: {shorten(str(pattern), 60)!r} is not a valid regex ({err}); fix it, {fix}"
    return None


def steering_problem(start_percent: Any, end_percent: Any, layers: Any, layer_group: Any) -> str | None:
    """The queue-time checks AcT Apply and the Sweep share: the schedule window, the ``layers`` regex and the
    ``layer_group`` choice (ComfyUI skips its own list check for inputs a ``validate_inputs`` reads)."""
    if layer_group is not None and layer_group not in APPLY_GROUPS:
        return (f"layer_group: {shorten(str(layer_group), 40)!r} is not one of its choices; pick one of: "
                f"{', '.join(APPLY_GROUPS)}")
    return window_problem(start_percent, end_percent) or regex_problem(
        "layers", layers, "or clear it to steer every layer")


_TOKENS = re.compile(r"[,;\s]+")


def parse_strengths(text: str) -> list[float]:
    """``"0, 0.5, 1"`` -> ``[0.0, 0.5, 1.0]`` (commas, spaces or semicolons); a bad entry is named in the error.

    Example:
        >>> parse_strengths("0, 0.5; 1  -1")
        [0.0, 0.5, 1.0, -1.0]
    """
    tokens = [t for t in _TOKENS.split(text.strip()) if t]
    if not tokens:
        raise ValueError("strengths is empty; write at least one strength, e.g. '0, 0.25, 0.5, 0.75, 1'")
    values = []
    for token in tokens:
        try:
            value = float(token)
        except ValueError:
            raise ValueError(f"Bad strength {token!r} in strengths; write numbers separated by commas") from None
        problem = number_problem(f"strength {token!r} in strengths", value, STRENGTH_MIN, STRENGTH_MAX)
        if problem:
            raise ValueError(problem)
        values.append(value)
    return values


def input_check(value: Any, check: Callable[..., object], *args: Any) -> bool | str:
    """What ``validate_inputs`` returns for one input: True when ``check(value, *args)`` passes (or the input is fed
    by a link, ``value`` None), else the message of the ValueError it raised.

    ComfyUI (``execution.validate_inputs``) accepts only ``True``: anything else, None included, fails the prompt.
    """
    if value is None:
        return True
    try:
        check(value, *args)
    except ValueError as err:
        return str(err)
    return True
