"""Print the markdown tables of docs/results.md from the committed JSON records under ``results/``.

    python benchmarks/results_table.py results/line_retrieval/test_base.json results/line_retrieval/test_seal-c.json

One row per record: accuracy (correct/n) per protocol and length, essay and out-of-domain perplexity
with their change against the first record (the base model), trainable parameters and training time.
"""

from __future__ import annotations

import json
import sys


def _name(record: dict) -> str:
    args = record["args"]
    if args.get("peer"):
        return args["peer"]
    if args.get("adapter"):
        return f"adapter {args['adapter']}"
    name = {"none": "base", "head": "SEAL-H", "channel": "SEAL-C"}[args["granularity"]]
    if args["granularity"] == "none":
        return name
    notes = []
    trained_format = args.get("prompt_format")
    if trained_format not in (None, "longeval"):
        notes.append(f"{trained_format}-format training")
    if str(args.get("train_length", "2048")) != "2048":
        notes.append(f"trained at {args['train_length']}")
    if args.get("lm_kl"):
        notes.append(f"KL-to-base windows x{args['lm_kl']:g}")
    return name + (f" ({', '.join(notes)})" if notes else "")


def _cell(record: dict, fmt: str, length: str) -> str:
    acc = record.get("accuracy", {}).get(fmt, {}).get(length)
    n = record.get("n_per_length", {}).get(fmt, {}).get(length)
    if acc is None or not n:
        return "–"
    return f"{acc:.3f} ({round(acc * n)}/{n})"


def _change(value: float | None, base: float | None) -> str:
    if value is None:
        return "–"
    if base is None:
        return f"{value:.2f}"
    return f"{value:.2f} ({100 * (value / base - 1):+.1f} %)"


def table(records: list[dict]) -> str:
    formats = list(dict.fromkeys(f for r in records for f in r.get("accuracy", {})))
    lengths = list(
        dict.fromkeys(k for r in records for f in formats for k in r.get("accuracy", {}).get(f, {}))
    )
    cols = [(f, k) for f in formats for k in lengths]
    # a (protocol, length) column no record measured is left out
    cols = [(f, k) for f, k in cols if any(_cell(r, f, k) != "–" for r in records)]
    head = ["variant", "trainable", "train s"]
    head += [f"{f} {int(k) // 1024}K" if int(k) >= 1024 else f"{f} {k}" for f, k in cols]
    head += ["essay ppl", "Python-docs ppl"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = records[0]
    for r in records:
        row = [_name(r), f"{r.get('trainable_parameters', 0):,}", str(r.get("train_seconds", "–"))]
        row += [_cell(r, f, k) for f, k in cols]
        row += [
            _change(r.get("ppl"), base.get("ppl")),
            _change(r.get("ppl_ood"), base.get("ppl_ood")),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    recs = []
    for path in sys.argv[1:]:
        with open(path) as f:
            recs.append(json.load(f))
    print(table(recs))
