"""lm-evaluation-harness on a SEAL adapter (unmerged, after `import seal_peft`) and on its merged model:
a local task (YAML over a local jsonl, no downloads), identical per-sample results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from test_ecosystem_common import tiny_checkpoint
from transformers import AutoModelForCausalLM

import seal_peft
from seal_peft.cli import main as cli_main
from seal_peft.models import load_tokenizer

lm_eval = pytest.importorskip("lm_eval", reason="pip install lm-eval (the `lm-eval` extra)")

TASKS = ("seal_tiny_mc", "seal_tiny_gen")


def write_tasks(folder: Path) -> Path:
    """Two tasks over one local jsonl: multiple choice (log-likelihoods) and generation (exact match)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "prompt": f"line {i}: REGISTER_CONTENT is <{1000 + 37 * i}>. The REGISTER_CONTENT in line {i} is",
            "choices": [f" {1000 + 37 * i}", f" {2000 + 11 * i}", f" {3000 + 7 * i}"],
            "label": 0,
            "answer": f" {1000 + 37 * i}",
        }
        for i in range(6)
    ]
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {folder / "datasets_cache"}
test_split: test
doc_to_text: "{{{{prompt}}}}"
"""
    (folder / "seal_tiny_mc.yaml").write_text(
        "task: seal_tiny_mc\n" + common + """output_type: multiple_choice
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
    )
    (folder / "seal_tiny_gen.yaml").write_text(
        "task: seal_tiny_gen\n" + common + """output_type: generate_until
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
    )
    return folder


def evaluate(model_args, tasks_dir: Path) -> dict:
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=list(TASKS), task_manager=TaskManager(include_path=str(tasks_dir)),
        batch_size=2, device="cpu", log_samples=True, bootstrap_iters=0,
    )
    return {
        task: {
            "acc": out["results"][task].get("acc,none", out["results"][task].get("exact_match,none")),
            "resps": [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])],
        }
        for task in TASKS
    }


def assert_same(a: dict, b: dict) -> None:
    for task in TASKS:
        assert a[task]["acc"] == b[task]["acc"]
        if task == "seal_tiny_mc":
            la = torch.tensor([[r[0][0] for r in resp] for resp in a[task]["resps"]])
            lb = torch.tensor([[r[0][0] for r in resp] for resp in b[task]["resps"]])
            torch.testing.assert_close(la, lb, rtol=0, atol=1e-4)
        else:
            assert a[task]["resps"] == b[task]["resps"]


@pytest.mark.timeout(600)
def test_lm_eval_unmerged_adapter_equals_merged_model(tmp_path):
    base = tiny_checkpoint(tmp_path / "base")
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), seal_peft.SealConfig(init_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    tasks = write_tasks(tmp_path / "tasks")
    assert cli_main(["merge", "--model", str(base), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "merged"), "--quiet"]) == 0

    # lm-eval loads the adapter itself (PeftModel.from_pretrained): works because seal_peft is imported
    by_path = evaluate(f"pretrained={base},peft={tmp_path / 'adapter'},dtype=float32", tasks)
    # an already-built SEAL PeftModel object
    tok = load_tokenizer(str(base))
    by_object = evaluate({"pretrained": peft_model.eval(), "tokenizer": tok}, tasks)
    merged = evaluate(f"pretrained={tmp_path / 'merged'},dtype=float32", tasks)
    plain = evaluate(f"pretrained={base},dtype=float32", tasks)

    assert_same(by_path, by_object)
    assert_same(by_path, merged)
    mc = lambda r: torch.tensor([[x[0][0] for x in resp] for resp in r["seal_tiny_mc"]["resps"]])  # noqa: E731
    assert (mc(by_path) - mc(plain)).abs().max() > 1e-3  # the adapter is really applied


def test_lm_eval_command_line_through_seal_peft(tmp_path):
    """`python -m seal_peft.lmeval run ...` is lm-eval's CLI with SEAL registered (the documented command)."""
    base = tiny_checkpoint(tmp_path / "base")
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), seal_peft.SealConfig()).save_pretrained(tmp_path / "a")
    tasks = write_tasks(tmp_path / "tasks")
    root = Path(__file__).resolve().parents[2]  # the repository
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "seal_peft.lmeval", "run", "--model", "hf",
           "--model_args", f"pretrained={base},peft={tmp_path / 'a'},dtype=float32", "--tasks", "seal_tiny_mc",
           "--include_path", str(tasks), "--batch_size", "2", "--device", "cpu",
           "--output_path", str(tmp_path / "results")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = list((tmp_path / "results").rglob("results_*.json"))
    assert files, proc.stdout[-2000:]
    result = json.loads(files[0].read_text())
    assert result["results"]["seal_tiny_mc"]["acc,none"] is not None
    assert str(result["config"]["model_args"]["peft"]).endswith("/a")
