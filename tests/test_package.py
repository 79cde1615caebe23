"""Packaging: `import actsteer` is light (torch only), the wheel has every subpackage and data file."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_actsteer_needs_torch_only(tmp_path):
    code = (
        "import sys, actsteer\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'diffusers', 'comfy', 'open_clip', "
        "'PIL', 'matplotlib', 'safetensors'})\n"
        "print(','.join(heavy))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"import actsteer pulled in: {res.stdout.strip()}"


def test_import_actsteer_core_loads_no_host_layer(tmp_path):
    code = (
        "import sys, actsteer.core\n"
        "hosts = sorted(m for m in sys.modules if m.startswith(('actsteer.hf_integration', 'actsteer.comfy_nodes', "
        "'actsteer.eval', 'actsteer.vllm_integration')))\n"
        "print(','.join(hosts))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"import actsteer.core pulled in: {res.stdout.strip()}"


def test_core_sources_import_nothing_above_core():
    for path in (ROOT / "core").glob("*.py"):
        text = path.read_text()
        for layer in ("hf_integration", "comfy_nodes", "eval", "vllm_integration"):
            assert f"..{layer}" not in text and f"actsteer.{layer}" not in text, f"{path.name} imports {layer}"
        assert "from .. import" not in text and "from ..core" not in text, f"{path.name} imports the top level"


def test_public_api_surface():
    import actsteer

    for name in ("estimate", "UnitMap", "Transport", "attach", "steer", "Steering", "enable_steering", "fit_lm",
                 "fit_pipeline", "strength_grid", "list_sites"):
        assert callable(getattr(actsteer, name)), name
    import actsteer.eval  # noqa: F401  (a submodule, imported on demand)


@pytest.mark.slow
def test_wheel_contains_subpackages_and_data(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("actsteer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("actsteer/__init__.py", "actsteer/core/engine.py", "actsteer/archs/site_groups.py",
                     "actsteer/hf_integration/cli.py",
                     "actsteer/comfy_nodes/nodes.py", "actsteer/eval/__init__.py",
                     "actsteer/hf_integration/data/neutral.txt", "actsteer/hf_integration/data/ocean.txt"):
        assert required in names, required
    assert not any(n.startswith(("actsteer/tests/", "actsteer/benchmarks/")) for n in names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "actsteer = actsteer.hf_integration.cli:main" in entry_points
