"""fit_lm and the LM site presets on tiny random GPT-2 / Llama / Gemma2 models."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import actsteer
from actsteer.hf_integration.presets import lm_sites

SOURCE = [f"the cat sat on mat number {i} today" for i in range(12)]
TARGET = [f"STORMY SEAS AND WAVES {i}!!" * (1 + i % 3) for i in range(12)]


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("gpt2", ["transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1", "transformer.h.1.ln_2", "transformer.ln_f"]),
        # Llama: the norms before attention of the middle layers (measured on SmolLM2; 2 layers keep both)
        ("llama", ["model.layers.0.input_layernorm", "model.layers.1.input_layernorm"]),
        ("gemma2", [f"model.layers.{i}.{p}_layernorm" for i in range(2) for p in ("post_attention", "post_feedforward")]),
    ],
)
def test_lm_sites_auto_per_architecture(tiny_lm_factory, arch, expected):
    model, _ = tiny_lm_factory(arch)
    assert lm_sites(model, "auto") == expected


def test_lm_sites_the_papers_llama_sites_stay_reachable_by_name(tiny_llama):
    model, _ = tiny_llama
    paper = [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]
    assert lm_sites(model, "mlp") == paper
    assert lm_sites(model, "paper") == paper  # "auto" before issue 22


@pytest.mark.parametrize("arch, preset", [("gpt2", "all-norms"), ("gemma2", "post-norms")])
def test_lm_sites_paper_is_auto_where_the_paper_has_the_measured_choice(tiny_lm_factory, arch, preset):
    model, _ = tiny_lm_factory(arch)
    assert lm_sites(model, "paper") == lm_sites(model, "auto") == lm_sites(model, preset)


def test_preset_names_per_architecture(tiny_llama, tiny_gpt2):
    from actsteer.hf_integration.presets import preset_names

    assert preset_names(tiny_llama[0]) == ["auto", "paper", "all-norms", "attn-norms", "mid-attn-norms", "mlp",
                                           "post-norms"]
    assert preset_names(tiny_gpt2[0])[:2] == ["auto", "paper"]
    with pytest.raises(ValueError, match="did you mean 'paper'"):
        lm_sites(tiny_llama[0], "papr")


@pytest.mark.parametrize("layers, kept", [(2, [0, 1]), (4, [1, 2]), (6, [1, 2, 3, 4]), (12, list(range(2, 10)))])
def test_lm_sites_mid_attn_norms_drop_a_sixth_of_the_layers_at_each_end(layers, kept):
    """30 layers (SmolLM2) keep 5..24; the default of `fit_lm` on Llama-family models."""
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    model = transformers.LlamaForCausalLM(cfg)
    assert lm_sites(model, "mid-attn-norms") == [f"model.layers.{i}.input_layernorm" for i in kept]
    assert lm_sites(model, "auto") == lm_sites(model, "mid-attn-norms")
    assert lm_sites(model, "attn-norms") == [f"model.layers.{i}.input_layernorm" for i in range(layers)]


def test_lm_sites_attn_norms_on_every_listed_architecture(tiny_gpt2, tiny_gemma2):
    assert lm_sites(tiny_gpt2[0], "attn-norms") == ["transformer.h.0.ln_1", "transformer.h.1.ln_1"]
    assert lm_sites(tiny_gemma2[0], "attn-norms") == ["model.layers.0.input_layernorm", "model.layers.1.input_layernorm"]
    assert lm_sites(tiny_gpt2[0], "mid-attn-norms") == ["transformer.h.0.ln_1", "transformer.h.1.ln_1"]


def test_fit_lm_default_sites_are_the_auto_preset(tiny_llama):
    model, tok = tiny_llama
    t = actsteer.fit_lm(model, tok, SOURCE, TARGET, progress=False)
    assert t.sites == lm_sites(model, "mid-attn-norms")
    assert t.method == "linear-act" and t.pooling == "mean" and t.support == "observed"


def test_lm_sites_named_presets_and_regexes(tiny_llama):
    model, _ = tiny_llama
    assert lm_sites(model, "all-norms") == [
        "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm",
    ]
    assert lm_sites(model, r"model\.layers\.1\.mlp\.down_proj") == ["model.layers.1.mlp.down_proj"]
    assert lm_sites(model, ["model.norm", r"model\.layers\.0\.input_layernorm"]) == [
        "model.layers.0.input_layernorm", "model.norm"]
    with pytest.raises(ValueError, match="did you mean 'post-norms'"):
        lm_sites(model, "post_norms")


def test_lm_sites_unknown_architecture_lists_candidates(tiny_gpt2):
    model, _ = tiny_gpt2

    class Mystery(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"model_type": "mystery"})()
            self.body = model

    with pytest.raises(ValueError, match=r"No site preset for model_type='mystery'.*body\.transformer\.h\.\{i\}\.ln_1"):
        lm_sites(Mystery(), "auto")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_fit_lm_records_metadata_and_moves_pooled_activations(tiny_lm_factory, arch):
    model, tok = tiny_lm_factory(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # support="all": every token is moved, so the sequential fit and steering agree exactly (see below)
    t = actsteer.fit_lm(model, tok, SOURCE, TARGET, support="all", progress=False, description="tiny")
    assert t.n_source == len(SOURCE) and t.n_target == len(TARGET)
    assert t.model["model_type"] == arch and t.model["class"] == type(model).__name__
    assert t.method == "linear-act" and t.mode == "sequential" and t.description == "tiny"
    assert t.extra["fit"]["forward_calls"] == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # The last site's mean pooled source activation, steered, equals the target's: the map is affine and was
    # fitted sequentially on the same (steered-upstream) source activations it now sees.
    from actsteer.core import ForwardContext
    from actsteer.hf_integration.lm import make_runner
    from actsteer.core.pooling import pool

    site = t.sites[-1]
    module = model.get_submodule(site)
    run = make_runner(model, tok, 128)

    def pooled(texts):
        rec = {}
        ctx = ForwardContext()
        h = module.register_forward_hook(lambda m, a, o: rec.__setitem__("x", pool(o, mask=ctx.mask)))
        try:
            with torch.no_grad():
                run(texts, ctx)
        finally:
            h.remove()
        return rec["x"]

    target_mean = pooled(TARGET).mean(0)
    assert (pooled(SOURCE).mean(0) - target_mean).abs().max() > 1e-3
    with actsteer.steer(model, t, strength=1.0):
        steered_mean = pooled(SOURCE).mean(0)
    assert_close(steered_mean, target_mean, rtol=0, atol=2e-4)


def test_fit_lm_left_and_right_padding_agree(tiny_lm_factory):
    left_model, left_tok = tiny_lm_factory("llama", padding_side="left")
    right_model, right_tok = tiny_lm_factory("llama", padding_side="right")
    a = actsteer.fit_lm(left_model, left_tok, SOURCE, TARGET, modules="all-norms", progress=False)
    b = actsteer.fit_lm(right_model, right_tok, SOURCE, TARGET, modules="all-norms", progress=False)
    assert a.sites == b.sites
    for site in a:
        assert_close(a[site].omega, b[site].omega, rtol=1e-4, atol=1e-4)
        assert_close(a[site].beta, b[site].beta, rtol=1e-4, atol=1e-4)


def test_fit_lm_batches_give_the_same_maps(tiny_gpt2):
    model, tok = tiny_gpt2
    one = actsteer.fit_lm(model, tok, SOURCE, TARGET, progress=False)
    many = actsteer.fit_lm(model, tok, SOURCE, TARGET, progress=False, batch_size=5)
    assert many.extra["fit"]["forward_calls"] > 1
    for site in one:
        assert_close(one[site].beta, many[site].beta, rtol=1e-4, atol=1e-5)


def test_fit_lm_restores_a_tokenizer_without_pad_token(tiny_gpt2):
    model, tok = tiny_gpt2
    tok.pad_token = None
    actsteer.fit_lm(model, tok, SOURCE[:4], TARGET[:4], progress=False)
    assert tok.pad_token is None


@pytest.mark.parametrize(
    "source, target, error, match",
    [
        ([], TARGET, ValueError, "at least 2"),
        (["only one"], TARGET[:2], ValueError, "at least 2"),
        (["fine", "   "], TARGET[:2], ValueError, "empty text"),
        ("a single string", TARGET, TypeError, "single string"),
        (["ok", 3], TARGET[:2], TypeError, "must contain strings"),
        (SOURCE[:2], TARGET * 3, ValueError, "unbalanced"),
    ],
)
def test_fit_lm_rejects_bad_text_lists(tiny_gpt2, source, target, error, match):
    model, tok = tiny_gpt2
    with pytest.raises(error, match=match):
        actsteer.fit_lm(model, tok, source, target, progress=False)


def _tiny(config_cls, **extra):
    import transformers

    cfg = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=257, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral", "phi3", "gemma3_text"])
def test_lm_sites_presets_cover_other_architectures(name):
    import transformers

    config_cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
                  "mistral": transformers.MistralConfig, "phi3": transformers.Phi3Config,
                  "gemma3_text": transformers.Gemma3TextConfig}[name]
    extra = {"head_dim": 16} if name in ("qwen3", "gemma3_text") else {}
    model = _tiny(config_cls, **extra)
    auto = lm_sites(model, "auto")
    if name == "gemma3_text":
        assert auto == [f"model.layers.{i}.{p}_layernorm" for i in range(2) for p in ("post_attention", "post_feedforward")]
    else:  # the decoder norms (Qwen3's head-sized q_norm/k_norm are left out)
        assert auto == [f"model.layers.{i}.{p}" for i in range(2) for p in ("input_layernorm", "post_attention_layernorm")] + ["model.norm"]
    for preset in ("all-norms", "post-norms", "mlp", "attn-norms", "mid-attn-norms"):
        assert lm_sites(model, preset)


def test_fit_lm_method_defaults(tiny_gpt2):
    model, tok = tiny_gpt2
    caa = actsteer.fit_lm(model, tok, SOURCE, TARGET, method="caa", progress=False)
    assert caa.pooling == "last" and caa.support == "all"
    aura = actsteer.fit_lm(model, tok, SOURCE, TARGET, method="AurA", progress=False)
    assert aura.method == "aura" and aura.pooling == "max"
    lin = actsteer.fit_lm(model, tok, SOURCE, TARGET, progress=False)
    assert lin.pooling == "mean" and lin.support == "observed"
    assert torch.isfinite(lin[lin.sites[0]].lo).all()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_context_length_reads_the_models_position_limit(tiny_lm_factory, arch):
    from actsteer.hf_integration.lm import context_length

    model, _ = tiny_lm_factory(arch)
    assert context_length(model) == 128  # n_positions (GPT-2) / max_position_embeddings of the tiny configs
    assert context_length(torch.nn.Linear(2, 2)) is None  # no config: nothing to cap


@pytest.mark.parametrize("max_length", [0, -5, 2.5, True])
def test_fit_lm_rejects_a_bad_max_length(tiny_gpt2, max_length):
    model, tok = tiny_gpt2
    with pytest.raises(ValueError, match="`max_length` must be a positive number of tokens"):
        actsteer.fit_lm(model, tok, SOURCE, TARGET, max_length=max_length, progress=False)
