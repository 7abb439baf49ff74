"""TRL's SFTTrainer on SEAL: ``SFTTrainer(model, peft_config=SealConfig(...))`` on the project's generated
line-retrieval data, in both dataset forms TRL accepts (the records as they are — pre-tokenized with the
prompt masked in ``labels`` — and TRL's text prompt/completion format with its completion-only loss).

Checked on what TRL actually feeds the model: the labels of every batch mask exactly the prompt, and the
loss TRL computes equals the answer-only cross-entropy; only SEAL scales train, every base weight is
bit-identical after training, and the saved adapter reloads with ``PeftModel.from_pretrained`` to the
trained model's logits (torch.equal)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_ecosystem_common import tiny_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from seal_peft import SealConfig
from seal_peft.data import line_retrieval
from seal_peft.training import DEFAULT_LR, seal_loss

trl = pytest.importorskip("trl", reason="pip install trl (in the `test` extra; Python >= 3.11)")
from seal_peft.integrations.trl import prompt_completion, sft_config  # noqa: E402

LENGTHS = [600, 450]  # tokens; the byte-level tiny tokenizer needs ~430 for one record and the question


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory.mktemp("trl") / "tiny")
    tok = AutoTokenizer.from_pretrained(path)
    data = line_retrieval(tok, num_samples=4, length=LENGTHS, seed=0, progress=False)
    return path, tok, data


class RecordingSFTTrainer(trl.SFTTrainer):
    """SFTTrainer that records each batch it computes the loss on, TRL's loss, and the answer-only
    cross-entropy of the same batch (``seal_loss``, the stock-Trainer path) computed from full logits."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[dict[str, torch.Tensor]] = []
        self.losses: list[tuple[float, float]] = []
        self.reference = seal_loss(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.batches.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with torch.no_grad():
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            ref = self.reference({"logits": logits}, inputs["labels"], num_items_in_batch)
        self.losses.append((loss.item(), ref.item()))
        return loss


def _train(path, tok, train, out, **overrides):
    base = AutoModelForCausalLM.from_pretrained(path)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    args = sft_config(
        str(out / "trainer"),
        "channel",
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=5e-2,
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
        **overrides,
    )
    trainer = RecordingSFTTrainer(
        model=base, args=args, train_dataset=train, processing_class=tok, peft_config=SealConfig(granularity="channel")
    )
    return trainer, before


def _record_for(data, ids: list[int]) -> dict:
    matches = [r for r in data if list(r["input_ids"]) == ids]
    assert len(matches) == 1, "a trained sequence is not one of the generated records"
    return matches[0]


@pytest.mark.parametrize("form", ["records", "prompt_completion"])
def test_sft_trainer_trains_seal_on_the_answer_only_and_saves_a_loadable_adapter(setup, tmp_path, form):
    path, tok, data = setup
    train = data if form == "records" else prompt_completion(data, tok)
    trainer, before = _train(path, tok, train, tmp_path)
    model = trainer.model
    assert isinstance(model, PeftModel)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".seal_scale." in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == 2 * 32  # 2 layers x 32 channels
    assert all(torch.equal(p, torch.ones_like(p)) for p in trainable.values())

    trainer.train()

    # (b) what TRL fed the model: labels are the records' labels (prompt -100, answer = its tokens), padding -100
    assert len(trainer.batches) == 2
    seen = 0
    for batch in trainer.batches:
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            n = int(mask.sum())
            rec = _record_for(data, ids[:n].tolist())
            p = rec["prompt_length"]
            supervised = (labels != -100).nonzero().flatten().tolist()
            assert supervised and supervised[0] == p, "a prompt token is in the loss, or the answer's first is not"
            assert supervised == list(range(p, p + len(supervised)))  # one span, nothing after it
            assert torch.equal(labels[supervised], ids[supervised])
            assert tok.decode(ids[supervised]) == rec["target"]  # the span is exactly the answer
            assert torch.equal(labels[:n], torch.tensor(rec["labels"]))
            seen += 1
    assert seen == 4
    # TRL's loss (fused LM head) is the answer-only cross-entropy of the stock-Trainer path
    for trl_loss, answer_loss in trainer.losses:
        assert trl_loss == pytest.approx(answer_loss, rel=1e-5)

    # (a) every scale moved; no base weight changed by a single bit
    for name, p in model.named_parameters():
        if ".seal_scale." in name:
            assert (p.detach() != 1).all(), name
    after = model.get_base_model().state_dict()
    after = {k.replace(".base_layer.", "."): v for k, v in after.items() if ".seal_scale." not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)

    # (c) the saved adapter: SEAL scales only, reloaded by plain PEFT to the same logits
    adapter = tmp_path / "adapter"
    trainer.save_model(str(adapter))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "SEAL" and config["granularity"] == "channel"
    assert config["base_model_name_or_path"] == str(path)
    keys = load_file(adapter / "adapter_model.safetensors").keys()
    assert len(keys) == 2 and all(k.endswith(".seal_scale") for k in keys)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), adapter).eval()
    x = torch.tensor([data[0]["input_ids"][:64]])
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)
        base_logits = AutoModelForCausalLM.from_pretrained(path)(x).logits
        assert not torch.equal(base_logits, model(x).logits)


