"""Line retrieval with training-free context extension, with and without a SEAL adapter.

For each variant (base, every extension alone, the adapter alone, the adapter + every extension) the
script loads a fresh model, applies the extension (``seal_peft.extension.extend_context``), loads the
adapter on top if asked, and scores greedy line retrieval at each length. Lengths beyond the native
window (8K for the embedded SmolLM2-135M) show what the extension buys; lengths inside it show that
extension + SEAL keeps what SEAL alone achieves. CPU cost grows with the square of the length: a
10K-token sample takes minutes on one thread, so keep ``--samples`` small there. The protocol is
LongEval's by default (``--prompt-format``; ``chat_prefill`` for the pre-filled one); with ``--adapter``
the evaluation excludes the keys and values of the adapter's training set (``--train-*``).

    OMP_NUM_THREADS=1 python benchmarks/extension.py --lengths 10240 --samples 5 \\
        --extensions ntk:2,self_extend:4 --adapter runs/adapters/c2e-2 --out runs/extension/10k.json

Results are written after every variant (``--out``), so an interrupted run keeps what it finished.

``--speed`` measures Self-Extend's cost instead (docs/benchmarks.md): prefill time, peak memory and
per-token decode time of the base model (SDPA), Self-Extend's fused core and its reference core at each
length, each run in a fresh process (peak RSS above the loaded model: VmHWM reset through
/proc/self/clear_refs), repeats interleaved, ratios = medians of the per-repeat ratios; then greedy
generation from a line-retrieval prompt of ``--check-length`` tokens with the fused and the reference core
(token-identical?).

    OMP_NUM_THREADS=2 python benchmarks/extension.py --speed --dtype float32 --lengths 8192,16384 \\
        --repeats 2 --reference-repeats 1 --decode-tokens 8 --check-length 10240 --check-tokens 16 \\
        --out results/extension/self_extend_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _split(text: str) -> list[str]:
    return [t for t in text.split(",") if t.strip()]


def run_variant(name, extension, adapter, args, dataset, dtype, lengths):
    from seal_peft.evaluation import evaluate_retrieval
    from seal_peft.extension import extend_context, parse_extend, record_extension
    from seal_peft.loading import from_pretrained
    from seal_peft.models import load_model

    model, tok = load_model(args.model, dtype=dtype)
    if extension:
        record = parse_extend(extension)
        method, factor = record.pop("method"), record.pop("factor")
        extend_context(model, method, factor=factor, **record)
    if adapter:
        model = from_pretrained(model, adapter)
        record_extension(model)
    model.eval()
    t0 = time.time()
    # each record's own cap: LongEval's 100 new tokens under its protocol, 24 for the pre-filled one
    result = evaluate_retrieval(model, tok, dataset, progress=not args.quiet, name=name, length_bins=lengths)
    return {
        "name": name,
        "extension": extension,
        "adapter": adapter,
        "accuracy": result.accuracy,
        "by_length": {str(k): v for k, v in result.accuracy_by_length(lengths).items()},
        "outputs": [
            {
                "length": r.get("length"),
                "depth": r.get("depth"),
                "answer": r.get("answer"),
                "output": r.get("output"),
            }
            for r in result.rows
        ],
        "seconds": round(time.time() - t0, 1),
    }


# ----------------------------------------------------------------------------------- --speed mode
_WORKER_MARK = "SELF_EXTEND_WORKER_RESULT "


def _speed_model(spec: dict):
    """The model of one speed run: base (SDPA) or Self-Extend with the fused / reference core."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import load_benchmark_model

    from seal_peft.extension import extend_context, self_extend_states

    model, desc = load_benchmark_model(spec["model"], getattr(torch, spec["dtype"]))
    if spec["variant"] != "base":
        extend_context(model, "self_extend", factor=spec["group"], window=spec["window"])
        for state in self_extend_states(model):
            state.impl = spec["variant"]
    return model, desc


