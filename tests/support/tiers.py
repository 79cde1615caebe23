"""The main tier's skip policy: a run that skips a test it means to run fails, and says which and why.

A skip hides what did not run: without ComfyUI installed, 72 tests used to skip and the tier still passed. Here
every skip must be on `ALLOWED_SKIPS`, the short list of tests that belong to another tier or to hardware this
machine may lack; any other skip turns a passing run into a failing one (exit code 1) and is listed at the end.
``ACTSTEER_ALLOW_SKIPS=1`` lists them without failing (a partial local setup); CI never sets it.

`tests/conftest.py` registers these hooks; ``python -m pytest -p support.tiers`` registers them anywhere.
"""

from __future__ import annotations

import fnmatch
import os

import pytest

# node id pattern (fnmatch, relative to the repository root) -> why a skip there is expected in the main tier
ALLOWED_SKIPS: dict[str, str] = {
    "tests/test_vllm_serving.py::*": "the vLLM tier runs in its own venv (scripts/test_vllm.sh fails on any skip)",
    "tests/test_hardening.py::test_hardening_cli_failure_is_one_line_with_exit_code_2[source-unreadable]":
        "needs a file that exists but cannot be read; some systems have none (/proc/1/mem readable or absent)",
    "tests/test_hardening.py::test_hardening_demo_extra_installs_what_the_default_model_needs":
        "reads pyproject.toml with tomllib, which Python 3.10 (supported) lacks",
}
ALLOWED_MARKERS: dict[str, str] = {"gpu": "needs CUDA; this machine may have none"}
ENV = "ACTSTEER_ALLOW_SKIPS"

_SKIPPED: list[tuple[str, str]] = []  # (node id, reason) of the skips of this run that no rule allows


def allowed(nodeid: str, keywords: object = ()) -> bool:
    """Whether a skip of test ``nodeid`` (with these marker keywords) is on the allow-list."""
    return any(fnmatch.fnmatchcase(nodeid, pattern) for pattern in ALLOWED_SKIPS) or any(
        marker in keywords for marker in ALLOWED_MARKERS
    )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and not allowed(report.nodeid, report.keywords):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append((report.nodeid, reason))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _SKIPPED and exitstatus == pytest.ExitCode.OK and os.environ.get(ENV) != "1":
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    if not _SKIPPED:
        return
    verdict = "listed only (ACTSTEER_ALLOW_SKIPS=1)" if os.environ.get(ENV) == "1" else "the run FAILS"
    terminalreporter.section(f"{len(_SKIPPED)} unexpected skip(s): {verdict}", sep="=", red=True)
    for nodeid, reason in _SKIPPED[:20]:
        terminalreporter.line(f"{nodeid}: {reason}")
    if len(_SKIPPED) > 20:
        terminalreporter.line(f"... and {len(_SKIPPED) - 20} more")
    terminalreporter.line(
        "A skip means part of this tier did not run. Install what it needs (bash scripts/install_test_deps.sh), "
        "or, if the skip belongs to another tier or to missing hardware, add it to ALLOWED_SKIPS in "
        "tests/support/tiers.py with the reason."
    )
