"""Loading a SEAL adapter with transformers' and PEFT's own entry points after ``import seal_peft``:
``model.load_adapter(dir)``, ``AutoModelForCausalLM.from_pretrained(adapter_dir)`` and
``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` give the logits of ``PeftModel.from_pretrained``
(torch.equal), for every supported architecture; and what happens where they cannot work (the base model
recorded in the adapter is not reachable, an adapter for another model, transformers' adapter-management
methods under PEFT 0.21, a process that never imported seal_peft)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import peft
import pytest
import torch
from conftest import ALL_ARCHS, VOCAB, make_model
from packaging.version import Version
from peft import AutoPeftModelForCausalLM, PeftModel, PeftModelForCausalLM, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

import seal_peft
from seal_peft import SealConfig, SealLayer


def save_seal_adapter(base, out, seed=0, **config):
    """Wrap ``base`` with SEAL, set every scale to a random value in [0.5, 1.5) and save the adapter."""
    model = get_peft_model(base, SealConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "seal_scale" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    model.save_pretrained(out)
    return out


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x).logits


@pytest.fixture
def x():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


def load_three_ways(base_dir, adapter, dtype=torch.float32):
    """{loader: model} for the three native loaders."""
    via_load_adapter = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    via_load_adapter.load_adapter(str(adapter))
    return {
        "load_adapter": via_load_adapter,
        "AutoModelForCausalLM": AutoModelForCausalLM.from_pretrained(adapter, dtype=dtype),
        "AutoPeftModelForCausalLM": AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=dtype),
    }


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_native_loaders_equal_peft_from_pretrained(arch, tmp_path, x):
    base_dir = tmp_path / "base"
    make_model(arch).save_pretrained(base_dir)
    adapter = save_seal_adapter(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "seal", granularity="head")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    ref = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter), x)
    assert not torch.equal(ref, logits(AutoModelForCausalLM.from_pretrained(base_dir), x))  # the scales matter
    models = load_three_ways(base_dir, adapter)
    assert type(models["AutoPeftModelForCausalLM"]) is PeftModelForCausalLM
    for loader, model in models.items():
        assert any(isinstance(m, SealLayer) for m in model.modules()), loader
        assert torch.equal(logits(model, x), ref), loader


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
@pytest.mark.parametrize("granularity", ["head", "channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_loaders_options(granularity, task_type, dtype, tmp_path, x):
    """SEAL-H / SEAL-C, with and without a task type, with modules_to_save, in fp32 and bf16."""
    base_dir = tmp_path / "base"
    make_model("llama").save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(
        base, SealConfig(granularity=granularity, task_type=task_type, modules_to_save=["lm_head"])
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "seal_scale" in name or "modules_to_save" in name:
                p.mul_(1.25)
    model.save_pretrained(tmp_path / "seal")
    adapter = tmp_path / "seal"
    ref = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), adapter), x)
    for loader, loaded in load_three_ways(base_dir, adapter, dtype).items():
        assert torch.equal(logits(loaded, x), ref), loader
        # transformers' loaders keep the scales in the model dtype (PEFT keeps fp32); the logits are the same
        scale = next(p for n, p in loaded.named_parameters() if "seal_scale" in n)
        assert scale.dtype == (torch.float32 if loader == "AutoPeftModelForCausalLM" else dtype), loader


def test_unreachable_base_model_fails_naming_it_and_load_adapter_still_works(tmp_path, x):
    """``base_model_name_or_path`` is where the base was loaded from when the adapter was made — a local
    folder (for the embedded models: the conversion cache) that another machine may not have. The two
    loaders that read it then fail in huggingface_hub, naming the path; loading the base yourself works."""
    base_dir = tmp_path / "base"
    make_model("llama").save_pretrained(base_dir)
    adapter = save_seal_adapter(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "seal")
    ref = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter), x)
    config_file = adapter / "adapter_config.json"
    gone = str(tmp_path / "elsewhere" / "SmolLM2-135M-Instruct")
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": gone}))
    for loader in (AutoModelForCausalLM, AutoPeftModelForCausalLM):
        with pytest.raises(OSError, match="SmolLM2-135M-Instruct"):
            loader.from_pretrained(adapter)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.load_adapter(str(adapter))
    assert torch.equal(logits(model, x), ref)
    assert torch.equal(logits(seal_peft.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter), x), ref)


def _llama(layers=2, heads=4):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads)
    return AutoModelForCausalLM.from_config(config)


def test_load_adapter_onto_another_model_is_not_checked_by_seal(tmp_path):
    """transformers 5 loads adapter weights with its own loader, so SEAL's fit checks (which
    PeftModel.from_pretrained and AutoPeftModelForCausalLM run) do not run in ``load_adapter``: other
    head counts fail in transformers (size mismatch), other layer counts load with only a printed report
    — the returned info lists the scales left at 1 / dropped. Use seal_peft.from_pretrained to refuse."""
    adapter = save_seal_adapter(_llama(), tmp_path / "seal")
    deeper = _llama(layers=3)
    info = deeper.load_adapter(str(adapter))
    assert set(info.missing_keys) == {"model.layers.2.self_attn.o_proj.seal_scale.default"}
    assert torch.equal(deeper.model.layers[2].self_attn.o_proj.seal_scale["default"], torch.ones(4))
    info = _llama(layers=1).load_adapter(str(adapter))
    assert set(info.unexpected_keys) == {"model.layers.1.self_attn.o_proj.seal_scale.default"}
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        _llama(heads=8).load_adapter(str(adapter))
    for other in (_llama(layers=3), _llama(layers=1), _llama(heads=8)):
        with pytest.raises(ValueError, match="This SEAL adapter does not fit the model"):
            seal_peft.from_pretrained(other, adapter)
        with pytest.raises(ValueError, match="This SEAL adapter does not fit the model"):
            PeftModel.from_pretrained(other, adapter)


def test_transformers_adapter_methods_after_load_adapter(tmp_path, x):
    """transformers 5.24's set_adapter / disable_adapters / enable_adapters / active_adapters require
    PEFT >= 0.22; under the PEFT this package pins (0.21) they refuse with transformers' message — manage
    adapters through PeftModel there (``disable_adapter()``, ``set_adapter``)."""
    import transformers.integrations.peft as tf_peft

    base_dir = tmp_path / "base"
    make_model("llama").save_pretrained(base_dir)
    adapter = save_seal_adapter(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "seal")
    base_logits = logits(AutoModelForCausalLM.from_pretrained(base_dir), x)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.load_adapter(str(adapter))
    with_adapter = logits(model, x)
    if Version(peft.__version__) < Version(tf_peft.MIN_PEFT_VERSION):
        calls = (model.disable_adapters, model.enable_adapters, model.active_adapters, lambda: model.set_adapter("default"))
        for call in calls:
            with pytest.raises(ValueError, match=f"version >= {tf_peft.MIN_PEFT_VERSION}"):
                call()
        wrapped = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
        with wrapped.disable_adapter():
            assert torch.equal(logits(wrapped, x), base_logits)
        assert torch.equal(logits(wrapped, x), with_adapter)
    else:
        assert model.active_adapters() == ["default"]
        model.disable_adapters()
        assert torch.equal(logits(model, x), base_logits)
        model.enable_adapters()
        assert torch.equal(logits(model, x), with_adapter)


def test_without_import_seal_peft_every_loader_fails_with_keyerror_seal(tmp_path):
    """What a process that never imported seal_peft gets (docs/api.md: import seal_peft first)."""
    base_dir = tmp_path / "base"
    make_model("llama").save_pretrained(base_dir)
    adapter = save_seal_adapter(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "seal")
    code = f"""
