"""Evaluation throughput: where an evaluation's time goes, and how close it comes to the prefill floor.

The floor is reading each prompt once: ``model(input_ids, logits_to_keep=1)`` per prompt under
``torch.inference_mode()``. Against it, on the same line-retrieval records (one fresh model, all
variants interleaved in rotating order, so a shared machine's drift hits every variant alike):

- ``evaluator``: :func:`seal_peft.evaluation.generate_answers` as shipped (batch 1, KV room reserved);
- ``loop-concat``: the same loop with transformers' concatenating ``DynamicCache`` (the loop before
  this benchmark; every decode step copies every layer's cache);
- ``generate``: the same answers through ``model.generate`` with a stopping criterion
  (:func:`seal_peft.evaluation.hf_generate.generate_answers_hf`);
- ``batched``: ``generate_answers(batch_size=--batch-size)`` (left padded; only with ``--batch-size``).

Every variant's answers are compared with the evaluator's (printed; tokens must be identical for the
batch-1 variants, the batched one may differ where padding changes the rounding). One instrumented
evaluator run then splits the time into prefill forwards, decode forwards (count x per-token cost),
tokenizer decoding and the rest (the loop's Python). Printed ratios: each variant / floor (median
[min-max] of the per-repeat ratio), generate / evaluator, and what the evaluator would cost with free
decoding.

    python benchmarks/eval_throughput.py --model smollm2 --dtype float32 --length 2048 --samples 6 \\
        --threads 2 --repeats 3 --adapter runs/le_c --json results/benchmarks/eval_throughput.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt_ratio, machine_info, markdown_table, parse_dtype, summarize, write_json  # noqa: E402


def fmt_s(s: dict[str, float]) -> str:
    return f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]"


VARIANTS = ("floor", "evaluator", "loop-concat", "generate", "batched")


def load(args: argparse.Namespace):
    """``(model, tokenizer, description)``: the embedded SmolLM2 (or an HF id/path, or a tiny random
    Llama with SmolLM2's tokenizer), optionally with a saved adapter, in eval mode."""
    from seal_peft.models import load_model, load_tokenizer

    dtype = parse_dtype(args.dtype)
    torch.manual_seed(args.seed)
    if args.model == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = load_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
        )  # fmt: skip
        model = LlamaForCausalLM(config).to(dtype)
        desc = "tiny random Llama (2 layers, 4 heads x 16), SmolLM2 tokenizer"
    else:
        model, tok = load_model(None if args.model == "smollm2" else args.model, dtype=dtype)
        cfg = model.config
        desc = f"{getattr(cfg, '_name_or_path', args.model) or args.model} ({cfg.num_hidden_layers} layers)"
    if args.adapter:
        import seal_peft

        model = seal_peft.from_pretrained(model, args.adapter)
        desc += f" + adapter {args.adapter}"
    return model.eval(), tok, desc


def make_records(tok: Any, args: argparse.Namespace) -> list[dict]:
    from seal_peft.data import line_retrieval

    ds = line_retrieval(
        tok, num_samples=args.samples, length=args.length, prompt_format=args.prompt_format,
        seed=args.data_seed, progress=False,
    )  # fmt: skip
    return [ds[i] for i in range(len(ds))]


def floor_fn(model: torch.nn.Module, records: list[dict]) -> Callable[[], list]:
    """The floor: each prompt read once, last-position logits only."""
    prompts = [torch.tensor([r["input_ids"][: r["prompt_length"]]]) for r in records]

    def run() -> list:
        with torch.inference_mode():
            for ids in prompts:
                model(ids, logits_to_keep=1)
        return []

    return run


