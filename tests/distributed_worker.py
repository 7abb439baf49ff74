"""Worker for tests/test_ecosystem_fsdp.py: 3 SEAL training steps on a tiny Llama, sharded or not.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py --mode fsdp2 --out DIR
    (modes fsdp1, fsdp2; zero2 = DeepSpeed ZeRO-2, if deepspeed is importable; fsdp1_plain_save =
    PEFT's own save_pretrained of an FSDP1 model, see run_plain_save)
    python tests/distributed_worker.py --mode single --out DIR        # or run_single() in-process

Every mode trains SEAL-H and SEAL-C (AdamW, the recipe) and SEAL-H with SGD from the same base
model on the same 6 samples (3 steps of an effective batch of 2): ``single`` = one process, batch 2; ``fsdp1`` / ``fsdp2`` = 2 processes (gloo,
CPU), batch 1 each, sharded with :mod:`seal_peft.distributed`; ``zero2`` = 2 processes under
``deepspeed.initialize`` with ZeRO stage 2. All samples have the same length and
the same number of answer tokens, so the per-rank token mean averaged over ranks (what FSDP's
gradient reduction computes) equals the token mean over the whole batch of the single process.
Writes ``DIR/<run>/adapter`` (saved by rank 0), ``DIR/<run>/record-rank<r>.json`` (losses,
gathered scales, FSDP unit layout) and, for fsdp1, what PEFT's own wrap policy did.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import seal_peft  # noqa: E402
from seal_peft.distributed import (  # noqa: E402
    fsdp2_shard,
    fsdp_auto_wrap_policy,
    full_adapter_state_dict,
    save_sharded_adapter,
)
from seal_peft.training import DEFAULT_LR, SealDataCollator, seal_loss  # noqa: E402

#: (name, granularity, optimizer): the recipe's AdamW for SEAL-H and SEAL-C, plus plain SGD, whose
#: update is proportional to the gradient (AdamW's is not: it would hide a summed-instead-of-averaged
#: gradient across ranks)
RUNS = (("head", "head", "adamw"), ("channel", "channel", "adamw"), ("head-sgd", "head", "sgd"))
SGD_LR = 10.0
#: what deepspeed.initialize built in the last zero2 run (recorded for the test)
ENGINE_INFO: dict = {}
STEPS, WORLD, LENGTH, ANSWER = 3, 2, 48, 4


def build_model(seed: int = 0):
    """The tiny base model (2 layers, 4 query heads of 8, 2 KV heads), identical in every process."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def samples() -> list[dict]:
    """STEPS * WORLD samples of LENGTH tokens; the last ANSWER tokens are supervised."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS * WORLD):
        ids = torch.randint(2, 96, (LENGTH,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (LENGTH - ANSWER) + ids[-ANSWER:]})
    return out


def peft_model(granularity: str):
    from peft import get_peft_model

    return get_peft_model(build_model(), seal_peft.SealConfig(granularity=granularity))


def train(
    model, scale_params, granularity: str, rank: int, world: int, optimizer: str = "adamw", zero_stage: int = 0
) -> list[float]:
    """STEPS optimizer steps; this process takes samples ``rank::world`` of each step's batch of WORLD.

    ``zero_stage > 0``: the same optimizer handed to ``deepspeed.initialize`` (ZeRO partitions its state
    and the gradients; the engine averages the gradients over the ranks).
    """
    collate = SealDataCollator(pad_token_id=0, trim_logits=True)
    loss_fn = seal_loss(model)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(scale_params, lr=DEFAULT_LR[granularity], weight_decay=0.0)
    else:
        opt = torch.optim.SGD(scale_params, lr=SGD_LR)
    engine = None
    if zero_stage:
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        ENGINE_INFO.update(zero_stage=engine.zero_optimization_stage(), optimizer=type(opt).__name__)
    data, losses = samples(), []
    model.train()
    for step in range(STEPS):
        batch = collate(data[step * WORLD : (step + 1) * WORLD][rank::world])
        labels = batch.pop("labels")
        loss = loss_fn((engine or model)(**batch, use_cache=False), labels)
        if engine is not None:
            engine.backward(loss)
            engine.step()  # steps the optimizer and zeroes the gradients
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _fsdp1_units(model) -> list[dict]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units = []
    for unit in FSDP.fsdp_modules(model):
        flat = unit._flat_param
        if flat is None:
            continue
        units.append(
            {
                "module": type(unit.module).__name__,
                "params": list(flat._fqns),
                "requires_grad": bool(flat.requires_grad),
                "local_numel": flat.numel(),
                "full_numel": int(sum(flat._numels)),
            }
        )
    return units


def _owned(module, is_unit) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters of ``module`` that no nested unit (``is_unit``) owns."""
    out = []

    def walk(m, prefix):
        out.extend((prefix + n, p) for n, p in m.named_parameters(recurse=False))
        for child_name, child in m.named_children():
            if not is_unit(child):
                walk(child, f"{prefix}{child_name}.")

    walk(module, "")
    return out


