"""The frontier benchmark's bookkeeping (benchmarks/frontier*.py, issue 22): budgets, sweeps, cache keys, data.

The model-facing part (generation, the judge, the peers) runs in the slow tier (`test_frontier_slow.py`) and in
the benchmark itself; here the pure functions that turn cells into the frontier table and the goal verdict.
"""

from __future__ import annotations

import math

import pytest

from benchmarks import frontier_data as fd
from benchmarks.frontier import concept_tables, frontier, frontier_table, goal_cells
from benchmarks.frontier_arms import Arm, actsteer_arm, site_strengths, sweep_arm
from benchmarks.frontier_cells import Cache
from benchmarks.frontier_sites import subsets


def _row(concept, arm, setting, presence, ppl_alone, ok=True, base=10.0):
    return {"concept": concept, "arm": arm, "setting": setting, "presence": presence, "ppl_alone": ppl_alone,
            "ppl": ppl_alone, "ratio": ppl_alone / base, "ratio_prompt": ppl_alone / base, "ok": ok,
            "distinct_2": 0.8 if ok else 0.4}


def test_frontier_is_the_best_presence_inside_the_budget_among_fluent_settings():
    points = [_row("c", "a", 0.0, 0.0, 10), _row("c", "a", 1, 0.6, 14), _row("c", "a", 2, 0.9, 19),
              _row("c", "a", 3, 1.0, 15, ok=False), _row("c", "a", 4, 1.0, 40)]
    assert frontier(points, 1.5) == 0.6  # the looping (not ok) setting at 1.5x does not count
    assert frontier(points, 2.0) == 0.9
    assert frontier(points, 4.0) == 1.0
    assert math.isnan(frontier(points[1:], 1.2))  # nothing inside


def test_frontier_table_and_goal_per_concept():
    rows = [_row("food", "unsteered", 0.0, 0.0, 10)]
    rows += [_row("food", "ours", s, p, r) for s, p, r in ((0.5, 0.5, 12), (1.0, 0.95, 16), (1.25, 1.0, 30))]
    rows += [_row("food", "steering-vectors L12-16", s, p, r) for s, p, r in ((0.5, 0.7, 12), (1.0, 1.0, 19))]
    rows += [_row("sport", "unsteered", 0.0, 0.0, 10), _row("sport", "ours", 1.0, 0.8, 15)]
    table = {(r["concept"], r["arm"]): r for r in frontier_table(rows)}
    assert table[("food", "ours")]["@1.25x"] == 0.5 and table[("food", "ours")]["@2x"] == 0.95
    assert table[("food", "steering-vectors L12-16")]["@2x"] == 1.0
    goal = {g["concept"]: g for g in goal_cells(rows, "ours")}
    assert goal["food"]["strength-1 goal"] and goal["food"]["ratio@1"] == pytest.approx(1.6)
    assert goal["food"]["distinct@1"] == pytest.approx(1.0)
    # the peer is ahead inside 1.25x (0.7 vs 0.5) and at 1.9x (1.0 vs 0.95): the smallest margin is -0.2 at 1.2x
    assert goal["food"]["min margin vs peers"] == pytest.approx(-0.2) and goal["food"]["at budget"] == 1.2
    assert not goal["sport"]["strength-1 goal"] and math.isnan(goal["sport"]["min margin vs peers"])


def test_sweep_bounded_runs_the_grid_then_bisects_the_budget_crossings():
    ppl = {0.5: 11.0, 0.75: 14.0, 1.0: 18.0, 1.25: 30.0}
    seen = []

    def run(s):
        seen.append(s)
        return {"summary": {"ppl_alone": ppl.get(s, 10 + 16 * s)}}

    arm = actsteer_arm("ours")
    cells = sweep_arm(arm, run, 10.0)
    assert seen[:4] == [0.5, 0.75, 1.0, 1.25]
    assert 1.125 in cells  # 2x is crossed between 1 and 1.25
    assert 0.875 in cells  # 1.5x is crossed between 0.75 and 1
    assert len(seen) == len(set(seen))  # no setting runs twice


