"""Levers that cost nothing at fit time, on the frontier (issue 22, item 2): which tokens are steered (``apply_to``),
which sites (site sets chosen from `frontier_sites.py`), a strength per site, support bands, pooling, the estimator.

Every lever is an actsteer arm (`frontier_arms.py`) swept over strength and scored like the frontier. Choices are
made here on the ``select`` concepts (food, music) and the 24 dev prompts only; `frontier.py` then checks the
chosen defaults on all benchmark concepts, the fresh concept and the 48 held-out prompts.

    python -m benchmarks.frontier_levers --cache /tmp/actsteer/frontier --out /tmp/actsteer/levers.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import frontier_data as fd
from benchmarks.frontier import BUDGETS, frontier_table, load_model, markdown, run_concept
from benchmarks.frontier_arms import actsteer_arm
from benchmarks.frontier_cells import NEW_TOKENS, Cache

L = r"model\.layers\.\d+"
NORMS = [rf"{L}\.input_layernorm", rf"{L}\.post_attention_layernorm"]


def layers(first: int, last: int, kind: str = "input_layernorm") -> list[str]:
    """Site names of ``kind`` on layers first..last (inclusive)."""
    return [rf"model\.layers\.{i}\.{kind}" for i in range(first, last + 1)]


LEVERS = {
    "auto": actsteer_arm("paper sites (mlp; auto before issue 22)", modules="paper"),
    "all-norms": actsteer_arm("all-norms", modules="all-norms"),
    "all-norms/generated": actsteer_arm("all-norms, generated tokens", modules="all-norms", apply_to="generated"),
    "all-norms/prompt": actsteer_arm("all-norms, prompt tokens", modules="all-norms", apply_to="prompt"),
    "auto/generated": actsteer_arm("paper sites, generated tokens", modules="paper", apply_to="generated"),
    "norms-no-final": actsteer_arm("decoder norms (no final norm)", modules=NORMS),
    "post-norms": actsteer_arm("post-norms", modules="post-norms"),
    "input-norms": actsteer_arm("input norms", modules=[NORMS[0]]),
    "input-norms/L10+": actsteer_arm("input norms, layers 10-29", modules=layers(10, 29)),
    "input-norms/L5-24": actsteer_arm("input norms, layers 5-24", modules=layers(5, 24)),
    "input-norms/L10-24": actsteer_arm("input norms, layers 10-24", modules=layers(10, 24)),
    "input-norms/prompt": actsteer_arm("input norms, prompt tokens", modules=[NORMS[0]], apply_to="prompt"),
    "input-norms/L5-24/prompt": actsteer_arm("input norms, layers 5-24, prompt tokens", modules=layers(5, 24),
                                             apply_to="prompt"),
    "input-norms/generated": actsteer_arm("input norms, generated tokens", modules=[NORMS[0]], apply_to="generated"),
    "all-norms/mean-act": actsteer_arm("all-norms, mean-act", modules="all-norms", method="mean-act"),
    "all-norms/band10": actsteer_arm("all-norms, support 10-90%", modules="all-norms", support=(0.1, 0.9)),
    "all-norms/last": actsteer_arm("all-norms, last-token pooling", modules="all-norms", pooling="last"),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default="food,music")
    parser.add_argument("--levers", default=",".join(LEVERS))
    parser.add_argument("--prompts", default="dev")
    parser.add_argument("--grid", default="0.5,1,1.5", help="strengths before the budget bisection")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--cache", default="/tmp/actsteer/frontier")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    model, tok = load_model()
    prompts = fd.prompts(args.prompts)
    cache = Cache(args.cache)
    prefix = f"{args.prompts}{len(prompts)}-t{args.new_tokens}"
    arms = [LEVERS[name] for name in args.levers.split(",")]
    grid = tuple(float(s) for s in args.grid.split(","))
    rows = []
    for name in args.concepts.split(","):
        if fd.CONCEPTS[name].role != "select":
            print(f"note: {name} is a {fd.CONCEPTS[name].role} concept, not one to choose defaults on")
        rows += run_concept(name, arms, model, tok, prompts, cache, prefix, args.new_tokens, grid=grid)
    cols = ["concept", "arm", "setting", "presence", "score", "ratio", "ratio_prompt", "distinct_2", "ok"]
    print(markdown(rows, cols))
    table = frontier_table(rows)
    print(markdown(table, ["concept", "arm"] + [f"@{b:g}x" for b in BUDGETS]))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "frontier": table}, indent=1))
    return {"rows": rows, "frontier": table}


if __name__ == "__main__":
    main()
