"""``model.generate(**inputs, steering=...)`` after `actsteer.enable_steering`, on tiny random LMs."""

from __future__ import annotations

import pytest
import torch
import transformers

import actsteer

SOURCE = [f"the cat sat on mat number {i} today" for i in range(10)]
TARGET = [f"STORMY SEAS AND WAVES {i}!!" * (1 + i % 3) for i in range(10)]
PROMPTS = ["hello there", "a much longer prompt for padding"]


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(params=["gpt2", "llama", "gemma2"])
def lm(request, tiny_lm_factory):
    model, tok = tiny_lm_factory(request.param)
    # a strong transport (all reals, strength up to 4) so that greedy text visibly changes on a random model
    transport = actsteer.fit_lm(model, tok, SOURCE, TARGET, support="all", progress=False)
    inputs = tok(PROMPTS, return_tensors="pt", padding=True)
    return model, tok, transport, inputs


def _gen(model, inputs, **kwargs):
    kwargs.setdefault("max_new_tokens", 8)
    kwargs.setdefault("do_sample", False)
    return model.generate(**inputs, **kwargs)


def test_enable_steering_is_idempotent_and_reversible(lm):
    model, _, _, inputs = lm
    assert "generate" not in model.__dict__
    assert actsteer.enable_steering(model) is model
    wrapped = model.generate
    actsteer.enable_steering(model)
    assert model.generate is wrapped
    actsteer.disable_steering(model)
    assert "generate" not in model.__dict__ and model.generate.__func__ is type(model).generate
    actsteer.disable_steering(model)  # twice is fine


def test_generate_without_steering_is_unchanged(lm):
    model, _, _, inputs = lm
    plain = _gen(model, inputs)
    actsteer.enable_steering(model)
    assert torch.equal(_gen(model, inputs), plain)
    assert torch.equal(_gen(model, inputs, steering=None), plain)


