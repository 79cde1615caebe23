"""Tiers say what ran: a skip the main tier does not expect fails the run (`support.tiers`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support import tiers

ROOT = Path(__file__).resolve().parents[1]


def _pytest(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT, capture_output=True,
        text=True, timeout=600, env={**os.environ, **env},
    )


def test_tiers_without_comfyui_the_main_tier_fails():
    """Without a ComfyUI tree the ComfyUI tests skip: the run must fail and name them (it used to pass)."""
    node = "tests/test_comfy_nodes.py::test_pack_registers_through_comfyui_loader"
    missing = {"COMFYUI_PATH": str(ROOT / "no-comfyui-here"), "ACTSTEER_ALLOW_SKIPS": "0"}
    run = _pytest(node, **missing)
    assert run.returncode == 1, run.stdout[-2000:]
    assert "1 unexpected skip(s): the run FAILS" in run.stdout and f"{node}: " in run.stdout
    assert "No ComfyUI tree" in run.stdout
    listed = _pytest(node, **{**missing, "ACTSTEER_ALLOW_SKIPS": "1"})
    assert listed.returncode == 0 and "1 unexpected skip(s): listed only" in listed.stdout


def test_tiers_allow_list_names_other_tiers_and_hardware_only():
    assert tiers.allowed("tests/test_vllm_serving.py::test_serving_steers_each_request")
    assert tiers.allowed("tests/test_x.py::test_y", keywords={"gpu": True})
    assert not tiers.allowed("tests/test_comfy_nodes.py::test_pack_registers_through_comfyui_loader")
    assert not tiers.allowed("tests/test_clip.py::test_clip_scores")  # the [clip] extra is part of this tier
    assert all(reason.strip() for reason in [*tiers.ALLOWED_SKIPS.values(), *tiers.ALLOWED_MARKERS.values()])
