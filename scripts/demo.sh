#!/usr/bin/env bash
# The main job: set up, then LoRA-fine-tune the bundled SmolLM2-135M-Instruct on chitchat
# dialogue -> topic and report held-out exact match / ROUGE-L before and after.
# Extra arguments are config overrides, e.g. `bash scripts/demo.sh max_steps=60`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
llamaforge train configs/demo.yaml "$@"
