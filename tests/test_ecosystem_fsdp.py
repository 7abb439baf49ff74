"""SEAL under FSDP on CPU (gloo, 2 processes): FSDP1 with seal_peft's wrap policy and FSDP2.

accelerate runs FSDP only on accelerators: with ``ACCELERATE_USE_CPU=1`` the shipped fsdp.yaml
silently becomes DDP (see docs/distributed.md). These tests therefore shard with torch directly
(``FullyShardedDataParallel`` + :func:`seal_peft.distributed.fsdp_auto_wrap_policy`, and
``fully_shard`` through :func:`seal_peft.distributed.fsdp2_shard`) in ``tests/distributed_worker.py``
and compare with one process training on the same effective batch.

Tolerance: the sharded and the single run differ only in the order of fp32 reductions (each rank
sums its sample's gradient, then the ranks average, vs one sum over the batch of 2): a few ulp,
~1e-7 relative, of each gradient. AdamW's update depends on the gradient only through m/sqrt(v),
so such an error changes a step by ~1e-7 * lr; SGD (lr 10) by ~1e-7 * 10 * |grad|. After 3 steps on
scales of ~1 that is far below ``rtol=1e-6`` -- while a wrong reduction (one rank's gradient, no
reduction, or a sum instead of a mean under SGD) moves the scales by ~1e-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distributed_worker import PLAIN_SAVE_RUNS, RUNS, build_model, launch, single_in_process
from peft import PeftModel


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three runs (each trains every entry of RUNS): single process, FSDP1, FSDP2."""
    base = tmp_path_factory.mktemp("fsdp")
    single_in_process(base / "single")
    return {"single": base / "single", "fsdp1": launch("fsdp1", base / "fsdp1"),
            "fsdp2": launch("fsdp2", base / "fsdp2")}  # fmt: skip


def _record(path: Path, run: str, rank: int) -> dict:
    return json.loads((path / run / f"record-rank{rank}.json").read_text())


def _scales(path: Path, run: str, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(path / run / f"scales-rank{rank}.pt")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["fsdp1", "fsdp2"])
@pytest.mark.parametrize("run", [name for name, _, _ in RUNS])
def test_fsdp_two_processes_equal_single_process(runs, mode, run):
    single = _scales(runs["single"], run, 0)
    rank0, rank1 = _scales(runs[mode], run, 0), _scales(runs[mode], run, 1)
    assert single.keys() == rank0.keys() == rank1.keys() and len(single) == 2
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), f"{mode}: the gathered scales differ between ranks ({key})"
        assert (single[key] - 1).abs().max() > 5e-3, f"training did not move {key}"
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-6, atol=0)
    # the loss of the batch of 2 is the mean of the two ranks' losses (same answer length everywhere)
    losses = [_record(runs[mode], run, r)["losses"] for r in (0, 1)]
    expected = _record(runs["single"], run, 0)["losses"]
    got = [(a + b) / 2 for a, b in zip(*losses)]
    assert got == pytest.approx(expected, rel=1e-6)
    record = _record(runs[mode], run, 0)
    assert record["initial_all_ones"], "gathering before the first step returned wrong scales"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["fsdp1", "fsdp2"])
def test_adapter_saved_by_rank0_loads_in_one_process(runs, mode):
    for run, granularity, _ in RUNS:
        folder = runs[mode] / run / "adapter"
        assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json",
                                                           "adapter_model.safetensors"]  # fmt: skip
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["granularity"] == granularity
        # the same files as save_pretrained of the unsharded model writes
        assert config == json.loads((runs["single"] / run / "adapter" / "adapter_config.json").read_text())
        loaded = PeftModel.from_pretrained(build_model(), folder)
        got = {n: p.detach() for n, p in loaded.named_parameters() if "seal_scale" in n}
        gathered = _scales(runs[mode], run, 0)
        assert got.keys() == gathered.keys()
        for key in got:
            assert torch.equal(got[key], gathered[key]), key


