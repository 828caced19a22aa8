#!/usr/bin/env bash
# The main job: set up, then run the bundled SmolLM2-135M-Instruct on a chat prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
llamaforge generate smollm2-135m-instruct --chat --max-new-tokens 64 \
  --prompt "${PROMPT:-What are three good ways to start a conversation with a stranger?}"
