"""Docstring examples are tests: every `Example:` in the public modules must run as written."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

MODULES = [
    "actsteer",
    "actsteer.core.apply",
    "actsteer.core.dispatch",
    "actsteer.core.engine",
    "actsteer.core.estimators",
    "actsteer.core.fitting",
    "actsteer.core.folding",
    "actsteer.core.io",
    "actsteer.core.pooling",
    "actsteer.core.provenance",
    "actsteer.core.record",
    "actsteer.core.sites",
    "actsteer.core.steering",
    "actsteer.core.steps",
    "actsteer.core.transport",
    "actsteer.core.validation",
    "actsteer.hf_integration",
    "actsteer.hf_integration.cli",
    "actsteer.hf_integration.cli_checks",
    "actsteer.hf_integration.default_model",
    "actsteer.hf_integration.generation",
    "actsteer.hf_integration.lm",
    "actsteer.hf_integration.presets",
    "actsteer.hf_integration.pipelines",
    "actsteer.hf_integration.pipeline_fit",
    "actsteer.archs.site_groups",
    "actsteer.hf_integration.texts",
    "actsteer.archs.comfy_names",
    "actsteer.archs.detect",
    "actsteer.archs.flux",
    "actsteer.eval",
    "actsteer.eval.clip",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"


def _readme_block(heading: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_readme_serving_example_runs(capsys):
    exec(compile(_readme_block("Serving and threads"), "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 3 and printed[0] != printed[1]  # the plain and the steered request differ
