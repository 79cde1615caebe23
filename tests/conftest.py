"""Shared fixtures (tiny language models from `support.tiny_lm`) and the main tier's skip policy (`support.tiers`).

Helpers shared by several test files live in the ``support`` package next to this file (``tests/support``: the
ComfyUI harness, tiny models, the miniature); pytest puts this folder on ``sys.path``, so tests import them as
``support.*``.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from support.tiers import pytest_runtest_logreport, pytest_sessionfinish, pytest_terminal_summary  # noqa: E402,F401
from support.tiny_lm import make_tiny_lm  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a shared, oversubscribed CPU OpenMP's spinning makes
# a 64-wide matmul ~50x slower with 2 threads than with 1. Set OMP_NUM_THREADS to choose otherwise.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)


@pytest.fixture
def tiny_lm_factory() -> Callable[..., tuple[torch.nn.Module, object]]:
    """``make(arch, dtype=torch.float32, padding_side="left")`` -> ``(model, tokenizer)``, arch in gpt2/llama/gemma2."""
    return make_tiny_lm


@pytest.fixture
def tiny_gpt2(tiny_lm_factory):
    return tiny_lm_factory("gpt2")


@pytest.fixture
def tiny_llama(tiny_lm_factory):
    return tiny_lm_factory("llama")


@pytest.fixture
def tiny_gemma2(tiny_lm_factory):
    return tiny_lm_factory("gemma2")
