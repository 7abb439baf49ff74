"""SEAL's training step against the training floor: the frozen model with ONE trainable scalar.

Every method that learns something inside the network pays the frozen network's activation backward.
The floor is that cost alone: the same model, frozen, with one trainable fp32 scalar multiplying the
embedding output (``speed_training.attach_floor_scalar``), so the gradient flows back through every
layer and there are no adapter ops. SEAL-H and SEAL-C are measured against it with the project's
loss (``SealDataCollator(trim_logits=True)`` + ``seal_loss``: vocabulary logits only for the
answer positions), AdamW, one sample, ``use_cache=False``; the ``+ckpt`` group repeats this with
non-reentrant gradient checkpointing against the checkpointed floor.

Method:

- **time**: per (length, group) ONE fresh process builds the group's models (``floor``, ``seal-h``,
  ``seal-c``, or their ``+ckpt`` versions; separate copies), warms each up with one step, then runs
  ``--rounds`` rounds of one step per variant in rotating order. A shared machine's drift thus hits
  all variants of a round alike; the ratio is the median [min-max] of the per-round ratios. The
  process CPU time of each step is recorded too (``time.process_time``): on a shared machine it does
  not count the time the process waits for a core, so with one thread it is the steadier measure.
- **peak memory**: every variant alone in a fresh process (``speed_training.py --worker``, one step,
  no warm-up): the peak resident set size of that step above the loaded model (the kernel's VmHWM,
  reset through /proc/self/clear_refs after loading; ``resource.getrusage`` maxrss where that is
  impossible, marked inexact), so it includes activations, gradients, optimizer state and
  allocator workspace. CUDA: ``torch.cuda.max_memory_allocated``.
- **saved for backward**: the distinct storages autograd packs during the forward (parameters
  excluded; a deterministic count of what the backward keeps, not available under checkpointing).
- ``--profile N``: torch.profiler over one step of each variant; prints the ops whose self time
  differs most from the floor's (where SEAL costs more or less).

    python benchmarks/training_floor.py --model smollm2 --dtype float32 --lengths 1024,2048,4096 \\
        --rounds 3 --threads 2 --json results/benchmarks/training_floor.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt_ms, fmt_ratio, machine_info, markdown_table, summarize, timed, write_json  # noqa: E402

GROUPS = {"plain": ("floor", "seal-h", "seal-c"), "ckpt": ("floor+ckpt", "seal-h+ckpt", "seal-c+ckpt")}


def _speed_training():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "speed_training.py")
    spec = importlib.util.spec_from_file_location("speed_training_for_floor", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _profile_ops(step) -> dict[str, dict[str, float]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return {
        e.key: {"self_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
        for e in prof.key_averages()
        if e.self_cpu_time_total >= 1000  # >= 1 ms of self time: keeps the record small
    }


def scale_input_sharing(model: torch.nn.Module, forward) -> dict[str, int]:
    """How many SEAL scale ops keep an ``o_proj`` input that attention's backward keeps anyway.

    Runs ``forward()`` (which must return a tensor that requires grad), walks its autograd graph and
    compares storages: the input saved by each SEAL multiply (``MulBackward0`` whose other factor is
    a scale vector) against every attention backward's saved tensors. Returns ``{"scale_ops": n,
    "shared_with_attention": m}``: with SDPA on CPU, ``m = n - 1`` (layer 0's attention needs no
    backward, so its saved input is SEAL's own).
    """
    out = forward()
    seen, stack, nodes = set(), [out.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(f for f, _ in node.next_functions)

    def saved(node) -> list[torch.Tensor]:
        tensors = []
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    value = getattr(node, name)
                except Exception:  # noqa: BLE001 - some saved slots raise once freed / are not tensors
                    continue
                if torch.is_tensor(value):
                    tensors.append(value)
        return tensors

    attention = {
        t.untyped_storage().data_ptr()
        for node in nodes
        if "attention" in node.name().lower()
        for t in saved(node)
    }
    scales = {id(p) for n, p in model.named_parameters() if "seal_scale" in n}

    def is_scale(node, hops: int = 6) -> bool:
        """``node`` is a SEAL scale's AccumulateGrad, or a chain of one-input ops (repeat_interleave,
        casts, views) ending in one."""
        while node is not None and hops > 0:
            if id(getattr(node, "variable", None)) in scales:
                return True
            inputs = [f for f, _ in node.next_functions if f is not None]
            if len(inputs) != 1:
                return False
            node, hops = inputs[0], hops - 1
        return False

    scale_inputs = []
    for node in nodes:
        # x * s: the scale is the second factor
        if (
            node.name() == "MulBackward0"
            and len(node.next_functions) == 2
            and is_scale(node.next_functions[1][0])
        ):
            this = getattr(node, "_saved_self", None)  # the activation (the scale's gradient needs it)
            if torch.is_tensor(this) and this.dim() >= 2:
                scale_inputs.append(this.untyped_storage().data_ptr())
    return {
        "scale_ops": len(scale_inputs),
        "shared_with_attention": sum(p in attention for p in scale_inputs),
    }


def time_group(specs: list[str], length: int, args: argparse.Namespace) -> dict[str, Any]:
    """Build every variant of ``specs`` here, warm each up, then time ``--rounds`` rotating rounds."""
    st = _speed_training()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants = {s: st.build_variant(s, length, args) for s in specs}
    for v in variants.values():
        v.step()  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {s: [] for s in specs}
    cpu: dict[str, list[float]] = {s: [] for s in specs}  # process CPU time: blind to preemption
    sys_s: dict[str, list[float]] = {s: [] for s in specs}
    faults: dict[str, list[int]] = {s: [] for s in specs}
    for r in range(args.rounds):
        order = specs[r % len(specs) :] + specs[: r % len(specs)]
        for s in order:
            cpu0, r0 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
            times[s].append(timed(variants[s].step, device))
            cpu[s].append(time.process_time() - cpu0)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            sys_s[s].append(r1.ru_stime - r0.ru_stime)  # kernel time: page faults of fresh allocations
            faults[s].append(r1.ru_minflt - r0.ru_minflt)
    result: dict[str, Any] = {
        "times": times,
        "cpu_times": cpu,
        "sys_times": sys_s,
        "minor_faults": faults,
        "saved_for_backward_mib": {s: v.saved_for_backward_mib() for s, v in variants.items()},
        "trainable": {s: v.trainable for s, v in variants.items()},
        "logits_positions": {s: v.inputs.get("logits_to_keep", length) for s, v in variants.items()},
        "loss": {s: v.losses[-1] for s, v in variants.items()},
        "model": next(iter(variants.values())).desc,
    }
    if args.profile:
        result["profile_ops"] = {s: _profile_ops(v.step) for s, v in variants.items()}
    return result


def _worker_args(args: argparse.Namespace, extra: list[str]) -> list[str]:
    argv = [
        "--model", args.model, "--dtype", args.dtype, "--device", args.device,
        "--answer-tokens", str(args.answer_tokens), "--seed", str(args.seed),
    ]  # fmt: skip
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv + extra


def _run(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {argv[1:]} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def peak_memory(spec: str, length: int, args: argparse.Namespace) -> dict:
    """One step of ``spec`` alone in a fresh process (speed_training.py's worker): its peak memory."""
    if args.in_process:
        st = _speed_training()
        ns = argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 0, "profile": 0})
        return st.run_variant(spec, length, ns)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "speed_training.py")
    extra = ["--worker", spec, "--lengths", str(length), "--steps", "1", "--warmup", "0"]
    return _run([path, *_worker_args(args, extra)])


