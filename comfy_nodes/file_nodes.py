"""AcT Save Transport and AcT Load Transport: the nodes around ``models/act_transports`` (see `files`).

Save runs every time the graph is queued (its fingerprint never repeats), so "add number" really adds; it
writes nothing when the last file saved under the name already holds the same transport, and says so on the
node. After a save it tells open browser tabs the new file list (web/js/actsteer.js updates every Load
dropdown). Load checks the file name when the prompt is queued, before any checkpoint loads.
"""

from __future__ import annotations

import logging

from comfy_api.latest import io, ui

from ..core import fitted_on, naming_of
from . import files
from .inputs import CATEGORY, TRANSPORT_OUT_TIP, Transport, input_check

logger = logging.getLogger(__name__)


class ActSteerSave(io.ComfyNode):
    """Save a transport into models/act_transports."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ActSteerSave",
            display_name="AcT Save Transport",
            category=CATEGORY,
            description="Saves a transport as a .safetensors file in models/act_transports (never overwrites "
                        "unless told to). Runs on every queue; saves nothing new when the transport did not change.",
            inputs=[
                Transport.Input("transport", tooltip="The transport to save, from AcT Learn Transport"),
                io.String.Input("filename", default="my_transport",
                                tooltip="Name inside models/act_transports; subfolders with '/' are allowed, '..' is not"),
                io.Combo.Input("if_exists", options=list(files.IF_EXISTS), default="add number",
                               tooltip="When a different transport already has this name: add number saves as "
                                       "name_00001, ...; error stops; overwrite replaces the file"),
            ],
            outputs=[io.String.Output(display_name="saved_as",
                                      tooltip="The saved file's name, as AcT Load Transport lists it")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename=None) -> bool | str:
        return input_check(filename, files.safe_name)

    @classmethod
    def fingerprint_inputs(cls, **_) -> float:
        return float("nan")  # never equal to itself: ComfyUI runs the node on every queue instead of caching it

    @classmethod
    def execute(cls, transport, filename, if_exists) -> io.NodeOutput:
        saved = files.save(transport, filename, if_exists)
        if saved.written:
            files.announce(saved)
        return io.NodeOutput(saved.name, ui=ui.PreviewText(saved.message()))


class ActSteerLoad(io.ComfyNode):
    """Load a transport from models/act_transports."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ActSteerLoad",
            display_name="AcT Load Transport",
            category=CATEGORY,
            description="Loads a transport file from models/act_transports (actsteer's safetensors format; also "
                        "transports fitted with actsteer's diffusers API, translated when applied).",
            inputs=[io.Combo.Input("transport_name", options=files.list_files(),
                                   tooltip="A transport file in models/act_transports; the list follows AcT Save "
                                           "(press R to refresh it after copying files in by hand)")],
            outputs=[Transport.Output(display_name="transport", tooltip=TRANSPORT_OUT_TIP)],
        )

    @classmethod
    def validate_inputs(cls, transport_name=None) -> bool | str:
        return input_check(transport_name, files.check_readable)

    @classmethod
    def fingerprint_inputs(cls, transport_name) -> str:
        return files.fingerprint(transport_name)

    @classmethod
    def execute(cls, transport_name) -> io.NodeOutput:
        transport = files.load(transport_name)
        if naming_of(transport) == "diffusers":
            logger.info("actsteer: %s was fitted with diffusers; its site names are translated when applied", transport_name)
        summary = f"{len(transport)} layers, {transport.method}, learned on {fitted_on(transport)}"
        return io.NodeOutput(transport, ui=ui.PreviewText(summary))