def test_generate_steering_changes_output_and_leaves_no_hooks(lm):
    model, _, transport, inputs = lm
    plain = _gen(model, inputs)
    actsteer.enable_steering(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    steered = _gen(model, inputs, steering=actsteer.Steering(transport, strength=4.0))
    assert not torch.equal(steered, plain)
    assert _hooks(model) == 0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(_gen(model, inputs), plain)


def test_generate_strength_zero_reproduces_unsteered(lm):
    model, _, transport, inputs = lm
    plain = _gen(model, inputs)
    actsteer.enable_steering(model)
    assert torch.equal(_gen(model, inputs, steering=actsteer.Steering(transport, strength=0.0)), plain)


def test_generate_accepts_transport_steering_and_lists(lm):
    model, _, transport, inputs = lm
    actsteer.enable_steering(model)
    bare = _gen(model, inputs, steering=transport)
    assert torch.equal(bare, _gen(model, inputs, steering=actsteer.Steering(transport, 1.0)))
    half = actsteer.Steering(transport, 2.0)
    # two composed transports at 2 + 2 vs one at 4: same maps applied twice is NOT the same as strength 4
    # (the map is affine), so just check a list runs and differs from a single one
    composed = _gen(model, inputs, steering=[half, half])
    assert composed.shape == bare.shape
    assert _hooks(model) == 0


def test_generate_cache_on_and_off_agree_under_steering(lm):
    model, _, transport, inputs = lm
    actsteer.enable_steering(model)
    st = actsteer.Steering(transport, strength=3.0)
    assert torch.equal(_gen(model, inputs, steering=st, use_cache=True), _gen(model, inputs, steering=st, use_cache=False))


def test_generate_per_row_strengths(lm):
    model, _, transport, inputs = lm
    actsteer.enable_steering(model)
    plain = _gen(model, inputs)
    full = _gen(model, inputs, steering=actsteer.Steering(transport, 4.0))
    mixed = _gen(model, inputs, steering=actsteer.Steering(transport, torch.tensor([0.0, 4.0])))
    assert torch.equal(mixed[0], plain[0])
    assert torch.equal(mixed[1], full[1])


def test_generate_beam_search_and_sampling(lm):
    model, _, transport, inputs = lm
    actsteer.enable_steering(model)
    st = actsteer.Steering(transport, torch.tensor([0.0, 4.0]))
    beams = _gen(model, inputs, steering=st, num_beams=3, num_return_sequences=2)
    assert beams.shape[0] == 4
    plain_beams = _gen(model, inputs, num_beams=3, num_return_sequences=2)
    assert torch.equal(beams[:2], plain_beams[:2])  # row 0 (strength 0) and its beams are untouched
    torch.manual_seed(3)
    sampled = _gen(model, inputs, steering=actsteer.Steering(transport, 2.0), do_sample=True, top_p=0.9)
    torch.manual_seed(3)
    again = _gen(model, inputs, steering=actsteer.Steering(transport, 2.0), do_sample=True, top_p=0.9)
    assert torch.equal(sampled, again)
    assert _hooks(model) == 0


def test_generate_per_row_strengths_never_change_the_handle_mid_call(lm, monkeypatch):
    """The rows generate() adds for beams are spread in the core: generate sets no strength while it runs."""
    model, _, transport, inputs = lm
    actsteer.enable_steering(model)
    changed = []
    original = actsteer.SteeringHandle.set_strength
    monkeypatch.setattr(actsteer.SteeringHandle, "set_strength",
                        lambda self, *a, **kw: changed.append(a) or original(self, *a, **kw))
    st = actsteer.Steering(transport, torch.tensor([0.0, 4.0]))
    beams = _gen(model, inputs, steering=st, num_beams=3, num_return_sequences=2)
    assert beams.shape[0] == 4 and changed == []


def test_generate_apply_to_generated_keeps_the_first_token(lm):
    model, _, transport, inputs = lm
    actsteer.enable_steering(model)
    plain = _gen(model, inputs)
    n = inputs["input_ids"].shape[1]
    gen_only = actsteer.Steering(transport, 4.0, apply_to="generated")
    out = _gen(model, inputs, steering=gen_only)
    # the first new token is predicted from the prompt alone, which is not steered
    assert torch.equal(out[:, : n + 1], plain[:, : n + 1])
    assert torch.equal(out, _gen(model, inputs, steering=gen_only, use_cache=False))
    prompt_only = actsteer.Steering(transport, 4.0, apply_to="prompt")
    assert torch.equal(_gen(model, inputs, steering=prompt_only), _gen(model, inputs, steering=prompt_only, use_cache=False))


def test_generate_hooks_removed_when_generation_raises(lm):
    model, _, transport, inputs = lm
    actsteer.enable_steering(model)

    class Boom(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _gen(model, inputs, steering=transport, logits_processor=transformers.LogitsProcessorList([Boom()]))
    assert _hooks(model) == 0
    # and the model can be steered again (no stale "already steered" state)
    _gen(model, inputs, steering=transport)


def test_generate_refuses_a_transport_of_another_model(tiny_lm_factory):
    gpt2, gpt2_tok = tiny_lm_factory("gpt2")
    llama, tok = tiny_lm_factory("llama")
    foreign = actsteer.fit_lm(gpt2, gpt2_tok, SOURCE, TARGET, progress=False)
    actsteer.enable_steering(llama)
    inputs = tok(PROMPTS, return_tensors="pt", padding=True)
    with pytest.raises(KeyError, match=r"transformer\.h\.0\.ln_1.*not found in LlamaForCausalLM"):
        _gen(llama, inputs, steering=foreign)
    # same names, other width
    wide = actsteer.fit_lm(llama, tok, SOURCE, TARGET, modules="all-norms", progress=False)
    narrow_cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, vocab_size=257, max_position_embeddings=128)
    narrow = transformers.LlamaForCausalLM(narrow_cfg).eval()
    actsteer.enable_steering(narrow)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.input_layernorm.*64 units.*outputs 32"):
        _gen(narrow, inputs, steering=wide)
    assert _hooks(narrow) == 0 and _hooks(llama) == 0


def test_text_generation_pipeline_passes_steering(tiny_lm_factory):
    model, tok = tiny_lm_factory("llama")
    transport = actsteer.fit_lm(model, tok, SOURCE, TARGET, support="all", progress=False)
    actsteer.enable_steering(model)
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tok)
    kw = dict(max_new_tokens=8, do_sample=False, return_full_text=False)
    plain = pipe("hello there", **kw)[0]["generated_text"]
    steered = pipe("hello there", steering=actsteer.Steering(transport, 4.0), **kw)[0]["generated_text"]
    zero = pipe("hello there", steering=actsteer.Steering(transport, 0.0), **kw)[0]["generated_text"]
    assert steered != plain and zero == plain


@pytest.mark.parametrize(("steering", "match"), [
    ({"model.norm": 1.0}, r"got a dict.*per-site strengths.*Steering\(transport, strength=\{site: value\}\)"),
    ("ocean.safetensors", r"got a str 'ocean\.safetensors'.*Transport\.load"),
    (3.0, r"got a float.*strength"),
    ([None], r"got NoneType"),
], ids=["dict", "str", "number", "list-of-none"])
def test_generate_steering_of_the_wrong_kind_says_what_it_got(tiny_llama, steering, match):
    model, tok = tiny_llama
    actsteer.enable_steering(model)
    inputs = tok(PROMPTS, return_tensors="pt", padding=True)
    with pytest.raises(TypeError, match=match):
        _gen(model, inputs, steering=steering)
    with pytest.raises(TypeError, match=match):
        actsteer.steer(model, steering).__enter__()
    assert _hooks(model) == 0
