"""AcT Save Transport and AcT Load Transport: the nodes around ``models/act_transports`` (see `files`).

Save passes its transport on: a graph that applies what it learns takes the transport from Save, so a bad file
name stops the whole graph when it is queued (ComfyUI would otherwise run every branch that does not depend on
Save, Learn included, and save nothing). Save writes nothing when the last file saved under the name already holds
the same transport, and says so on the node; its cache fingerprint is the state of the files under the name, so an
unchanged graph queued again reuses Save and what follows, and a file deleted by hand is saved again. After a save
it tells open browser tabs the new file list (web/js/actsteer.js updates every Load dropdown). Load checks the file
name when the prompt is queued, before any checkpoint loads, and can follow Save's numbered copies.
"""

from __future__ import annotations

import logging

from comfy_api.latest import io, ui

from ..core import describe_size, fitted_on, naming_of
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
                                      tooltip="The saved file's name, as AcT Load Transport lists it"),
                     Transport.Output(display_name="transport",
                                      tooltip="The same transport, passed on once it is saved: connect AcT Apply "
                                              "here, so that a bad file name stops the graph before Learn runs")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename=None) -> bool | str:
        return input_check(filename, files.safe_name)

    @classmethod
    def fingerprint_inputs(cls, filename=None, if_exists=None, **_) -> str | float:
        if not isinstance(filename, str) or not isinstance(if_exists, str):
            return float("nan")  # never equal to itself: run every time
        return files.save_fingerprint(filename, if_exists)

    @classmethod
    def execute(cls, transport, filename, if_exists) -> io.NodeOutput:
        before = files.save_fingerprint(filename, if_exists)
        saved = files.save(transport, filename, if_exists)
        files.saved_state(filename, if_exists, before)
        if saved.written:
            files.announce(saved)
        return io.NodeOutput(saved.name, transport, ui=ui.PreviewText(saved.message()))


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
                                           "(press R to refresh it after copying files in by hand)"),
                    io.Combo.Input("version", options=list(VERSIONS), default="this file", optional=True,
                                   tooltip="this file: exactly the file picked. newest copy: the newest numbered "
                                           "copy AcT Save made of this name (name_00001, name_00002, ...), so that a "
                                           "transport learned again is picked up")],
            outputs=[Transport.Output(display_name="transport", tooltip=TRANSPORT_OUT_TIP)],
        )

    @classmethod
    def validate_inputs(cls, transport_name=None, version=None) -> bool | str:
        if version is not None and version not in VERSIONS:
            return f"version: {version!r} is not one of its choices; pick one of: {', '.join(VERSIONS)}"
        return input_check(transport_name and _resolve(transport_name, version), files.check_readable)

    @classmethod
    def fingerprint_inputs(cls, transport_name, version="this file") -> str:
        return files.fingerprint(_resolve(transport_name, version))

    @classmethod
    def execute(cls, transport_name, version="this file") -> io.NodeOutput:
        name = _resolve(transport_name, version)
        transport = files.load(name)
        if naming_of(transport) == "diffusers":
            logger.info("actsteer: %s was fitted with diffusers; its layer names are translated when applied", name)
        summary = f"{describe_size(transport)}, {transport.method}, learned on {fitted_on(transport)}"
        if name != transport_name:
            summary = f"newest copy: {name}\n{summary}"
        return io.NodeOutput(transport, ui=ui.PreviewText(summary))


VERSIONS: tuple[str, ...] = ("this file", "newest copy")


def _resolve(transport_name, version) -> str:
    """The file AcT Load reads: ``transport_name``, or its newest numbered copy."""
    return files.newest_copy(transport_name) if version == "newest copy" else transport_name
