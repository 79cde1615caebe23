"""HF -> vLLM site translation and the request keys (actsteer.vllm_integration.names/store): no vLLM needed.

The slicing is checked numerically on a tiny random HF Llama: a transport applied to HF's separate projections
must equal the translated transport applied to the fused (and, under tensor parallelism, per-rank) output that
vLLM computes from the same weights.
"""

from __future__ import annotations

import actsteer
import pytest
import torch
from actsteer.vllm_integration import ModelShape, TransportStore, parse_request, to_vllm
from actsteer.vllm_integration.store import transports_dir

transformers = pytest.importorskip("transformers")


@pytest.fixture
def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    config.architectures = ["LlamaForCausalLM"]
    return transformers.LlamaForCausalLM(config).eval()


def _random_transport(sites: dict[str, int], seed: int = 0, support: str = "range") -> actsteer.Transport:
    g = torch.Generator().manual_seed(seed)
    maps = {}
    for site, d in sites.items():
        omega, beta = 0.5 + torch.rand(d, generator=g), torch.randn(d, generator=g)
        lo, hi = (-torch.rand(d, generator=g), torch.rand(d, generator=g)) if support == "range" else (None, None)
        maps[site] = actsteer.UnitMap(omega, beta, lo=lo, hi=hi, target_lo=lo, target_hi=hi)
    return actsteer.Transport(maps, model={"class": "LlamaForCausalLM"})


