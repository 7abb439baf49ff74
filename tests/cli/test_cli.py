"""The ``seal-peft`` command: which data each command uses, option validation, error reporting.

Model loading and evaluation are replaced by fakes where only the data matters, so these tests take
seconds; the real commands run in tests/test_real_model.py.
"""

from __future__ import annotations

import pytest
from conftest import make_char_tokenizer

from seal_peft import cli
from seal_peft.data import load_essays, needle_haystack


def char_tokenizer():
    """One token per printable character; no chat template (use --prompt-format plain), no BOS."""
    return make_char_tokenizer(bos=False)


class _Stop(Exception):
    pass


def _haystack_half(tok, record) -> str:
    """"train" or "eval": the half of the essays that a needle record's haystack comes from."""
    text = tok.decode(record["input_ids"][: record["prompt_length"]])
    halves = {h: " ".join(load_essays(h)) for h in ("train", "eval")}
    found = []  # 80-character pieces of essay text (between unknown characters; the needle is in none)
    for run in text.split("<unk>"):
        for start in range(0, len(run) - 80, 80):
            piece = run[start : start + 80]
            found += [h for h, essays in halves.items() if piece in essays]
    assert len(found) >= 3 and len(set(found)) == 1, (found, text)
    return found[0]


NEEDLE = ["--task", "needle", "--num-samples", "2", "--lengths", "1500", "--prompt-format", "plain", "--quiet"]


def test_eval_generates_needles_from_the_held_out_essays(monkeypatch):
    """`eval` drew its NIAH haystacks from the training half (which the recipe's LM windows come from)."""
    tok = char_tokenizer()
    seen = {}

    def fake_evaluate_model(model, tok_, ds, *args, **kwargs):
        seen["ds"] = ds
        raise _Stop

    monkeypatch.setattr(cli.eval, "_load_with_adapter", lambda *a, **k: (None, tok))
    monkeypatch.setattr(cli.eval, "evaluate_model", fake_evaluate_model)
    with pytest.raises(_Stop):
        cli.main(["eval", *NEEDLE, "--device", "cpu"])
    assert len(seen["ds"]) == 2 and {_haystack_half(tok, r) for r in seen["ds"]} == {"eval"}


def test_train_generates_needles_from_the_training_essays(monkeypatch):
    from seal_peft import models

    tok = char_tokenizer()
    seen = {}

    def fake_train_variant(model, tok_, ds, *args, **kwargs):
        seen["ds"] = ds
        raise _Stop

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (None, tok))
    monkeypatch.setattr(cli.train, "_apply_extend", lambda *a: None)
    monkeypatch.setattr(cli.train, "train_variant", fake_train_variant)
    with pytest.raises(_Stop):
        cli.main(["train", *NEEDLE, "--device", "cpu", "--out", "unused"])
    assert {_haystack_half(tok, r) for r in seen["ds"]} == {"train"}


def test_needle_data_from_the_wrong_essays_is_refused(monkeypatch, tmp_path):
    tok = char_tokenizer()
    kwargs = dict(num_samples=1, length=1500, prompt_format="plain", progress=False)
    for half in ("train", "eval", None):
        needle_haystack(tok, essays=half, **kwargs).save_to_disk(str(tmp_path / str(half)))
    args = cli.build_parser().parse_args(["eval", "--quiet"])
    for half in ("train", "None"):
        args.data = str(tmp_path / half)
        with pytest.raises(ValueError, match="held-out half.*--essays eval"):
            cli._common._dataset_from_args(args, tok, essays="eval")
    args.data = str(tmp_path / "eval")
    assert len(cli._common._dataset_from_args(args, tok, essays="eval")) == 1
    with pytest.raises(ValueError, match="train on the training half.*--essays train"):
        cli._common._dataset_from_args(args, tok, essays="train")
    args.data = str(tmp_path / "None")
    with pytest.warns(UserWarning, match="all the essays"):
        cli._common._dataset_from_args(args, tok, essays="train")
    # `generate --essays eval` writes evaluation data
    out = tmp_path / "gen"
    monkeypatch.setattr("seal_peft.models.load_tokenizer", lambda *a, **k: tok)
    assert cli.main(["generate", *NEEDLE, "--essays", "eval", "--out", str(out)]) == 0
    args.data = str(out)
    ds = cli._common._dataset_from_args(args, tok, essays="eval")
    assert {_haystack_half(tok, r) for r in ds} == {"eval"}


