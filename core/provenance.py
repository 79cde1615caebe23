"""Provenance: what a transport records about the model it was fitted on (``Transport.model``), and the one
description of that model which every error message uses.

The keys actsteer writes into ``Transport.model`` (any other key is kept as it is):

- ``class``: the class of the fitted model (every fit; a pipeline's class for `fit_pipeline`, ComfyUI's model
  class for the Learn node);
- ``name_or_path``: the checkpoint the model was loaded from (`fit_lm`, `fit_pipeline`; may be empty);
- ``naming``: how the sites are named, ``"diffusers"`` or ``"comfyui"`` (`fit_pipeline`, Learn, `to_comfy`,
  `from_comfy`);
- ``arch``: the site-group architecture, ``"sdxl"`` or ``"flux"`` (`actsteer.archs`);
- ``model_type``, ``hidden_size``, ``num_hidden_layers``, ...: the LM's config fields (`fit_lm`);
- ``unet_layout`` / ``unet_config``, ``flux_*``, ``diffusers_version``: what name translation needs.

Files written by earlier versions of the ComfyUI Learn node also carry ``framework`` (the same as ``naming``);
`naming_of` reads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .validation import printable

if TYPE_CHECKING:
    from .transport import Transport

NAMINGS = ("diffusers", "comfyui")
_LEGACY_NAMING = "framework"


def model_record(model: Any, **fields: Any) -> dict[str, Any]:
    """What a fit stores in ``Transport.model``: the model's class, then ``fields`` (see the table above).

    Example:
        >>> import torch
        >>> model_record(torch.nn.Linear(2, 2), name_or_path="tiny")
        {'class': 'Linear', 'name_or_path': 'tiny'}
    """
    return {"class": type(model).__name__, **fields}


def naming_of(transport: Transport) -> str | None:
    """``"diffusers"`` or ``"comfyui"`` when the transport records how its sites are named, else None."""
    value = transport.model.get("naming") or transport.model.get(_LEGACY_NAMING)
    return value if value in NAMINGS else None


def model_name(transport: Transport) -> str | None:
    """The checkpoint the transport was fitted on, else the model's class; None when it records neither."""
    value = transport.model.get("name_or_path") or transport.model.get("class")
    return None if value in (None, "") else str(value)


def fitted_on(transport: Transport) -> str:
    """The one description of the model a transport was fitted on, for messages (shortened, control characters
    escaped): ``"HuggingFaceTB/SmolLM2-135M"``, ``"SDXL (ComfyUI)"``, or ``"an unknown model"``.

    Example:
        >>> import torch, actsteer
        >>> t = actsteer.Transport({"0": actsteer.UnitMap(torch.ones(1), torch.zeros(1))},
        ...                        model={"class": "SDXL", "naming": "comfyui"})
        >>> fitted_on(t), fitted_on(t.replace(model={}))
        ('SDXL (ComfyUI)', 'an unknown model')
    """
    name = model_name(transport)
    if name is None:
        return "an unknown model"
    text = printable(name, 200)
    return f"{text} (ComfyUI)" if naming_of(transport) == "comfyui" else text


def fitted_on_note(transport: Transport) -> str:
    """``" (the transport was fitted on ...)"``, to end a message with; empty when the transport records no model."""
    return f" (the transport was fitted on {fitted_on(transport)})" if model_name(transport) is not None else ""
