"""The llama.cpp check of `seal-peft export-gguf` (driven by scripts/test-llamacpp.sh).

Three steps, because llama-cpp-python lives in its own virtualenv (.venv-llamacpp) without seal_peft:

  prepare   (project venv)  export the adapter, build the line-retrieval prompts (LongEval's protocol,
                            the test split of benchmarks/line_retrieval.py), run transformers greedily on
                            the exported GGUF, and take last-position logits of the merged model
  llamacpp  (llama venv)    run llama.cpp greedily on the base GGUF and on the exported GGUF
  report    (project venv)  score, compare, print, and write the record

Both engines get the same prompt token ids (the chat template applied by the tokenizer) and decode
greedily up to LongEval's 100 new tokens or the end-of-turn token; the answer is LongEval's last integer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

MAX_NEW_TOKENS = 100  # LongEval's cap (seal_peft.evaluation.generation.LONGEVAL_MAX_NEW_TOKENS)


def _write(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ prepare
def prepare(args) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from line_retrieval import EVAL_SEEDS
    from transformers import AutoModelForCausalLM

    import seal_peft
    from seal_peft.data import line_retrieval
    from seal_peft.evaluation.generation import eos_token_ids, greedy_generate
    from seal_peft.integrations.gguf_export import export_gguf
    from seal_peft.models import embedded_gguf_file, load_model

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = work / "seal.gguf"
    t0 = time.perf_counter()
    result = export_gguf(args.adapter, out, qtype=args.type)
    export_s = time.perf_counter() - t0
    print(f"[prepare] {result.summary()} ({export_s:.1f} s)", flush=True)

    model, tok = load_model()
    # the test split exactly as benchmarks/line_retrieval.py builds it for the committed SEAL-C record
    # (training data: 50 x 2048 tokens, seed 0; evaluation: 40 per length, seed 1000, training keys excluded)
    train = line_retrieval(tok, 50, [2048], prompt_format="longeval", seed=0, progress=False)
    lengths = [int(x) for x in args.lengths.split(",")]
    evalset = line_retrieval(
        tok, 40 * 3, [1024, 2048, 4096], prompt_format="longeval", seed=EVAL_SEEDS["test"], exclude=train,
        progress=False,
    )
    prompts = []
    for length in lengths:
        rows = [r for r in evalset if abs(r["length"] - length) <= 64][: args.per_length]
        for r in rows:
            ids = r["input_ids"][: r["prompt_length"]]
            text = tok.decode(ids, skip_special_tokens=False)
            prompts.append({"length": length, "answer": r["answer"], "key": r["key"], "ids": ids, "text": text})
    eos = sorted(eos_token_ids(model, tok))

    merged = seal_peft.from_pretrained(model, args.adapter).merge_and_unload(safe_merge=True)
    t0 = time.perf_counter()
    exported = AutoModelForCausalLM.from_pretrained(work, gguf_file=out.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    logits = {"merged": [], "transformers_export": []}
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p["ids"]])
            logits["merged"].append(merged(ids, logits_to_keep=1).logits[0, -1].tolist())
            logits["transformers_export"].append(exported(ids, logits_to_keep=1).logits[0, -1].tolist())
    t0 = time.perf_counter()
    tokens = greedy_generate(exported, [p["ids"] for p in prompts], max_new_tokens=MAX_NEW_TOKENS,
                             eos_token_id=eos, progress=False)
    gen_s = time.perf_counter() - t0
    for p, toks in zip(prompts, tokens):
        p["transformers_export"] = {"tokens": list(toks), "text": tok.decode(list(toks), skip_special_tokens=True)}
    _write(work / "prompts.json", {
        "adapter": args.adapter, "base_gguf": str(embedded_gguf_file()), "export_gguf": str(out),
        "export": {"type": args.type or "same as source", "seconds": round(export_s, 1),
                   "re_encoded": [t.name for t in result.re_encoded]},
        "eos": eos, "prompts": prompts, "logits": logits,
        "transformers": {"load_seconds": round(load_s, 1), "generate_seconds": round(gen_s, 1)},
    })
    print(f"[prepare] {len(prompts)} prompts; transformers on the export: load {load_s:.0f} s, "
          f"generate {gen_s:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------ llama.cpp
def run_llamacpp(args) -> None:
    import llama_cpp
    import numpy as np

    def logits(llm) -> np.ndarray:
        """The logits of the last evaluated token (llama-cpp-python >= 0.3 keeps them in the context only)."""
        pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).astype(np.float32)

    work = Path(args.work)
    data = json.loads((work / "prompts.json").read_text())
    eos = set(data["eos"])
    longest = max(len(p["ids"]) for p in data["prompts"]) + MAX_NEW_TOKENS + 16
    results = {"llama_cpp_version": llama_cpp.__version__, "n_ctx": longest, "models": {}}
    for name, path in (("base", data["base_gguf"]), ("export", data["export_gguf"])):
        t0 = time.perf_counter()
        llm = llama_cpp.Llama(model_path=path, n_ctx=longest, n_threads=args.threads, n_threads_batch=args.threads,
                              n_batch=512, seed=0, verbose=False)
        load_s = time.perf_counter() - t0
        runs = []
        t0 = time.perf_counter()
        n_new = 0
        for p in data["prompts"]:
            ids = p["ids"]
            same_tokens = llm.tokenize(p["text"].encode("utf-8"), add_bos=False, special=True) == ids
            llm.reset()
            llm.eval(ids)
            last = logits(llm).tolist()
            generated = []
            for _ in range(MAX_NEW_TOKENS):  # greedy: the arg-max of the logits llama.cpp computed
                token = int(np.argmax(logits(llm)))
                if token in eos or token == llm.token_eos():
                    break
                generated.append(token)
                llm.eval([token])
            n_new += len(generated)
            text = llm.detokenize(generated).decode("utf-8", errors="replace")
            runs.append({"tokens": generated, "text": text, "last_logits": last, "same_tokenization": same_tokens})
        seconds = time.perf_counter() - t0
        results["models"][name] = {"path": path, "load_seconds": round(load_s, 2), "seconds": round(seconds, 1),
                                   "new_tokens": n_new, "runs": runs}
        print(f"[llama.cpp] {name}: load {load_s:.1f} s, {len(runs)} prompts in {seconds:.0f} s", flush=True)
        del llm
    _write(work / "llamacpp.json", results)


# ------------------------------------------------------------------------------------------ report
def report(args) -> None:
    import numpy as np

    from seal_peft.evaluation.scoring import last_integer, last_integer_match

    work = Path(args.work)
    data = json.loads((work / "prompts.json").read_text())
    lc = json.loads((work / "llamacpp.json").read_text())
    prompts = data["prompts"]
    n = len(prompts)

    def accuracy(texts):
        return sum(last_integer_match(t, p["answer"]) for t, p in zip(texts, prompts)) / n

    tf_texts = [p["transformers_export"]["text"] for p in prompts]
    runs = lc["models"]
    acc = {
        "llama.cpp base GGUF": accuracy([r["text"] for r in runs["base"]["runs"]]),
        "llama.cpp exported GGUF": accuracy([r["text"] for r in runs["export"]["runs"]]),
        "transformers exported GGUF": accuracy(tf_texts),
    }
    pairs = list(zip(runs["export"]["runs"], prompts))
    same_answer = sum(last_integer(r["text"]) == last_integer(p["transformers_export"]["text"]) for r, p in pairs)
    same_text = sum(r["tokens"] == p["transformers_export"]["tokens"] for r, p in pairs)
    matched = total = 0
    for r, p in pairs:  # tokens equal position by position up to the first difference, over the longer output
        a, b = r["tokens"], p["transformers_export"]["tokens"]
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        matched += k
        total += max(len(a), len(b), 1)
    merged = np.array(data["logits"]["merged"])
    tf_export = np.array(data["logits"]["transformers_export"])
    lc_export = np.array([r["last_logits"] for r in runs["export"]["runs"]])
    lc_base = np.array([r["last_logits"] for r in runs["base"]["runs"]])
    record = {
        "command": "bash scripts/test-llamacpp.sh",
        "adapter": data["adapter"],
        "export": {k: v for k, v in data["export"].items() if k != "re_encoded"}
        | {"re_encoded_tensors": len(data["export"]["re_encoded"])},
        "prompts": n,
        "lengths": sorted({p["length"] for p in prompts}),
        "llama_cpp_python": lc["llama_cpp_version"],
        "accuracy": acc,
        "agreement_llamacpp_vs_transformers_on_export": {
            "same_answer": f"{same_answer}/{n}", "same_tokens": f"{same_text}/{n}",
            "token_agreement": round(matched / total, 4),
        },
        "last_logits_max_abs_diff": {
            "transformers export vs merged (fp32)": round(float(np.abs(tf_export - merged).max()), 4),
            "llama.cpp export vs transformers export": round(float(np.abs(lc_export - tf_export).max()), 4),
            "llama.cpp base vs merged (fp32): the adapter's effect": round(float(np.abs(lc_base - merged).max()), 4),
        },
        "argmax_equal_llamacpp_export_vs_merged": f"{int((lc_export.argmax(1) == merged.argmax(1)).sum())}/{n}",
        "same_tokenization_of_the_prompt_text": f"{sum(r['same_tokenization'] for r in runs['export']['runs'])}/{n}",
        "llama_cpp_seconds": {k: v["seconds"] for k, v in runs.items()},
        "llama_cpp_new_tokens": {k: v["new_tokens"] for k, v in runs.items()},
        "outputs": [
            {"length": p["length"], "answer": p["answer"], "transformers_export": p["transformers_export"]["text"],
             "llama_cpp_export": r["text"], "llama_cpp_base": b["text"]}
            for p, r, b in zip(prompts, runs["export"]["runs"], runs["base"]["runs"])
        ],
    }
    # the same prompts in the committed benchmark record of this adapter (transformers, fp32, unmerged)
    for path in sorted(Path("results/line_retrieval").glob("*.json")):
        bench = json.loads(path.read_text())
        if os.path.normpath(bench.get("args", {}).get("save_adapter") or "") != os.path.normpath(data["adapter"]):
            continue
        by_key = {s["key"]: s for s in bench["samples"].get("longeval", [])}
        found = [by_key.get(p["key"]) for p in prompts]
        if all(f is not None and f["answer"] == p["answer"] for f, p in zip(found, prompts)):
            record["benchmark_record"] = {
                "path": str(path),
                "accuracy (transformers fp32, adapter unmerged)": sum(f["correct"] for f in found) / n,
                "same_answer_as_llama_cpp_export": (
                    f"{sum(last_integer(f['output']) == last_integer(r['text']) for f, r in zip(found, runs['export']['runs']))}/{n}"
                ),
            }
        break
    print(json.dumps({k: v for k, v in record.items() if k != "outputs"}, indent=1))
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        _write(Path(args.record), record)
        print(f"record written to {args.record}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("prepare", "llamacpp", "report"))
    p.add_argument("--work", default="out/llamacpp")
    p.add_argument("--adapter", default="runs/le_c")
    p.add_argument("--type", default=None, help="export-gguf --type (default: the source's types)")
    p.add_argument("--lengths", default="1024,2048")
    p.add_argument("--per-length", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--record", default=None, help="write the report record here (JSON)")
    args = p.parse_args(argv)
    {"prepare": prepare, "llamacpp": run_llamacpp, "report": report}[args.step](args)


if __name__ == "__main__":
    main()
