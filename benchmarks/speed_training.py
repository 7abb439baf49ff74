"""Training cost of SEAL vs LoRA (the paper's SEAL-L: r=4 on q, k, v, o) and PEFT's IA3.

One optimizer step = forward + loss + backward + AdamW step on one sample of N tokens whose only
supervised tokens are a short answer at the end (like every SEAL training sample). Every method
uses the loss the project trains SEAL with: ``SealDataCollator(trim_logits=True)`` +
``seal_loss`` (vocabulary logits only for the answer positions); ``+full`` variants compute the
logits of every position (``trim_logits=False``, same loss) for comparison.

Variants (comma-separated ``--variants``):

- ``forward``: the base model's plain forward, no gradients, logits for every position
  (``model(input_ids)``); ``forward-trim``: the same with the collator's ``logits_to_keep``.
- ``seal-h``, ``seal-c``, ``lora``, ``ia3``: one training step; suffix ``+full`` = untrimmed logits,
  ``+ckpt`` = gradient (activation) checkpointing, non-reentrant, as ``seal_training_arguments``.
- ``floor``: the training floor of any method that learns inside the network: the frozen model with
  ONE trainable scalar multiplying the embedding output (:func:`attach_floor_scalar`), so the
  gradient flows back through every layer and there are no adapter ops (``benchmarks/training_floor.py``
  compares SEAL with it).

Each (variant, length) runs in a fresh Python process (``--in-process`` runs them here, for tests):
it loads the model, measures the memory in use, then runs ``--warmup`` + ``--steps`` steps and
reports the median [min-max] step time and the peak memory above the loaded model (peak RSS on CPU:
the kernel's VmHWM reset through /proc/self/clear_refs; ``max_memory_allocated`` on CUDA), which
includes activations, gradients, optimizer state and allocator workspace.

    python benchmarks/speed_training.py --model smollm2 --dtype bfloat16 --lengths 1024,2048
    python benchmarks/speed_training.py --variants forward-trim,seal-h --lengths 512,1024,2048,4096  # scaling
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    LEARNING_RATE,
    PeakMemory,
    adapter_config,
    answer_sample,
    fmt_ms,
    load_benchmark_model,
    machine_info,
    markdown_table,
    parse_dtype,
    saved_for_backward_bytes,
    summarize,
    timed_steps,
    write_json,
)

DEFAULT_VARIANTS = "forward,forward-trim,seal-h,seal-c,lora,ia3,seal-h+full,lora+full"
FORWARDS = ("forward", "forward-trim")


def parse_variant(spec: str) -> tuple[str, set[str]]:
    kind, *mods = spec.split("+")
    known = FORWARDS + ("seal-h", "seal-c", "lora", "ia3", "floor")
    if kind not in known or any(m not in ("full", "ckpt") for m in mods):
        raise ValueError(f"bad variant {spec!r}: use one of {known} with optional +full / +ckpt")
    if kind in FORWARDS and mods:
        raise ValueError(f"bad variant {spec!r}: forward variants take no modifiers")
    return kind, set(mods)


def attach_floor_scalar(model: torch.nn.Module) -> torch.nn.Parameter:
    """Freeze ``model`` and multiply its input-embedding output by one trainable fp32 scalar (init 1).

    The scalar's gradient is the sum of (gradient at the embedding output) x (embedding output): the
    backward must run through every layer, as for any adapter in layer 0, but there is no adapter op
    and nothing extra to keep. Returns the scalar (registered on the embedding module as
    ``floor_scale``, so ``model.parameters()`` lists it).
    """
    model.requires_grad_(False)
    embed = model.get_input_embeddings()
    embed.floor_scale = torch.nn.Parameter(torch.ones((), dtype=torch.float32, device=embed.weight.device))

    def scale(module, args, output):
        return output * module.floor_scale.to(output.dtype)

    embed.register_forward_hook(scale)
    return embed.floor_scale


def enable_checkpointing(model: torch.nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class Variant:
    """A built benchmark variant: ``step()`` runs one step (a training step, or a no-grad forward).

    (A plain class, not a dataclass: the tests load this file without registering it in sys.modules.)
    """

    def __init__(self, spec, kind, mods, model, desc, inputs, labels, step, trainable=0, loss_fn=None,
                 optimizer=None, losses=None, load_s=0.0):  # fmt: skip
        self.spec, self.kind, self.mods, self.model, self.desc = spec, kind, mods, model, desc
        self.inputs, self.labels, self.step, self.trainable = inputs, labels, step, trainable
        self.loss_fn, self.optimizer, self.load_s = loss_fn, optimizer, load_s
        self.losses: list[float] = [] if losses is None else losses

    def saved_for_backward_mib(self) -> float | None:
        """MiB autograd keeps for one step's backward (None for forwards and checkpointed variants)."""
        if self.kind in FORWARDS or "ckpt" in self.mods:  # checkpointing hides its saved tensors
            return None
        saved_bytes, loss = saved_for_backward_bytes(
            self.model, lambda: self.loss_fn(self.model(**self.inputs), self.labels)
        )
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return round(saved_bytes / 2**20, 1)