def variant_fns(model, tok, records, args) -> dict[str, Callable[[], list[str]]]:
    from seal_peft.evaluation import generate_answers
    from seal_peft.evaluation import generation as gen
    from seal_peft.evaluation.hf_generate import generate_answers_hf

    kw = {"max_new_tokens": args.max_new_tokens, "progress": False}

    def loop_concat() -> list[str]:
        reserve = gen.reserve_kv_room
        gen.reserve_kv_room = lambda cache, room: 0  # the loop as it was: DynamicCache concatenates
        try:
            return generate_answers(model, tok, records, **kw)
        finally:
            gen.reserve_kv_room = reserve

    fns = {
        "floor": floor_fn(model, records),
        "evaluator": lambda: generate_answers(model, tok, records, **kw),
        "loop-concat": loop_concat,
        "generate": lambda: generate_answers_hf(model, tok, records, **kw),
    }
    if args.batch_size > 1:
        fns["batched"] = lambda: generate_answers(model, tok, records, batch_size=args.batch_size, **kw)
    return {k: v for k, v in fns.items() if k in args.variants}


class _TimedTokenizer:
    """Delegates to a tokenizer and times its ``decode`` calls."""

    def __init__(self, tok: Any) -> None:
        self._tok, self.seconds, self.calls = tok, 0.0, 0

    def decode(self, *a: Any, **k: Any) -> str:
        t0 = time.perf_counter()
        try:
            return self._tok.decode(*a, **k)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


