"""The ``seal-peft`` command: which data each command uses, option validation, error reporting.

Model loading and evaluation are replaced by fakes where only the data matters, so these tests take
seconds; the real commands run in tests/test_real_model.py.
"""

from __future__ import annotations

import string

import pytest

from seal_peft import cli
from seal_peft.data import load_essays, needle_haystack


def char_tokenizer():
    """One token per printable character; no chat template (use --prompt-format plain)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(string.printable[:95]) + ["\n"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


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

    monkeypatch.setattr(cli, "_load_with_adapter", lambda *a, **k: (None, tok))
    monkeypatch.setattr(cli, "evaluate_model", fake_evaluate_model)
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
    monkeypatch.setattr(cli, "_apply_extend", lambda *a: None)
    monkeypatch.setattr(cli, "train_variant", fake_train_variant)
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
            cli._dataset_from_args(args, tok, essays="eval")
    args.data = str(tmp_path / "eval")
    assert len(cli._dataset_from_args(args, tok, essays="eval")) == 1
    with pytest.raises(ValueError, match="train on the training half.*--essays train"):
        cli._dataset_from_args(args, tok, essays="train")
    args.data = str(tmp_path / "None")
    with pytest.warns(UserWarning, match="all the essays"):
        cli._dataset_from_args(args, tok, essays="train")
    # `generate --essays eval` writes evaluation data
    out = tmp_path / "gen"
    monkeypatch.setattr("seal_peft.models.load_tokenizer", lambda *a, **k: tok)
    assert cli.main(["generate", *NEEDLE, "--essays", "eval", "--out", str(out)]) == 0
    args.data = str(out)
    ds = cli._dataset_from_args(args, tok, essays="eval")
    assert {_haystack_half(tok, r) for r in ds} == {"eval"}