def _fsdp2_units(model) -> list[dict]:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    units = []
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        params = [
            {
                "name": name,
                "requires_grad": p.requires_grad,
                "dtensor": isinstance(p, DTensor),
                "local_numel": p.to_local().numel() if isinstance(p, DTensor) else p.numel(),
                "full_numel": p.numel(),
            }
            for name, p in _owned(module, lambda m: isinstance(m, FSDPModule))
        ]
        units.append({"module": type(module).__name__, "params": params})
    return units


def peft_policy_error() -> str | None:
    """What FSDP1 says to a SEAL model wrapped with PEFT's own policy (use_orig_params=False)."""
    from peft.utils.other import fsdp_auto_wrap_policy as peft_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = peft_model("head")
    try:
        FSDP(model, auto_wrap_policy=peft_policy(model), use_orig_params=False, device_id=torch.device("cpu"))
    except ValueError as err:
        return str(err)
    return None


def orig_params_gradient_numel(policy_name: str) -> int:
    """FSDP1 with ``use_orig_params=True``: the flat-parameter gradient elements on this rank after
    one backward. A flat parameter that mixes frozen and trainable tensors gets a gradient for all."""
    from peft.utils.other import fsdp_auto_wrap_policy as peft_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = peft_model("head")
    policy = (peft_policy if policy_name == "peft" else fsdp_auto_wrap_policy)(model)
    model = FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
    ids = torch.tensor([list(range(2, 18))])
    model(input_ids=ids, labels=ids).loss.backward()
    flats = [u._flat_param for u in FSDP.fsdp_modules(model) if u._flat_param is not None]
    return sum(f.grad.numel() for f in flats if f.grad is not None)


def run_distributed(mode: str, out: str) -> None:
    import torch.distributed as dist

    if mode == "zero2":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == WORLD, f"run with --nproc_per_node {WORLD}"
    if mode == "fsdp1":  # PEFT's policy vs SEAL's (collectives: every rank takes part)
        record = {
            "error": peft_policy_error(),
            "orig_params_grad_numel": {p: orig_params_gradient_numel(p) for p in ("peft", "seal")},
        }
        if rank == 0:
            with open(os.path.join(out, "peft_policy.json"), "w") as f:
                json.dump(record, f)
    for name, granularity, optimizer in RUNS:
        model = peft_model(granularity)
        if mode == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            model = FSDP(
                model,
                auto_wrap_policy=fsdp_auto_wrap_policy(model),
                use_orig_params=False,
                device_id=torch.device("cpu"),
            )
            units = _fsdp1_units(model)
        elif mode == "fsdp2":
            model = fsdp2_shard(model)
            units = _fsdp2_units(model)
        elif mode == "zero2":
            units = []  # ZeRO-2 partitions gradients and optimizer state, not the module
        else:
            raise ValueError(f"mode {mode!r}")
        # gathering before the first forward must not disturb FSDP's lazy initialisation
        initial = full_adapter_state_dict(model)
        params = [p for p in model.parameters() if p.requires_grad]
        losses = train(model, params, granularity, rank, world, optimizer, zero_stage=2 if mode == "zero2" else 0)
        path = os.path.join(out, name)
        save_sharded_adapter(model, os.path.join(path, "adapter"))
        scales = full_adapter_state_dict(model)  # every rank gets the full scales
        torch.save(scales, os.path.join(path, f"scales-rank{rank}.pt"))
        record = {
            "losses": losses,
            "units": units,
            "world": world,
            "initial_all_ones": all(bool((v == 1).all()) for v in initial.values()),
            "num_trainable": len(params),
            "engine": dict(ENGINE_INFO),
        }
        with open(os.path.join(path, f"record-rank{rank}.json"), "w") as f:
            json.dump(record, f)
        dist.barrier()
    dist.destroy_process_group()