def _speed_prompt(spec: dict, model):
    import torch

    if spec.get("prompt") == "line_retrieval" and spec["model"] != "tiny":
        from seal_peft.data import line_retrieval
        from seal_peft.models import load_tokenizer

        tok = load_tokenizer(None if spec["model"] == "smollm2" else spec["model"])
        current, needed = getattr(tok, "model_max_length", 0) or 0, int(spec["length"] * 1.05)
        tok.model_max_length = needed if current > 10**7 else max(needed, current)  # past 8K on purpose
        row = line_retrieval(
            tok,
            num_samples=1,
            length=[spec["length"]],
            prompt_format="chat_prefill",
            seed=1000,
            progress=False,
        )[0]
        return torch.tensor([row["input_ids"][: row["prompt_length"]]])
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(spec.get("seed", 0))
    return torch.randint(min(100, vocab - 1), vocab, (1, spec["length"]), generator=gen)


def speed_worker(spec: dict) -> dict:
    """One measurement (in its own process unless ``--in-process``): load, prefill, decode or generate."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import PeakMemory

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model, desc = _speed_model(spec)
    ids = _speed_prompt(spec, model)
    result: dict = {"spec": spec, "model": desc, "tokens": ids.shape[1], "threads": torch.get_num_threads()}
    result["load_before"] = os.getloadavg()[0]
    with torch.no_grad():
        model(ids[:, :64], use_cache=True, logits_to_keep=1)  # warm-up: thread pool, allocator
        if spec.get("synthetic_cache"):
            result.update(_decode_on_synthetic_cache(model, spec))
        elif spec.get("generate"):
            start = time.perf_counter()
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=spec["generate"],
                do_sample=False,
                pad_token_id=getattr(model.config, "eos_token_id", None) or 0,
            )
            result["generate_s"] = time.perf_counter() - start
            result["new_tokens"] = out[0, ids.shape[1] :].tolist()
        else:
            with PeakMemory(torch.device("cpu")) as mem:
                start, cpu = time.perf_counter(), time.process_time()
                out = model(ids, use_cache=True, logits_to_keep=1)
                result["prefill_s"] = time.perf_counter() - start
                result["prefill_cpu_s"] = time.process_time() - cpu  # all threads; less sensitive to load
                result["peak_mib"] = mem.peak_mib()
                result["peak_exact"] = mem.exact
            cache, token, steps, cpus = out.past_key_values, out.logits[:, -1:].argmax(-1), [], []
            for _ in range(spec.get("decode_tokens", 0)):
                start, cpu = time.perf_counter(), time.process_time()
                out = model(token, past_key_values=cache, use_cache=True)
                steps.append(time.perf_counter() - start)
                cpus.append(time.process_time() - cpu)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            result["decode_s"], result["decode_cpu_s"] = steps, cpus
    if spec["variant"] != "base":
        from seal_peft.extension import self_extend_states

        result["paths"] = self_extend_states(model)[0].path_counts
    result["load_after"] = os.getloadavg()[0]
    return result


def _decode_on_synthetic_cache(model, spec: dict) -> dict:
    """Decode steps after a KV cache of ``length`` random keys/values (no prefill: cheap to repeat). Two
    untimed steps first (the fused core rotates the cache's keys once, then only new ones)."""
    import torch
    from transformers import DynamicCache

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(spec.get("seed", 0))
    shape = (1, cfg.num_key_value_heads, spec["length"], head_dim)
    cache = DynamicCache(config=cfg)
    for layer in range(cfg.num_hidden_layers):
        cache.update(
            torch.randn(shape, generator=gen).to(model.dtype),
            torch.randn(shape, generator=gen).to(model.dtype),
            layer,
        )
    token, steps, cpus = torch.tensor([[min(1000, cfg.vocab_size - 1)]]), [], []
    for step in range(2 + spec["decode_tokens"]):
        position = torch.tensor([[spec["length"] + step]])
        start, cpu = time.perf_counter(), time.process_time()
        out = model(token, past_key_values=cache, position_ids=position, use_cache=True)
        if step >= 2:
            steps.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return {"decode_s": steps, "decode_cpu_s": cpus}


def _run_worker(spec: dict, in_process: bool) -> dict:
    if in_process:
        return speed_worker(spec)
    cmd = [sys.executable, os.path.abspath(__file__), "--speed-worker", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(_WORKER_MARK)]
    if done.returncode or not lines:
        raise SystemExit(f"speed run {spec} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(_WORKER_MARK) :])


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def speed_main(args) -> dict:
    """``--speed``: Self-Extend fused vs reference vs base, side by side (see the module docstring)."""
    lengths = [int(x) for x in _split(args.lengths or "8192,16384")] if args.repeats else []
    common = {
        "model": args.model or "smollm2",
        "dtype": args.dtype,
        "group": args.group,
        "window": args.window,
        "decode_tokens": args.decode_tokens,
        "threads": args.threads,
    }
    report: dict = {
        "command": "python benchmarks/extension.py " + " ".join(args.argv),
        "mode": "speed",
        "settings": {
            **common,
            "lengths": lengths,
            "repeats": args.repeats,
            "reference_repeats": args.reference_repeats,
        },
        "runs": [],
    }
    start = time.time()
    for rep in range(args.repeats):
        for length in lengths:
            variants = ["base", "fused"] + (["reference"] if rep < args.reference_repeats else [])
            if rep % 2:  # alternate the order, so slow drifts of the machine's load hit every variant
                variants = variants[::-1]
            for variant in variants:
                run = _run_worker(
                    {**common, "variant": variant, "length": length, "repeat": rep}, args.in_process
                )
                report["runs"].append(run)
                decode = _median(run["decode_s"]) if run["decode_s"] else float("nan")
                print(
                    f"  run {rep} {variant:<9} {length:>6}: prefill {run['prefill_s']:7.2f} s, peak "
                    f"{run['peak_mib']:7.0f} MiB, decode {decode * 1e3:7.1f} ms/token "
                    f"(load {run['load_before']:.1f}->{run['load_after']:.1f})",
                    flush=True,
                )
                write_report(args.out, report)
    rows = []
    for length in lengths:
        by = {
            v: [r for r in report["runs"] if r["spec"]["length"] == length and r["spec"]["variant"] == v]
            for v in ("base", "fused", "reference")
        }
        row = {"length": length}
        for v, runs in by.items():
            row[f"{v}_prefill_s"] = _median([r["prefill_s"] for r in runs])
            row[f"{v}_peak_mib"] = _median([r["peak_mib"] for r in runs])
            row[f"{v}_decode_ms"] = _median([_median(r["decode_s"]) * 1e3 for r in runs if r["decode_s"]])
        base_by_rep = {r["spec"]["repeat"]: r for r in by["base"]}
        for v in ("fused", "reference"):
            pairs = [
                (r, base_by_rep[r["spec"]["repeat"]]) for r in by[v] if r["spec"]["repeat"] in base_by_rep
            ]
            row[f"{v}_prefill_ratio"] = _median([r["prefill_s"] / b["prefill_s"] for r, b in pairs])
            row[f"{v}_decode_ratio"] = _median(
                [_median(r["decode_s"]) / _median(b["decode_s"]) for r, b in pairs if r["decode_s"]]
            )
            row[f"{v}_prefill_cpu_ratio"] = _median(
                [r["prefill_cpu_s"] / b["prefill_cpu_s"] for r, b in pairs]
            )
            row[f"{v}_decode_cpu_ratio"] = _median(
                [_median(r["decode_cpu_s"]) / _median(b["decode_cpu_s"]) for r, b in pairs if r["decode_s"]]
            )
        rows.append(row)
    report["summary"] = rows
    decode_rows = []
    decode_lengths = [int(x) for x in _split(args.decode_lengths or "")]
    for rep in range(args.decode_repeats):
        for length in decode_lengths:
            for variant in ("base", "fused") if rep % 2 == 0 else ("fused", "base"):
                spec = {
                    **common,
                    "variant": variant,
                    "length": length,
                    "repeat": rep,
                    "synthetic_cache": True,
                }
                spec["decode_tokens"] = args.decode_steps
                run = _run_worker(spec, args.in_process)
                report["runs"].append(run)
                print(
                    f"  decode run {rep} {variant:<6} {length:>6}: {_median(run['decode_s']) * 1e3:7.1f} ms/token "
                    f"(load {run['load_before']:.1f}->{run['load_after']:.1f})",
                    flush=True,
                )
                write_report(args.out, report)
    for length in decode_lengths:
        runs = [
            r for r in report["runs"] if r["spec"].get("synthetic_cache") and r["spec"]["length"] == length
        ]
        by = {
            v: {r["spec"]["repeat"]: r for r in runs if r["spec"]["variant"] == v} for v in ("base", "fused")
        }
        pairs = [(by["fused"][k], by["base"][k]) for k in by["fused"] if k in by["base"]]
        decode_rows.append(
            {
                "length": length,
                "base_decode_ms": _median([_median(b["decode_s"]) * 1e3 for _, b in pairs]),
                "fused_decode_ms": _median([_median(f["decode_s"]) * 1e3 for f, _ in pairs]),
                "fused_decode_ratio": _median(
                    [_median(f["decode_s"]) / _median(b["decode_s"]) for f, b in pairs]
                ),
                "fused_decode_cpu_ratio": _median(
                    [_median(f["decode_cpu_s"]) / _median(b["decode_cpu_s"]) for f, b in pairs]
                ),
                "pairs": len(pairs),
            }
        )
    report["decode_summary"] = decode_rows
    check = None
    if args.check_length:
        outs = {}
        for variant in ("fused", "reference"):
            spec = {**common, "variant": variant, "length": args.check_length, "prompt": "line_retrieval"}
            spec["generate"] = args.check_tokens
            outs[variant] = _run_worker(spec, args.in_process)
            report["runs"].append(outs[variant])
        check = {
            "length": outs["fused"]["tokens"],
            "new_tokens": args.check_tokens,
            "identical": outs["fused"]["new_tokens"] == outs["reference"]["new_tokens"],
            "fused_tokens": outs["fused"]["new_tokens"],
            "reference_tokens": outs["reference"]["new_tokens"],
            "fused_generate_s": outs["fused"]["generate_s"],
            "reference_generate_s": outs["reference"]["generate_s"],
        }
        report["greedy_check"] = check
    report["seconds"] = round(time.time() - start, 1)
    write_report(args.out, report)
    first = report["runs"][0] if report["runs"] else {"model": common["model"], "threads": args.threads}
    print(
        f"\nSelf-Extend (group {args.group}, window {args.window}) vs base SDPA: {first['model']}, {args.dtype}, "
        f"{first['threads']} threads; medians of {args.repeats} interleaved runs ({args.reference_repeats} for the "
        f"reference); ratios = median of per-run ratios"
    )
    print(
        f"{'tokens':>7} | {'prefill s base':>14} {'fused':>7} {'ref':>7} | {'fused/base':>10} {'ref/base':>8} | "
        f"{'peak MiB base':>13} {'fused':>6} {'ref':>6} | {'decode ms base':>14} {'fused':>6} {'ref':>6} | "
        f"{'fused/base':>10} {'ref/base':>8}"
    )
    for r in rows:
        print(
            f"{r['length']:>7} | {r['base_prefill_s']:>14.2f} {r['fused_prefill_s']:>7.2f} "
            f"{r['reference_prefill_s']:>7.2f} | {r['fused_prefill_ratio']:>10.3f} {r['reference_prefill_ratio']:>8.3f} | "
            f"{r['base_peak_mib']:>13.0f} {r['fused_peak_mib']:>6.0f} {r['reference_peak_mib']:>6.0f} | "
            f"{r['base_decode_ms']:>14.1f} {r['fused_decode_ms']:>6.1f} {r['reference_decode_ms']:>6.1f} | "
            f"{r['fused_decode_ratio']:>10.3f} {r['reference_decode_ratio']:>8.3f}"
        )
    print("CPU-time ratios (process time of all threads; less sensitive to other load than wall time):")
    for r in rows:
        print(
            f"{r['length']:>7} | prefill fused/base {r['fused_prefill_cpu_ratio']:.3f}, ref/base "
            f"{r['reference_prefill_cpu_ratio']:.3f} | decode fused/base {r['fused_decode_cpu_ratio']:.3f}, "
            f"ref/base {r['reference_decode_cpu_ratio']:.3f}"
        )
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        growth = "  ".join(
            f"{v} {b[f'{v}_peak_mib'] / max(a[f'{v}_peak_mib'], 1e-9):.2f}x"
            for v in ("base", "fused", "reference")
        )
        print(
            f"peak memory {b['length']} / {a['length']} tokens ({b['length'] / a['length']:.1f}x): {growth}"
        )
    for r in decode_rows:
        print(
            f"decode after a {r['length']}-token cache (random keys, {args.decode_steps} steps, {r['pairs']} "
            f"interleaved pairs): base {r['base_decode_ms']:.1f} ms/token, fused {r['fused_decode_ms']:.1f}; "
            f"fused/base {r['fused_decode_ratio']:.3f} (CPU time {r['fused_decode_cpu_ratio']:.3f})"
        )
    if check is not None:
        print(
            f"greedy {check['new_tokens']} tokens after a {check['length']}-token line-retrieval prompt: fused "
            f"{'==' if check['identical'] else '!='} reference ({check['fused_generate_s']:.1f} s vs "
            f"{check['reference_generate_s']:.1f} s)"
        )
    print(f"({report['seconds']:.0f} s in all)")
    return report


def write_report(path: str | None, report: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)


def eval_dataset(tok, args, lengths: list[int]):
    """The evaluation records (``--samples`` per length, ``--prompt-format``, ``--seed``) and what they exclude.

    The tokenizer's ``model_max_length`` is raised to the longest length (+5 %), since the point is to run
    past the native window. With ``--adapter``, the adapter's training set is rebuilt (``--train-samples``
    at ``--train-length``, ``--train-format``, seed 0: ``benchmarks/line_retrieval.py``'s recipe) and the
    evaluation never asks one of its keys or answers with one of its values.
    """
    from seal_peft.data import line_retrieval

    current = getattr(tok, "model_max_length", 0) or 0
    needed = int(max(lengths) * 1.05)  # generated lengths are hit within +-3 %
    tok.model_max_length = needed if current > 10**7 else max(needed, current)
    train, exclude = None, None
    if args.adapter and args.train_samples:
        train_lengths = [int(x) for x in _split(args.train_length)]
        train = line_retrieval(
            tok, args.train_samples, train_lengths, prompt_format=args.train_format, seed=0, progress=False
        )
        exclude = {
            "samples": args.train_samples,
            "lengths": train_lengths,
            "format": args.train_format,
            "seed": 0,
        }
    dataset = line_retrieval(
        tok,
        num_samples=args.samples * len(lengths),
        length=lengths,
        prompt_format=args.prompt_format,
        seed=args.seed,
        exclude=train,
        progress=not args.quiet,
    )
    return dataset, exclude


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF id/path; default: embedded SmolLM2-135M-Instruct")
    p.add_argument(
        "--lengths", default=None, help="comma-separated token lengths (default 10240; --speed: 8192,16384)"
    )
    p.add_argument("--samples", type=int, default=5, help="samples per length (default 5)")
    p.add_argument(
        "--extensions",
        default="ntk:2,dynamic_ntk:2,yarn:2,self_extend:4",
        help="comma-separated METHOD:FACTOR[:window=N] (default ntk:2,dynamic_ntk:2,yarn:2,self_extend:4)",
    )
    p.add_argument(
        "--adapter", default=None, help="a saved SEAL adapter to evaluate alone and with each extension"
    )
    p.add_argument(
        "--variants", default=None, help="only run these variant names, in this order (comma-separated)"
    )
    p.add_argument("--no-base", action="store_true", help="skip the unextended base model")
    p.add_argument(
        "--prompt-format",
        default="longeval",
        choices=["longeval", "chat", "chat_prefill", "plain"],
        help="evaluation protocol (default: LongEval's: plain question, empty assistant turn, up to 100 new "
        "tokens, last integer scored); chat_prefill = the answer pre-filled up to 'is <' (24 new tokens)",
    )
    p.add_argument(
        "--train-samples",
        type=int,
        default=50,
        help="with --adapter: size of its training set, rebuilt (seed 0) so the evaluation excludes its keys "
        "and values (0: no exclusion; default 50)",
    )
    p.add_argument(
        "--train-length",
        default="2048",
        help="with --adapter: its training lengths, comma-separated (default 2048)",
    )
    p.add_argument(
        "--train-format",
        default="longeval",
        choices=["longeval", "chat", "chat_prefill", "plain"],
        help="with --adapter: its training prompt format (default longeval)",
    )
    p.add_argument(
        "--seed", type=int, default=1000, help="evaluation data seed (default 1000, the test split)"
    )
    p.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="weights (default bfloat16)"
    )
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--quiet", action="store_true")
    speed = p.add_argument_group("--speed: Self-Extend cost (fused and reference core vs base SDPA)")
    speed.add_argument("--speed", action="store_true", help="measure Self-Extend speed and memory instead")
    speed.add_argument("--group", type=int, default=4, help="Self-Extend group size (default 4)")
    speed.add_argument("--window", type=int, default=1024, help="Self-Extend window (default 1024)")
    speed.add_argument(
        "--repeats", type=int, default=2, help="interleaved runs of base and fused (default 2)"
    )
    speed.add_argument(
        "--reference-repeats", type=int, default=1, help="how many of them include the reference (default 1)"
    )
    speed.add_argument("--decode-tokens", type=int, default=8, help="timed decode steps per run (default 8)")
    speed.add_argument(
        "--check-length",
        type=int,
        default=10240,
        help="prompt tokens of the greedy check (0: skip; default 10240)",
    )
    speed.add_argument("--check-tokens", type=int, default=16, help="greedy tokens compared (default 16)")
    speed.add_argument(
        "--decode-lengths",
        default="",
        help="also time decoding alone after a synthetic KV cache of these lengths (no prefill; e.g. 8192,16384)",
    )
    speed.add_argument(
        "--decode-repeats", type=int, default=4, help="interleaved pairs per decode length (default 4)"
    )
    speed.add_argument("--decode-steps", type=int, default=12, help="timed steps per decode run (default 12)")
    speed.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    speed.add_argument("--in-process", action="store_true", help="run everything in this process (tests)")
    speed.add_argument("--speed-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.speed_worker:
        result = speed_worker(json.loads(args.speed_worker))
        print(_WORKER_MARK + json.dumps(result), flush=True)
        return result
    if args.speed:
        args.argv = list(argv if argv is not None else sys.argv[1:])
        return speed_main(args)
    args.lengths = args.lengths or "10240"

    import torch

    from seal_peft.models import load_tokenizer

    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    lengths = [int(x) for x in _split(args.lengths)]
    tok = load_tokenizer(args.model)
    dataset, exclude = eval_dataset(tok, args, lengths)
    extensions = _split(args.extensions)
    variants: list[tuple[str, str | None, str | None]] = []
    if not args.no_base:
        variants.append(("base", None, None))
    variants += [(ext, ext, None) for ext in extensions]
    if args.adapter:
        label = os.path.basename(os.path.normpath(args.adapter))
        variants.append((f"SEAL {label}", None, args.adapter))
        variants += [(f"{ext} + SEAL {label}", ext, args.adapter) for ext in extensions]
    if args.variants:  # in the order given
        by_name = {v[0]: v for v in variants}
        unknown = [n for n in _split(args.variants) if n not in by_name]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; available: {list(by_name)}")
        variants = [by_name[n] for n in _split(args.variants)]
    report = {
        "command": "python benchmarks/extension.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "lengths": lengths,
        "samples_per_length": args.samples,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "prompt_format": args.prompt_format,
        "seed": args.seed,
        "excluded_training_set": exclude,
        "variants": [],
    }
    for name, ext, adapter in variants:
        row = run_variant(name, ext, adapter, args, dataset, dtype, lengths)
        report["variants"].append(row)
        cells = "  ".join(f"{k}: {v:.2f}" for k, v in row["by_length"].items())
        print(f"{name:<32} {cells}   ({row['seconds']:.0f} s)", flush=True)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1, default=str)
    return report


if __name__ == "__main__":
    main()