def test_sweep_unbounded_doubles_from_the_default_and_halves_until_quiet():
    def run(s):
        return {"summary": {"ppl_alone": 10.0 * (1 + s / 4)}}  # 2x at s = 4

    cells = sweep_arm(Arm("peer", "sv", start=1.0), run, 10.0)
    assert {0.25, 0.5, 1.0, 2.0, 4.0, 8.0} <= set(cells)  # 0.5 is still above 1.1x: one more halving
    assert max(cells) == 8.0  # stops doubling once over 2x
    assert {5.657, 2.828} <= set(cells)  # geometric bisection of the 2x and 1.5x crossings


def test_site_strengths_first_matching_factor_else_one():
    sites = ["model.layers.0.input_layernorm", "model.layers.1.input_layernorm", "model.norm"]
    got = site_strengths(sites, 0.8, ((r"model\.layers\.0\..*", 0.5), (r"model\..*", 2.0)))
    assert got == {sites[0]: 0.4, sites[1]: 1.6, sites[2]: 1.6}
    assert site_strengths(sites, 1.0, ()) == dict.fromkeys(sites, 1.0)


def test_arm_keys_follow_what_fit_lm_resolves(tiny_llama):
    """The defaults and the preset they resolve to share cells; the paper's sites (mlp) get their own."""
    model, _ = tiny_llama
    defaults = actsteer_arm("defaults")
    assert defaults.key(model) == actsteer_arm("named", modules="mid-attn-norms").key(model)
    assert defaults.key(model) != actsteer_arm("paper", modules="mlp").key(model)
    assert defaults.key(model) != actsteer_arm("gen", apply_to="generated").key(model)
    assert defaults.label.endswith("[unmatched]") and actsteer_arm("p", "pairs").label.endswith("[minimal pairs]")


def test_cache_roundtrip(tmp_path):
    cache = Cache(tmp_path)
    assert cache.get("a/b c") is None
    cache.put("a/b c", {"x": 1})
    assert cache.get("a/b c") == {"x": 1} and (tmp_path / "a" / "b_c.json").is_file()


def test_site_subsets_cover_kinds_depth_bands_and_layers():
    sites = [f"model.layers.{i}.{k}" for i in range(12) for k in ("input_layernorm", "post_attention_layernorm")]
    sites.append("model.norm")
    groups = subsets(sites)
    assert groups["all"] == sites
    assert len(groups["kind input_layernorm"]) == 12 and groups["kind final norm"] == ["model.norm"]
    assert len(groups["first 2 layers"]) == 4 and "model.norm" in groups["last 10 layers (+final)"]
    assert groups["layer 3"] == ["model.layers.3.input_layernorm", "model.layers.3.post_attention_layernorm"]


def test_data_prompts_held_out_and_concepts_complete():
    frontier_prompts, dev = fd.prompts("frontier"), fd.prompts("dev")
    assert len(frontier_prompts) >= 48 and len(dev) >= 24
    assert not set(frontier_prompts) & set(dev)
    assert set(fd.BENCHMARK_CONCEPTS) <= set(fd.CONCEPTS) and len(fd.BENCHMARK_CONCEPTS) >= 4
    assert [c for c in fd.CONCEPTS.values() if c.role == "fresh"]  # a concept never used to choose a default
    neutral = set(fd.read_lines(fd.NEUTRAL))
    for concept in fd.CONCEPTS.values():
        target = fd.read_lines(concept.target)
        assert len(target) >= 48, concept.name
        assert not (set(frontier_prompts) | set(dev)) & (set(target) | neutral)
    assert fd.prompting("food", ["Once"]) == ["The following text is about food and cooking.\nOnce"]


def test_concept_tables_show_multiples_of_unsteered_and_mark_repetitive_settings():
    rows = [_row("food", "unsteered", 0.0, 0.0, 10), _row("food", "ours", 1.0, 0.9, 15),
            _row("food", "peer", 2.0, 1.0, 12, ok=False)]
    text = concept_tables(rows)
    assert "| ours | 1 | 0.90 | 1.50 | 1.50 | 1.00 |" in text
    assert "| peer | 2 | 1.00 | 1.20 | 1.20 | 0.50 (repetitive) |" in text
    assert "unsteered" not in text.split("|", 1)[1]  # the unsteered row heads the table, it is not a row of it
