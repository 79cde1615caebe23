"""Slow: the quantile map and LinEAS on the real SmolLM2-135M-Instruct (held-out fidelity and the concept)."""

from __future__ import annotations

import pytest
import torch

import actsteer
from actsteer.core import QuantileMap, collect
from actsteer.eval.fidelity import normalised_w1
from actsteer.hf_integration.cli import DEMO_PROMPTS, concept_score, generate_rows, read_texts
from actsteer.hf_integration.lm import make_runner

pytestmark = pytest.mark.slow

DATA = __import__("pathlib").Path(actsteer.__file__).parent / "hf_integration" / "data"


@pytest.fixture(scope="module")
def smollm2():
    from actsteer.hf_integration.default_model import load_default_model

    torch.manual_seed(0)
    return load_default_model()


@pytest.fixture(scope="module")
def texts():
    neutral, ocean = read_texts(DATA / "neutral.txt"), read_texts(DATA / "ocean.txt")
    return neutral[:32], ocean[:32], neutral[32:], ocean[32:]  # fit on 32 a side, hold out the rest


def _pooled(model, tok, sites, texts, transport=None):
    run = make_runner(model, tok, 128)
    scope = actsteer.steer(model, transport, strength=1.0) if transport is not None else torch.no_grad()
    with torch.no_grad(), scope, collect(model, sites) as rec:
        rec.ctx.mask = None
        run(texts, rec.ctx)
    return rec.pooled()


def _held_out_gain(model, tok, transport, texts) -> float:
    """Mean over sites of normalised W1(held-out source, held-out target): after / before steering."""
    _, _, held_src, held_tgt = texts
    sites = transport.sites
    target, before = _pooled(model, tok, sites, held_tgt), _pooled(model, tok, sites, held_src)
    after = _pooled(model, tok, sites, held_src, transport)
    w_before = sum(normalised_w1(before[s], target[s]) for s in sites) / len(sites)
    w_after = sum(normalised_w1(after[s], target[s]) for s in sites) / len(sites)
    return w_after / w_before


@pytest.mark.parametrize(("method", "options"), [("quantile", None), ("lineas", {"steps": 30})])
def test_smollm2_new_estimators_move_held_out_text_and_induce_the_concept(smollm2, texts, method, options):
    model, tok = smollm2
    src, tgt, _, _ = texts
    transport = actsteer.fit_lm(model, tok, src, tgt, modules="all-norms", method=method, progress=False,
                                options=options)
    if method == "quantile":
        assert all(isinstance(m, QuantileMap) for m in transport.values())
    else:
        fit = transport.extra["fit"]
        assert fit["steps_run"] <= 30 and fit["backward_calls"] == fit["steps_run"]
    assert _held_out_gain(model, tok, transport, texts) < 0.85
    rows = generate_rows(model, tok, transport, DEMO_PROMPTS, [0.0, 1.0], max_new_tokens=24)
    before = sum(concept_score(p + " " + t) for p, t in zip(DEMO_PROMPTS, rows[0]))
    after = sum(concept_score(p + " " + t) for p, t in zip(DEMO_PROMPTS, rows[1]))
    assert after > before, (rows[0], rows[1])