import sys
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM
calls = [lambda: AutoModelForCausalLM.from_pretrained({str(base_dir)!r}).load_adapter({str(adapter)!r}),
         lambda: AutoModelForCausalLM.from_pretrained({str(adapter)!r}),
         lambda: AutoPeftModelForCausalLM.from_pretrained({str(adapter)!r})]
for call in calls:
    try:
        call()
        print("loaded")
    except Exception as err:
        print(type(err).__name__, err)
assert "seal_peft" not in sys.modules
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:3] == ["KeyError 'SEAL'"] * 3


@pytest.mark.slow
def test_embedded_model_adapter_loads_natively(tmp_path):
    """The embedded SmolLM2 comes from a GGUF file: its adapter records the conversion cache folder
    (an ordinary checkpoint), which the native loaders read like any local base model."""
    from seal_peft.models import embedded_model_path, load_model

    base, tok = load_model()
    adapter = save_seal_adapter(base, tmp_path / "seal", granularity="channel")
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(embedded_model_path())
    x = torch.tensor([tok("line 3: REGISTER_CONTENT is <42>. What is in line 3?")["input_ids"]])
    ref = logits(PeftModel.from_pretrained(load_model()[0], adapter), x)
    for loader, model in load_three_ways(recorded, adapter).items():
        assert torch.equal(logits(model, x), ref), loader
