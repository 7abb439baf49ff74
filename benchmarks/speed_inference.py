"""Inference cost of SEAL: base model vs SEAL unmerged vs SEAL merged (``merge_and_unload``).

Prefill (one forward over N tokens, logits for the last position only, as ``generate`` does) and
per-token decoding (single-token steps on a KV cache after a prefill of ``--decode-context`` tokens).
The three models are timed interleaved: every repeat runs each variant once, in rotating order, so
drift of a shared machine hits all of them alike. Reported per variant: median [min-max] ms; per
ratio: the median [min-max] over repeats of the ratio *within* a repeat.

Before timing, the merged model is checked to be the base graph: no SEAL wrapper is left, every
module has exactly the base model's type (``o_proj`` is a plain ``nn.Linear``) and the parameter
count is the base's; its logits match the unmerged model's.

    python benchmarks/speed_inference.py --model smollm2 --dtype bfloat16 --lengths 512,2048,4096
    python benchmarks/speed_inference.py --model tiny --dtype float32 --lengths 512,2048,4096
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    fmt_ms,
    fmt_ratio,
    load_benchmark_model,
    machine_info,
    markdown_table,
    parse_dtype,
    randomize_seal_scales,
    summarize,
    timed,
    write_json,
)

VARIANTS = ("base", "base-copy", "unmerged", "merged")


def build_variants(
    base: torch.nn.Module, granularity: str, seed: int, spread: float = 0.2
) -> dict[str, torch.nn.Module]:
    """``{"base", "base-copy", "unmerged", "merged"}`` models sharing nothing (deep copies).

    ``base-copy`` is a deep copy of the base model: the control that shows how much two identical
    models differ only by where their weights lie in memory."""
    from peft import get_peft_model

    import seal_peft

    unmerged = get_peft_model(copy.deepcopy(base), seal_peft.SealConfig(granularity=granularity))
    randomize_seal_scales(unmerged, seed=seed, spread=spread)
    unmerged.eval()
    merged = copy.deepcopy(unmerged).merge_and_unload().eval()
    # PEFT freezes the base weights and merge_and_unload keeps them frozen. Freeze the base models too:
    # on some CPU builds a no-grad forward is measurably slower with frozen bf16 weights than with
    # trainable ones (see --trainable-control), which is not SEAL's doing.
    base.requires_grad_(False)
    return {"base": base, "base-copy": copy.deepcopy(base), "unmerged": unmerged, "merged": merged}


def check_merged_is_base_graph(base: torch.nn.Module, merged: torch.nn.Module) -> dict:
    """Assert that merging left no trace in the module tree; returns what was checked."""
    from seal_peft.tuner.layer import SealLayer

    base_types = [(n, type(m)) for n, m in base.named_modules()]
    merged_types = [(n, type(m)) for n, m in merged.named_modules()]
    assert not any(isinstance(m, SealLayer) for m in merged.modules()), (
        "a SEAL wrapper survived merge_and_unload"
    )
    assert merged_types == base_types, "merged model's module tree differs from the base model's"
    o_proj = [m for n, m in merged.named_modules() if n.endswith("o_proj")]
    assert o_proj and all(type(m) is torch.nn.Linear for m in o_proj), "o_proj is not a plain nn.Linear"
    n_base = sum(p.numel() for p in base.parameters())
    n_merged = sum(p.numel() for p in merged.parameters())
    assert n_base == n_merged, f"parameter count {n_merged} != base {n_base}"
    return {"o_proj_type": "torch.nn.Linear", "modules": len(base_types), "parameters": n_base}


@torch.no_grad()
def max_logit_diff(a: torch.nn.Module, b: torch.nn.Module, ids: torch.Tensor) -> float:
    return float((a(ids).logits.float() - b(ids).logits.float()).abs().max())


def bench_prefill(models, ids, repeats):
    times = {v: [] for v in models}
    ratios = {v: [] for v in models if v != "base"}

    @torch.no_grad()
    def run(model):
        model(ids, use_cache=False, logits_to_keep=1)

    for model in models.values():  # warm-up (oneDNN primitive creation, allocator)
        run(model)
    names = list(models)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        this = {v: timed(lambda m=models[v]: run(m)) for v in order}
        for v, t in this.items():
            times[v].append(t)
        for v in ratios:
            ratios[v].append(this[v] / this["base"])
    return times, ratios


def bench_decode(models, context_ids, tokens, repeats):
    times = {v: [] for v in models}
    ratios = {v: [] for v in models if v != "base"}
    step_ids = context_ids[:, -1:]

    # transformers >= 5.2x calls the KV cache `cache` (formerly `past_key_values`)
    key = "cache" if "cache" in inspect.signature(models["base"].forward).parameters else "past_key_values"

    @torch.no_grad()
    def decode(model):
        out = model(context_ids, use_cache=True, logits_to_keep=1)  # prefill: not timed
        kv = {key: out[key]}

        def steps():
            for _ in range(tokens):
                model(step_ids, use_cache=True, logits_to_keep=1, **kv)

        return timed(steps) / tokens

    for model in models.values():
        decode(model)
    names = list(models)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        this = {v: decode(models[v]) for v in order}
        for v, t in this.items():
            times[v].append(t)
        for v in ratios:
            ratios[v].append(this[v] / this["base"])
    return times, ratios


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (embedded), tiny (random), or an HF id/path")
    p.add_argument("--dtype", default="bfloat16", help="comma-separated: bfloat16,float32")
    p.add_argument("--granularity", default="head", choices=["head", "channel"])
    p.add_argument("--lengths", default="512,2048,4096", help="prefill lengths (tokens)")
    p.add_argument("--decode-context", type=int, default=512, help="tokens in the KV cache before decoding")
    p.add_argument("--decode-tokens", type=int, default=32, help="decoded tokens per timing (0: skip decode)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--scale-spread",
        type=float,
        default=0.2,
        help="SEAL scales = 1 + spread * N(0, 1); 0 = identity (the SEAL model then computes the base function)",
    )
    p.add_argument(
        "--flush-denormal",
        action="store_true",
        help="torch.set_flush_denormal(True): exclude value-dependent slow paths of subnormal floats",
    )
    p.add_argument(
        "--trainable-control",
        action="store_true",
        help="also time a copy of the base model whose weights have requires_grad=True",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the full record here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    record: dict = {"args": vars(args), "machine": machine_info(torch.device("cpu")), "results": []}
    print(f"# SEAL inference overhead  ({record['machine']})")
    for dtype_name in args.dtype.split(","):
        dtype = parse_dtype(dtype_name)
        base, desc = load_benchmark_model(args.model, dtype, seed=args.seed)
        models = build_variants(base, args.granularity, args.seed, args.scale_spread)
        if args.trainable_control:
            models["base-trainable"] = copy.deepcopy(models["base"]).requires_grad_(True)
        checks = check_merged_is_base_graph(models["base"], models["merged"])
        vocab = base.config.vocab_size
        g = torch.Generator().manual_seed(args.seed)
        probe = torch.randint(0, vocab, (1, 64), generator=g)
        checks["max_abs_logit_diff_merged_vs_unmerged"] = max_logit_diff(
            models["merged"], models["unmerged"], probe
        )
        checks["max_abs_logit_diff_merged_vs_base"] = max_logit_diff(models["merged"], models["base"], probe)
        print(f"\n## {desc}, {dtype_name}, SEAL-{args.granularity[0].upper()}; checks: {checks}")
        rows = []
        for n in lengths:
            ids = torch.randint(0, vocab, (1, n), generator=g)
            times, ratios = bench_prefill(models, ids, args.repeats)
            rows.append(("prefill", n, times, ratios))
        if args.decode_tokens > 0:
            ctx = torch.randint(0, vocab, (1, args.decode_context), generator=g)
            times, ratios = bench_decode(models, ctx, args.decode_tokens, args.repeats)
            rows.append(("decode/token", args.decode_context, times, ratios))
        table = []
        for phase, n, times, ratios in rows:
            stats = {v: summarize(t) for v, t in times.items()}
            rstats = {v: summarize(r) for v, r in ratios.items()}
            names = list(times)
            table.append(
                [phase, n] + [fmt_ms(stats[v]) for v in names] + [fmt_ratio(rstats[v]) for v in names[1:]]
            )
            record["results"].append(
                {
                    "model": args.model,
                    "dtype": dtype_name,
                    "phase": phase,
                    "tokens": n,
                    "seconds": stats,
                    "seconds_all": times,
                    "ratio_vs_base": rstats,
                }
            )
        record.setdefault("checks", {})[dtype_name] = checks
        print(
            markdown_table(
                ["phase", "tokens"] + [f"{v} ms" for v in models] + [f"{v}/base" for v in list(models)[1:]],
                table,
            )
        )
        del models, base
    write_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