def build_variant(spec: str, length: int, args: argparse.Namespace) -> Variant:
    """Load the model and build ``spec`` on one ``length``-token answer sample."""
    from peft import get_peft_model

    from seal_peft.training import SealDataCollator, seal_loss

    kind, mods = parse_variant(spec)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    model, desc = load_benchmark_model(args.model, parse_dtype(args.dtype), seed=args.seed)
    model.to(device)
    load_s = time.perf_counter() - t0
    sample = answer_sample(length, model.config.vocab_size, args.answer_tokens, seed=args.seed)
    trim = kind == "forward-trim" or (kind not in FORWARDS and "full" not in mods)
    batch = SealDataCollator(pad_token_id=0, trim_logits=trim)([sample])
    labels = batch.pop("labels").to(device)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    inputs["use_cache"] = False
    if kind in FORWARDS:
        model.eval()

        @torch.no_grad()
        def forward():
            return model(**inputs).logits.shape[-2]

        return Variant(spec, kind, mods, model, desc, inputs, labels, forward, load_s=load_s)
    if "ckpt" in mods:
        enable_checkpointing(model)
    if kind == "floor":
        attach_floor_scalar(model)
    else:
        model = get_peft_model(model, adapter_config(kind))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE.get(kind, 1e-3), weight_decay=0.0)
    loss_fn = seal_loss(model)
    losses: list[float] = []

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        out = model(**inputs)
        loss = loss_fn(out, labels)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        return out.logits.shape[-2]

    return Variant(
        spec, kind, mods, model, desc, inputs, labels, train_step,
        trainable=sum(p.numel() for p in params), loss_fn=loss_fn, optimizer=optimizer, losses=losses,
        load_s=load_s,
    )  # fmt: skip