def _outputs(model, sites, x):
    """The HF outputs of modules named in ``sites`` for input ids ``x`` (one forward, hooks removed after)."""
    got, handles = {}, []
    for name in sites:
        module = model.get_submodule(name)
        handles.append(module.register_forward_hook(lambda m, a, o, name=name: got.__setitem__(name, o)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return got


def test_to_vllm_norm_sites_become_tuple_elements_except_first_input_norm(llama):
    shape = ModelShape.from_config(llama.config)
    t = _random_transport({
        "model.layers.0.input_layernorm": 16, "model.layers.1.input_layernorm": 16,
        "model.layers.1.post_attention_layernorm": 16, "model.norm": 16, "model.layers.0.self_attn:0": 16,
        "model.layers.1.mlp.down_proj": 16, "model.embed_tokens": 16,
    })
    v = to_vllm(t, shape)
    assert v.sites == [
        "model.layers.0.input_layernorm", "model.layers.1.input_layernorm:0",
        "model.layers.1.post_attention_layernorm:0", "model.norm:0", "model.layers.0.self_attn",
        "model.layers.1.mlp.down_proj:0", "model.embed_tokens",
    ]
    for hf_site, vllm_site in zip(t.sites, v.sites):  # whole-width sites are carried over unchanged
        for field in ("omega", "beta", "lo", "hi", "target_lo", "target_hi"):
            assert torch.equal(getattr(t[hf_site], field), getattr(v[vllm_site], field))
    assert v.extra["vllm_sites_from"] == t.sites and t.extra == {}  # the input is not changed


@pytest.mark.parametrize("tp_size", [1, 2, 4])
@pytest.mark.parametrize("strength", [1.0, 0.5, -0.7])
def test_to_vllm_fused_slices_match_hf_projections_per_rank(llama, tp_size, strength):
    hf_sites = {
        "model.layers.1.mlp.gate_proj": 24, "model.layers.1.mlp.up_proj": 24,
        "model.layers.0.self_attn.q_proj": 16, "model.layers.0.self_attn.k_proj": 8,
        "model.layers.0.self_attn.v_proj": 8,
    }
    t = _random_transport(hf_sites, seed=1)
    x = torch.randint(0, 64, (2, 7))
    out = _outputs(llama, hf_sites, x)
    steered = {s: t[s](out[s], strength) for s in hf_sites}
    for rank in range(tp_size):
        shape = ModelShape.from_config(llama.config, tp_rank=rank, tp_size=tp_size)
        v = to_vllm(t, shape)

        def shard(name, heads=None, rank=rank):
            full = out[name] if heads is None else heads
            n = full.shape[-1] // tp_size
            return full[..., rank * n:(rank + 1) * n]

        # what vLLM's column-parallel layers output on this rank, from the same weights
        gate_up = torch.cat([shard("model.layers.1.mlp.gate_proj"), shard("model.layers.1.mlp.up_proj")], -1)
        kv_heads = shape.kv_heads_here * shape.head_dim
        head = rank // max(1, tp_size // 2) if tp_size > 2 else rank
        k, vv = out["model.layers.0.self_attn.k_proj"], out["model.layers.0.self_attn.v_proj"]
        qkv = torch.cat([shard("model.layers.0.self_attn.q_proj"), k[..., head * kv_heads:(head + 1) * kv_heads],
                         vv[..., head * kv_heads:(head + 1) * kv_heads]], -1)
        got_gu = v["model.layers.1.mlp.gate_up_proj:0"](gate_up, strength)
        got_qkv = v["model.layers.0.self_attn.qkv_proj:0"](qkv, strength)
        want_gu = torch.cat([shard("model.layers.1.mlp.gate_proj", steered["model.layers.1.mlp.gate_proj"]),
                             shard("model.layers.1.mlp.up_proj", steered["model.layers.1.mlp.up_proj"])], -1)
        ks, vs = steered["model.layers.0.self_attn.k_proj"], steered["model.layers.0.self_attn.v_proj"]
        here = slice(head * kv_heads, (head + 1) * kv_heads)
        want_qkv = torch.cat([shard("model.layers.0.self_attn.q_proj", steered["model.layers.0.self_attn.q_proj"]),
                              ks[..., here], vs[..., here]], -1)
        torch.testing.assert_close(got_gu, want_gu, rtol=0, atol=0)
        torch.testing.assert_close(got_qkv, want_qkv, rtol=0, atol=0)


def test_to_vllm_units_outside_a_slice_are_left_bit_identical(llama):
    t = _random_transport({"model.layers.0.mlp.up_proj": 24}, seed=2)
    v = to_vllm(t, ModelShape.from_config(llama.config))
    x = torch.randn(5, 48)
    y = v["model.layers.0.mlp.gate_up_proj:0"](x, 0.8)
    assert torch.equal(y[:, :24], x[:, :24])
    assert not torch.equal(y[:, 24:], x[:, 24:])


@pytest.mark.parametrize("site, reason", [
    ("model.layers.1", "fused norm"),
    ("model.layers.0.mlp.act_fn", "SiluAndMul"),
    ("lm_head", "logits"),
    ("model.layers.0.self_attn.rotary_emb", "rotary"),
])
def test_to_vllm_refuses_sites_without_a_vllm_counterpart_and_says_why(llama, site, reason):
    t = _random_transport({site: 16})
    with pytest.raises(ValueError, match=reason) as err:
        to_vllm(t, ModelShape.from_config(llama.config))
    assert repr(site) in str(err.value)


def test_to_vllm_rejects_a_transport_from_another_model(llama):
    shape = ModelShape.from_config(llama.config)
    with pytest.raises(KeyError, match=r"layers 0-1"):
        to_vllm(_random_transport({"model.layers.5.input_layernorm": 16}), shape)
    with pytest.raises(ValueError, match=r"has 32 units but LlamaForCausalLM outputs 16"):
        to_vllm(_random_transport({"model.layers.0.input_layernorm": 32}), shape)


def test_model_shape_refuses_unknown_architectures():
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2)
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        ModelShape.from_config(config)


def test_parse_request_reads_names_and_strengths():
    assert parse_request(None) is None
    assert parse_request({"other": 1}) is None
    one = parse_request({"actsteer_transport": "ocean"})
    assert (one.names, one.strengths) == (("ocean",), (1.0,))
    two = parse_request({"actsteer_transport": ["ocean", "styles/food"], "actsteer_strength": 0.5})
    assert (two.names, two.strengths) == (("ocean", "styles/food"), (0.5, 0.5))


@pytest.mark.parametrize("extra, message", [
    ({"actsteer_strength": 1.0}, "'actsteer_transport' is not"),
    ({"actsteer_transport": "a", "actsteer_strength": "0.8"}, "must be a number"),
    ({"actsteer_transport": "a", "actsteer_strength": float("nan")}, "finite"),
    ({"actsteer_transport": "a", "actsteer_strength": 1e9}, "outside any useful range"),
    ({"actsteer_transport": ["a", "b"], "actsteer_strength": [1.0]}, "1 values for 2 transports"),
    ({"actsteer_transport": []}, "non-empty list"),
    ({"actsteer_transport": "../etc/passwd"}, "not allowed"),
    ({"actsteer_transport": "/abs/path"}, "not allowed"),
    ({"actsteer_transport": "a", "actsteer_strenght": 1}, "did you mean 'actsteer_strength'"),
])
def test_parse_request_refuses_bad_keys_with_the_reason(extra, message):
    with pytest.raises(ValueError, match=message):
        parse_request(extra)


def test_transport_store_loads_translates_caches_and_names_misses(llama, tmp_path, monkeypatch):
    shape = ModelShape.from_config(llama.config)
    _random_transport({"model.layers.1.mlp.gate_proj": 24}).save(tmp_path / "ocean.safetensors")
    (tmp_path / "styles").mkdir()
    _random_transport({"model.layers.0.input_layernorm": 16}).save(tmp_path / "styles" / "calm.safetensors")
    _random_transport({"model.layers.0.input_layernorm": 99}).save(tmp_path / "wrong.safetensors")
    store = TransportStore(tmp_path, shape)
    assert store.available() == ["ocean", "styles/calm", "wrong"]
    version, t = store.get("ocean")
    assert t.sites == ["model.layers.1.mlp.gate_up_proj:0"] and store.get("ocean")[1] is t  # cached
    assert store.get("styles/calm")[1].sites == ["model.layers.0.input_layernorm"]
    with pytest.raises(KeyError, match=r"No transport named 'ocaen'.*closest: 'ocean'"):
        store.get("ocaen")
    with pytest.raises(ValueError, match=r"'wrong' does not fit the served model.*99 units"):
        store.get("wrong")
    key = store.check(parse_request({"actsteer_transport": "ocean", "actsteer_strength": 0.5}), torch.float32)
    assert key != store.check(parse_request({"actsteer_transport": "ocean", "actsteer_strength": 0.6}), torch.float32)
    monkeypatch.setenv("ACTSTEER_TRANSPORTS", str(tmp_path))
    assert transports_dir(None) == tmp_path
    assert transports_dir({"actsteer": {"transports": "/srv/t"}}).as_posix() == "/srv/t"


def test_worker_layout_subsequence_keeps_each_request_order():
    from actsteer.vllm_integration.worker import _subsequence

    a, b = ("ocean", "v1"), ("food", "v1")
    assert _subsequence((a, b), [a, b]) == [0, 1]
    assert _subsequence((b, a), [a, b]) is None  # another order needs its own slots
    assert _subsequence((b, a), [a, b, a]) == [1, 2]
    assert _subsequence((a, a), [a, b]) is None and _subsequence((a, a), [a, b, a]) == [0, 2]
    assert _subsequence((("ocean", "v2"),), [a, b]) is None  # a changed file is a different slot


def test_to_vllm_translates_quantile_maps_and_mixed_fused_slices(llama):
    """Quantile maps keep their knots through the translation; an affine map fused beside one becomes a quantile map
    that is exact on its knots, and the units no map covers stay bit for bit."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 64, (2, 7))
    hf_sites = {"model.layers.0.self_attn.q_proj": 16, "model.layers.0.self_attn.k_proj": 8,
                "model.layers.1.input_layernorm": 16}
    out = _outputs(llama, hf_sites, x)
    maps = {}
    for site, d in hf_sites.items():
        a = torch.randn(64, d, generator=g)
        kind = "linear-act" if site.endswith("k_proj") else "quantile"
        maps[site] = actsteer.estimate(a, a.exp() + torch.randn(64, d, generator=g), method=kind, knots=6)
    t = actsteer.Transport(maps, model={"class": "LlamaForCausalLM"})
    v = to_vllm(t, ModelShape.from_config(llama.config))
    assert isinstance(v["model.layers.0.self_attn.qkv_proj:0"], actsteer.core.QuantileMap)
    norm = v["model.layers.1.input_layernorm:0"]
    assert torch.equal(norm.knots, t["model.layers.1.input_layernorm"].knots)
    qkv = torch.cat([out["model.layers.0.self_attn.q_proj"], out["model.layers.0.self_attn.k_proj"],
                     torch.randn(2, 7, 8, generator=g)], -1)
    for strength in (1.0, -0.5):
        got = v["model.layers.0.self_attn.qkv_proj:0"](qkv, strength)
        want_q = t["model.layers.0.self_attn.q_proj"](out["model.layers.0.self_attn.q_proj"], strength)
        want_k = t["model.layers.0.self_attn.k_proj"](out["model.layers.0.self_attn.k_proj"], strength)
        torch.testing.assert_close(got[..., :16], want_q, rtol=0, atol=0)
        torch.testing.assert_close(got[..., 16:24], want_k, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[..., 24:], qkv[..., 24:])
