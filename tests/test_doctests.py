"""Docstring examples are tests: every `Example:` in the public modules must run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "actsteer",
    "actsteer.core.collect",
    "actsteer.core.estimate",
    "actsteer.core.fit",
    "actsteer.core.hooks",
    "actsteer.core.io",
    "actsteer.core.pooling",
    "actsteer.core.sites",
    "actsteer.core.transport",
    "actsteer.hf_integration",
    "actsteer.hf_integration.cli",
    "actsteer.hf_integration.default_model",
    "actsteer.hf_integration.generation",
    "actsteer.hf_integration.lm",
    "actsteer.hf_integration.presets",
    "actsteer.hf_integration.pipelines",
    "actsteer.hf_integration.pipeline_fit",
    "actsteer.hf_integration.comfy_names",
    "actsteer.eval",
    "actsteer.eval.clip",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
