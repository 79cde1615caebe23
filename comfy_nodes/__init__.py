"""actsteer.comfy_nodes: the ComfyUI V3 node pack (imported only by ComfyUI)."""
