"""Site presets for causal LMs, chosen by ``model.config.model_type`` (ACT_SPEC.md section 6).

``"auto"`` is the measured choice where there is one: on Llama models (``model_type="llama"``: SmolLM2, Llama) the
norms before attention of the middle two thirds of the layers (``"mid-attn-norms"``), measured against the paper's
MLP projections and all norms on the presence/perplexity frontier (benchmarks/RESULTS.md, "Frontier (issue 22)");
elsewhere the paper's choice (GPT-2: all LayerNorms; Gemma-2/3: the post norms) or the decoder norms.
``"paper"`` is the paper's choice everywhere (Llama: ``"mlp"``; ``"auto"`` before issue 22). Named presets work on
every listed architecture; explicit regexes (matched in full) work on any model.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

import torch

from ..core import list_sites, resolve_sites

_L = r"model\.layers\.\d+"
# Decoder-layer norms of the Llama family (Llama, SmolLM2, Mistral, Qwen2/3, Phi-3): the norms before
# attention and before the MLP. Qwen3's q_norm/k_norm (head-sized) are deliberately left out.
_LLAMA_NORMS = [rf"{_L}\.input_layernorm", rf"{_L}\.post_attention_layernorm"]
_GEMMA_POST = [rf"{_L}\.post_attention_layernorm", rf"{_L}\.post_feedforward_layernorm"]
_GEMMA_ALL = _LLAMA_NORMS + [rf"{_L}\.pre_feedforward_layernorm", rf"{_L}\.post_feedforward_layernorm"]
_GPT2_ALL = [r"transformer\.h\.\d+\.ln_1", r"transformer\.h\.\d+\.ln_2", r"transformer\.ln_f"]

_LLAMA_FAMILY = {  # Llama, SmolLM2, Mistral, Qwen2/3 share module names
    "all-norms": _LLAMA_NORMS + [r"model\.norm"],
    "attn-norms": [rf"{_L}\.input_layernorm"],
    "post-norms": [rf"{_L}\.post_attention_layernorm"],
    "mlp": [rf"{_L}\.mlp\.(gate|up|down)_proj"],
}

LM_PRESETS: dict[str, dict[str, list[str]]] = {
    "gpt2": {
        "all-norms": _GPT2_ALL,
        "attn-norms": [r"transformer\.h\.\d+\.ln_1"],
        "post-norms": [r"transformer\.h\.\d+\.ln_2"],
        "mlp": [r"transformer\.h\.\d+\.mlp\.c_proj"],
    },
    "llama": _LLAMA_FAMILY,
    "mistral": _LLAMA_FAMILY,
    "qwen2": _LLAMA_FAMILY,
    "phi3": {
        "all-norms": _LLAMA_NORMS + [r"model\.norm"],
        "attn-norms": [rf"{_L}\.input_layernorm"],
        "post-norms": [rf"{_L}\.post_attention_layernorm"],
        "mlp": [rf"{_L}\.mlp\.(gate_up|down)_proj"],
    },
    "gemma2": {
        "all-norms": _GEMMA_ALL + [r"model\.norm"],
        "attn-norms": [rf"{_L}\.input_layernorm"],
        "post-norms": _GEMMA_POST,
        "mlp": [rf"{_L}\.mlp\.(gate|up|down)_proj"],
    },
}
LM_PRESETS["qwen3"] = LM_PRESETS["qwen2"]
LM_PRESETS["gemma3_text"] = LM_PRESETS["gemma3"] = {
    # Gemma-3 multimodal checkpoints nest the text model (model.language_model.layers...): allow any prefix.
    name: [r"(?:.*\.)?" + p.replace(r"model\.", "", 1) for p in pats] for name, pats in LM_PRESETS["gemma2"].items()
}

# Presets that keep only the middle of the depth: (base preset, fraction of the layers dropped at each end).
# On SmolLM2 the first and the last sixth of the layers added perplexity and no concept (benchmarks/RESULTS.md).
MIDDLE_PRESETS = {"mid-attn-norms": ("attn-norms", 1 / 6)}

# The paper's choice per architecture (GPT-2: all LayerNorms; Gemma-2/3: the post norms; Llama: the MLP projections)
# and the decoder norms where it has none: ``modules="paper"`` (what ``"auto"`` was before issue 22).
PAPER_PRESET = {
    "gpt2": "all-norms",
    "llama": "mlp",
    "gemma2": "post-norms",
    "gemma3": "post-norms",
    "gemma3_text": "post-norms",
    "mistral": "all-norms",
    "qwen2": "all-norms",
    "qwen3": "all-norms",
    "phi3": "all-norms",
}
# The "auto" choice: measured on SmolLM2 for Llama (benchmarks/RESULTS.md, "Frontier"), the paper's elsewhere.
AUTO_PRESET = {**PAPER_PRESET, "llama": "mid-attn-norms"}


def candidate_sites(model: torch.nn.Module, limit: int = 12) -> list[str]:
    """Likely steering sites (norms and MLP outputs) of an unknown model, to suggest in errors."""
    names = list_sites(model)
    rx = re.compile(r".*(norm|ln_\w+|ln|mlp|ffn|feed_forward)(\.(down_proj|c_proj|fc2))?$", re.IGNORECASE)
    hits = [n for n in names if rx.fullmatch(n)]
    # collapse layer indices so the list shows the kinds of modules, not every layer
    kinds = list(dict.fromkeys(re.sub(r"\.\d+\.", ".{i}.", n) for n in hits))
    return kinds[:limit]


def lm_sites(model: torch.nn.Module, modules: str | Sequence[str] = "auto") -> list[str]:
    """Resolve ``modules`` ("auto", a preset name, a regex, or a list of regexes/names) to site names.

    Raises:
        ValueError: unknown architecture with ``"auto"``/a preset (lists candidate module names), unknown
            preset name, or a pattern matching nothing.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    presets = LM_PRESETS.get(model_type or "", {})
    if isinstance(modules, str) and (modules in ("auto", "paper") or modules in _preset_names()):
        if not presets:
            kinds = candidate_sites(model)
            raise ValueError(
                f"No site preset for model_type={model_type!r} ({type(model).__name__}); pass modules= as a regex or a "
                f"list of module names. Candidates: {', '.join(kinds) or '(none found; see actsteer.list_sites(model))'}"
            )
        name = {"auto": AUTO_PRESET, "paper": PAPER_PRESET}.get(modules, {}).get(model_type, modules)
        base, drop = MIDDLE_PRESETS.get(name, (name, 0.0))
        if base not in presets:
            raise ValueError(
                f"Preset {name!r} is not defined for {model_type!r}; choose one of: {', '.join(preset_names(model))}")
        sites = resolve_sites(model, presets[base])
        return middle_layers(sites, drop) if drop else sites
    if isinstance(modules, str):
        if modules.isidentifier() and not list_sites(model, modules) and "." not in modules:
            close = difflib.get_close_matches(modules, _preset_names(), n=1)
            if close:
                raise ValueError(f"Unknown preset {modules!r}; did you mean {close[0]!r}?")
        modules = [modules]
    return resolve_sites(model, list(modules))