def run_variant(spec: str, length: int, args: argparse.Namespace) -> dict:
    """Load the model, build ``spec``, time its steps and measure its peak memory (this process)."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    v = build_variant(spec, length, args)
    kind, desc, inputs, step = v.kind, v.desc, v.inputs, v.step
    trainable, losses, load_s = v.trainable, v.losses, v.load_s
    with PeakMemory(device) as mem:
        times = timed_steps(step, device, args.warmup, args.steps)
        peak = mem.peak_mib()
    saved = v.saved_for_backward_mib()
    profile = None
    if args.profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            step()
        profile = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile)
    result = {
        "variant": spec,
        "tokens": length,
        "model": desc,
        "dtype": args.dtype,
        "device": str(device),
        "logits_positions": inputs.get("logits_to_keep", length),
        "trainable_params": trainable,
        "step_s": summarize(times),
        "step_s_all": times,
        "peak_mib": round(peak, 1),
        "peak_exact": mem.exact,
        "saved_for_backward_mib": saved,
        "profile": profile,
        "load_s": round(load_s, 2),
    }
    if kind not in FORWARDS:
        result["loss"] = losses[-1]
        if not all(map(lambda x: x == x and abs(x) != float("inf"), losses)):
            raise RuntimeError(f"{spec}: non-finite loss {losses}")
    return result


def _worker_argv(args: argparse.Namespace, spec: str, length: int) -> list[str]:
    argv = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        spec,
        "--lengths",
        str(length),
        "--model",
        args.model,
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--answer-tokens",
        str(args.answer_tokens),
        "--seed",
        str(args.seed),
    ]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.profile:
        argv += ["--profile", str(args.profile)]
    return argv


def run_in_subprocess(args: argparse.Namespace, spec: str, length: int) -> dict:
    proc = subprocess.run(_worker_argv(args, spec, length), capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {spec}@{length} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _relative(r: dict, other: dict | None, key: str) -> str:
    if other is None:
        return "-"
    if key == "step_s":
        return f"{r['step_s']['median'] / other['step_s']['median']:.2f}"
    return f"{r['peak_mib'] / other['peak_mib']:.2f}" if other["peak_mib"] >= 1 else "-"


def ratio_rows(results: list[dict], lengths: list[int]) -> list[list]:
    """Per length: each step variant relative to the plain forwards and to LoRA with the same modifiers."""
    rows = []
    for n in lengths:
        at = {r["variant"]: r for r in results if r["tokens"] == n}
        for spec, r in at.items():
            kind, mods = parse_variant(spec)
            if kind in FORWARDS:
                continue
            suffix = "".join(f"+{m}" for m in sorted(mods))
            lora = at.get("lora" + suffix) if kind != "lora" else None
            rows.append(
                [
                    n,
                    spec,
                    _relative(r, at.get("forward"), "step_s"),
                    _relative(r, at.get("forward-trim"), "step_s"),
                    _relative(r, lora, "step_s"),
                    _relative(r, lora, "peak"),
                ]
            )
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (embedded), tiny (random), or an HF id/path")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--lengths", default="1024,2048")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--answer-tokens", type=int, default=16, help="supervised tokens at the end of the sample")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile", type=int, default=0, help="print the N most expensive ops of one step (torch.profiler)"
    )
    p.add_argument("--in-process", action="store_true", help="no subprocesses (tests; memory less exact)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    if args.worker:
        print("RESULT " + json.dumps(run_variant(args.worker, lengths[0], args)), flush=True)
        return {}
    specs = [s for s in args.variants.split(",") if s]
    for s in specs:
        parse_variant(s)
    if args.threads:
        torch.set_num_threads(args.threads)
    record: dict = {"args": vars(args), "machine": machine_info(torch.device(args.device)), "results": []}
    print(f"# SEAL training step cost  ({record['machine']})")
    for n in lengths:
        for spec in specs:
            r = run_variant(spec, n, args) if args.in_process else run_in_subprocess(args, spec, n)
            record["results"].append(r)
            print(
                f"  {spec:>14} @ {n:5d} tokens: step {fmt_ms(r['step_s'])} ms, peak +{r['peak_mib']:.0f} MiB",
                flush=True,
            )
            if r.get("profile"):
                print(f"torch.profiler, one step of {spec} @ {n} tokens:\n{r['profile']}", flush=True)
    res = record["results"]
    print(
        f"\n## {res[0]['model']}, {args.dtype}, {args.device}; times: median [min-max] of {args.steps} steps"
    )
    print(
        markdown_table(
            [
                "tokens",
                "variant",
                "logits for",
                "trainable",
                "step ms",
                "peak MiB",
                "saved for bwd MiB",
                "ms / 1K tokens",
            ],
            [
                [
                    r["tokens"],
                    r["variant"],
                    r["logits_positions"],
                    r["trainable_params"],
                    fmt_ms(r["step_s"]),
                    f"{r['peak_mib']:.0f}",
                    "-" if r.get("saved_for_backward_mib") is None else f"{r['saved_for_backward_mib']:.1f}",
                    f"{r['step_s']['median'] * 1e6 / r['tokens']:.0f}",
                ]
                for r in res
            ],
        )
    )
    rows = ratio_rows(res, lengths)
    if rows:
        print("\nratios (medians): step / forward (full logits), step / forward (trimmed logits), vs LoRA")
        print(
            markdown_table(
                ["tokens", "variant", "step/fwd", "step/fwd-trim", "step/LoRA step", "peak/LoRA peak"], rows
            )
        )
    record["ratios"] = rows
    write_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
