"""One cell of the frontier benchmark: generate continuations of the prompts one way, score them, cache the result.

Every method (actsteer, the peers, prompting) generates through the same `generate` (left padding, the prompts in
one batch, greedy, repetition penalty 1.2, 32 new tokens) and is scored by the same `score`, always with every
steering removed: concept presence (`actsteer.eval.concept_presence`, the MiniLM margin), perplexity of the
continuation under the UNSTEERED model alone and given its prompt (`actsteer.eval.perplexity`, medians), distinct-2.
Cells are cached as JSON (one file per cell) so a long run can be stopped and resumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

GENERATION = {"do_sample": False, "repetition_penalty": 1.2}
NEW_TOKENS = 32


@contextlib.contextmanager
def padded(tokenizer: Any, side: str = "left") -> Iterator[Any]:
    """A pad token (EOS when the tokenizer has none) and a padding side, restored on exit."""
    pad, old_side = tokenizer.pad_token, tokenizer.padding_side
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = side
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = old_side
        if pad is None:
            tokenizer.pad_token = None


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: Sequence[str], *, new_tokens: int = NEW_TOKENS, generate=None,
                 **kwargs: Any) -> torch.Tensor:
    """Plain Hugging Face ``generate`` on the prompts in one left-padded batch; the generated token ids."""
    with padded(tokenizer):
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True).to(model.device)
        out = (generate or model.generate)(**enc, max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id,
                                           **GENERATION, **kwargs)
    return out[:, enc["input_ids"].shape[1]:]


def decode(tokenizer, ids: torch.Tensor) -> list[str]:
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def _median(values: torch.Tensor) -> float:
    finite = [v for v in values.tolist() if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def score(model, tokenizer, prompts: Sequence[str], texts: Sequence[str], descriptions: Sequence[str]) -> dict:
    """Per-continuation rows and the summary: presence, score, ppl (given the prompt), ppl_alone, distinct_2."""
    from actsteer.eval import concept_presence, distinct_n, perplexity

    texts = list(texts)
    ppl = perplexity(model, tokenizer, texts, prompts=list(prompts))
    alone = perplexity(model, tokenizer, texts)
    pres = concept_presence(texts, list(descriptions))
    rows = [{"prompt": p, "text": t, "score": float(s), "present": bool(on), "ppl": float(a), "ppl_alone": float(b)}
            for p, t, s, on, a, b in zip(prompts, texts, pres.score, pres.present, ppl, alone)]
    summary = {
        "presence": pres.rate, "score": pres.mean_score, "ppl": _median(ppl), "ppl_alone": _median(alone),
        "distinct_2": distinct_n(texts, 2), "n": len(texts),
    }
    return {"rows": rows, "summary": summary}


def fingerprint(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


class Cache:
    """JSON files under ``root``: one per cell (``key`` is a relative path) and per fitted object."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str, suffix: str = ".json") -> Path:
        return self.root / (key.replace(" ", "_") + suffix)

    def get(self, key: str) -> dict | None:
        path = self.path(key)
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, key: str, value: dict) -> dict:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value, indent=1))
        tmp.replace(path)  # atomic: an interrupted run never leaves half a cell
        return value


def run_cell(cache: Cache, key: str, model, tokenizer, prompts: Sequence[str], descriptions: Sequence[str],
             produce: Callable[[], list[str]], *, score_prompts: Sequence[str] | None = None,
             meta: dict | None = None) -> dict:
    """The cached cell ``key``, or: texts = ``produce()`` (steered generation), scored with steering removed.

    ``score_prompts``: the prompts the continuations are scored against (default ``prompts``; the prompting
    baseline is scored against the plain prompts, not the instructed ones).
    """
    hit = cache.get(key)
    if hit is not None:
        return hit
    t0 = time.perf_counter()
    texts = produce()
    t_gen = time.perf_counter() - t0
    result = score(model, tokenizer, score_prompts or prompts, texts, descriptions)
    result["meta"] = {**(meta or {}), "seconds_generate": t_gen, "seconds_total": time.perf_counter() - t0}
    return cache.put(key, result)
