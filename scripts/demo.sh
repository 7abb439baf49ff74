#!/usr/bin/env bash
# The project's demo command: installs everything it needs into ./.venv, then runs `seal-peft demo`
# on the embedded SmolLM2-135M-Instruct (base eval, SEAL-H and SEAL-C training, eval, merge check,
# saved adapters + merged model, a before/after table and plots under runs/demo). Extra arguments
# go to `seal-peft demo` (e.g. --lengths 512,1024,2048,4096 --eval-samples 40).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/install.sh
OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} seal-peft demo "$@"
