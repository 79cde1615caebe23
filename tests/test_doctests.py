"""Docstring examples are tests: every example in the package, and in the tests' own support package, runs as
written. One collector walks the packages `pyproject.toml` installs (and ``tests/support``), so a new module is
covered without being listed anywhere.

The ComfyUI node modules import ComfyUI's API at import time: they are run as ComfyUI loads them, in the pack that
`support.comfy.load_pack` loads through ComfyUI's own loader.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import support

ROOT = Path(__file__).resolve().parents[1]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
COMFY = "actsteer.comfy_nodes"


def _packages() -> list[str]:
    """The packages `pyproject.toml` installs (``[tool.setuptools] packages``)."""
    text = (ROOT / "pyproject.toml").read_text()
    listed = re.search(r"^packages\s*=\s*\[(.*?)\]", text, flags=re.MULTILINE | re.DOTALL)
    return re.findall(r'"([\w.]+)"', listed.group(1))


def _modules() -> list[str]:
    names = []
    for package in _packages():
        names.append(package)
        path = ROOT.joinpath(*package.split(".")[1:])
        names += [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(path)])
                  if not m.ispkg and m.name != "__main__"]
    names += ["support"] + [m.name for m in pkgutil.walk_packages(support.__path__, "support.")]
    return sorted(set(names))


MODULES = _modules()


def _import(name: str):
    if name == COMFY or name.startswith(COMFY + "."):
        from support.comfy import load_pack

        return importlib.import_module(load_pack().__name__ + name[len("actsteer"):])
    return importlib.import_module(name)


def test_doctests_cover_every_installed_package():
    for package in _packages():
        assert package in MODULES
    assert {"actsteer.core.engine", "actsteer.archs.site_groups", "actsteer.comfy_nodes.inputs",
            "support.miniature.shapes"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_doctests_run(name):
    module = _import(name)
    result = doctest.testmod(module, optionflags=FLAGS)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
    # every example written in the module ran (one not reached by doctest's finder would never be checked)
    written = [line for line in inspect.getsource(module).splitlines()
               if line.lstrip().startswith(">>> ") and "+SKIP" not in line]
    assert result.attempted == len(written), f"{name}: {len(written)} examples written, {result.attempted} ran"


def _readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_readme_serving_example_runs(capsys):
    exec(compile(_readme_block("Serving and threads"), "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 3 and printed[0] != printed[1]  # the plain and the steered request differ
