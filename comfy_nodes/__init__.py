"""actsteer.comfy_nodes: the ComfyUI V3 node pack, registered through ``comfy_entrypoint``.

ComfyUI is imported only when ComfyUI calls the entry point, so ``import actsteer.comfy_nodes`` works anywhere.
"""

from __future__ import annotations

from typing import Any


async def comfy_entrypoint() -> Any:
    """Return the pack's ``ComfyExtension`` (ComfyUI calls this via the repository root's ``comfy_entrypoint``).

    Also registers the ``models/act_transports`` folder with ComfyUI's ``folder_paths`` and, in a running server,
    the handler that lets queue-time checks see the queued graph (`graph.remember_prompt`).
    """
    from comfy_api.latest import ComfyExtension

    from .files import register_folder
    from .graph import register as register_graph_checks
    from .nodes import NODES

    class ActSteerExtension(ComfyExtension):
        """The AcT nodes: Learn, Save, Load, Apply, Strength Sweep."""

        async def get_node_list(self) -> list:
            return list(NODES)

    register_folder()
    register_graph_checks()  # in a server: queue-time checks of each node's MODEL family (see graph.py)
    return ActSteerExtension()
