#!/usr/bin/env bash
# The project's test command: installs everything it needs into ./.venv, then runs the whole suite
# (fast tiny-model tier + the real-model tier on the embedded SmolLM2). Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` for the fast tier only.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
. scripts/install.sh
echo "== ruff"
ruff check seal_peft tests examples benchmarks
echo "== import layers (lint-imports, contracts in pyproject.toml)"
lint-imports
echo "== pytest"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} python -m pytest -q -p no:cacheprovider --timeout=900 "$@"
echo "== tests took $(( $(date +%s) - start )) s"
