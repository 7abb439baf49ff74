"""Training helpers for the stock HF Trainer (tiny models)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_model
from peft import get_peft_model
from transformers import Trainer

from seal_peft import SealConfig
from seal_peft.training import (
    SealDataCollator,
    add_lm_samples,
    lm_text_samples,
    mix_lm_samples,
    scale_pull_loss,
    seal_scales,
    seal_training_arguments,
)


def _rows(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 10 + i % 3
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        labels = [-100] * (length - 3) + ids[-3:]
        rows.append(
            {"input_ids": ids, "labels": labels, "attention_mask": [1] * length, "answer": "7", "depth": 0.5}
        )
    return rows


def test_collator_pads_and_drops_metadata():
    batch = SealDataCollator(pad_token_id=0)(_rows(3))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (3, 12)
    assert batch["attention_mask"][0].tolist() == [1] * 10 + [0, 0]
    assert batch["labels"][0, 10:].tolist() == [-100, -100]
    assert SealDataCollator(pad_token_id=0, pad_to_multiple_of=8)(_rows(3))["input_ids"].shape == (3, 16)
    with pytest.raises(ValueError, match="empty batch"):
        SealDataCollator()([])
    with pytest.raises(ValueError, match="no 'input_ids'/'labels'"):
        SealDataCollator()([{"text": "x"}])


def test_recommended_arguments(tmp_path):
    args = seal_training_arguments(str(tmp_path), granularity="head")
    assert args.learning_rate == 1e-2 and args.weight_decay == 0.0 and args.num_train_epochs == 1
    assert args.lr_scheduler_type == "constant" and args.per_device_train_batch_size == 1
    assert "adamw" in str(args.optim).lower()
    assert seal_training_arguments(str(tmp_path), granularity="channel").learning_rate == 2e-2
    assert (
        seal_training_arguments(
            str(tmp_path), learning_rate=3e-2, gradient_accumulation_steps=4
        ).gradient_accumulation_steps
        == 4
    )
    with pytest.raises(ValueError, match="use 'head' or 'channel'"):
        seal_training_arguments(str(tmp_path), granularity="layer")


def test_scale_pull_loss_is_ce_plus_penalty():
    model = get_peft_model(make_model("llama"), SealConfig(init_weights=False))
    batch = SealDataCollator(pad_token_id=0)(_rows(2))
    out = model(**batch)
    plain = scale_pull_loss(model, 0.0)(out, batch["labels"])
    torch.testing.assert_close(plain, out.loss, atol=1e-5, rtol=1e-5)
    pulled = scale_pull_loss(model, 2.0)(out, batch["labels"])
    penalty = torch.cat([(s - 1).pow(2) for s in seal_scales(model)]).sum()
    torch.testing.assert_close(pulled, out.loss + 2.0 * penalty, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        scale_pull_loss(model, -1.0)


def test_mix_lm_samples():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % VOCAB for c in text]}

    lm = lm_text_samples(Tok(), ["abcdefghij" * 5], num_samples=3, length=8, seed=1)
    assert all(len(r["input_ids"]) == 8 and r["labels"] == r["input_ids"] for r in lm)
    mixed = mix_lm_samples(_rows(6), lm, every=2)
    assert len(mixed) == 9 and set(mixed.column_names) == {"input_ids", "attention_mask", "labels"}
    assert mixed[2]["labels"] == mixed[2]["input_ids"]
    with pytest.raises(ValueError, match="fewer than length"):
        lm_text_samples(Tok(), ["ab"], 1, 8)


def test_add_lm_samples_uses_training_essays_only():
    from seal_peft.data import load_essays

    class Tok:  # one id per character: a window can be located in the essay text
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    mixed = add_lm_samples(_rows(6), Tok(), every=3, length=64, seed=2)
    assert len(mixed) == 8
    lm_rows = [mixed[3], mixed[7]]
    train_text, eval_text = "".join(load_essays("train")), "".join(load_essays("eval"))
    for r in lm_rows:
        assert len(r["input_ids"]) == 64 and r["labels"] == r["input_ids"]
        window = "".join(map(chr, r["input_ids"]))
        assert window in train_text and window not in eval_text
    assert mixed[0]["labels"] == _rows(6)[0]["labels"]  # retrieval samples untouched
    with pytest.raises(ValueError, match="every=0 must be >= 1"):
        add_lm_samples(_rows(6), Tok(), every=0)


@pytest.mark.parametrize("granularity", ["head", "channel"])
def test_trainer_with_recommended_args_lowers_answer_loss(tmp_path, granularity):
    model = get_peft_model(make_model("llama"), SealConfig(granularity=granularity))
    rows = _rows(4) * 6
    collate = SealDataCollator(pad_token_id=0)
    batch = collate(rows[:4])
    with torch.no_grad():
        before = model(**batch).loss.item()
    args = seal_training_arguments(
        str(tmp_path),
        granularity=granularity,
        learning_rate=5e-2,
        disable_tqdm=True,
        use_cpu=True,
        gradient_checkpointing=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=collate,
        compute_loss_func=scale_pull_loss(model, 0.01),
    )
    trainer.train()
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < before
    scales = torch.cat([s.detach() for s in seal_scales(model)])
    assert not torch.allclose(scales, torch.ones_like(scales))


@pytest.mark.parametrize("granularity", ["head", "channel"])
def test_recipe_gradient_checkpointing_gives_the_same_step(tmp_path, granularity):
    """seal_training_arguments(gradient_checkpointing=True) really checkpoints (every SEAL layer runs twice
    per step), and the step it takes is exactly the one without checkpointing."""
    from seal_peft.tuner.layer import SealLayer

    rows = _rows(2)
    scales, calls = {}, {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(make_model("llama"), SealConfig(granularity=granularity, init_weights=False))
        layers = [m for m in model.modules() if isinstance(m, SealLayer)]
        seen: list[int] = []
        for m in layers:
            m.register_forward_pre_hook(lambda *_, seen=seen: seen.append(1))
        args = seal_training_arguments(
            str(tmp_path / str(ckpt)),
            granularity=granularity,
            disable_tqdm=True,
            use_cpu=True,
            gradient_checkpointing=ckpt,
            optim="sgd",  # the update is the gradient itself (AdamW's first step is ~lr * sign(grad))
            learning_rate=1.0,
            max_steps=1,
        )
        Trainer(
            model=model, args=args, train_dataset=rows, data_collator=SealDataCollator(pad_token_id=0)
        ).train()
        scales[ckpt] = [m.seal_scale["default"].detach().clone() for m in layers]
        calls[ckpt] = len(seen)
    assert calls == {False: len(scales[False]), True: 2 * len(scales[True])}
    for plain, checkpointed in zip(scales[False], scales[True]):
        assert torch.equal(plain, checkpointed)


def test_trimmed_logits_give_the_same_loss_and_gradient():
    from seal_peft.training import seal_loss

    model = get_peft_model(make_model("llama"), SealConfig(init_weights=False))
    rows = _rows(3)
    full = SealDataCollator(pad_token_id=0)(rows)
    trimmed = SealDataCollator(pad_token_id=0, trim_logits=True)(rows)
    assert 1 < trimmed["logits_to_keep"] < full["input_ids"].shape[1]
    loss_fn = seal_loss(model, scale_pull=0.5)
    losses, grads = [], []
    for batch in (full, trimmed):
        batch = dict(batch)
        labels = batch.pop("labels")
        model.zero_grad()
        out = model(**batch)
        loss = loss_fn(out, labels)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([s.grad.flatten() for s in seal_scales(model)]))
    assert out.logits.shape[1] == trimmed["logits_to_keep"]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_train_seal_convenience(tmp_path):
    from seal_peft.training import train_seal

    model = get_peft_model(make_model("qwen2"), SealConfig())
    trainer = train_seal(
        model, None, _rows(4) * 3, str(tmp_path), learning_rate=5e-2, progress=False, use_cpu=True
    )
    assert trainer.state.global_step == 12
    scales = torch.cat([s.detach() for s in seal_scales(model)])
    assert not torch.allclose(scales, torch.ones_like(scales))
    with pytest.raises(ValueError, match="empty"):
        train_seal(model, None, [], str(tmp_path))


def test_cli_train_lm_options_parse():
    from seal_peft.cli import build_parser

    args = build_parser().parse_args(["train", "--out", "x", "--lm-every", "4", "--lm-length", "256"])
    assert (args.lm_every, args.lm_length) == (4, 256)
    assert build_parser().parse_args(["train", "--out", "x"]).lm_every is None  # None = the recipe's
    assert build_parser().parse_args(["train", "--out", "x", "--lm-kl", "0.5"]).lm_kl == 0.5
    assert build_parser().parse_args(["train", "--out", "x"]).lm_kl is None


def test_recipe_mixes_lm_samples_unless_turned_off(monkeypatch):
    import seal_peft.training as training

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    seen = {}
    monkeypatch.setattr(training, "train_seal", lambda m, t, ds, out, **kw: seen.update(n=len(ds), kw=kw))
    training.train_variant(make_model("llama"), Tok(), _rows(6), "channel", "unused", recipe="smollm2")
    tuned = training.RECIPES["smollm2"]["channel"]
    assert seen["n"] == 6 + 3 and seen["kw"]["learning_rate"] == tuned.learning_rate
    assert "lm_every" not in seen["kw"] and "lm_length" not in seen["kw"]  # not Trainer arguments
    training.train_variant(make_model("llama"), Tok(), _rows(6), "head", "unused", lm_every=0, recipe="smollm2")
    assert seen["n"] == 6
    assert seen["kw"]["lm_kl"] == 0.0  # the recipes keep the windows' cross-entropy
    training.train_variant(make_model("llama"), Tok(), _rows(6), "head", "unused", lm_kl=0.5, recipe="smollm2")
    assert seen["kw"]["lm_kl"] == 0.5 and seen["n"] == 9


def test_lm_windows_are_a_ratio_the_trainer_shuffles_unless_sequential(tmp_path):
    """docs/training.md: the Trainer shuffles the mixed data (the recipe was measured so);
    ``train_sampling_strategy="sequential"`` keeps the order ``mix_lm_samples`` built."""
    from torch.utils.data import RandomSampler, SequentialSampler

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % VOCAB for c in text]}

    mixed = mix_lm_samples(_rows(6), lm_text_samples(Tok(), ["abcdefghij" * 5], 3, 8), every=2)
    model = get_peft_model(make_model("llama"), SealConfig())

    def sampler(**kw):
        args = seal_training_arguments(str(tmp_path), use_cpu=True, **kw)
        return Trainer(model=model, args=args, train_dataset=mixed, data_collator=SealDataCollator())._get_train_sampler()

    assert isinstance(sampler(), RandomSampler)
    keep = sampler(train_sampling_strategy="sequential")
    assert isinstance(keep, SequentialSampler)
    assert [mixed[i]["labels"] == mixed[i]["input_ids"] for i in keep] == [False, False, True] * 3


def test_one_source_of_recipes(monkeypatch):
    """The CLI, the helpers, the example and the benchmarks read seal_peft.training.RECIPES (the CLI had
    its own copy with SEAL-H lr 3e-2 while everything else said 1e-2)."""
    import importlib.util
    import pathlib
    import sys

    import seal_peft.training as training
    from seal_peft import cli
    from seal_peft.training import RECIPES, recipe_for_model

    assert not hasattr(cli, "RECIPES")
    assert set(RECIPES) == {"paper", "smollm2"}
    paper, tuned = RECIPES["paper"], RECIPES["smollm2"]
    assert (paper["head"].learning_rate, paper["channel"].learning_rate) == (1e-2, 2e-2)  # the paper's
    assert (tuned["head"].learning_rate, tuned["channel"].learning_rate) == (3e-2, 2e-2)
    assert paper["head"].lm_every == 0 and tuned["head"].lm_every == tuned["channel"].lm_every == 2
    for g in ("head", "channel"):
        assert seal_training_arguments("unused", granularity=g).learning_rate == paper[g].learning_rate

    # the CLI: the tuned recipe for the embedded model, the paper's for any other, or the one asked for
    class CharTok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    assert recipe_for_model(None) == recipe_for_model("smollm2") == "smollm2"
    assert recipe_for_model("gpt2") == recipe_for_model("gemma3-270m") == "paper"
    seen = []
    monkeypatch.setattr(training, "train_seal", lambda m, t, ds, out, **kw: seen.append((len(ds), kw)))
    parse = cli.build_parser().parse_args
    for argv, model_name, expect in [
        ([], None, tuned["head"]),
        (["--model", "some/model"], "some/model", paper["head"]),
        (["--recipe", "paper"], None, paper["head"]),
    ]:
        args = parse(["train", "--out", "x", *argv])
        assert args.model == model_name
        recipe = cli._common._recipe_name(args)
        training.train_variant(make_model("llama"), CharTok(), _rows(6), "head", "unused", recipe=recipe)
        windows = 6 // expect.lm_every if expect.lm_every else 0
        assert seen[-1][1]["learning_rate"] == expect.learning_rate and seen[-1][0] == 6 + windows

    # the benchmarks' optimizer rates and the example's defaults come from the same table
    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_common", root / "benchmarks" / "_common.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_common"] = bench
    spec.loader.exec_module(bench)
    assert bench.LEARNING_RATE["seal-h"] == paper["head"].learning_rate
    assert bench.LEARNING_RATE["seal-c"] == paper["channel"].learning_rate
    example = (root / "examples" / "train_line_retrieval.py").read_text()
    assert "RECIPES[" in example and "learning_rate=recipe.learning_rate" in example
    readme = (root / "README.md").read_text()
    for name, recipe in RECIPES.items():  # the README states both
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}`"))
        assert f"| {recipe['head'].learning_rate:.0e}".replace("e-0", "e-") in row


def _lm_row(length=12, seed=5):
    ids = torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return {"input_ids": ids, "labels": list(ids), "attention_mask": [1] * length}


def test_lm_kl_trains_lm_windows_on_kl_to_base_and_task_rows_on_ce():
    from seal_peft.training import seal_loss

    model = get_peft_model(make_model("llama"), SealConfig(init_weights=False))  # scales != 1
    rows = [_rows(1)[0], _lm_row()]  # a prompt-masked task row and a plain-text window, padded together
    batch = SealDataCollator(pad_token_id=0)(rows)
    labels = batch.pop("labels")
    loss_fn = seal_loss(model, lm_kl=0.5)
    out = model(**batch)
    got = loss_fn(out, labels)
    # by hand: CE of the task row + 0.5 * KL(base || adapted) over the window's targets, / all targets
    logits, shift = out.logits[:, :-1].float(), labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[0], shift[0], ignore_index=-100, reduction="sum")
    with torch.no_grad(), model.disable_adapter():
        base = model(**batch).logits[:, :-1].float()
    p, logq = torch.log_softmax(base[1], -1), torch.log_softmax(logits[1], -1)
    kl = (p.exp() * (p - logq)).sum(-1)[shift[1] != -100].sum()
    assert kl > 1e-3  # the scales really move the window's distribution
    torch.testing.assert_close(got, (ce + 0.5 * kl) / (shift != -100).sum(), atol=1e-6, rtol=1e-5)
    # the teacher pass left the adapter on and the gradient reaches the scales
    torch.testing.assert_close(model(**batch).logits, out.logits, atol=0, rtol=0)
    got.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in seal_scales(model))


def test_lm_kl_is_zero_with_gradient_zero_at_identity_and_off_by_default():
    from seal_peft.training import seal_loss

    model = get_peft_model(make_model("llama"), SealConfig())  # scales = 1: adapted == base
    batch = SealDataCollator(pad_token_id=0)([_lm_row()])
    labels = batch.pop("labels")
    loss = seal_loss(model, lm_kl=1.0)(model(**batch), labels)
    assert loss.item() == 0.0
    loss.backward()
    assert all(s.grad.abs().max().item() < 1e-6 for s in seal_scales(model))
    plain = seal_loss(model)(model(**batch), labels)  # lm_kl=0: the window keeps its cross-entropy
    assert plain.item() > 1.0
    # a batch without LM windows: lm_kl changes nothing
    task = SealDataCollator(pad_token_id=0)(_rows(2))
    task_labels = task.pop("labels")
    out = model(**task)
    assert seal_loss(model, lm_kl=1.0)(out, task_labels).item() == seal_loss(model)(out, task_labels).item()


def test_lm_kl_bad_input():
    from seal_peft.training import seal_loss

    model = get_peft_model(make_model("llama"), SealConfig())
    with pytest.raises(ValueError, match="lm_kl=-1"):
        seal_loss(model, lm_kl=-1)
    with pytest.raises(TypeError, match="get_peft_model"):
        seal_loss(make_model("llama"), lm_kl=1.0)


def test_train_seal_with_lm_kl_moves_scales_with_windows_in_the_mix(tmp_path):
    from seal_peft.training import train_seal

    model = get_peft_model(make_model("llama"), SealConfig(granularity="channel"))
    data = mix_lm_samples(_rows(4), [_lm_row(seed=s) for s in range(2)], every=2)
    train_seal(model, None, data, str(tmp_path), granularity="channel", lm_kl=1.0, progress=False, use_cpu=True)
    scales = torch.cat([s.detach().flatten() for s in seal_scales(model)])
    assert (scales - 1).abs().max() > 1e-4