# ------------------------------------------------------------------------------------------- errors
BAD_OPTIONS = [
    ["demo", "--granularities", "foo"],
    ["demo", "--granularities", "head,head"],
    ["demo", "--granularities", ""],
    ["demo", "--eval-samples", "0"],
    ["demo", "--train-samples", "-1"],
    ["demo", "--train-length", "x"],
    ["demo", "--lengths", "512,0"],
    ["demo", "--ppl-tokens", "-5"],
    ["demo", "--recipe", "mine"],
    ["generate", "--out", "x", "--num-samples", "0"],
    ["generate", "--out", "x", "--lengths", ""],
    ["generate", "--out", "x", "--depths", "0.5,1.5"],
    ["generate", "--out", "x", "--depths", "nan"],
    ["generate", "--out", "x", "--essays", "test"],
    ["train", "--out", "x", "--lr", "0"],
    ["train", "--out", "x", "--lr", "inf"],
    ["train", "--out", "x", "--epochs", "-1"],
    ["train", "--out", "x", "--scale-pull", "-0.1"],
    ["train", "--out", "x", "--layers", "1,-2"],
    ["train", "--out", "x", "--lm-every", "-1"],
    ["train", "--out", "x", "--lm-length", "0"],
    ["train", "--out", "x", "--extend", "ntk"],
    ["train", "--out", "x", "--extend", "ntk:two"],
    ["train", "--out", "x", "--device-map", "everywhere"],
    ["eval", "--ppl-tokens", "-1"],
    ["eval", "--extend", "rope:2"],
    ["analyze", "--out", "x", "--top", "0"],
    ["analyze", "--out", "x", "--perturb-top", "-1"],
    ["analyze", "--out", "x", "--random-draws", "-1"],
    ["analyze", "--out", "x", "--check-heads", "-3"],
    ["analyze", "--out", "x", "--perturb-value", "nan"],
]


@pytest.mark.parametrize("argv", BAD_OPTIONS, ids=[" ".join(a) for a in BAD_OPTIONS])
def test_every_bad_option_is_refused_before_anything_runs(argv, capsys, monkeypatch):
    from seal_peft import models

    def no_loading(*a, **k):  # nothing may be loaded for a bad option
        raise AssertionError("loaded a model")

    monkeypatch.setattr(models, "load_model", no_loading)
    monkeypatch.setattr(models, "load_tokenizer", no_loading)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    option = [a for a in argv if a.startswith("--")][-1]  # the bad one is last
    assert f"argument {option}" in err and "Traceback" not in err, err


def test_usage_errors_are_one_line_internal_errors_keep_their_traceback(monkeypatch, capsys, tmp_path):
    from seal_peft.errors import SealUsageError

    def usage(args):
        raise SealUsageError("--thing 3: use 4")

    def bug(args):
        raise ValueError("an internal bug")

    argv = ["generate", "--out", str(tmp_path / "x")]
    monkeypatch.setattr(cli.generate, "cmd_generate", usage)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == "error: --thing 3: use 4\n"
    with pytest.raises(SealUsageError):  # --debug: the traceback
        cli.main([*argv, "--debug"])
    monkeypatch.setattr(cli.generate, "cmd_generate", bug)
    for error in (ValueError, TypeError, FileNotFoundError):
        monkeypatch.setattr(cli.generate, "cmd_generate", lambda args, e=error: (_ for _ in ()).throw(e("a bug")))
        with pytest.raises(error, match="a bug"):
            cli.main(argv)


def test_missing_data_folder_and_bad_data_options_are_usage_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("seal_peft.models.load_tokenizer", lambda *a, **k: char_tokenizer())
    assert cli.main(["generate", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a folder written by `seal-peft generate --out`" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["generate", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a dataset" in capsys.readouterr().err
    # a length the generator cannot reach with this tokenizer: the generator's message, on one line
    argv = ["generate", "--prompt-format", "plain", "--lengths", "20", "--num-samples", "1", "--quiet"]
    assert cli.main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the data options") and "too short" in err and err.count("\n") == 1


def test_train_layers_outside_the_model_are_refused(monkeypatch, capsys):
    from conftest import make_model

    from seal_peft import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (make_model("llama"), char_tokenizer()))
    monkeypatch.setattr(cli.train, "train_variant", lambda *a, **k: pytest.fail("trained"))
    assert cli.main(["train", "--out", "unused", "--layers", "0,5", "--device", "cpu", "--quiet"]) == 2
    assert "--layers 0,5: the model has 2 layers (0..1); 5 do not exist" in capsys.readouterr().err


def _other_tokenizer():
    tok = char_tokenizer()
    tok.add_tokens(["<extra>"])  # one token more: other ids
    return tok


def test_train_data_of_another_tokenizer_is_refused(monkeypatch, tmp_path, capsys):
    """A generated dataset records its tokenizer; `train --data` with another model's tokenizer is refused."""
    from datasets import Dataset

    from seal_peft import models
    from seal_peft.data import line_retrieval
    from seal_peft.data._common import dataset_metadata, tokenizer_fingerprint

    tok = char_tokenizer()
    ds = line_retrieval(tok, num_samples=1, length=900, prompt_format="plain", progress=False)
    recorded = dataset_metadata(ds)[0]["tokenizer"]
    assert recorded == tokenizer_fingerprint(tok) and len(recorded["sha256"]) == 64
    assert tokenizer_fingerprint(char_tokenizer()) == recorded  # another copy of the same vocabulary
    assert tokenizer_fingerprint(_other_tokenizer())["sha256"] != recorded["sha256"]
    ds.save_to_disk(str(tmp_path / "data"))
    Dataset.from_list(ds.to_list()).save_to_disk(str(tmp_path / "old"))  # no record (older seal-peft)

    seen = {}
    loaded = {}
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (None, loaded["tok"]))
    monkeypatch.setattr(cli.train, "_apply_extend", lambda *a: None)
    monkeypatch.setattr(cli.train, "train_variant", lambda m, t, d, *a, **k: seen.update(n=len(d)) or _stop())
    argv = ["train", "--device", "cpu", "--quiet", "--out", str(tmp_path / "adapter")]
    loaded["tok"] = _other_tokenizer()
    assert cli.main([*argv, "--data", str(tmp_path / "data"), "--model", "other/model"]) == 2
    err = capsys.readouterr().err
    assert "was generated with another tokenizer" in err and "seal-peft generate --model other/model" in err
    assert not seen and not (tmp_path / "adapter").exists()
    loaded["tok"] = char_tokenizer()
    with pytest.raises(_Stop):
        cli.main([*argv, "--data", str(tmp_path / "data")])
    assert seen["n"] == 1
    with pytest.warns(UserWarning, match="does not record the tokenizer"), pytest.raises(_Stop):
        cli.main([*argv, "--data", str(tmp_path / "old")])


