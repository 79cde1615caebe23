"""The quantile map and LinEAS through the transformers host: `fit_lm`, the request-scoped engine and
``generate(steering=...)``, on tiny random GPT-2 / Llama / Gemma2 models."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import actsteer
from actsteer.core import QuantileMap, collect

SOURCE = [f"the cat sat on mat number {i} today" for i in range(12)]
TARGET = [f"STORMY SEAS AND WAVES {i}!!" * (1 + i % 3) for i in range(12)]
PROMPTS = ["hello there", "a much longer prompt for padding"]
FAST_LINEAS = {"steps": 8, "eval_every": 4}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_fit_lm_quantile_steers_with_the_piecewise_map(tiny_lm_factory, arch):
    model, tok = tiny_lm_factory(arch)
    before = _state(model)
    t = actsteer.fit_lm(model, tok, SOURCE, TARGET, method="quantile", support="all", progress=False,
                        options={"knots": 6})
    assert t.method == "quantile" and all(isinstance(m, QuantileMap) and m.num_knots == 6 for m in t.values())
    site = t.sites[0]
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), collect(model, [site], pooling="mean") as plain:
        model(**enc)
    raw: dict[str, torch.Tensor] = {}
    handle = model.get_submodule(site.split(":")[0]).register_forward_hook(
        lambda m, a, out: raw.setdefault("x", (out[0] if isinstance(out, tuple) else out).detach().clone()))
    try:
        with torch.no_grad():
            model(**enc)
            with actsteer.steer(model, t, 1.0), collect(model, [site], pooling="mean") as steered:
                model(**enc)
    finally:
        handle.remove()
    # the first site is where the closed form holds exactly: the map applied to each token of its own input
    expected = t[site](raw["x"]).mean(1)  # `collect` without a mask pools every position
    assert_close(steered.pooled()[site], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steered.pooled()[site], plain.pooled()[site])
    assert _hooks(model) == 0
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_quantile_generate_strength_zero_is_bit_identical_and_per_row(tiny_llama):
    model, tok = tiny_llama
    t = actsteer.fit_lm(model, tok, SOURCE, TARGET, method="quantile", support="all", progress=False)
    actsteer.enable_steering(model)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=6, do_sample=False)
    plain = model.generate(**enc, **kw)
    assert torch.equal(model.generate(**enc, steering=actsteer.Steering(t, 0.0), **kw), plain)
    strong = model.generate(**enc, steering=actsteer.Steering(t, 4.0), **kw)
    assert not torch.equal(strong, plain)
    # one strength per row: row 0 unsteered, row 1 steered exactly as alone
    mixed = model.generate(**enc, steering=actsteer.Steering(t, torch.tensor([0.0, 4.0])), **kw)
    assert torch.equal(mixed[0], plain[0]) and torch.equal(mixed[1], strong[1])
    actsteer.disable_steering(model)


def test_quantile_keeps_half_precision(tiny_llama):
    model, tok = tiny_llama
    t = actsteer.fit_lm(model, tok, SOURCE, TARGET, method="quantile", progress=False)
    model = model.to(torch.bfloat16)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), actsteer.steer(model, t, 1.0):
        logits = model(**enc).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fit_lm_lineas_gives_affine_maps_that_generate_uses(tiny_lm_factory, arch):
    model, tok = tiny_lm_factory(arch)
    before = _state(model)
    t = actsteer.fit_lm(model, tok, SOURCE, TARGET, method="lineas", progress=False, options=FAST_LINEAS)
    assert t.method == "lineas" and t.mode == "end-to-end" and t.support == "observed"
    assert all(type(m) is actsteer.UnitMap for m in t.values())
    fit = t.extra["fit"]
    assert fit["steps_run"] == 8 and fit["backward_calls"] == 8 and fit["forward_calls"] >= 10
    assert t.model["class"] == type(model).__name__
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    actsteer.enable_steering(model)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    out = model.generate(**enc, steering=actsteer.Steering(t, 1.0), max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2
    actsteer.disable_steering(model)


def test_fit_lm_lineas_refuses_unknown_options_before_running(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="Unknown LinEAS option.*steps"):
        actsteer.fit_lm(model, tok, SOURCE, TARGET, method="lineas", progress=False, options={"stepz": 3})


def test_lineas_batches_give_the_same_gradients(tiny_llama):
    """With ``batch_size`` a step runs a no-grad pass, then the vector-Jacobian product batch by batch: the same
    training as one batch (support "all": the ranges are then not involved)."""
    model, tok = tiny_llama
    # the MLP projections (the sites this was written on; with issue 22's default sites, the norms before attention,
    # float32 summation order moves beta by up to 9e-5 after the Adam steps: noise, not a different training)
    common = dict(method="lineas", support="all", progress=False, modules="mlp",
                  options={**FAST_LINEAS, "held_out": 0.0})
    one = actsteer.fit_lm(model, tok, SOURCE, TARGET, **common)
    batched = actsteer.fit_lm(model, tok, SOURCE, TARGET, batch_size=5, **common)
    for site in one:
        assert_close(batched[site].omega, one[site].omega, rtol=1e-4, atol=1e-5)
        assert_close(batched[site].beta, one[site].beta, rtol=1e-4, atol=1e-5)
    assert batched.extra["fit"]["backward_calls"] == 8 * 3  # 12 texts in batches of 5


def test_estimate_refuses_lineas_with_the_way_to_fit_it():
    with pytest.raises(ValueError, match="fit_lm/fit_pipeline"):
        actsteer.estimate(torch.randn(4, 2), torch.randn(4, 2), method="lineas")


@pytest.fixture
def saved_llama(tiny_lm_factory, tmp_path):
    model, tok = tiny_lm_factory("llama")
    model.save_pretrained(tmp_path / "tiny-llama")
    tok.save_pretrained(tmp_path / "tiny-llama")
    src, tgt = tmp_path / "source.txt", tmp_path / "target.txt"
    src.write_text("\n".join(SOURCE))
    tgt.write_text("\n".join(TARGET))
    return tmp_path / "tiny-llama", src, tgt


@pytest.mark.parametrize(("method", "options", "shown"), [
    ("quantile", ["knots=5"], "quantile maps: 5 sites with 5 knots"),
    ("lineas", ["steps=4", "eval_every=2", "l1=0", "group=0"], "method: lineas"),
])
def test_cli_fit_with_the_new_methods(saved_llama, tmp_path, capsys, method, options, shown):
    from actsteer.hf_integration.cli import main

    model, src, tgt = saved_llama
    out = tmp_path / f"{method}.safetensors"
    args = ["fit", "--model", str(model), "--source", str(src), "--target", str(tgt), "-o", str(out),
            "--method", method, "--modules", "all-norms"] + [a for o in options for a in ("--option", o)]
    assert main(args) == 0
    assert main(["inspect", str(out)]) == 0
    assert shown in capsys.readouterr().out
    assert main(["generate", "--model", str(model), "--steer", str(out), "--prompt", "hi", "--max-new-tokens", "3"]) == 0


def test_cli_refuses_bad_method_options_before_loading(saved_llama, tmp_path, capsys):
    from actsteer.hf_integration.cli import main

    _, src, tgt = saved_llama
    base = ["fit", "--model", "no/such/model", "--source", str(src), "--target", str(tgt), "-o", str(tmp_path / "x")]
    assert main(base + ["--method", "lineas", "--option", "stepz=3"]) == 2
    assert "Unknown LinEAS option" in capsys.readouterr().err
    assert main(base + ["--method", "quantile", "--option", "knots=1"]) == 2
    assert "knots=N" in capsys.readouterr().err
