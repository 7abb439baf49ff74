"""scripts/gpu_check.sh (the prepared GPU check) runs end to end on CPU at tiny shapes.

On a GPU it runs tests/test_device.py with SEAL_TEST_DEVICE=cuda and benchmarks/gpu_paper_setting.py
at the 7B / 31K-token shape; here the same script runs with the device, config and length swapped
for CPU-sized ones, so a broken path, flag or step shows up before a GPU is ever lent.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_gpu_check_script_runs_on_cpu_at_tiny_shapes(tmp_path):
    env = dict(
        os.environ,
        OUT=str(tmp_path),
        OMP_NUM_THREADS="1",
        SEAL_GPU_CHECK_DEVICE="cpu",
        SEAL_GPU_CHECK_CONFIG="tiny",
        SEAL_GPU_CHECK_SEQ_LEN="48",
        SEAL_GPU_CHECK_DTYPE="float32",
    )
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=280, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check done" in proc.stdout
    log = (tmp_path / "pytest.log").read_text()
    assert " passed" in log and "failed" not in log and "error" not in log.lower()
    record = json.loads((tmp_path / "paper_gpu.json").read_text())
    assert [r["variant"] for r in record["results"]] == ["seal-h", "seal-c"]
    assert record["args"]["grad_ckpt"] is True and record["args"]["samples"] == 50
    for r in record["results"]:
        assert r["extrapolated_total_s"] == pytest.approx(50 * r["step_s"]["median"])
    assert "| seal-h |" in (tmp_path / "paper_gpu.txt").read_text()


def test_gpu_check_script_refuses_a_missing_cuda_device(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")  # no GPU, even on a GPU machine
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert "torch sees no CUDA device" in proc.stderr + proc.stdout
