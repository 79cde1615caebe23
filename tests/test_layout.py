"""The package's layout, read from its source: the import graph between files, the core's one face, and names
that resolve as the README writes them.

The graph counts every import statement a file holds (module level or inside a function; not the ones under
``if TYPE_CHECKING:``, which never run): ``from .x import y`` is an edge to ``x`` (or to ``x.y`` when that is a
module). Importing a submodule also imports its package's ``__init__``; that is how Python works and is not an edge.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "actsteer"
NOT_PACKAGE = {"tests", "benchmarks", "scripts", "web", "example_workflows"}

# Which layers a layer's files may import (besides its own files). The hosts are peers: each stands on the core
# and on `archs` (model-name knowledge), never on another host. `eval` measures transformers models through the
# transformers host, and the transformers host's command line reuses eval's helpers.
ALLOWED = {
    "core": set(),
    "archs": {"core"},
    "hf_integration": {"core", "archs", "eval"},
    "comfy_nodes": {"core", "archs"},
    "vllm_integration": {"core"},
    "eval": {"core", "hf_integration"},
    "": {"core", "archs", "hf_integration", "comfy_nodes"},  # the top-level package's lazy entry points
    "__main__": {"hf_integration"},  # python -m actsteer: the command line
}
NOT_PYTHON = {"actsteer.transports"}  # the websocket event the ComfyUI pack sends (CHANGELOG)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in NOT_PACKAGE or any(p.startswith(".") for p in rel.parts):
            continue
        parts = [PACKAGE, *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(name: str) -> set[str]:
    """The package modules that module ``name`` imports."""
    tree = ast.parse(MODULES[name].read_text())
    skip = _type_checking_lines(tree)
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_layout_import_graph_has_no_loop_between_files():
    loops = sorted({tuple(sorted([a, b])) for a in GRAPH for b in _reachable(a) if a in _reachable(b) and a != b})
    assert not loops, f"files that import each other (directly or through others): {loops[:10]}"


def test_layout_layers_import_only_what_they_stand_on():
    wrong = [
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        for target in targets
        if _layer(target) != _layer(name) and _layer(target) not in ALLOWED[_layer(name)]
    ]
    assert not wrong, wrong


def test_layout_comfy_nodes_never_reach_the_transformers_host():
    for name in (n for n in MODULES if _layer(n) == "comfy_nodes"):
        reached = {m for m in _reachable(name) if _layer(m) == "hf_integration"}
        assert not reached, f"{name} reaches {sorted(reached)}"


def test_layout_the_core_has_one_face():
    """Outside the core, files import `actsteer.core` itself (its ``__init__``), never one of its modules, and only
    names that the face lists."""
    import actsteer.core

    for name, targets in GRAPH.items():
        if _layer(name) == "core":
            continue
        inner = sorted(t for t in targets if t.startswith(f"{PACKAGE}.core."))
        assert not inner, f"{name} imports core modules {inner}; import them from actsteer.core"
    for name in MODULES:
        if _layer(name) == "core":
            continue
        for node in ast.walk(ast.parse(MODULES[name].read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and node.module == "core":
                missing = [a.name for a in node.names if a.name not in actsteer.core.__all__]
                assert not missing, f"{name} imports {missing} from actsteer.core, which does not list them"


def test_layout_no_name_of_the_core_face_hides_a_module():
    """`actsteer.core.fit` is the function the README calls: no module of the core has the name of a face entry
    (`from .fit import fit` used to make ``actsteer.core.fit.fit`` an AttributeError)."""
    import actsteer.core

    hidden = [n for n in actsteer.core.__all__ if importlib.util.find_spec(f"actsteer.core.{n}") is not None]
    assert not hidden, f"face names that are also module names (the module is unreachable as an attribute): {hidden}"


def _dotted_names(text: str) -> set[str]:
    return set(re.findall(r"`(actsteer(?:\.\w+)+)(?:\([^`]*\))?`", text))


@pytest.mark.parametrize("doc", ["README.md", "CHANGELOG.md", "benchmarks/RESULTS.md"])
def test_layout_dotted_names_in_the_docs_resolve(doc):
    """Every `actsteer.x.y` the docs name resolves as a user's code would reach it: import the longest module
    prefix, then attribute access from the top package (``actsteer.core.fit.fit`` used to fail here)."""
    problems = []
    for dotted in sorted(_dotted_names((ROOT / doc).read_text()) - NOT_PYTHON):
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            try:
                importlib.import_module(".".join(parts[:i]))
                break
            except ImportError:
                continue
        obj = importlib.import_module(PACKAGE)
        try:
            for part in parts[1:]:
                obj = getattr(obj, part)
        except AttributeError as err:
            problems.append(f"{dotted}: {err}")
    assert not problems, problems
