"""Saving, loading (in fresh processes), the stock HF Trainer, and bad adapter files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import VOCAB, make_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import seal_peft
from seal_peft import SealConfig, SealLayer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def saved(tmp_path, inputs):
    """A base checkpoint on disk and a trained-looking SEAL adapter for it."""
    make_model("mistral").save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    model = get_peft_model(base, SealConfig(granularity="head", init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    torch.save(inputs, tmp_path / "inputs.pt")
    return tmp_path, model(inputs).logits.detach()


def test_saved_files(saved):
    path, _ = saved
    files = set(os.listdir(path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    config = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SEAL" and config["granularity"] == "head"
    assert config["target_modules"] == ["self_attn.o_proj"]
    weights = load_file(path / "adapter" / "adapter_model.safetensors")
    assert sorted(weights) == [
        f"base_model.model.model.layers.{i}.self_attn.o_proj.seal_scale" for i in range(2)
    ]
    assert all(w.shape == (4,) for w in weights.values())


@pytest.mark.parametrize("loader", ["PeftModel", "AutoPeftModelForCausalLM", "seal_peft.from_pretrained"])
def test_load_in_fresh_process_identical_logits(saved, loader):
    path, expected = saved
    code = f"""
        import torch, seal_peft
        from transformers import AutoModelForCausalLM
        from peft import PeftModel, AutoPeftModelForCausalLM
        inputs = torch.load("inputs.pt")
        loader = {loader!r}
        if loader == "AutoPeftModelForCausalLM":
            model = AutoPeftModelForCausalLM.from_pretrained("adapter")
        else:
            base = AutoModelForCausalLM.from_pretrained("base")
            load = PeftModel.from_pretrained if loader == "PeftModel" else seal_peft.from_pretrained
            model = load(base, "adapter")
        model.eval()
        assert not any(p.requires_grad for p in model.parameters())
        torch.save(model(inputs).logits, "out.pt")
    """
    result = _run(code, path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(path / "out.pt"), expected)


def test_loading_without_import_gives_keyerror_and_docs_explain(saved):
    path, _ = saved
    result = _run(
        """
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("base"), "adapter")
        """,
        path,
    )
    assert result.returncode != 0 and "KeyError: 'SEAL'" in result.stderr
    docs = open(os.path.join(REPO, "docs", "api.md")).read()
    assert "KeyError: 'SEAL'" in docs and "import seal_peft" in docs


def test_is_trainable_and_load_adapter(saved, inputs):
    path, expected = saved
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path / "base").eval()
    frozen = PeftModel.from_pretrained(base, path / "adapter")
    assert not any(p.requires_grad for p in frozen.parameters())
    base = AutoModelForCausalLM.from_pretrained(path / "base").eval()
    model = PeftModel.from_pretrained(base, path / "adapter", is_trainable=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "seal_scale" in n
    }
    model.load_adapter(path / "adapter", adapter_name="second")
    model.set_adapter("second")
    assert torch.equal(model(inputs).logits, expected)


def test_low_cpu_mem_usage_load(saved, inputs):
    path, expected = saved
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path / "base").eval()
    model = PeftModel.from_pretrained(base, path / "adapter", low_cpu_mem_usage=True)
    assert torch.equal(model(inputs).logits, expected)


def _mistral(layers: int, heads: int):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        sliding_window=None,
    )
    return MistralForCausalLM(config)


@pytest.mark.parametrize(
    "layers, heads, match",
    [
        (2, 8, "does not fit the model.*different number of heads"),  # 8 heads of 4 instead of 4 of 8
        (1, 4, "does not fit the model.*modules the model does not have"),  # fewer layers
        (3, 4, "has no scales for 1 SEAL layer"),  # more layers
    ],
)
def test_adapter_onto_model_of_other_shape(saved, layers, heads, match):
    path, _ = saved
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(_mistral(layers, heads), path / "adapter")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_corrupted_safetensors(saved, damage):
    path, _ = saved
    weights = path / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) - 7])
    elif damage == "garbage":
        weights.write_bytes(b"\x00\xff" * 40)
    else:
        weights.unlink()
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path / "base")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    match = "no adapter_model.safetensors" if damage == "missing" else "truncated or corrupted"
    with pytest.raises(ValueError, match=match):
        seal_peft.from_pretrained(base, path / "adapter")
    # plain PEFT also refuses (with its own error), and the base weights are untouched either way
    with pytest.raises(Exception):  # noqa: B017  (safetensors/OS errors differ by damage)
        PeftModel.from_pretrained(base, path / "adapter")
    for k, v in base.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k


def test_non_seal_adapter_dir_rejected_by_seal_loader(tmp_path):
    from peft import LoraConfig

    model = get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'LORA' adapter, not a SEAL one"):
        seal_peft.from_pretrained(make_model("llama"), tmp_path)


# ----------------------------------------------------------------------------- Trainer
def _dataset(n=8, length=16):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * length})
    return rows


def _trainer(model, out, max_steps, save_steps=3):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        save_steps=save_steps,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=_dataset())


def _scales(model):
    return torch.cat(
        [m.seal_scale["default"].detach().flatten() for m in model.modules() if isinstance(m, SealLayer)]
    )


def test_stock_trainer_moves_scales_checkpoint_is_adapter_only_and_resumes(tmp_path):
    model = get_peft_model(make_model("llama"), SealConfig())
    trainer = _trainer(model, tmp_path / "run", max_steps=3)
    trainer.train()
    trained = _scales(model)
    assert not torch.allclose(trained, torch.ones_like(trained))
    ckpt = tmp_path / "run" / "checkpoint-3"
    files = set(os.listdir(ckpt))
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    saved = load_file(ckpt / "adapter_model.safetensors")
    assert all("seal_scale" in k for k in saved)

    # continuous 6-step run vs 3 steps + resume for 3 more: same scales
    full = get_peft_model(make_model("llama"), SealConfig())
    _trainer(full, tmp_path / "full", max_steps=6, save_steps=100).train()
    resumed = get_peft_model(make_model("llama"), SealConfig())
    _trainer(resumed, tmp_path / "run", max_steps=6, save_steps=100).train(resume_from_checkpoint=str(ckpt))
    torch.testing.assert_close(_scales(resumed), _scales(full), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_scales(resumed), trained)