def _stop():
    raise _Stop


def test_eval_of_a_folder_that_is_no_adapter_is_a_usage_error(monkeypatch, tmp_path, capsys):
    from conftest import make_model

    from seal_peft import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (make_model("llama"), char_tokenizer()))
    (tmp_path / "data").mkdir()
    for adapter, message in [(tmp_path / "data", "without adapter_config.json"), (tmp_path / "none", "--adapter")]:
        assert cli.main(["eval", "--adapter", str(adapter), "--device", "cpu", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err


# ----------------------------------------------------------------------------- TrainingArguments
def _captured_training_args(monkeypatch, extra):
    """Run ``seal-peft train`` on a tiny model up to the ``Trainer`` and return the args it is given."""
    from conftest import make_model
    from transformers import Trainer

    from seal_peft import models

    seen = {}

    def fake_init(self, *a, args=None, **k):  # the Trainer gets its args; nothing trains
        seen["args"] = args
        raise _Stop

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (make_model("llama"), char_tokenizer()))
    monkeypatch.setattr(Trainer, "__init__", fake_init)
    with pytest.raises(_Stop):
        cli.main(["train", *NEEDLE, "--device", "cpu", "--out", "unused", *extra])
    return seen["args"]


def test_train_passes_any_training_argument_to_the_trainer(monkeypatch):
    args = _captured_training_args(
        monkeypatch,
        [
            "--ta", "per_device_train_batch_size=4",
            "--ta", "gradient_accumulation_steps=3",
            "--ta", "logging_steps=7",
            "--ta", "report_to=tensorboard",
            "--ta", "bf16=false",
            "--ta", "max_grad_norm=0.5",
            "--ta", "lr_scheduler_type=cosine",
        ],
    )
    assert args.per_device_train_batch_size == 4 and args.gradient_accumulation_steps == 3
    assert args.logging_steps == 7 and args.report_to == ["tensorboard"]
    assert args.bf16 is False and args.max_grad_norm == 0.5 and args.lr_scheduler_type == "cosine"
    # untouched fields keep the recipe's settings (the default model is the embedded SmolLM2: its recipe)
    from seal_peft.training import RECIPES

    assert args.learning_rate == RECIPES["smollm2"]["head"].learning_rate and args.save_strategy == "no"


def test_train_training_argument_lists():
    from seal_peft.cli.train import parse_training_arg

    assert parse_training_arg("report_to=tensorboard,wandb") == ("report_to", ["tensorboard", "wandb"])
    assert parse_training_arg("report_to=none") == ("report_to", "none")
    assert parse_training_arg("label_names=labels,extra") == ("label_names", ["labels", "extra"])
    assert parse_training_arg("max_steps=-1") == ("max_steps", -1)


BAD_TRAINING_ARGS = [
    ("per_device_train_batch_sise=4", "'per_device_train_batch_sise' is not a TrainingArguments field"),
    ("per_device_train_batch_size", "expected FIELD=VALUE"),
    ("per_device_train_batch_size=four", "per_device_train_batch_size"),
    ("bf16=maybe", "bf16"),
    ("lr_scheduler_type=sometimes", "lr_scheduler_type"),
    ("learning_rate=1e-3", "use --lr"),
    ("output_dir=x", "use --out"),
]


@pytest.mark.parametrize("value,message", BAD_TRAINING_ARGS, ids=[v for v, _ in BAD_TRAINING_ARGS])
def test_train_bad_training_argument_is_a_one_line_usage_error(value, message, capsys, monkeypatch):
    from seal_peft import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--out", "x", "--ta", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --ta/--training-arg" in err and message in err and "Traceback" not in err, err
    if "not a TrainingArguments field" in message:
        assert "per_device_train_batch_size" in err and "--list-training-args" in err, err


def test_train_lists_the_training_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--list-training-args"])  # no --out needed
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "per_device_train_batch_size" in out and "report_to" in out and "int" in out
    assert "learning_rate" not in out.split("set by train options")[0]
