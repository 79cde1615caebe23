"""The Apply node's work, shared by AcT Apply and the Strength Sweep: the node checks, the layer group, then
`patching.apply_steering`, with errors said for the graph."""

from __future__ import annotations

from .checks import check_numbers, for_artist, select_group
from .inputs import STRENGTH_MAX, STRENGTH_MIN, number_problem
from .patching import apply_steering


def steer_model(model, transport, strength: float, start_percent: float, end_percent: float, layers: str = "",
                layer_group: str = "all"):
    """`apply_steering` behind the node checks: finite strength, usable maps, the layer group; artist-facing errors."""
    problem = number_problem("strength", strength, STRENGTH_MIN, STRENGTH_MAX)
    if problem:
        raise ValueError(problem)
    check_numbers(transport, "The transport")
    transport = select_group(model, transport, layer_group or "all")
    try:
        return apply_steering(model, transport, strength=float(strength), start_percent=start_percent,
                              end_percent=end_percent, layers=layers or "")
    except (KeyError, ValueError) as err:
        raise ValueError(for_artist(err, "change the Apply node's inputs or the MODEL it gets", always=False)) from None
