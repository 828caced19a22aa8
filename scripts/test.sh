#!/usr/bin/env bash
# Set up, lint, and run the test suite (pass pytest arguments through, e.g. -m "not real").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest -q "$@"