def test_sft_config_is_the_seal_recipe(tmp_path):
    args = sft_config(str(tmp_path), "channel", seed=3, completion_only_loss=True, dataset_num_proc=1)
    assert isinstance(args, trl.SFTConfig)
    assert args.learning_rate == DEFAULT_LR["channel"] and args.lr_scheduler_type == "constant"
    assert args.weight_decay == 0.0 and args.warmup_steps == 0 and args.optim == "adamw_torch"
    assert not args.bf16 and not args.fp16 and not args.gradient_checkpointing
    assert args.max_length is None and args.completion_only_loss is True and args.dataset_num_proc == 1
    assert args.seed == 3 and args.data_seed == 3 and args.save_strategy == "no"
    assert sft_config(str(tmp_path), "head", learning_rate=1e-3, max_length=4096).max_length == 4096
    assert sft_config(str(tmp_path), "head", learning_rate=1e-3).learning_rate == 1e-3
    with pytest.raises(TypeError, match="'max_lenght' is not a field of trl.SFTConfig"):
        sft_config(str(tmp_path), "head", max_lenght=10)
    with pytest.raises(ValueError, match="granularity='rank'"):
        sft_config(str(tmp_path), "rank")


def test_trl_default_max_length_drops_long_seal_samples(setup, tmp_path):
    """Why sft_config sets max_length=None: TRL's default (1024) keeps the *start* of a sample and drops
    the samples left without supervised tokens — a SEAL sample's answer is at its end."""
    path, tok, _ = setup
    long = line_retrieval(tok, num_samples=3, length=[1200, 600, 1200], seed=1, progress=False)
    base = AutoModelForCausalLM.from_pretrained(path)
    stock = trl.SFTConfig(str(tmp_path / "stock"), use_cpu=True, bf16=False, report_to=[])
    assert stock.max_length == 1024
    kept = trl.SFTTrainer(base, args=stock, train_dataset=long, processing_class=tok,
                          peft_config=SealConfig()).train_dataset
    assert len(kept) == 1 and kept[0]["input_ids"] == long[1]["input_ids"]
    ours = trl.SFTTrainer(AutoModelForCausalLM.from_pretrained(path), args=sft_config(str(tmp_path / "seal"),
                          use_cpu=True), train_dataset=long, processing_class=tok, peft_config=SealConfig())
    assert [r["input_ids"] for r in ours.train_dataset] == long["input_ids"]


def test_prompt_completion_refuses_records_without_a_prompt(setup):
    from datasets import Dataset

    _, tok, _ = setup
    with pytest.raises(ValueError, match="no prompt_length, target column"):
        prompt_completion(Dataset.from_list([{"input_ids": [1, 2], "labels": [1, 2]}]), tok)
