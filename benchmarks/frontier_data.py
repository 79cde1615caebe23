"""Data of the frontier benchmark (`frontier.py`): concepts, held-out prompts, and the two kinds of fitting pairs.

- **Concepts**: food, sports, ocean and music are the benchmark concepts; space is a *fresh* concept, written for
  this benchmark and kept out of every choice of a default (its results were only looked at after the defaults
  were chosen). Levers and site sets were chosen on the ``select`` concepts (food, music) and the dev prompts, then
  confirmed on the ``confirm`` concepts (sports, ocean), the fresh one, and the held-out prompts.
- **Prompts**: ``frontier_prompts.txt`` (48 held-out prompts, the frontier) and ``dev_prompts.txt`` (24 others, used
  only while choosing). Both are neutral openings, disjoint from each other and from every fitting text.
- **Unmatched data** (what `fit_lm` users have): source = the neutral sentences of ``hf_integration/data/neutral.txt``
  that the judge does not find to be about the concept, target = the concept's 48 sentences; the peers get them
  as 48 (positive, negative) pairs (target i, source i mod n), as in ``PEERS_ON_SMOLLM2.md``.
- **Minimal pairs** (what repeng is made for): the same assistant text under two user instructions that differ only
  in the topic ("Tell me something about food and cooking." vs "... everyday life."), in the model's chat template,
  followed by a truncated neutral sentence (repeng's recipe: persona prompts + truncated generic outputs).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
NEUTRAL = HERE.parent / "hf_integration" / "data" / "neutral.txt"
OCEAN = HERE.parent / "hf_integration" / "data" / "ocean.txt"


@dataclasses.dataclass(frozen=True)
class Concept:
    name: str
    target: Path
    descriptions: tuple[str, ...]  # for the MiniLM presence judge
    topic: str  # for the prompting baseline and the minimal pairs
    role: str  # "select": used to choose defaults; "confirm": only to check them; "fresh": never looked at before


CONCEPTS = {c.name: c for c in (
    Concept("food", DATA / "food.txt", ("food", "cooking", "a recipe", "cooking a meal in the kitchen",
                                        "eating a delicious dish"), "food and cooking", "select"),
    Concept("music", DATA / "music.txt", ("music", "playing a musical instrument", "a song", "a concert",
                                          "a band playing music", "singing a song"), "music", "select"),
    Concept("sports", DATA / "sports.txt", ("sports", "a sports game", "athletes competing in a race",
                                            "a team playing a match", "scoring a goal", "a tennis match",
                                            "a basketball game", "running a race"), "sports", "confirm"),
    Concept("ocean", OCEAN, ("the ocean", "the sea", "waves on a beach", "sailing a boat at sea",
                             "fish and whales in the ocean"), "the ocean", "confirm"),
    Concept("space", DATA / "space.txt", ("outer space", "astronomy", "planets and stars",
                                          "astronauts in a spaceship", "a rocket launch into orbit",
                                          "the night sky and galaxies"), "outer space and astronomy", "fresh"),
)}
BENCHMARK_CONCEPTS = ("food", "sports", "ocean", "music")
NEGATIVE_TOPIC = "everyday life"
INSTRUCTION = "Tell me something about {topic}."


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def prompts(kind: str = "frontier") -> list[str]:
    """The 48 held-out ``"frontier"`` prompts or the 24 ``"dev"`` prompts."""
    return read_lines(DATA / f"{kind}_prompts.txt")


@functools.lru_cache(maxsize=None)
def unmatched(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(source, target): neutral sentences not judged about the concept, and the concept's sentences."""
    from actsteer.eval import concept_presence

    concept = CONCEPTS[name]
    neutral = read_lines(NEUTRAL)
    on_topic = concept_presence(neutral, list(concept.descriptions)).present.tolist()
    return tuple(t for t, on in zip(neutral, on_topic) if not on), tuple(read_lines(concept.target))


def unmatched_pairs(name: str) -> list[tuple[str, str]]:
    """48 (positive, negative) pairs of unrelated sentences: (target i, source i mod n)."""
    source, target = unmatched(name)
    return [(t, source[i % len(source)]) for i, t in enumerate(target)]


def _chat(tokenizer: Any, instruction: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                         add_generation_prompt=True)


def minimal_pairs(name: str, tokenizer: Any, n: int = 48) -> list[tuple[str, str]]:
    """``n`` (positive, negative) minimal pairs: the same truncated neutral sentence after two instructions that
    differ only in the topic, in the tokenizer's chat template."""
    source, _ = unmatched(name)
    positive = _chat(tokenizer, INSTRUCTION.format(topic=CONCEPTS[name].topic))
    negative = _chat(tokenizer, INSTRUCTION.format(topic=NEGATIVE_TOPIC))
    pairs = []
    for i in range(n):
        words = source[i % len(source)].split()
        suffix = " ".join(words[: 2 + (5 * i) % 7])  # 2..8 words, varied (repeng trains on many truncations)
        pairs.append((positive + suffix, negative + suffix))
    return pairs


def fitting_texts(name: str, data: str, tokenizer: Any) -> tuple[list[str], list[str]]:
    """(source, target) for an activation-transport fit on ``data`` = "unmatched" or "pairs"."""
    if data == "unmatched":
        source, target = unmatched(name)
        return list(source), list(target)
    pairs = minimal_pairs(name, tokenizer)
    return [neg for _, neg in pairs], [pos for pos, _ in pairs]


def fitting_pairs(name: str, data: str, tokenizer: Any) -> list[tuple[str, str]]:
    """(positive, negative) pairs for the peers on ``data`` = "unmatched" or "pairs"."""
    return unmatched_pairs(name) if data == "unmatched" else minimal_pairs(name, tokenizer)


def prompting(name: str, prompt_list: list[str]) -> list[str]:
    """The prompting baseline: the topic stated before each prompt (as in concept_induction.py)."""
    return [f"The following text is about {CONCEPTS[name].topic}.\n{p}" for p in prompt_list]
