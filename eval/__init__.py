"""actsteer.eval: measure steering on real models: concept presence, fluency, diversity, transport fidelity, sweeps.

Needs torch only at import; transformers (and the MiniLM judge) load on first use, matplotlib only for plots.

Example:
    >>> from actsteer.eval import distinct_n
    >>> distinct_n(["the sea the sea"], n=1)
    0.5
"""

from __future__ import annotations

from .clip import ClipScores, clip_scores
from .fidelity import FidelityReport, SiteFidelity, normalised_w1, support_coverage, transport_fidelity, wasserstein_1d
from .sweep import SweepResult, generate_continuations, sweep
from .text import (
    DEFAULT_CONTRAST,
    DEFAULT_THRESHOLD,
    Presence,
    SentenceEncoder,
    concept_presence,
    default_encoder,
    distinct_n,
    keyword_hits,
    perplexity,
)

__all__ = [
    "ClipScores",
    "DEFAULT_CONTRAST",
    "DEFAULT_THRESHOLD",
    "FidelityReport",
    "Presence",
    "SentenceEncoder",
    "SiteFidelity",
    "SweepResult",
    "clip_scores",
    "concept_presence",
    "default_encoder",
    "distinct_n",
    "generate_continuations",
    "keyword_hits",
    "normalised_w1",
    "perplexity",
    "support_coverage",
    "sweep",
    "transport_fidelity",
    "wasserstein_1d",
]
