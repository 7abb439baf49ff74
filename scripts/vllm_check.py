"""vLLM serves the merged SEAL model: the three steps of ``scripts/test-vllm.sh``.

``prepare`` (project venv): writes the base model and the merged SEAL model as plain transformers
checkpoints, a held-out line-retrieval set under LongEval's protocol (prompt token ids, answers), and
transformers' greedy continuations of every prompt for both checkpoints.

``run`` (vLLM venv, no seal_peft import): the same prompts through vLLM's offline ``LLM`` API and through
its OpenAI-compatible server on 127.0.0.1 (``/v1/completions`` with token-id prompts), greedy, the same
cap; records startup time and generated tokens/s.

``report`` (project venv): LongEval's scorer (last integer of the output) on every engine's outputs,
token-level agreement of vLLM with transformers on the same checkpoint, and a JSON record.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MAX_NEW_TOKENS = 100  # LongEval's cap
CHECKPOINTS = ("base", "seal")


def prepare(args: argparse.Namespace) -> None:
    import torch

    import seal_peft
    from seal_peft.data import line_retrieval
    from seal_peft.evaluation.generation import eos_token_ids, greedy_generate, prompt_ids
    from seal_peft.models import load_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, tok = load_model(dtype=torch.float32)
    model.save_pretrained(work / "base")
    tok.save_pretrained(work / "base")
    # the training set the adapter was made from (benchmarks/line_retrieval.py, seed 0): kept out of the
    # evaluation records, keys and values alike
    train = line_retrieval(tok, 50, [2048], prompt_format=args.train_format, seed=0, progress=False)
    records = line_retrieval(
        tok, args.samples, [args.length], prompt_format="longeval", seed=1000, exclude=train, progress=False
    )
    prompts = [prompt_ids(r, i) for i, r in enumerate(records)]
    eos = sorted(eos_token_ids(model, tok))
    merged = seal_peft.from_pretrained(model, args.adapter).merge_and_unload(safe_merge=True)
    merged.save_pretrained(work / "seal")
    tok.save_pretrained(work / "seal")
    out: dict = {"adapter": args.adapter, "eos": eos, "answers": [r["answer"] for r in records]}
    out["prompts"] = prompts
    for name in CHECKPOINTS:
        m, _ = load_model(str(work / name), dtype=torch.float32)  # what vLLM loads, read back from disk
        t0 = time.time()
        toks = greedy_generate(
            m, prompts, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos, pad_token_id=eos[0], progress=False
        )
        out[f"transformers_{name}_seconds"] = round(time.time() - t0, 1)
        out[f"transformers_{name}"] = [[t for t in seq if t not in eos] for seq in toks]
        del m
    (work / "prepared.json").write_text(json.dumps(out))
    print(f"prepared {len(prompts)} prompts of {args.length} tokens in {work}", flush=True)


def _wait_for_server(url: str, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM server exited with code {proc.returncode} before it answered")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise SystemExit(f"vLLM server did not answer on {url} within {timeout:.0f} s")


def run(args: argparse.Namespace) -> None:
    from vllm import LLM, SamplingParams  # the vLLM venv only
    from vllm.inputs import TokensPrompt

    work = Path(args.work)
    prep = json.loads((work / "prepared.json").read_text())
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)
    results: dict = {}
    for name in CHECKPOINTS:
        t0 = time.time()
        llm = LLM(model=str(work / name), dtype="float32", max_model_len=args.max_model_len,
                  gpu_memory_utilization=args.memory_share, seed=0)
        startup = time.time() - t0
        t0 = time.time()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prep["prompts"]], params)
        seconds = time.time() - t0
        toks = [[t for t in o.outputs[0].token_ids if t not in prep["eos"]] for o in outs]
        results[f"offline_{name}"] = toks
        results[f"offline_{name}_startup_seconds"] = round(startup, 1)
        results[f"offline_{name}_seconds"] = round(seconds, 1)
        results[f"offline_{name}_tokens_per_second"] = round(
            (sum(len(p) for p in prep["prompts"]) + sum(len(t) for t in toks)) / seconds, 1
        )
        print(f"offline {name}: startup {startup:.1f} s, generate {seconds:.1f} s", flush=True)
        del llm
    # the OpenAI-compatible server, one checkpoint (the merged SEAL model: what a user deploys)
    port = args.port
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(work / "seal"),
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--max-model-len", str(args.max_model_len), "--gpu-memory-utilization", str(args.memory_share),
         "--served-model-name", "seal"],
        stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT,
    )
    try:
        _wait_for_server(url, proc, timeout=600)
        results["server_startup_seconds"] = round(time.time() - t0, 1)
        texts, toks = [], []
        t0 = time.time()
        for p in prep["prompts"]:
            body = {"model": "seal", "prompt": p, "max_tokens": MAX_NEW_TOKENS, "temperature": 0.0,
                    "return_token_ids": True, "skip_special_tokens": True}
            req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                choice = json.loads(r.read())["choices"][0]
            texts.append(choice["text"])
            ids = choice.get("token_ids")
            toks.append(None if ids is None else [t for t in ids if t not in prep["eos"]])
        results["server_seal_seconds"] = round(time.time() - t0, 1)
        results["server_seal_text"] = texts
        results["server_seal"] = toks
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    (work / "vllm.json").write_text(json.dumps(results))
    print("vLLM outputs written", flush=True)


def _agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Token agreement of two sets of greedy continuations: positions where both emitted the same token,
    over the longer continuation's length (a missing token counts as a disagreement)."""
    same = total = exact = 0
    for x, y in zip(a, b):
        n = max(len(x), len(y))
        same += sum(1 for i in range(min(len(x), len(y))) if x[i] == y[i])
        total += n
        exact += x == y
    return {"token_agreement": same / total if total else 1.0, "identical_outputs": exact, "n": len(a)}


