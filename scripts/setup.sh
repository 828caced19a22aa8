#!/usr/bin/env bash
# Create .venv (once) with pinned dependencies, the real assets and llamaforge itself.
# On a machine without an NVIDIA GPU the CPU build of torch is installed first; with one,
# bring your own CUDA build of torch (pyproject.toml states the supported range).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.llamaforge-installed
want=$(cat requirements/*.txt pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip >/dev/null
  if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      python -m pip install -q "torch>=2.4,<2.15"
    else
      python -m pip install -q torch==2.13.0  # CPU build
    fi
  fi
  python -m pip install -q -r requirements/test.txt
  python -m pip install -q --no-deps -r requirements/assets.txt
  python -m pip install -q --no-deps -e .
  echo "$want" >"$stamp"
fi
# The web page's browser tests (tests/test_ui_browser.py) drive Debian's chromium through
# Playwright's executable_path: no browser download. Without chromium they skip (CI: fail).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo_=$([ "$(id -u)" = 0 ] || echo sudo)
  { $sudo_ apt-get update -qq &&
    $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null ||
    echo "setup: could not install chromium; the browser tests will be skipped" >&2
fi
# llama.cpp checks GGUF exports (tests/test_gguf_export.py): Node.js from Debian where missing,
# then node-llama-cpp and its prebuilt CPU binary, pinned by tools/llamacpp/package-lock.json.
if ! command -v npm >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo_=$([ "$(id -u)" = 0 ] || echo sudo)
  { $sudo_ apt-get update -qq && $sudo_ apt-get install -y -qq nodejs npm; } >/dev/null ||
    echo "setup: could not install Node.js; the llama.cpp tests will be skipped" >&2
fi
if command -v npm >/dev/null 2>&1; then
  nstamp=tools/llamacpp/node_modules/.llamaforge-installed
  nwant=$(sha256sum tools/llamacpp/package-lock.json | cut -c1-16)
  if [ "$(cat "$nstamp" 2>/dev/null)" != "$nwant" ]; then
    (cd tools/llamacpp && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm ci --omit=optional \
      --no-audit --no-fund --loglevel=error)
    echo "$nwant" >"$nstamp"
  fi
fi