#: (name, granularity, wrap policy, use_orig_params) of the plain-save runs: SEAL's FSDP1 setup, and the
#: one the Trainer builds for FSDP1 (PEFT's policy, which needs use_orig_params=True for SEAL)
PLAIN_SAVE_RUNS = (("seal-policy", "channel", "seal", False), ("peft-policy", "head", "peft", True))


def run_plain_save(out: str) -> None:
    """FSDP1 (nested units), then PEFT's own ``save_pretrained`` as accelerate / the Trainer call it.

    Every rank gathers the FULL_STATE_DICT accelerate's ``get_state_dict`` builds for FSDP1
    (``rank0_only=True``: the other ranks get an empty dict) and calls ``save_pretrained(...,
    is_main_process=rank == 0)`` (accelerate's documented pattern; rank 0's call is the Trainer's).
    Then the same with a SHARDED_STATE_DICT, which must be refused. Writes ``DIR/<run>/adapter``,
    ``scales-rank<r>.pt`` (the trained scales, gathered) and ``plain-save-rank<r>.json``.
    """
    import torch.distributed as dist
    from peft.utils.other import fsdp_auto_wrap_policy as peft_policy
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for name, granularity, policy, orig_params in PLAIN_SAVE_RUNS:
        path = os.path.join(out, name)
        os.makedirs(path, exist_ok=True)
        model = peft_model(granularity)
        wrap = (fsdp_auto_wrap_policy if policy == "seal" else peft_policy)(model)
        model = FSDP(model, auto_wrap_policy=wrap, use_orig_params=orig_params, device_id=torch.device("cpu"))
        nested = [n for n, _ in model.module.named_modules() if "._fsdp_wrapped_module." in n]
        train(model, [p for p in model.parameters() if p.requires_grad], granularity, rank, world)
        torch.save(full_adapter_state_dict(model), os.path.join(path, f"scales-rank{rank}.pt"))
        # accelerate also sets offload_to_cpu=True; on CPU that "offload" aliases the unsharded flat parameter
        # and FSDP then frees its storage ("setStorage ... out of bounds"), so it is left off here
        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
            state = model.state_dict()
        main = rank == 0
        model.module.save_pretrained(os.path.join(path, "adapter"), state_dict=state, is_main_process=main)
        with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
            sharded = model.state_dict()
        try:
            model.module.save_pretrained(os.path.join(path, "sharded"), state_dict=sharded, is_main_process=main)
            error = None
        except ValueError as err:
            error = str(err)
        with open(os.path.join(path, f"plain-save-rank{rank}.json"), "w") as f:
            json.dump({"nested_names": len(nested), "full_state_keys": len(state), "sharded_error": error}, f)
        dist.barrier()
    dist.destroy_process_group()


def run_single(out: str) -> None:
    for name, granularity, optimizer in RUNS:
        model = peft_model(granularity)
        params = [p for p in model.parameters() if p.requires_grad]
        losses = train(model, params, granularity, rank=0, world=1, optimizer=optimizer)
        path = os.path.join(out, name)
        save_sharded_adapter(model, os.path.join(path, "adapter"))  # not distributed: a plain save
        scales = {n: p.detach().clone() for n, p in model.named_parameters() if "seal_scale" in n}
        torch.save(scales, os.path.join(path, "scales-rank0.pt"))
        with open(os.path.join(path, "record-rank0.json"), "w") as f:
            json.dump({"losses": losses, "units": [], "world": 1, "num_trainable": len(params)}, f)


def launch(mode: str, out, extra_pythonpath: str = ""):
    """Run this worker on WORLD processes (torchrun, gloo) from a test; return ``out``."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, extra_pythonpath, env.get("PYTHONPATH", "")] if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
           "--master_port", str(port), os.path.abspath(__file__), "--mode", mode, "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


def single_in_process(out) -> None:
    """``run_single`` in the calling process with one thread (the workers' kernels and rounding)."""
    for name, _, _ in RUNS:
        os.makedirs(os.path.join(out, name), exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_single(str(out))
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", required=True, choices=["single", "fsdp1", "fsdp2", "zero2", "fsdp1_plain_save"])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    for name, _, _ in RUNS:
        os.makedirs(os.path.join(args.out, name), exist_ok=True)
    if args.mode == "single":
        run_single(args.out)
    elif args.mode == "fsdp1_plain_save":
        run_plain_save(args.out)
    else:
        run_distributed(args.mode, args.out)


if __name__ == "__main__":
    main()