def report(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from seal_peft.evaluation.scoring import last_integer_match

    work = Path(args.work)
    prep = json.loads((work / "prepared.json").read_text())
    vl = json.loads((work / "vllm.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(work / "seal"))
    answers = prep["answers"]

    def accuracy(seqs: list[list[int]]) -> tuple[int, list[str]]:
        texts = [tok.decode(s, skip_special_tokens=True).strip() for s in seqs]
        return sum(last_integer_match(t, a) for t, a in zip(texts, answers)), texts

    rec: dict = {"adapter": prep["adapter"], "n": len(answers), "protocol": "longeval (last integer, 100 tokens)"}
    for engine, key in [("transformers", "transformers_{}"), ("vllm_offline", "offline_{}")]:
        for name in CHECKPOINTS:
            correct, texts = accuracy(prep[key.format(name)] if engine == "transformers" else vl[key.format(name)])
            rec[f"{engine}_{name}_correct"] = correct
            rec[f"{engine}_{name}_outputs"] = texts
    server_texts = [t.strip() for t in vl["server_seal_text"]]
    rec["vllm_server_seal_correct"] = sum(last_integer_match(t, a) for t, a in zip(server_texts, answers))
    rec["vllm_server_seal_outputs"] = server_texts
    for name in CHECKPOINTS:
        rec[f"agreement_offline_vs_transformers_{name}"] = _agreement(vl[f"offline_{name}"], prep[f"transformers_{name}"])
    if all(t is not None for t in vl["server_seal"]):
        rec["agreement_server_vs_transformers_seal"] = _agreement(vl["server_seal"], prep["transformers_seal"])
    rec["server_text_equals_offline_text"] = sum(
        s == t for s, t in zip(server_texts, rec["vllm_offline_seal_outputs"])
    )
    for k, v in vl.items():
        if k.endswith("seconds") or k.endswith("per_second"):
            rec[k] = v
    for k, v in prep.items():
        if k.endswith("seconds"):
            rec[k] = v
    rec["answers"] = answers
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        Path(args.out).write_text(json.dumps(rec, indent=1))
    n = len(answers)
    print(f"LongEval protocol, n={n} prompts of {len(prep['prompts'][0])} tokens, adapter {prep['adapter']}")
    for engine in ("transformers", "vllm_offline"):
        print(f"  {engine:13s} base {rec[f'{engine}_base_correct']}/{n}   SEAL-C merged {rec[f'{engine}_seal_correct']}/{n}")
    print(f"  vllm_server   SEAL-C merged {rec['vllm_server_seal_correct']}/{n}")
    for k, v in rec.items():
        if k.startswith("agreement"):
            print(f"  {k}: {v['token_agreement']:.4f} token agreement, {v['identical_outputs']}/{v['n']} identical")
    print("  timings:", {k: v for k, v in rec.items() if k.endswith("seconds") or k.endswith("per_second")})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["prepare", "run", "report"])
    p.add_argument("--work", default="runs/vllm_check")
    p.add_argument("--adapter", default="runs/le_c", help="SEAL adapter of the embedded SmolLM2")
    p.add_argument("--train-format", default="longeval", help="prompt format the adapter was trained in")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--memory-share", type=float, default=0.3, help="vLLM on CPU: share of RAM for the KV cache")
    p.add_argument("--port", type=int, default=8731)
    p.add_argument("--out", default="results/deployment/vllm.json")
    args = p.parse_args(argv)
    {"prepare": prepare, "run": run, "report": report}[args.step](args)


if __name__ == "__main__":
    main(sys.argv[1:])
