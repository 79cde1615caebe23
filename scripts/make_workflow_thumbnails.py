"""Draw the template-browser thumbnails of ``example_workflows/*.json``: ``<name>.jpg`` beside each workflow.

ComfyUI's frontend (1.32) shows a custom node pack's example workflows under Templates with the file name as
the title and ``/api/workflow_templates/<pack>/<name>.jpg`` as the thumbnail. No image model runs here, so the
thumbnail is a schematic of the workflow: its title and its main nodes, left to right in the order data flows
through them. Run it after changing a workflow:

    python scripts/make_workflow_thumbnails.py
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WORKFLOWS = Path(__file__).resolve().parents[1] / "example_workflows"
SIZE = (512, 384)
SHOWN = {  # node type -> label; other nodes (prompts, latents, notes) are left out of the schematic
    "CheckpointLoaderSimple": "Load Checkpoint", "UNETLoader": "Load FLUX", "ActSteerLearn": "AcT Learn",
    "ActSteerSave": "AcT Save", "ActSteerLoad": "AcT Load", "ActSteerApply": "AcT Apply",
    "ActSteerSweep": "AcT Strength Sweep", "KSampler": "KSampler", "SaveImage": "Save Image",
    "PreviewImage": "Preview Image",
}
ACT_COLOUR, OTHER_COLOUR = (88, 166, 255), (120, 128, 140)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow >= 10.1 ships a scalable default font


def _columns(workflow: dict) -> list[list[dict]]:
    """The shown nodes in columns by how far data flows to reach them (longest path over the shown nodes), each
    column in canvas order top to bottom."""
    shown = {n["id"]: n for n in workflow["nodes"] if n["type"] in SHOWN}
    before: dict[int, set[int]] = {i: set() for i in shown}
    for src, dst in _edges(workflow):
        before[dst].add(src)
    depth: dict[int, int] = {}

    def level(node: int, seen: frozenset = frozenset()) -> int:
        if node not in depth:
            depth[node] = 1 + max((level(p, seen | {node}) for p in before[node] if p not in seen), default=-1)
        return depth[node]

    columns: dict[int, list[dict]] = {}
    for node_id in shown:
        columns.setdefault(level(node_id), []).append(shown[node_id])
    return [sorted(columns[k], key=lambda n: (n["pos"][1], n["pos"][0])) for k in sorted(columns)]


def _edges(workflow: dict) -> set[tuple[int, int]]:
    """Links between shown nodes, followed through the nodes the schematic leaves out (VAE Decode, ...)."""
    shown = {n["id"] for n in workflow["nodes"] if n["type"] in SHOWN}
    after: dict[int, set[int]] = {}
    for _, src, _, dst, _, _ in workflow["links"]:
        after.setdefault(src, set()).add(dst)
    edges = set()
    for start in shown:
        todo, seen = list(after.get(start, ())), set()
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            if node in shown:
                edges.add((start, node))
            else:
                todo.extend(after.get(node, ()))
    return edges


def draw(workflow_path: Path) -> Path:
    """Write ``<name>.jpg`` next to ``workflow_path``; returns its path."""
    workflow = json.loads(workflow_path.read_text())
    image = Image.new("RGB", SIZE, (24, 26, 32))
    pen = ImageDraw.Draw(image)
    pen.text((24, 20), "actsteer · Activation Transport", font=_font(16), fill=ACT_COLOUR)
    title = textwrap.wrap(workflow_path.stem.removeprefix("AcT "), width=26)
    for i, line in enumerate(title[:3]):
        pen.text((24, 48 + 34 * i), line, font=_font(28), fill=(235, 235, 240))
    columns = _columns(workflow)
    top, width = 170, (SIZE[0] - 48) / max(len(columns), 1)
    boxes: dict[int, tuple[float, float, float, float]] = {}
    for c, column in enumerate(columns):
        x0 = 24 + c * width
        for r, node in enumerate(column):
            y0 = top + r * 70
            boxes[node["id"]] = (x0 + 6, y0, x0 + width - 6, y0 + 44)
    for src, dst in _edges(workflow):  # the links, under the boxes
        (_, sy0, sx1, sy1), (dx0, dy0, _, dy1) = boxes[src], boxes[dst]
        pen.line((sx1, (sy0 + sy1) / 2, dx0, (dy0 + dy1) / 2), fill=(200, 200, 210), width=2)
    for node in workflow["nodes"]:
        if node["id"] in boxes:
            box = boxes[node["id"]]
            colour = ACT_COLOUR if node["type"].startswith("ActSteer") else OTHER_COLOUR
            pen.rounded_rectangle(box, radius=8, outline=colour, width=2, fill=(34, 38, 46))
            label = textwrap.wrap(SHOWN[node["type"]], width=max(6, int(width / 8.5)), break_long_words=False)
            for i, line in enumerate(label[:2]):
                pen.text((box[0] + 6, box[1] + 5 + 17 * i), line, font=_font(13), fill=(225, 228, 235))
    out = workflow_path.with_suffix(".jpg")
    image.save(out, "JPEG", quality=88)
    return out


def main() -> None:
    for path in sorted(WORKFLOWS.glob("*.json")):
        print(draw(path))


if __name__ == "__main__":
    main()
