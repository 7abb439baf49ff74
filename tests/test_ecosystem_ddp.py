"""The SEAL training example under DDP (2 CPU processes, gloo) equals a single-process run.

`accelerate launch --config_file configs/accelerate/ddp.yaml` (multi-GPU DDP) with
``ACCELERATE_USE_CPU=1`` starts two torchrun workers on CPU; the Trainer then wraps the model in DDP over gloo. (A bare
``accelerate launch --cpu --num_processes 2`` starts *one* process unless an mpirun hostfile is
given; see docs/distributed.md.)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_ecosystem_common import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_line_retrieval.py"
COMMON = ["--train-samples", "8", "--length", "512", "--prompt-format", "plain", "--eval-samples", "0",
          "--no-merge", "--seed", "3"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.mark.timeout(600)
def test_ddp_two_cpu_processes_equal_single_process(tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert accelerate, "accelerate's CLI is not installed"
    model = tiny_checkpoint(tmp_path / "tiny")
    env = _env()
    ddp_env = dict(env, ACCELERATE_USE_CPU="1")
    _run(
        # the shipped multi-GPU DDP config, run on CPU (fp32 for an exact comparison)
        [accelerate, "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "ddp.yaml"),
         "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
         str(EXAMPLE), "--model", str(model), *COMMON, "--save-rank-scales", "--out", str(tmp_path / "ddp")],
        ddp_env,
    )
    # 2 processes x batch 1 = effective batch 2: compare with one process accumulating 2 batches of 1
    _run([sys.executable, str(EXAMPLE), "--model", str(model), *COMMON, "--grad-accum", "2",
          "--out", str(tmp_path / "single")], env)

    rank0 = torch.load(tmp_path / "ddp" / "scales-rank0.pt")
    rank1 = torch.load(tmp_path / "ddp" / "scales-rank1.pt")
    assert rank0.keys() == rank1.keys() and len(rank0) == 2
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks diverged on {key}"
    ddp = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    single = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    assert ddp.keys() == single.keys()
    for key in ddp:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-5)
        assert (ddp[key] - 1).abs().max() > 1e-3, "training did not move the scales"
    assert not (tmp_path / "ddp" / "scales-rank2.pt").exists()


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_shipped_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}
    assert config.distributed_type.value == expected[name] and config.num_processes == 2
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
