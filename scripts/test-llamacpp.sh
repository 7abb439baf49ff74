#!/usr/bin/env bash
# llama.cpp check of `seal-peft export-gguf` (issue 15): export a SEAL-C adapter of the embedded SmolLM2
# into its Q4_1 GGUF, run the base GGUF and the exported GGUF greedily with llama.cpp (llama-cpp-python)
# on line-retrieval prompts (LongEval's protocol, the test split), compare with transformers' greedy
# answers on the same exported GGUF, and print accuracy, agreement and logit differences. The record
# goes to results/deployment/llamacpp.json.
#
#   bash scripts/test-llamacpp.sh                  # 5 prompts each at 1024 and 2048 tokens
#   PER_LENGTH=10 THREADS=2 bash scripts/test-llamacpp.sh
#
# llama-cpp-python builds llama.cpp from source (10-20 minutes on 2 cores) into its own virtualenv,
# .venv-llamacpp, once; LLAMACPP_LOG keeps the build log. The adapter is runs/le_c (the SEAL-C adapter of
# docs/results.md) when present, else ADAPTER, else a small one trained here (a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || . scripts/install.sh
PY=.venv/bin/python
LLAMA_VENV=${LLAMA_VENV:-.venv-llamacpp}
LLAMACPP_LOG=${LLAMACPP_LOG:-out/llamacpp-build.log}
THREADS=${THREADS:-2}
PER_LENGTH=${PER_LENGTH:-5}
WORK=${WORK:-out/llamacpp}
RECORD=${RECORD:-results/deployment/llamacpp.json}
export OMP_NUM_THREADS=$THREADS
mkdir -p "$WORK" "$(dirname "$LLAMACPP_LOG")"

if ! "$LLAMA_VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "building llama-cpp-python into $LLAMA_VENV (compiles llama.cpp; log: $LLAMACPP_LOG)" >&2
  [ -x "$LLAMA_VENV/bin/python" ] || "$PY" -m venv "$LLAMA_VENV"
  if ! CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} nice -n 15 \
      "$LLAMA_VENV/bin/pip" install llama-cpp-python >"$LLAMACPP_LOG" 2>&1; then
    echo "llama-cpp-python did not build: $(grep -m1 -iE 'error[: ]' "$LLAMACPP_LOG" || tail -n1 "$LLAMACPP_LOG")" >&2
    exit 1
  fi
fi
if ! err=$("$LLAMA_VENV/bin/python" -c "import llama_cpp" 2>&1); then
  echo "llama-cpp-python does not import: $(echo "$err" | tail -n1)" >&2
  exit 1
fi

ADAPTER=${ADAPTER:-}
if [ -z "$ADAPTER" ]; then
  if [ -f runs/le_c/adapter_config.json ]; then
    ADAPTER=runs/le_c
  else
    ADAPTER="$WORK/adapter-seal-c"
    if [ ! -f "$ADAPTER/adapter_config.json" ]; then
      echo "no runs/le_c: training a small SEAL-C adapter into $ADAPTER" >&2
      .venv/bin/seal-peft train --granularity channel --num-samples 16 --lengths 1024 --seed 0 \
        --prompt-format longeval --out "$ADAPTER" --quiet
    fi
  fi
fi

nice -n 10 "$PY" scripts/llamacpp_check.py prepare --work "$WORK" --adapter "$ADAPTER" \
  --per-length "$PER_LENGTH" --threads "$THREADS" ${TYPE:+--type "$TYPE"}
nice -n 10 "$LLAMA_VENV/bin/python" scripts/llamacpp_check.py llamacpp --work "$WORK" --threads "$THREADS"
"$PY" scripts/llamacpp_check.py report --work "$WORK" --record "$RECORD"
