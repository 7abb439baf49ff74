#!/usr/bin/env bash
# DeepSpeed ZeRO-2 on CPU (gloo, 2 processes) with SEAL: tests/test_ecosystem_deepspeed.py.
# deepspeed is not in the test extra (slow install + ~4 min JIT build of its CPU comm op on first use),
# so it is installed into a side folder ($SEAL_DS_DIR, default ~/.cache/seal-peft/deepspeed-cpu) without touching the
# venv's torch/transformers/peft (--no-deps; its remaining deps are small pure packages listed here).
set -euo pipefail
cd "$(dirname "$0")/.."
. "${SEAL_VENV:-.venv}/bin/activate"
DS_DIR=${SEAL_DS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/seal-peft/deepspeed-cpu}
if ! PYTHONPATH="$DS_DIR" python -c "import deepspeed" 2>/dev/null; then
  python -m pip install -q --disable-pip-version-check --no-deps --target "$DS_DIR" \
    "deepspeed==0.19.8" einops hjson msgpack ninja py-cpuinfo
fi
export PATH="$DS_DIR/bin:$PATH"   # ninja, for the JIT build
PYTHONPATH="$DS_DIR${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 \
  python -m pytest -q -p no:cacheprovider -rs tests/test_ecosystem_deepspeed.py "$@"
