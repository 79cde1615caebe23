"""Strength sweeps of a steered causal LM: generations and metrics per strength (`sweep`, `SweepResult`).

The paper's concept-induction protocol in miniature (ACT_SPEC.md section 7): generate continuations of held-out
prompts at several strengths, then score concept presence, perplexity under the unsteered model, and distinct-n.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core import Steering, Transport
from .text import DEFAULT_CONTRAST, DEFAULT_THRESHOLD, Encoder, concept_presence, distinct_n, perplexity

logger = logging.getLogger(__name__)

DEFAULT_STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Greedy decoding with the repetition penalty of the paper's protocol (ACT_SPEC.md section 7): deterministic.
DEFAULT_GENERATION: dict[str, Any] = {"do_sample": False, "repetition_penalty": 1.2}
PLOT_HINT = "pip install 'actsteer[plot]' (or matplotlib)"


@dataclasses.dataclass
class SweepResult:
    """What `sweep` returns.

    Attributes:
        rows: one dict per generation: ``strength``, ``prompt``, ``text`` (the continuation), ``score`` (the
            presence margin), ``present``, ``keyword_hits``, ``perplexity`` (of the continuation given its prompt),
            ``perplexity_alone`` (of the continuation on its own).
        summary: one dict per strength: ``strength``, ``presence`` (fraction present), ``score`` (mean margin),
            ``perplexity`` and ``perplexity_alone`` (medians over texts), ``distinct_1``, ``distinct_2``, ``n``.
        meta: label, concept, sites, timings, generation settings.
    """

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def at(self, strength: float) -> dict[str, Any]:
        """The summary row of one strength."""
        for row in self.summary:
            if math.isclose(row["strength"], strength, abs_tol=1e-9):
                return row
        raise KeyError(f"No strength {strength} in this sweep; it has {[r['strength'] for r in self.summary]}")

    def to_csv(self, path: str | Path, *, table: str = "rows") -> Path:
        """Write ``rows`` (generations and their metrics, default) or ``summary`` (per strength) as CSV."""
        if table not in ("rows", "summary"):
            raise ValueError(f"`table` must be 'rows' or 'summary', got {table!r}")
        data = self.rows if table == "rows" else self.summary
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(data[0]) if data else [])
            writer.writeheader()
            writer.writerows(data)
        return path

    def markdown(self, digits: int = 3) -> str:
        """The summary as a Markdown table."""
        cols = ["strength", "presence", "score", "perplexity", "perplexity_alone", "distinct_1", "distinct_2"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
        for row in self.summary:
            lines.append("| " + " | ".join(_fmt(row[c], digits) for c in cols) + " |")
        return "\n".join(lines)

    def plot(self, path: str | Path, *, metrics: Sequence[str] = ("presence", "perplexity", "distinct_2")) -> Path:
        """Save a PNG of each metric against strength (needs matplotlib: the ``[plot]`` extra).

        Raises:
            ModuleNotFoundError: matplotlib is not installed (the message says how to install it).
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ModuleNotFoundError:
            raise ModuleNotFoundError(f"SweepResult.plot needs matplotlib: {PLOT_HINT}") from None
        xs = [r["strength"] for r in self.summary]
        fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            ax.plot(xs, [r[metric] for r in self.summary], marker="o")
            ax.set_xlabel("strength")
            ax.set_title(metric)
            if metric == "perplexity":
                ax.set_yscale("log")
        fig.suptitle(self.meta.get("label") or "actsteer sweep")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _median(values: torch.Tensor) -> float:
    finite = [v for v in values.tolist() if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _fmt(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}" if abs(value) >= 10 else f"{value:.{digits}f}"
    return str(value)


@torch.no_grad()
def generate_continuations(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    transport: Transport | None = None,
    strengths: Sequence[float] = (0.0,),
    apply_to: str = "all",
    max_new_tokens: int = 32,
    batch_size: int = 64,
    seed: int = 0,
    **generation: Any,
) -> list[list[str]]:
    """Continuations of ``prompts`` at each strength, ``out[s][p]``; all (strength, prompt) pairs share batches.

    One strength per batch row (``Steering`` with a 1-D strength tensor), so a whole sweep is one or a few
    ``generate`` calls. Prompts are left-padded; the tokenizer and model are left as they were.
    """
    from ..hf_integration.generation import disable_steering_lm, enable_steering_lm, is_steering_enabled
    from ..hf_integration.lm import padding_ready

    pairs = [(float(s), p) for s in strengths for p in prompts]
    kwargs = {**DEFAULT_GENERATION, **generation, "max_new_tokens": max_new_tokens}
    was_enabled = is_steering_enabled(model)
    enable_steering_lm(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    texts: list[str] = []
    try:
        with padding_ready(tokenizer):
            for b in range(0, len(pairs), batch_size):
                chunk = pairs[b : b + batch_size]
                enc = tokenizer([p for _, p in chunk], return_tensors="pt", padding=True).to(model.device)
                steering = None
                if transport is not None and any(s != 0.0 for s, _ in chunk):
                    steering = Steering(transport, torch.tensor([s for s, _ in chunk]), apply_to)
                torch.manual_seed(seed)
                out = model.generate(**enc, steering=steering, pad_token_id=tokenizer.pad_token_id, **kwargs)
                texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        if not was_enabled:
            disable_steering_lm(model)
    n = len(prompts)
    return [texts[i * n : (i + 1) * n] for i in range(len(strengths))]


def sweep(
    model: torch.nn.Module,
    tokenizer: Any,
    transport: Transport | None,
    prompts: Sequence[str],
    strengths: Sequence[float] | None = None,
    *,
    concept: str | Sequence[str] | None = None,
    keywords: Sequence[str] | None = None,
    contrast: Sequence[str] = DEFAULT_CONTRAST,
    encoder: Encoder | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    apply_to: str = "all",
    max_new_tokens: int = 32,
    batch_size: int = 64,
    label: str = "",
    csv_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    **generation: Any,
) -> SweepResult:
    """Generate from ``prompts`` at each strength and measure concept presence, perplexity and distinct-n.

    Presence is scored on the continuation only (`concept_presence`); perplexity is that of the continuation under
    the UNSTEERED model (the paper's fluency side effect), given its prompt (``perplexity``) and on its own
    (``perplexity_alone``: a fluent change of topic costs less there); distinct-1/2 are pooled over the strength's
    continuations. Greedy decoding with repetition penalty 1.2 unless ``generation`` says otherwise.

    Args:
        model, tokenizer: a Hugging Face causal LM and its tokenizer.
        transport: the `Transport` to sweep, or None for unsteered generations (e.g. a prompting baseline:
            put the instruction in ``prompts``); with None, ``strengths`` must be ``(0,)`` or left out.
        prompts: held-out prompts (not used for fitting).
        strengths: default ``(0, 0.25, 0.5, 0.75, 1)``; the additive baselines' unbounded scale works too.
        concept: description(s) for `concept_presence`; without it presence columns are NaN.
        keywords, contrast, encoder, threshold: passed to `concept_presence`.
        apply_to: ``"all"`` tokens (paper), ``"prompt"`` or ``"generated"`` (see `actsteer.Steering`).
        max_new_tokens: continuation length.
        batch_size: rows per ``generate`` call (rows = prompts x strengths).
        label: a name stored in ``meta`` and used as the plot title.
        csv_path: if given, write the per-generation table there and the summary beside it (``*_summary.csv``).
        plot_path: if given, save a PNG of the metrics against strength; skipped with a warning when matplotlib
            is missing.
        **generation: extra ``model.generate`` arguments (``do_sample``, ``top_p``, ``repetition_penalty``...).

    Returns:
        A `SweepResult` (``rows``, ``summary``, ``meta``; ``to_csv``, ``markdown``, ``plot``).

    Example:
        >>> result = sweep(model, tok, transport, ["Once upon a time,"], [0, 1], concept="the ocean")  # doctest: +SKIP
        >>> result.at(1.0)["presence"] > result.at(0.0)["presence"]  # doctest: +SKIP
        True
    """
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError("`prompts` must be a non-empty list of prompts")
    if strengths is None:
        strengths = DEFAULT_STRENGTHS if transport is not None else (0.0,)
    strengths = [float(s) for s in strengths]
    if transport is None and any(s != 0.0 for s in strengths):
        raise ValueError(f"Without a transport there is nothing to steer at strengths {strengths}; pass strengths=(0,)")
    prompts = list(prompts)
    t0 = time.perf_counter()
    texts = generate_continuations(
        model, tokenizer, prompts, transport=transport, strengths=strengths, apply_to=apply_to,
        max_new_tokens=max_new_tokens, batch_size=batch_size, **generation,
    )
    t_gen = time.perf_counter() - t0
    flat = [t for row in texts for t in row]
    ppl = perplexity(model, tokenizer, flat, prompts=prompts * len(strengths))
    ppl_alone = perplexity(model, tokenizer, flat)
    if concept is not None:
        pres = concept_presence(flat, concept, keywords=keywords, contrast=contrast, encoder=encoder,
                                threshold=threshold)
        sim, hits, present = pres.score.tolist(), pres.keyword_hits.tolist(), pres.present.tolist()
    else:
        sim, hits, present = [math.nan] * len(flat), [0] * len(flat), [math.nan] * len(flat)
    rows, summary = [], []
    n = len(prompts)
    for i, s in enumerate(strengths):
        part = slice(i * n, (i + 1) * n)
        for j, prompt in enumerate(prompts):
            k = i * n + j
            rows.append({
                "strength": s, "prompt": prompt, "text": flat[k], "score": sim[k],
                "present": present[k], "keyword_hits": hits[k], "perplexity": float(ppl[k]),
                "perplexity_alone": float(ppl_alone[k]),
            })
        summary.append({
            "strength": s,
            "presence": float(sum(present[part]) / n) if concept is not None else math.nan,
            "score": float(sum(sim[part]) / n),
            "perplexity": _median(ppl[part]),
            "perplexity_alone": _median(ppl_alone[part]),
            "distinct_1": distinct_n(texts[i], 1),
            "distinct_2": distinct_n(texts[i], 2),
            "n": n,
        })
    meta = {
        "label": label, "concept": concept, "sites": [] if transport is None else transport.sites,
        "method": None if transport is None else transport.method, "max_new_tokens": max_new_tokens,
        "generation": {**DEFAULT_GENERATION, **generation}, "seconds_generate": t_gen,
        "seconds_total": time.perf_counter() - t0,
    }
    logger.info("actsteer.eval: swept %s over %d strengths x %d prompts in %.1fs", label or "transport",
                len(strengths), n, meta["seconds_total"])
    result = SweepResult(rows=rows, summary=summary, meta=meta)
    if csv_path is not None:
        path = result.to_csv(csv_path)
        result.to_csv(path.with_name(path.stem + "_summary.csv"), table="summary")
    if plot_path is not None:
        try:
            result.plot(plot_path)
        except ModuleNotFoundError:
            logger.warning("actsteer.eval: no plot written to %s: matplotlib is missing (%s)", plot_path, PLOT_HINT)
    return result