def breakdown(model, tok, records, args) -> dict[str, Any]:
    """One evaluator run, timed by part: prefill forwards, decode forwards, tokenizer decode, the rest."""
    from seal_peft.evaluation.generation import generate_answer_tokens
    from seal_peft.tuner.utils import get_base_model

    inner = get_base_model(model)  # the transformers model: its forward runs once per prefill / step
    parts = {"prefill": [0.0, 0, 0], "decode": [0.0, 0, 0]}  # seconds, calls, tokens
    start: list[float] = []

    def pre(module, a, k):
        start.append(time.perf_counter())

    def post(module, a, k, out):
        ids = k.get("input_ids", a[0] if a else None)
        n = int(ids.shape[-1]) if ids is not None else 0
        part = parts["decode" if n == 1 else "prefill"]
        part[0] += time.perf_counter() - start.pop()
        part[1] += 1
        part[2] += n * int(ids.shape[0]) if ids is not None else 0

    timed_tok = _TimedTokenizer(tok)
    handles = [
        inner.register_forward_pre_hook(pre, with_kwargs=True),
        inner.register_forward_hook(post, with_kwargs=True),
    ]
    try:
        t0 = time.perf_counter()
        tokens = generate_answer_tokens(
            model, timed_tok, records, max_new_tokens=args.max_new_tokens, progress=False
        )
        outputs = [
            timed_tok.decode(t, skip_special_tokens=True).strip() for t in tokens
        ]  # as generate_answers
        total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    new_tokens = [len(t) for t in tokens]
    rest = total - parts["prefill"][0] - parts["decode"][0] - timed_tok.seconds
    return {
        "total_s": total,
        "prefill_s": parts["prefill"][0],
        "prefill_calls": parts["prefill"][1],
        "prefill_tokens": parts["prefill"][2],
        "decode_s": parts["decode"][0],
        "decode_steps": parts["decode"][1],
        "decode_s_per_step": parts["decode"][0] / max(parts["decode"][1], 1),
        "tokenizer_decode_s": timed_tok.seconds,
        "tokenizer_decode_calls": timed_tok.calls,
        "rest_s": rest,
        "answer_tokens_per_record": new_tokens,
        "outputs": outputs,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (embedded), tiny (random), or an HF id/path")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--adapter", default=None, help="a saved SEAL (or other PEFT) adapter to evaluate")
    p.add_argument("--length", type=int, default=2048, help="tokens per record (prompt + answer)")
    p.add_argument("--samples", type=int, default=6)
    p.add_argument("--prompt-format", default="longeval")
    p.add_argument("--data-seed", type=int, default=1, help="seed of the records (1: not the training seed)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="None: each record's default cap")
    p.add_argument("--batch-size", type=int, default=0, help="> 1 adds the batched variant")
    p.add_argument("--variants", default="floor,evaluator,loop-concat,generate,batched")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {','.join(VARIANTS)}")
    if "floor" not in args.variants or "evaluator" not in args.variants:
        p.error("--variants must include floor and evaluator (the ratios are taken against them)")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok, desc = load(args)
    records = make_records(tok, args)
    fns = variant_fns(model, tok, records, args)
    names = list(fns)
    record: dict[str, Any] = {
        "args": vars(args),
        "machine": machine_info(torch.device("cpu")),
        "model": desc,
        "prompt_tokens": [int(r["prompt_length"]) for r in records],
    }
    print(f"# evaluation throughput ({record['machine']})")
    print(f"{desc}, {args.dtype}; {len(records)} records, prompt tokens {record['prompt_tokens']}")

    outputs: dict[str, list[str]] = {}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate who goes first
        for name in order:
            t0 = time.perf_counter()
            out = fns[name]()
            seconds[name].append(time.perf_counter() - t0)
            if name != "floor":
                outputs.setdefault(name, out)
        print(f"  repeat {rep + 1}: " + ", ".join(f"{n} {seconds[n][-1]:.2f}s" for n in names), flush=True)

    same = {n: outputs[n] == outputs["evaluator"] for n in outputs if n != "evaluator"}
    ratios = {
        n: summarize([a / b for a, b in zip(seconds[n], seconds["floor"])]) for n in names if n != "floor"
    }
    vs_eval = {
        n: summarize([a / b for a, b in zip(seconds[n], seconds["evaluator"])])
        for n in names
        if n not in ("floor", "evaluator")
    }
    parts = breakdown(model, tok, records, args)
    floor_med = summarize(seconds["floor"])["median"]
    record.update(
        seconds={n: summarize(v) for n, v in seconds.items()},
        seconds_all=seconds,
        ratio_vs_floor=ratios,
        ratio_vs_evaluator=vs_eval,
        same_answers_as_evaluator=same,
        breakdown=parts,
        outputs=outputs["evaluator"],
    )
    print(
        f"\n## seconds for all {len(records)} records: median [min-max] of {args.repeats} interleaved repeats"
    )
    print(
        markdown_table(
            ["variant", "seconds", "/ floor", "/ evaluator", "same answers as evaluator"],
            [
                [
                    n,
                    fmt_s(summarize(seconds[n])),
                    "-" if n == "floor" else fmt_ratio(ratios[n]),
                    fmt_ratio(vs_eval[n]) if n in vs_eval else "-",
                    "-" if n == "floor" else ("yes" if n == "evaluator" else ("yes" if same[n] else "NO")),
                ]
                for n in names
            ],
        )
    )
    if "generate" in vs_eval:
        print(f"\nmodel.generate / custom loop: {fmt_ratio(vs_eval['generate'])}")
    print(f"evaluator / floor: {fmt_ratio(ratios['evaluator'])} (goal <= 1.15)")
    b = parts
    print("\n## where one evaluator run's time goes")
    rows = [
        [
            "prefill forwards",
            f"{b['prefill_s']:.2f}",
            f"{b['prefill_calls']} calls, {b['prefill_tokens']} tokens",
        ],
        [
            "decode forwards",
            f"{b['decode_s']:.2f}",
            f"{b['decode_steps']} steps x {b['decode_s_per_step'] * 1e3:.1f} ms",
        ],
        ["tokenizer decode", f"{b['tokenizer_decode_s']:.3f}", f"{b['tokenizer_decode_calls']} calls"],
        ["the rest (loop Python, argmax, masks)", f"{b['rest_s']:.3f}", ""],
        ["total", f"{b['total_s']:.2f}", f"answer tokens per record {b['answer_tokens_per_record']}"],
    ]
    print(markdown_table(["part", "seconds", "detail"], rows))
    free = (b["total_s"] - b["decode_s"]) / floor_med
    print(
        f"\nwith free decoding the evaluator would be {free:.3f} x floor; the decode steps alone add "
        f"{b['decode_s'] / floor_med:.3f} x floor ({b['decode_steps']} steps = "
        f"{b['decode_steps'] / len(records):.1f} per record)"
    )
    record["free_decode_ratio"] = free
    write_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
