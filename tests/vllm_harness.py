"""Helpers for the vLLM tier: fit the test transports and HF references, and run vLLM scenarios in a subprocess.

vLLM starts its engine core and worker with ``spawn``, so the engine is built in a fresh interpreter, under
``if __name__ == "__main__":``: ``python tests/vllm_harness.py MODEL_DIR OUT.json`` runs every engine scenario on
ONE ``vllm.LLM`` and writes what it saw. It never imports actsteer: the plugin must come in through vLLM's entry
point alone (``ACTSTEER_TRANSPORTS`` points at the folder).
"""

from __future__ import annotations

import json
import os
import sys
from importlib.resources import files
from pathlib import Path

PROMPTS = ["Once upon a time,", "The best thing about weekends is", "My favourite place to relax is"]
NEW_TOKENS = 32
# request name -> the keys it sends (plain: none). "food" steers MLP projections: fused gate_up slices in vLLM.
REQUESTS = {
    "plain": {},
    "ocean": {"actsteer_transport": "ocean", "actsteer_strength": 0.8},
    "food": {"actsteer_transport": "food"},
    "both": {"actsteer_transport": ["ocean", "food"], "actsteer_strength": [1.0, 0.5]},
}
LONG_PROMPT_REPEAT = 12  # a ~290-token prompt: several KV blocks, prefilled in chunks of 64 tokens
BAD_REQUESTS = {
    "missing": {"actsteer_transport": "no_such_transport"},
    "strength": {"actsteer_transport": "ocean", "actsteer_strength": "strong"},
    "typo": {"actsteer_transport": "ocean", "actsteer_strenght": 0.5},
}


def texts() -> tuple[list[str], list[str], list[str]]:
    """Neutral, ocean and food example texts (the package's data and the benchmarks' food list)."""
    data = files("actsteer.hf_integration") / "data"
    neutral = data.joinpath("neutral.txt").read_text().splitlines()
    ocean = data.joinpath("ocean.txt").read_text().splitlines()
    food = (Path(__file__).parent.parent / "benchmarks" / "data" / "food.txt").read_text().splitlines()
    return neutral, ocean, food


def long_prompt() -> str:
    return " ".join(["The harbour town woke slowly, and the market stalls opened one by one."] * LONG_PROMPT_REPEAT)


def requested(names_and_strengths: dict) -> tuple[list[str], list[float]]:
    names = names_and_strengths.get("actsteer_transport", [])
    names = [names] if isinstance(names, str) else list(names)
    s = names_and_strengths.get("actsteer_strength", 1.0)
    return names, (list(s) if isinstance(s, list) else [s] * len(names))


def run_engine(model_dir: str, out_path: str) -> None:
    """Every engine scenario on one vLLM engine (chunked prefill and prefix caching on); results as JSON."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model_dir, dtype="float32", max_model_len=512, seed=0, gpu_memory_utilization=0.1,
        max_num_batched_tokens=64, max_num_seqs=16, enable_prefix_caching=True, enable_chunked_prefill=True,
    )
    config = llm.llm_engine.vllm_config
    out: dict = {
        "enforce_eager": config.model_config.enforce_eager,
        "compilation_mode": int(config.compilation_config.mode),
    }

    def params(extra: dict, n: int = NEW_TOKENS) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.0, logprobs=0, extra_args=dict(extra) or None)

    def record(outputs) -> list[dict]:
        rows = []
        for o in outputs:
            c = o.outputs[0]
            rows.append({
                "prompt_ids": list(o.prompt_token_ids), "ids": list(c.token_ids), "text": c.text,
                "logprobs": [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)],
            })
        return rows

    # one continuous batch: every prompt with every steering, in an interleaved order
    keys = [(k, p) for p in PROMPTS for k in REQUESTS]
    mixed = record(llm.generate([p for _, p in keys], [params(REQUESTS[k]) for k, _ in keys]))
    out["mixed"] = [{"request": k, "prompt": p, **r} for (k, p), r in zip(keys, mixed)]
    out["plain_alone"] = record(llm.generate(PROMPTS, [params({}) for _ in PROMPTS]))
    # prefix caching: the unsteered long prompt fills the cache first; the steered one must not reuse its blocks
    lp = long_prompt()
    first = record(llm.generate([lp], [params({}, 16)]))[0]
    steered = record(llm.generate([lp], [params(REQUESTS["ocean"], 16)]))[0]
    again = record(llm.generate([lp], [params({}, 16)]))[0]
    out["prefix"] = {"plain": first, "ocean": steered, "plain_again": again}
    errors = {}
    for name, extra in BAD_REQUESTS.items():
        try:
            llm.generate(["Hello"], [params(extra, 2)])
            errors[name] = None
        except Exception as err:  # noqa: BLE001 - the message is what the test checks
            errors[name] = f"{type(err).__name__}: {err}"
    out["errors"] = errors
    out["after_errors"] = record(llm.generate([PROMPTS[0]], [params(REQUESTS["ocean"])]))[0]
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_engine(sys.argv[1], sys.argv[2])