def _preset_names() -> list[str]:
    return sorted({p for table in LM_PRESETS.values() for p in table} | set(MIDDLE_PRESETS) | {"auto", "paper"})


def preset_names(model: torch.nn.Module | None = None) -> list[str]:
    """The preset names ``modules=`` accepts (for ``model``'s architecture when given); ``"auto"``, ``"paper"`` first.

    Example:
        >>> preset_names()[:4]
        ['auto', 'paper', 'all-norms', 'attn-norms']
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table = LM_PRESETS.get(model_type or "", {}) if model is not None else dict.fromkeys(_preset_names())
    names = sorted(set(table) - {"auto", "paper"} | {m for m, (base, _) in MIDDLE_PRESETS.items() if base in table})
    return ["auto", "paper"] + names


_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


def middle_layers(sites: list[str], drop: float) -> list[str]:
    """The sites of the middle layers: ``round(L * drop)`` of the ``L`` layers are dropped at each end.

    Sites outside numbered layers (a final norm) are dropped too.

    Example:
        >>> sites = [f"model.layers.{i}.input_layernorm" for i in range(12)]
        >>> [s.split(".")[2] for s in middle_layers(sites, 1 / 6)]
        ['2', '3', '4', '5', '6', '7', '8', '9']
    """
    index = {s: int(m.group(1)) for s in sites if (m := _LAYER.search(s))}
    layers = sorted(set(index.values()))
    cut = round(len(layers) * drop)
    keep = set(layers[cut : len(layers) - cut]) if len(layers) > 2 * cut else set(layers)
    return [s for s in sites if index.get(s) in keep]
