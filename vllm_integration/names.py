"""Translate a transport fitted on a Hugging Face LM into the module names and shapes of vLLM's model.

vLLM's Llama-family models (Llama/SmolLM2, Mistral, Qwen2, Qwen3, Phi-3) differ from transformers in three ways
that matter for steering:

- ``RMSNorm`` called with a residual fuses the add and returns ``(normed, residual_sum)``: every decoder norm
  except layer 0's ``input_layernorm`` (and the final ``model.norm``) is addressed as element 0 (``site:0``).
  Element 0 is exactly the HF norm's output, and the residual stream is left alone, as in HF.
- ``q_proj``/``k_proj``/``v_proj`` are one ``qkv_proj`` and ``gate_proj``/``up_proj`` one ``gate_up_proj``, and
  linear layers return ``(output, bias)``: an HF projection becomes a slice of the fused output, and the maps
  of the units outside it are the identity (bit-exact: ``x * 1 + 0``).
- Under tensor parallelism (TP) column-parallel outputs hold only this rank's shard: the slice is cut per rank.

| HF site (``p = model.layers.{i}``) | vLLM site | TP |
|---|---|---|
| ``model.embed_tokens`` | ``model.embed_tokens`` | safe (all-reduced) |
| ``p.input_layernorm`` | ``p.input_layernorm`` (layer 0), else ``p.input_layernorm:0`` | safe (replicated) |
| ``p.post_attention_layernorm``, ``model.norm`` | ``...:0`` | safe (replicated) |
| ``p.self_attn:0``, ``p.self_attn.o_proj`` | ``p.self_attn``, ``p.self_attn.o_proj:0`` | safe (all-reduced) |
| ``p.mlp``, ``p.mlp.down_proj`` | ``p.mlp``, ``p.mlp.down_proj:0`` | safe (all-reduced) |
| ``p.self_attn.{q,k,v}_proj``, ``p.self_attn.qkv_proj`` | slices of ``p.self_attn.qkv_proj:0`` | sliced per rank |
| ``p.mlp.{gate,up}_proj``, ``p.mlp.gate_up_proj`` | slices of ``p.mlp.gate_up_proj:0`` | sliced per rank |

Refused, with the reason: the decoder layer's own output ``p`` (vLLM defers its residual add into the next
layer's fused norm, so that tensor never exists), ``p.mlp.act_fn`` (vLLM's ``SiluAndMul`` also multiplies by
``up_proj``), ``lm_head`` (not run as a module), rotary embeddings and Qwen3's per-head ``q_norm``/``k_norm``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from ..core import Transport, UnitMap, fitted_on_note, parse_site

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
)

_LAYER = re.compile(r"model\.layers\.(?P<i>\d+)\.(?P<rest>.+)")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the translation needs to know of the served model, and which tensor-parallel rank it runs on.

    Example:
        >>> s = ModelShape("LlamaForCausalLM", num_layers=2, hidden_size=8, intermediate_size=16, num_heads=2,
        ...                num_kv_heads=1, head_dim=4)
        >>> s.qkv_width, s.gate_up_width
        (16, 32)
    """

    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tp_rank: int = 0
    tp_size: int = 1

    @classmethod
    def from_config(cls, config: Any, *, tp_rank: int = 0, tp_size: int = 1) -> ModelShape:
        """From a transformers config (what ``vllm_config.model_config.hf_config`` is).

        Raises:
            ValueError: the architecture is not one whose vLLM module layout is known here.
        """
        archs = list(getattr(config, "architectures", None) or [])
        found = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
        if not found:
            raise ValueError(
                f"actsteer cannot map transports onto vLLM's {archs or '(unknown)'} model: its module layout is known "
                f"for {', '.join(SUPPORTED_ARCHITECTURES)} only"
            )
        heads = int(config.num_attention_heads)
        hidden = int(config.hidden_size)
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(
            architecture=found[0],
            num_layers=int(config.num_hidden_layers),
            hidden_size=hidden,
            intermediate_size=int(config.intermediate_size),
            num_heads=heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            tp_rank=int(tp_rank),
            tp_size=int(tp_size),
        )

    # per-rank widths of the fused column-parallel outputs
    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim // self.tp_size

    @property
    def kv_heads_here(self) -> int:
        return max(1, self.num_kv_heads // self.tp_size)

    @property
    def qkv_width(self) -> int:
        return self.q_width + 2 * self.kv_heads_here * self.head_dim

    @property
    def gate_up_width(self) -> int:
        return 2 * self.intermediate_size // self.tp_size


@dataclasses.dataclass(frozen=True)
class _Piece:
    """HF units ``source_units`` of an HF site land on units ``offset..offset+len`` of a vLLM site of ``width``."""

    vllm_site: str
    width: int
    offset: int
    source_units: torch.Tensor  # (n,) long indices into the HF map


def _arange(start: int, stop: int) -> torch.Tensor:
    return torch.arange(start, stop, dtype=torch.long)


def _shard(total: int, shape: ModelShape) -> torch.Tensor:
    """The units of a column-parallel output of ``total`` units that this rank holds."""
    n = total // shape.tp_size
    return _arange(shape.tp_rank * n, (shape.tp_rank + 1) * n)


def _kv_shard(shape: ModelShape) -> torch.Tensor:
    """This rank's key (or value) units: its heads, or the one head it holds a replica of when heads < ranks."""
    hd = shape.head_dim
    if shape.num_kv_heads >= shape.tp_size:
        per = shape.num_kv_heads // shape.tp_size
        return _arange(shape.tp_rank * per * hd, (shape.tp_rank + 1) * per * hd)
    head = shape.tp_rank // (shape.tp_size // shape.num_kv_heads)  # vLLM's kv-head replica layout
    return _arange(head * hd, (head + 1) * hd)


def _refuse(site: str, shape: ModelShape, why: str) -> ValueError:
    return ValueError(f"Site {site!r} cannot be steered in vLLM's {shape.architecture}: {why}")


def _plan_site(site: str, shape: ModelShape) -> list[_Piece]:
    """Where one HF site lives in the vLLM model on this rank (one piece, or several for a fused HF output).

    Raises:
        KeyError: the site does not exist in a model of this shape (e.g. a layer past the last one).
        ValueError: the site exists in HF but has no vLLM counterpart (the message says why, and what to use).
    """
    name, k = parse_site(site)
    h = shape.hidden_size
    if name in ("model.embed_tokens", "model.norm") and k is None:
        return [_Piece(name if name == "model.embed_tokens" else "model.norm:0", h, 0, _arange(0, h))]
    if re.fullmatch(r"model\.layers\.\d+", name):
        raise _refuse(
            site, shape,
            "vLLM adds each layer's residual inside the next layer's fused norm, so the decoder layer's output "
            "never exists as one tensor; steer the next layer's input_layernorm or this layer's mlp instead",
        )
    m = _LAYER.fullmatch(name)
    if m is None:
        if name == "lm_head":
            raise _refuse(site, shape, "vLLM computes the logits with lm_head's weight, never by calling the module")
        raise KeyError(
            f"Site {site!r} is not a module of {shape.architecture} that actsteer can map onto vLLM; mappable sites "
            "are "
            "model.embed_tokens, model.norm and model.layers.{i}.(input_layernorm|post_attention_layernorm|"
            "self_attn:0|self_attn.(q|k|v|qkv|o)_proj|mlp|mlp.(gate|up|gate_up|down)_proj)"
        )
    i, rest = int(m["i"]), m["rest"]
    if i >= shape.num_layers:
        raise KeyError(
            f"Site {site!r} not found in {shape.architecture} (layers 0-{shape.num_layers - 1}); the transport was "
            "fitted on a deeper model"
        )
    p = f"model.layers.{i}"
    whole = _arange(0, h)
    if k is None and rest == "input_layernorm":
        # layer 0 gets no residual yet, so its norm returns a tensor; the others fuse the add and return a tuple
        return [_Piece(f"{p}.input_layernorm" if i == 0 else f"{p}.input_layernorm:0", h, 0, whole)]
    if k is None and rest == "post_attention_layernorm":
        return [_Piece(f"{p}.post_attention_layernorm:0", h, 0, whole)]
    if rest == "self_attn" and k == 0:
        return [_Piece(f"{p}.self_attn", h, 0, whole)]
    if k is None and rest in ("self_attn.o_proj", "mlp.down_proj"):
        return [_Piece(f"{p}.{rest}:0", h, 0, whole)]
    if k is None and rest == "mlp":
        return [_Piece(f"{p}.mlp", h, 0, whole)]
    if k is None and rest in ("mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj"):
        inter, here = shape.intermediate_size, shape.intermediate_size // shape.tp_size
        shard = _shard(inter, shape)
        site_name, width = f"{p}.mlp.gate_up_proj:0", shape.gate_up_width
        if rest == "mlp.gate_proj":
            return [_Piece(site_name, width, 0, shard)]
        if rest == "mlp.up_proj":
            return [_Piece(site_name, width, here, shard)]
        return [_Piece(site_name, width, 0, shard), _Piece(site_name, width, here, inter + shard)]
    if k is None and rest in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.qkv_proj"):
        q_total, kv_total = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
        q, kv = _shard(q_total, shape), _kv_shard(shape)
        site_name, width = f"{p}.self_attn.qkv_proj:0", shape.qkv_width
        k_off, v_off = shape.q_width, shape.q_width + len(kv)
        if rest == "self_attn.q_proj":
            return [_Piece(site_name, width, 0, q)]
        if rest == "self_attn.k_proj":
            return [_Piece(site_name, width, k_off, kv)]
        if rest == "self_attn.v_proj":
            return [_Piece(site_name, width, v_off, kv)]
        return [
            _Piece(site_name, width, 0, q),
            _Piece(site_name, width, k_off, q_total + kv),
            _Piece(site_name, width, v_off, q_total + kv_total + kv),
        ]
    why = {
        "mlp.act_fn": "vLLM's SiluAndMul returns silu(gate) * up, not HF's silu(gate); steer mlp.gate_proj instead",
        "self_attn.rotary_emb": "rotary embeddings return (query, key) pairs, not per-token activations",
        "self_attn.q_norm": "the per-head norm runs on (tokens x heads, head_dim) rows; steer self_attn.q_proj",
        "self_attn.k_norm": "the per-head norm runs on (tokens x heads, head_dim) rows; steer self_attn.k_proj",
    }.get(rest)
    if why is None:
        why = f"no vLLM counterpart is known for {rest!r}" + (f" with element {k}" if k is not None else "")
    raise _refuse(site, shape, why)


def to_vllm(transport: Transport, shape: ModelShape) -> Transport:
    """The transport with vLLM site names and per-rank widths (fused outputs get identity maps around the slice).

    Args:
        transport: fitted on the HF model (sites as `actsteer.fit_lm` names them).
        shape: the served model and this tensor-parallel rank.

    Returns:
        A new `Transport` whose sites are vLLM module outputs; the metadata is kept, plus
        ``extra["vllm_sites_from"]`` (the HF sites).

    Raises:
        KeyError / ValueError: a site that does not exist in this model, has the wrong width, or has no vLLM
            counterpart; every message names the site.

    Example:
        >>> import torch, actsteer
        >>> s = ModelShape("LlamaForCausalLM", num_layers=2, hidden_size=4, intermediate_size=3, num_heads=2,
        ...                num_kv_heads=2, head_dim=2)
        >>> up = actsteer.UnitMap(torch.full((3,), 2.0), torch.ones(3))
        >>> t = actsteer.Transport({"model.layers.1.mlp.up_proj": up})
        >>> v = to_vllm(t, s)
        >>> v.sites, v["model.layers.1.mlp.gate_up_proj:0"].omega.tolist()
        (['model.layers.1.mlp.gate_up_proj:0'], [1.0, 1.0, 1.0, 2.0, 2.0, 2.0])
    """
    pieces: dict[str, list[tuple[_Piece, UnitMap, str]]] = {}
    for site, unit_map in transport.items():
        plan = _plan_site(site, shape)
        expected = _hf_width(site, shape)
        if unit_map.dim != expected:
            raise ValueError(
                f"Site {site!r}: the transport has {unit_map.dim} units but {shape.architecture} outputs {expected} "
                f"there; the transport was fitted on a different model{fitted_on_note(transport)}"
            )
        for piece in plan:
            pieces.setdefault(piece.vllm_site, []).append((piece, unit_map, site))
    maps = {}
    for vllm_site, parts in pieces.items():
        maps[vllm_site] = _merge(vllm_site, parts)
    extra = dict(transport.extra)
    extra["vllm_sites_from"] = transport.sites
    return transport.replace(maps, extra=extra)


def site_width(site: str, shape: ModelShape) -> int:
    """Units of a vLLM site on this rank: the fused q/k/v and gate/up outputs are column-parallel shards, the
    others (norms, embeddings, all-reduced outputs) are the hidden size.

    Example:
        >>> s = ModelShape("LlamaForCausalLM", num_layers=2, hidden_size=8, intermediate_size=16, num_heads=2,
        ...                num_kv_heads=1, head_dim=4, tp_size=2)
        >>> site_width("model.layers.0.mlp.gate_up_proj:0", s), site_width("model.norm:0", s)
        (16, 8)
    """
    last = parse_site(site)[0].rsplit(".", 1)[-1]
    if last == "qkv_proj":
        return shape.qkv_width
    if last == "gate_up_proj":
        return shape.gate_up_width
    return shape.hidden_size


def _hf_width(site: str, shape: ModelShape) -> int:
    """Units of the HF site's output (the whole model, not a TP shard)."""
    name, _ = parse_site(site)
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    widths = {
        "q_proj": q, "k_proj": kv, "v_proj": kv, "qkv_proj": q + 2 * kv,
        "gate_proj": shape.intermediate_size, "up_proj": shape.intermediate_size,
        "gate_up_proj": 2 * shape.intermediate_size,
    }
    return widths.get(name.rsplit(".", 1)[-1], shape.hidden_size)


def _merge(vllm_site: str, parts: list[tuple[_Piece, UnitMap, str]]) -> UnitMap:
    """One UnitMap over the whole vLLM output: the pieces' units where they land, the identity elsewhere."""
    width = parts[0][0].width
    inf = torch.full((width,), float("inf"))
    fields = {
        "omega": torch.ones(width), "beta": torch.zeros(width), "lo": -inf, "hi": inf.clone(),
        "target_lo": -inf.clone(), "target_hi": inf.clone(), "dead": torch.zeros(width, dtype=torch.bool),
    }
    taken = torch.zeros(width, dtype=torch.bool)
    owner: dict[int, str] = {}
    for piece, unit_map, hf_site in parts:
        dest = _arange(piece.offset, piece.offset + len(piece.source_units))
        if bool(taken[dest].any()):
            other = owner[int(dest[taken[dest]][0])]
            raise ValueError(
                f"Sites {other!r} and {hf_site!r} of the transport both map onto the same units of {vllm_site!r}"
            )
        taken[dest] = True
        owner.update(dict.fromkeys(dest.tolist(), hf_site))
        for field, value in unit_map.to_tensors().items():
            fields[field][dest] = value[piece.source_units]
    return UnitMap(**fields)