def timing(specs: list[str], length: int, args: argparse.Namespace) -> dict:
    if args.in_process:
        return time_group(specs, length, args)
    extra = ["--worker-time", ",".join(specs), "--lengths", str(length), "--rounds", str(args.rounds)]
    if args.profile:
        extra += ["--profile", str(args.profile)]
    return _run([os.path.abspath(__file__), *_worker_args(args, extra)])


def profile_diff(ops: dict[str, dict[str, dict[str, float]]], floor: str, spec: str, n: int) -> list[list]:
    """The ``n`` ops whose self time differs most between ``spec`` and ``floor`` (ms, calls)."""
    a, b = ops[spec], ops[floor]
    keys = sorted(
        set(a) | set(b), key=lambda k: -abs(a.get(k, {}).get("self_ms", 0) - b.get(k, {}).get("self_ms", 0))
    )
    rows = []
    for k in keys[:n]:
        x, y = a.get(k, {"self_ms": 0.0, "calls": 0}), b.get(k, {"self_ms": 0.0, "calls": 0})
        rows.append([k, f"{y['self_ms']:.1f} ({y['calls']})", f"{x['self_ms']:.1f} ({x['calls']})",
                     f"{x['self_ms'] - y['self_ms']:+.1f}"])  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (embedded), tiny (random), or an HF id/path")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--groups", default="plain,ckpt", help="plain (no checkpointing) and/or ckpt")
    p.add_argument("--rounds", type=int, default=3, help="timed rotating rounds (one step per variant)")
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", type=int, default=0, help="show the N ops that differ most from the floor")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory processes")
    p.add_argument("--in-process", action="store_true", help="no subprocesses (tests; memory less exact)")
    p.add_argument("--worker-time", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    if args.worker_time:
        print("RESULT " + json.dumps(time_group(args.worker_time.split(","), lengths[0], args)), flush=True)
        return {}
    groups = [g for g in args.groups.split(",") if g]
    for g in groups:
        if g not in GROUPS:
            p.error(f"unknown group {g!r}; use plain and/or ckpt")
    if args.threads:
        torch.set_num_threads(args.threads)
    record: dict[str, Any] = {
        "args": vars(args),
        "machine": machine_info(torch.device(args.device)),
        "rows": [],
    }
    print(f"# SEAL training step vs the floor ({record['machine']})", flush=True)
    t_start = time.perf_counter()
    for n in lengths:
        for g in groups:
            specs = list(GROUPS[g])
            floor = specs[0]
            t = timing(specs, n, args)
            record.setdefault("model", t["model"])
            mem = {} if args.no_memory else {s: peak_memory(s, n, args) for s in specs}
            for s in specs:
                row = {
                    "tokens": n,
                    "variant": s,
                    "trainable_params": t["trainable"][s],
                    "logits_positions": t["logits_positions"][s],
                    "step_s": summarize(t["times"][s]),
                    "step_s_all": t["times"][s],
                    "step_vs_floor": summarize([a / b for a, b in zip(t["times"][s], t["times"][floor])]),
                    "cpu_step_s": summarize(t["cpu_times"][s]),
                    "sys_step_s": summarize(t["sys_times"][s]),
                    "minor_faults_per_step": summarize(t["minor_faults"][s]),
                    "cpu_step_vs_floor": summarize(
                        [a / b for a, b in zip(t["cpu_times"][s], t["cpu_times"][floor])]
                    ),
                    "saved_for_backward_mib": t["saved_for_backward_mib"][s],
                    "loss": t["loss"][s],
                }
                if mem:
                    row["peak_mib"] = mem[s]["peak_mib"]
                    row["peak_exact"] = mem[s]["peak_exact"]
                    row["peak_vs_floor"] = (
                        mem[s]["peak_mib"] / mem[floor]["peak_mib"] if mem[floor]["peak_mib"] > 0 else None
                    )
                saved, saved_floor = row["saved_for_backward_mib"], t["saved_for_backward_mib"][floor]
                row["saved_vs_floor"] = saved / saved_floor if saved is not None and saved_floor else None
                record["rows"].append(row)
                print(
                    f"  {s:>12} @ {n:5d}: step {fmt_ms(row['step_s'])} ms, / floor {fmt_ratio(row['step_vs_floor'])}"
                    f"; CPU time / floor {fmt_ratio(row['cpu_step_vs_floor'])} (kernel "
                    f"{row['sys_step_s']['median']:.1f} s, {row['minor_faults_per_step']['median']:.0f} page faults)"
                    + (f", peak +{row['peak_mib']:.0f} MiB" if mem else ""),
                    flush=True,
                )
            if args.profile and "profile_ops" in t:
                for s in specs[1:]:
                    print(f"\ntorch.profiler, one step @ {n} tokens, ops that differ most: {floor} vs {s}")
                    print(markdown_table(["op", f"{floor} ms (calls)", f"{s} ms (calls)", "diff ms"],
                                         profile_diff(t["profile_ops"], floor, s, args.profile)))  # fmt: skip
                record.setdefault("profiles", {})[f"{n}/{g}"] = t["profile_ops"]
    record["wall_s"] = round(time.perf_counter() - t_start, 1)

    def ratio(r: dict, key: str) -> str:
        v = r.get(key)
        return "-" if v is None else f"{v:.3f}"

    print(
        f"\n## {record.get('model')}, {args.dtype}, {args.device}; {args.rounds} rotating rounds per length"
    )
    print(
        markdown_table(
            ["tokens", "variant", "trainable", "step ms", "step / floor", "CPU s / floor", "peak MiB",
             "peak / floor", "saved for bwd MiB", "saved / floor"],
            [
                [r["tokens"], r["variant"], r["trainable_params"], fmt_ms(r["step_s"]), fmt_ratio(r["step_vs_floor"]),
                 fmt_ratio(r["cpu_step_vs_floor"]),
                 "-" if "peak_mib" not in r else f"{r['peak_mib']:.0f}", ratio(r, "peak_vs_floor"),
                 "-" if r["saved_for_backward_mib"] is None else f"{r['saved_for_backward_mib']:.1f}",
                 ratio(r, "saved_vs_floor")]
                for r in record["rows"]
            ],
        )
    )  # fmt: skip
    print("goals: step / floor <= 1.03, peak / floor <= 1.10")
    write_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
