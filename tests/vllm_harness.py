"""Helpers for the vLLM tier: fit the test transports and HF references, and run vLLM scenarios in a subprocess.

vLLM starts its engine core and workers with ``spawn``, so engines are built in a fresh interpreter, under
``if __name__ == "__main__":``: ``python tests/vllm_harness.py SCENARIO MODEL_DIR FOLDER OUT.json`` runs the
scenario (``engine``: every engine scenario on ONE compiled ``vllm.LLM``; ``tp``: a tensor-parallel engine) and
writes what it saw. It never imports actsteer: the plugin must come in through vLLM's entry point alone. The
engine and the test server share `engine_config` (the server changes only the kind of steering op, ``graph``); the
harness prints `SCENARIOS_START` once the engine is up, so that the test can tell compile lines of the start-up from
a recompilation.
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
    "reverse": {"actsteer_transport": "ocean", "actsteer_strength": -0.5},
}
LONG_PROMPT_REPEAT = 12  # a ~290-token prompt: several KV blocks, prefilled in chunks of 64 tokens
BAD_REQUESTS = {
    "missing": {"actsteer_transport": "no_such_transport"},
    "strength": {"actsteer_transport": "ocean", "actsteer_strength": "strong"},
    "boolean": {"actsteer_transport": "ocean", "actsteer_strength": True},
    "typo": {"actsteer_transport": "ocean", "actsteer_strenght": 0.5},
    "prefix": {"actstear_transport": "ocean"},
    "composed": {"actsteer_transport": ["ocean", "food", "ocean"]},
    "other_model": {"actsteer_transport": "other_model"},
}
MAX_TRANSPORTS = 3  # resident slots: the harness uses 4 transports, so slots are reused
TP_SIZE = 3  # SmolLM2-135M has 9 attention heads and 3 KV heads: 2 ranks cannot split them, 3 can
SCENARIOS_START = "=== vllm_harness: scenarios start ==="
COMPILE_MARKERS = ("Dynamo bytecode transform", "Compiling a graph", "saved AOT compiled", "torch.compile takes")


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


def engine_config(folder: str) -> dict:
    """The settings the engine and the test server share (the server sets ``graph: "fused"`` on top)."""
    return {
        "dtype": "float32", "max_model_len": 512, "seed": 0, "max_num_batched_tokens": 64, "max_num_seqs": 16,
        "enable_prefix_caching": True, "enable_chunked_prefill": True,
        "additional_config": {"actsteer": {"transports": folder, "max_transports": MAX_TRANSPORTS}},
    }


def _record(outputs) -> list[dict]:
    rows = []
    for o in outputs:
        c = o.outputs[0]
        rows.append({
            "prompt_ids": list(o.prompt_token_ids), "ids": list(c.token_ids), "text": c.text,
            "logprobs": [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)],
        })
    return rows


def _params(extra: dict, n: int = NEW_TOKENS, **kw):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, logprobs=0, extra_args=dict(extra) or None, **kw)


def run_engine(model_dir: str, folder: str, out_path: str) -> None:
    """Every engine scenario on one compiled vLLM engine (chunked prefill and prefix caching on)."""
    from vllm import LLM

    llm = LLM(model_dir, gpu_memory_utilization=0.1, **engine_config(folder))
    print(SCENARIOS_START, file=sys.stderr, flush=True)
    config = llm.llm_engine.vllm_config
    out: dict = {
        "enforce_eager": config.model_config.enforce_eager,
        "compilation_mode": int(config.compilation_config.mode),
        "plan": config.additional_config["actsteer"]["plan"]["sites"],
        "folder": folder,
    }
    # one continuous batch: every prompt with every steering, in an interleaved order
    keys = [(k, p) for p in PROMPTS for k in REQUESTS]
    mixed = _record(llm.generate([p for _, p in keys], [_params(REQUESTS[k]) for k, _ in keys], use_tqdm=False))
    out["mixed"] = [{"request": k, "prompt": p, **r} for (k, p), r in zip(keys, mixed)]
    out["plain_alone"] = _record(llm.generate(PROMPTS, [_params({}) for _ in PROMPTS], use_tqdm=False))
    # prefix caching: the unsteered long prompt fills the cache first; the steered one must not reuse its blocks
    lp = long_prompt()
    first = _record(llm.generate([lp], [_params({}, 16)], use_tqdm=False))[0]
    steered = _record(llm.generate([lp], [_params(REQUESTS["ocean"], 16)], use_tqdm=False))[0]
    again = _record(llm.generate([lp], [_params({}, 16)], use_tqdm=False))[0]
    out["prefix"] = {"plain": first, "ocean": steered, "plain_again": again}
    # batch neighbours, with an observed-support transport: the same batch shape, neighbours plain or steered
    target = {"actsteer_transport": "ocean_observed"}
    shapes = {
        "plain_neighbours": [target, {}, {}],
        "steered_neighbours": [target, REQUESTS["food"], {"actsteer_transport": "ocean", "actsteer_strength": -0.8}],
        "alone": [target],
    }
    out["neighbours"] = {
        name: _record(llm.generate(PROMPTS[:len(extras)], [_params(e, 24, ignore_eos=True) for e in extras],
                                   use_tqdm=False))
        for name, extras in shapes.items()
    }
    # slots: a fourth transport evicts one of the MAX_TRANSPORTS resident ones; coming back reloads it
    out["evicting"] = _record(llm.generate([PROMPTS[0]], [_params({"actsteer_transport": "ocean_copy",
                                                                    "actsteer_strength": 0.8})], use_tqdm=False))[0]
    out["reloaded"] = _record(llm.generate([PROMPTS[0]], [_params(REQUESTS["ocean"])], use_tqdm=False))[0]
    errors = {}
    for name, extra in BAD_REQUESTS.items():
        try:
            llm.generate(["Hello"], [_params(extra, 2)], use_tqdm=False)
            errors[name] = None
        except Exception as err:  # noqa: BLE001 - the message is what the test checks
            errors[name] = f"{type(err).__name__}: {err}"
    out["errors"] = errors
    try:  # one bad request among good ones: vLLM validates the whole call before running any of it
        llm.generate(PROMPTS[:2], [_params(REQUESTS["ocean"]), _params(BAD_REQUESTS["missing"])], use_tqdm=False)
        out["mixed_bad"] = None
    except Exception as err:  # noqa: BLE001
        out["mixed_bad"] = f"{type(err).__name__}: {err}"
    out["after_errors"] = _record(llm.generate([PROMPTS[0]], [_params(REQUESTS["ocean"])], use_tqdm=False))[0]
    Path(out_path).write_text(json.dumps(out))


def run_tp(model_dir: str, folder: str, out_path: str) -> None:
    """A tensor-parallel engine (`TP_SIZE` ranks, each with its shard of the fused q/k/v and gate/up outputs)."""
    from vllm import LLM

    # vLLM's CPU build binds each rank to a NUMA node of its own by default; this machine has one
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    llm = LLM(model_dir, dtype="float32", max_model_len=512, seed=0, tensor_parallel_size=TP_SIZE,
              gpu_memory_utilization=0.1, distributed_executor_backend="mp", enforce_eager=True, max_num_seqs=16,
              additional_config={"actsteer": {"transports": folder, "max_transports": MAX_TRANSPORTS}})
    keys = [(k, p) for p in PROMPTS for k in ("plain", "ocean", "food", "both")]
    rows = _record(llm.generate([p for _, p in keys], [_params(REQUESTS[k]) for k, _ in keys], use_tqdm=False))
    out = {"tp": llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size,
           "mixed": [{"request": k, "prompt": p, **r} for (k, p), r in zip(keys, rows)]}
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    scenario, model, transports, out_file = sys.argv[1:5]
    {"engine": run_engine, "tp": run_tp}[scenario](model, transports, out_file)
