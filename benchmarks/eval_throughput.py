"""Evaluation throughput: where an evaluation's time goes, and how close it comes to the prefill floor.

The floor is reading each prompt once: ``model(input_ids, logits_to_keep=1)`` per prompt under
``torch.inference_mode()``. Against it, on the same line-retrieval records and the same model:

- ``evaluator``: :func:`seal_peft.evaluation.generate_answers` as shipped (batch 1, KV room reserved);
- ``loop-concat``: the same loop with transformers' concatenating ``DynamicCache`` (the loop before
  this benchmark: every decode step copies every layer's whole cache);
- ``generate``: the same answers through ``model.generate`` with a stopping criterion
  (:func:`seal_peft.evaluation.hf_generate.generate_answers_hf`);
- ``batched``: ``generate_answers(batch_size=--batch-size)`` (left padded; only with ``--batch-size``).

The variants are interleaved per record (per chunk of ``--batch-size`` records when the batched
variant runs), in rotating order, so a shared machine's load changes hit all of them alike; a
variant's time in a repeat is its sum over the records. Forward hooks on the transformers model
split every variant's time into prefill forwards and decode forwards (steps x per-step cost); the
evaluator's tokenizer calls are timed too, the rest is the loop's Python. Process CPU time
(``time.process_time``) is recorded per variant as well: it does not count waiting for a core on a
shared machine, so with one thread it is the steadier comparison. Printed: each variant /
floor and / evaluator (median [min-max] of the per-repeat ratios), ``model.generate`` / custom loop,
whether each variant gave the evaluator's answers, the evaluator's breakdown, and what it would cost
with free decoding.

    python benchmarks/eval_throughput.py --model smollm2 --dtype float32 --length 2048 --samples 6 \\
        --threads 1 --repeats 2 --adapter runs/le_c --json results/benchmarks/eval_throughput.json
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


def floor_fn(model: torch.nn.Module, tok: Any, records: list[dict]) -> list:
    """The floor: each prompt read once, last-position logits only."""
    with torch.inference_mode():
        for r in records:
            model(torch.tensor([r["input_ids"][: r["prompt_length"]]]), logits_to_keep=1)
    return []


def variant_fns(args: argparse.Namespace) -> dict[str, Callable[[Any, Any, list[dict]], list[str]]]:
    """``name -> fn(model, tokenizer, records) -> answers`` for the requested variants."""
    from seal_peft.evaluation import generate_answers
    from seal_peft.evaluation import generation as gen
    from seal_peft.evaluation.hf_generate import generate_answers_hf

    kw = {"max_new_tokens": args.max_new_tokens, "progress": False}

    def loop_concat(model, tok, records) -> list[str]:
        reserve = gen.reserve_kv_room
        gen.reserve_kv_room = lambda cache, room: 0  # the loop as it was: DynamicCache concatenates
        try:
            return generate_answers(model, tok, records, **kw)
        finally:
            gen.reserve_kv_room = reserve

    def batched(model, tok, records) -> list[str]:
        return generate_answers(model, tok, records, batch_size=args.batch_size, **kw)

    fns = {
        "floor": floor_fn,
        "evaluator": lambda model, tok, records: generate_answers(model, tok, records, **kw),
        "loop-concat": loop_concat,
        "generate": lambda model, tok, records: generate_answers_hf(model, tok, records, **kw),
        "batched": batched,
    }
    names = [n for n in args.variants if n != "batched" or args.batch_size > 1]
    return {n: fns[n] for n in names}


class _TimedTokenizer:
    """Delegates to a tokenizer and times its ``decode`` calls."""

    def __init__(self, tok: Any) -> None:
        self._tok, self.seconds = tok, 0.0

    def decode(self, *a: Any, **k: Any) -> str:
        t0 = time.perf_counter()
        try:
            return self._tok.decode(*a, **k)
        finally:
            self.seconds += time.perf_counter() - t0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


class ForwardMeter:
    """Forward hooks on the transformers model: seconds, calls and tokens of prefill forwards (more
    than one new token per row) and decode forwards (one), summed under the current ``label``."""

    def __init__(self, model: torch.nn.Module) -> None:
        from seal_peft.tuner.utils import get_base_model

        inner = get_base_model(model)  # its forward runs once per prefill / step, in every variant
        self.label = ""
        self.parts: dict[str, dict[str, list[float]]] = {}
        self._start: list[float] = []
        self._handles = [
            inner.register_forward_pre_hook(self._pre, with_kwargs=True),
            inner.register_forward_hook(self._post, with_kwargs=True),
        ]

    def _pre(self, module, args, kwargs) -> None:
        self._start.append(time.perf_counter())

    def _post(self, module, args, kwargs, out) -> None:
        elapsed = time.perf_counter() - self._start.pop()
        ids = kwargs.get("input_ids", args[0] if args else None)
        n = int(ids.shape[-1]) if ids is not None else 0
        kind = "decode" if n == 1 else "prefill"
        part = self.parts.setdefault(self.label, {}).setdefault(kind, [0.0, 0, 0])
        part[0] += elapsed
        part[1] += 1
        part[2] += n * (int(ids.shape[0]) if ids is not None else 0)

    def take(self, label: str) -> dict[str, list[float]]:
        return self.parts.pop(label, {})

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def measure(model, tok, records, fns, args) -> dict[str, Any]:
    """Run every variant ``--repeats`` times, interleaved per record chunk; times, parts and answers."""
    names = list(fns)
    size = max(args.batch_size, 1) if "batched" in names else 1
    chunks = [records[i : i + size] for i in range(0, len(records), size)]
    meter, timed_tok = ForwardMeter(model), _TimedTokenizer(tok)
    outputs: dict[str, list[str]] = {n: [] for n in names}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    forward: dict[str, list[dict]] = {n: [] for n in names}
    tokenizer_s: list[float] = []
    record_steps: list[int] = []  # the evaluator's decode steps per chunk (first repeat)
    chunk_s: dict[str, list[float]] = {n: [] for n in names}  # every chunk of every repeat
    cpu_seconds: dict[str, list[float]] = {n: [] for n in names}  # process CPU time: blind to preemption
    try:
        for rep in range(args.repeats):
            total = dict.fromkeys(names, 0.0)
            cpu_total = dict.fromkeys(names, 0.0)
            timed_tok.seconds = 0.0
            for c, chunk in enumerate(chunks):
                k = (rep + c) % len(names)
                for name in names[k:] + names[:k]:
                    meter.label = name
                    before = meter.parts.get(name, {}).get("decode", [0.0, 0, 0])[1]
                    t0, c0 = time.perf_counter(), time.process_time()
                    out = fns[name](model, timed_tok if name == "evaluator" else tok, chunk)
                    elapsed = time.perf_counter() - t0
                    total[name] += elapsed
                    cpu_total[name] += time.process_time() - c0
                    chunk_s[name].append(elapsed)
                    if rep == 0:
                        outputs[name] += out
                        if name == "evaluator":
                            after = meter.parts.get(name, {}).get("decode", [0.0, 0, 0])[1]
                            record_steps.append(int(after - before))
            for n in names:
                seconds[n].append(total[n])
                cpu_seconds[n].append(cpu_total[n])
                forward[n].append(meter.take(n))
            tokenizer_s.append(timed_tok.seconds)
            print(
                f"  repeat {rep + 1}: " + ", ".join(f"{n} {seconds[n][-1]:.2f}s" for n in names), flush=True
            )
    finally:
        meter.close()

    def part(n: str, kind: str, i: int) -> float:
        return sum(f.get(kind, [0.0, 0, 0])[i] for f in forward[n]) / args.repeats  # mean per repeat

    return {
        "outputs": outputs,
        "seconds": seconds,
        "chunk_seconds": chunk_s,
        "cpu_seconds": cpu_seconds,
        "tokenizer_s": sum(tokenizer_s) / args.repeats,
        "prefill_s": {n: part(n, "prefill", 0) for n in names},
        "prefill_calls": {n: part(n, "prefill", 1) for n in names},
        "prefill_tokens": {n: part(n, "prefill", 2) for n in names},
        "decode_s": {n: part(n, "decode", 0) for n in names},
        "decode_steps": {n: part(n, "decode", 1) for n in names},
        "decode_steps_per_chunk": record_steps,
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
    p.add_argument("--variants", default=",".join(VARIANTS))
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
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok, desc = load(args)
    records = make_records(tok, args)
    fns = variant_fns(args)
    names = list(fns)
    record: dict[str, Any] = {
        "args": vars(args),
        "machine": machine_info(torch.device("cpu")),
        "model": desc,
        "prompt_tokens": [int(r["prompt_length"]) for r in records],
    }
    print(f"# evaluation throughput ({record['machine']})")
    print(f"{desc}, {args.dtype}; {len(records)} records, prompt tokens {record['prompt_tokens']}")
    m = measure(model, tok, records, fns, args)
    seconds, outputs = m["seconds"], m["outputs"]
    same = {n: outputs[n] == outputs["evaluator"] for n in names if n not in ("floor", "evaluator")}
    vs_floor = {
        n: summarize([a / b for a, b in zip(seconds[n], seconds["floor"])]) for n in names if n != "floor"
    }
    vs_eval = {
        n: summarize([a / b for a, b in zip(seconds[n], seconds["evaluator"])])
        for n in names
        if n not in ("floor", "evaluator")
    }
    per_chunk = {  # the same ratios taken per record (chunk): pairs run seconds apart, a spread per run
        n: summarize([a / b for a, b in zip(m["chunk_seconds"][n], m["chunk_seconds"]["floor"])])
        for n in names
        if n != "floor"
    }
    cpu_s = m["cpu_seconds"]
    cpu_vs_floor = {
        n: summarize([a / b for a, b in zip(cpu_s[n], cpu_s["floor"])]) for n in names if n != "floor"
    }
    steps, dec_s = m["decode_steps"], m["decode_s"]
    step_ms = {n: 1e3 * dec_s[n] / steps[n] if steps[n] else None for n in names}

    print(
        f"\n## all {len(records)} records: median [min-max] of {args.repeats} repeats, interleaved per record"
    )
    print(
        markdown_table(
            ["variant", "seconds", "/ floor", "/ floor per record", "CPU s / floor", "/ evaluator", "prefill s",
             "decode steps",
             "ms / step", "same answers"],
            [
                [n, fmt_s(summarize(seconds[n])), "-" if n == "floor" else fmt_ratio(vs_floor[n]),
                 "-" if n == "floor" else fmt_ratio(per_chunk[n]), "-" if n == "floor" else fmt_ratio(cpu_vs_floor[n]),
                 fmt_ratio(vs_eval[n]) if n in vs_eval else "-", f"{m['prefill_s'][n]:.2f}",
                 f"{steps[n]:.0f}", "-" if step_ms[n] is None else f"{step_ms[n]:.1f}",
                 "-" if n == "floor" else ("(reference)" if n == "evaluator" else ("yes" if same[n] else "NO"))]
                for n in names
            ],
        )
    )  # fmt: skip
    if "generate" in vs_eval:
        print(f"\nmodel.generate / custom loop: {fmt_ratio(vs_eval['generate'])}")
    if "loop-concat" in vs_eval:
        print(f"concatenating cache / KV room (whole evaluation): {fmt_ratio(vs_eval['loop-concat'])}")
    print(
        f"evaluator / floor: {fmt_ratio(vs_floor['evaluator'])} per run, {fmt_ratio(per_chunk['evaluator'])} per "
        f"record, {fmt_ratio(cpu_vs_floor['evaluator'])} in process CPU time (goal <= 1.15)"
    )

    # where the evaluator's time goes (means over its timed runs)
    floor_s = sum(seconds["floor"]) / args.repeats
    total = sum(seconds["evaluator"]) / args.repeats
    prefill, decode, tok_s = m["prefill_s"]["evaluator"], dec_s["evaluator"], m["tokenizer_s"]
    rest = total - prefill - decode - tok_s
    per_record = m["decode_steps_per_chunk"]
    ms = step_ms["evaluator"] or 0.0
    b = {
        "total_s": total,
        "floor_s": floor_s,
        "prefill_s": prefill,
        "prefill_calls": m["prefill_calls"]["evaluator"],
        "prefill_tokens": m["prefill_tokens"]["evaluator"],
        "decode_s": decode,
        "decode_steps": steps["evaluator"],
        "decode_ms_per_step": ms,
        "tokenizer_decode_s": tok_s,
        "rest_s": rest,
        "decode_steps_per_chunk": per_record,
        "free_decode_ratio": (total - decode) / floor_s,
    }
    print("\n## where the evaluator's time goes (mean of its timed runs)")
    rows = [
        ["prefill forwards", f"{prefill:.2f}", f"{b['prefill_calls']:.0f} calls, {b['prefill_tokens']:.0f} tokens",
         f"{prefill / floor_s:.3f}"],
        ["decode forwards", f"{decode:.2f}", f"{b['decode_steps']:.0f} steps x {ms:.1f} ms", f"{decode / floor_s:.3f}"],
        ["tokenizer decode", f"{tok_s:.3f}", "", f"{tok_s / floor_s:.4f}"],
        ["the rest (loop Python, argmax, masks)", f"{rest:.3f}", "", f"{rest / floor_s:.4f}"],
        ["total", f"{total:.2f}", "", f"{total / floor_s:.3f}"],
    ]  # fmt: skip
    print(markdown_table(["part", "seconds", "detail", "/ floor"], rows))
    print(
        f"\nwith free decoding the evaluator would be {b['free_decode_ratio']:.3f} x floor; the decode steps add "
        f"{decode / floor_s:.3f} x floor ({b['decode_steps'] / len(records):.1f} steps per record; per "
        f"{'chunk' if len(per_record) != len(records) else 'record'} {per_record}: the answer's tokens after the first, "
        "plus the step that yields EOS)"
    )
    record.update(
        seconds={n: summarize(v) for n, v in seconds.items()},
        seconds_all=seconds,
        ratio_vs_floor=vs_floor,
        ratio_vs_floor_per_chunk=per_chunk,
        cpu_seconds=cpu_s,
        cpu_ratio_vs_floor=cpu_vs_floor,
        chunk_seconds=m["chunk_seconds"],
        ratio_vs_evaluator=vs_eval,
        same_answers_as_evaluator=same,
        prefill_s=m["prefill_s"],
        decode_steps=steps,
        decode_ms_per_step=step_ms,
        breakdown=b,
        outputs=outputs["evaluator"],
    )
    write_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