@pytest.mark.timeout(600)
def test_fsdp1_policy_gives_the_scales_their_own_units(runs):
    """Every FSDP1 flat parameter is uniformly trainable or frozen; the trainable ones hold only scales."""
    # what PEFT's own policy does with a SEAL model (use_orig_params=False, accelerate's FSDP1 default)
    peft_policy = json.loads((runs["fsdp1"] / "peft_policy.json").read_text())
    assert "uniform `requires_grad`" in (peft_policy["error"] or ""), peft_policy
    # with use_orig_params=True PEFT's policy works, but the decoder layers' frozen weights get gradient
    # storage; SEAL's policy allocates gradients for the scales only (4 per layer, 2 per rank)
    numel = peft_policy["orig_params_grad_numel"]
    assert numel["seal"] == 2 * 2 and numel["peft"] > 1000 * numel["seal"], numel
    for run, granularity, _ in RUNS:
        units = _record(runs["fsdp1"], run, 0)["units"]
        trainable = [u for u in units if u["requires_grad"]]
        n_scales = 4 if granularity == "head" else 32  # 4 heads of 8 channels per layer
        assert [u["params"] for u in trainable] == [["seal_scale.default"]] * 2
        assert all(u["full_numel"] == n_scales and u["local_numel"] == n_scales // 2 for u in trainable)
        frozen = [u for u in units if not u["requires_grad"]]
        assert sum(u["module"] == "LlamaDecoderLayer" for u in frozen) == 2
        assert sum(u["params"] == ["weight"] for u in frozen) == 2  # the o_proj base layers
        assert all(not any("seal" in p for p in u["params"]) for u in frozen)
        assert _record(runs["fsdp1"], run, 0)["num_trainable"] == 2  # one flat parameter per SEAL unit


@pytest.mark.timeout(600)
def test_fsdp2_shards_the_scales_with_their_decoder_layer(runs):
    for run, granularity, _ in RUNS:
        units = _record(runs["fsdp2"], run, 0)["units"]
        layers = [u for u in units if u["module"] == "FSDPLlamaDecoderLayer"]
        assert len(layers) == 2 and len(units) == 3  # + the root
        n_scales = 4 if granularity == "head" else 32
        for unit in layers:
            scales = [p for p in unit["params"] if "seal_scale" in p["name"]]
            assert [p["name"] for p in scales] == ["self_attn.o_proj.seal_scale.default"]
            assert scales[0]["requires_grad"] and scales[0]["dtensor"]
            assert (scales[0]["full_numel"], scales[0]["local_numel"]) == (n_scales, n_scales // 2)
            assert not any(p["requires_grad"] for p in unit["params"] if "seal_scale" not in p["name"])


@pytest.mark.timeout(300)
def test_fsdp1_plain_save_pretrained_writes_the_trained_scales(tmp_path):
    """PEFT's own save_pretrained of an FSDP1 model with nested units (SEAL's policy, and PEFT's policy
    with use_orig_params=True as the Trainer builds it), fed the FULL_STATE_DICT accelerate gathers.

    PEFT 0.21 matched the scales by module names that carry '_fsdp_wrapped_module.' in the middle, and
    wrote an empty adapter without an error. A SHARDED_STATE_DICT must be refused, naming the way out.
    """
    out = launch("fsdp1_plain_save", tmp_path)
    for run, granularity, _, _ in PLAIN_SAVE_RUNS:
        records = [json.loads((out / run / f"plain-save-rank{r}.json").read_text()) for r in (0, 1)]
        assert records[0]["nested_names"] > 0  # the case PEFT's leading-prefix strip misses
        # rank0_only: the other rank got an empty state dict, saved nothing, and did not fail
        assert records[1]["full_state_keys"] == 0
        trained = torch.load(out / run / "scales-rank0.pt")
        assert len(trained) == 2 and all((v - 1).abs().max() > 5e-3 for v in trained.values())
        loaded = PeftModel.from_pretrained(build_model(), out / run / "adapter")
        assert loaded.peft_config["default"].granularity == granularity
        got = {n: p.detach() for n, p in loaded.named_parameters() if "seal_scale" in n}
        assert got.keys() == trained.keys()
        for key in got:
            assert torch.equal(got[key], trained[key]), key
        for record in records:
            assert "seal_peft.distributed.save_sharded_adapter" in (record["sharded_error"] or ""), record
        assert not (out / run / "sharded" / "adapter_model.safetensors").exists()
