#!/usr/bin/env bash
# The GPU check, one script (<= 8 minutes on one A100/H100-class GPU):
#   1. the device-dependent fast tests on CUDA: tests/test_device.py with SEAL_TEST_DEVICE=cuda
#      (bf16 training, merge/unmerge exactness, adapter and evaluation placement);
#   2. benchmarks/gpu_paper_setting.py: the paper's setting (random-init 7B shape, 31K tokens, bf16,
#      gradient checkpointing): step time, extrapolated 50-sample epoch, peak memory.
# Uses the python on PATH (or $PYTHON) as it is: it installs nothing (a GPU box may have no network).
# Output goes to $OUT (if set) or runs/gpu_check/: pytest.log, paper_gpu.json, paper_gpu.txt.
#
#   bash scripts/gpu_check.sh
#   SEAL_GPU_CHECK_VARIANTS=seal-h,seal-c,lora bash scripts/gpu_check.sh      # + LoRA for comparison
#   # smoke test on CPU at tiny shapes (what tests/test_gpu_check_script.py runs):
#   SEAL_GPU_CHECK_DEVICE=cpu SEAL_GPU_CHECK_CONFIG=tiny SEAL_GPU_CHECK_SEQ_LEN=64 \
#     SEAL_GPU_CHECK_DTYPE=float32 bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${SEAL_GPU_CHECK_DEVICE:-cuda}
CONFIG=${SEAL_GPU_CHECK_CONFIG:-longchat-7b-32k}
SEQ_LEN=${SEAL_GPU_CHECK_SEQ_LEN:-31000}
DTYPE=${SEAL_GPU_CHECK_DTYPE:-bfloat16}
VARIANTS=${SEAL_GPU_CHECK_VARIANTS:-seal-h,seal-c}
DEST=${OUT:-runs/gpu_check}
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)

echo "== machine"
"$PY" - "$DEVICE" <<'PYEOF'
import sys, torch, transformers, peft
device = sys.argv[1]
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| transformers", transformers.__version__,
      "| peft", peft.__version__)
if device.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("gpu_check: SEAL_GPU_CHECK_DEVICE=cuda but torch sees no CUDA device (CPU-only torch build?)")
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"{p.total_memory / 2**30:.0f} GiB", "| bf16:", torch.cuda.is_bf16_supported())
PYEOF

echo "== 1. device tests (SEAL_TEST_DEVICE=$DEVICE)"
SEAL_TEST_DEVICE=$DEVICE timeout 180 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" \
  tests/test_device.py 2>&1 | tee "$DEST/pytest.log"
echo "   ($(( $(date +%s) - start )) s so far)"

echo "== 2. paper setting: $CONFIG, $SEQ_LEN tokens, $DTYPE, gradient checkpointing, $VARIANTS"
timeout 420 "$PY" benchmarks/gpu_paper_setting.py --config "$CONFIG" --seq-len "$SEQ_LEN" --samples 50 \
  --variants "$VARIANTS" --steps 3 --warmup 1 --dtype "$DTYPE" --device "$DEVICE" --attn sdpa \
  --json "$DEST/paper_gpu.json" 2>&1 | tee "$DEST/paper_gpu.txt"
echo "== gpu_check done in $(( $(date +%s) - start )) s; records in $DEST"
