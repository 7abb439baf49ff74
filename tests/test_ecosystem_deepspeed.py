"""SEAL under DeepSpeed ZeRO-2 on CPU (gloo, 2 processes) equals a single-process run.

``deepspeed`` is not in the test extra: it takes ~40 s to install and, on first use, ~4 min to JIT
compile its CPU communication op. ``bash scripts/deepspeed_cpu_check.sh`` installs it into a side
folder (the project's venv is left alone) and runs this file; without deepspeed the module is
skipped and says so. What ran where is recorded in docs/distributed.md.

accelerate + Trainer + DeepSpeed does not run on a CPU-only machine (accelerate counts one process,
DeepSpeed's batch check fails; with ACCELERATE_USE_CPU=1 it silently becomes DDP), so the worker calls
``deepspeed.initialize`` directly with the same optimizer as the single-process run. Tolerance: as
in tests/test_ecosystem_fsdp.py (only the order of fp32 reductions differs).
"""

from __future__ import annotations

import json

import pytest
import torch

deepspeed = pytest.importorskip(
    "deepspeed", reason="deepspeed is not installed; run `bash scripts/deepspeed_cpu_check.sh`"
)

from distributed_worker import RUNS, build_model, launch, single_in_process  # noqa: E402
from peft import PeftModel  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("zero2")
    single_in_process(base / "single")
    return {"single": base / "single", "zero2": launch("zero2", base / "zero2")}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("run", [name for name, _, _ in RUNS])
def test_zero2_two_processes_equal_single_process(runs, run):
    record = json.loads((runs["zero2"] / run / "record-rank0.json").read_text())
    assert record["engine"] == {"zero_stage": 2, "optimizer": "DeepSpeedZeroOptimizer"} and record["world"] == 2
    single = torch.load(runs["single"] / run / "scales-rank0.pt")
    rank0 = torch.load(runs["zero2"] / run / "scales-rank0.pt")
    rank1 = torch.load(runs["zero2"] / run / "scales-rank1.pt")
    assert single.keys() == rank0.keys() == rank1.keys() and len(single) == 2
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), f"the ranks diverged on {key}"
        assert (single[key] - 1).abs().max() > 5e-3, f"training did not move {key}"
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-6, atol=0)
    # the adapter saved by rank 0 (ZeRO-2 keeps full parameters on every rank) loads in one process
    loaded = PeftModel.from_pretrained(build_model(), runs["zero2"] / run / "adapter")
    for name, param in loaded.named_parameters():
        if "seal_scale" in name:
            assert torch.equal(param.detach(), rank0[name]), name
