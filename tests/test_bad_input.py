"""Bad input: every case fails with an actionable error and corrupts nothing.

"Nothing corrupted" is checked the same way everywhere: the base model's weights (and, after
``seal_peft.from_pretrained``, its structure and ``requires_grad`` flags) and the adapter files on disk
are byte-for-byte what they were before the failed call.

Related checks live elsewhere and are not repeated here: adapters for a model with another number of
heads or layers and corrupted weight files (test_save_load.py), loading without ``import seal_peft``
(test_save_load.py), SealConfig constructor validation (tuner/test_config.py).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import warnings

import pytest
import torch
from conftest import VOCAB, make_model
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import seal_peft
from seal_peft import SealConfig, SealLayer

INPUTS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------------------- helpers
def logits(model):
    with torch.no_grad():
        return model(INPUTS).logits


def seal_layers(model) -> list[SealLayer]:
    return [m for m in model.modules() if isinstance(m, SealLayer)]


def digest(folder: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "types": [type(m).__name__ for m in model.modules()],
        "peft_config": "peft_config" in model.__dict__,
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    now = snapshot(model)
    assert now["types"] == before["types"] and now["peft_config"] == before["peft_config"]
    assert now["grad"] == before["grad"]
    assert now["state"].keys() == before["state"].keys()
    assert all(torch.equal(now["state"][k], v) for k, v in before["state"].items())


def save_adapter(tmp_path, arch="llama", name="adapter", **config) -> tuple[pathlib.Path, torch.Tensor]:
    torch.manual_seed(0)
    model = get_peft_model(make_model(arch), SealConfig(init_weights=False, **config))
    model.save_pretrained(tmp_path / name)
    return tmp_path / name, logits(model.eval())


def edit_config(folder: pathlib.Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DELETE:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


DELETE = object()


def both_loaders_fail(folder, error, match_seal, match_peft=None, arch="llama"):
    """Both loaders raise; the base model and the adapter files are unchanged afterwards."""
    files = digest(folder)
    base = make_model(arch)
    before = snapshot(base)
    with pytest.raises(error, match=match_seal):
        seal_peft.from_pretrained(base, folder)
    assert_unchanged(base, before)  # seal_peft.from_pretrained is all-or-nothing
    base = make_model(arch)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(Exception, match=match_seal if match_peft is None else match_peft):  # noqa: B017
        PeftModel.from_pretrained(base, folder)
    # plain PEFT may leave SEAL layers injected, but never changes a base weight
    state = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items()}
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    assert digest(folder) == files


# --------------------------------------------------------------------------- adapter_config.json
def test_unknown_config_key_is_ignored_with_a_warning_like_peft(tmp_path):
    """PEFT's rule for configs written by a newer version: unknown keys are dropped with a warning.
    SEAL keeps that rule (an adapter saved by a newer seal_peft still loads), and the weight-file
    check below guarantees a dropped key can never make a *different* adapter load silently."""
    folder, expected = save_adapter(tmp_path)
    edit_config(folder, future_option=True, scale_activation="sigmoid")
    for load in (PeftModel.from_pretrained, seal_peft.from_pretrained):
        with pytest.warns(
            UserWarning, match=r"Unexpected keyword arguments \['future_option', 'scale_activation'\]"
        ):
            model = load(make_model("llama"), folder)
        assert torch.equal(logits(model.eval()), expected)


def test_misspelled_key_cannot_load_a_different_adapter(tmp_path):
    folder, _ = save_adapter(tmp_path, granularity="channel")
    edit_config(folder, granularity=DELETE, granulrity="channel")  # -> default 'head'
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        both_loaders_fail(folder, ValueError, r"does not fit the model.*\(32,\) scales in the file")


@pytest.mark.parametrize(
    "field, value, error, match",
    [
        ("granularity", 3, ValueError, r"granularity=3 is not supported; use 'head'"),
        ("granularity", "layer", ValueError, r"granularity='layer' is not supported"),
        ("head_dim", "8", ValueError, r"head_dim='8' must be a positive integer"),
        ("head_dim", -8, ValueError, r"head_dim=-8 must be a positive integer"),
        ("init_weights", "yes", TypeError, r"init_weights must be True or False"),
        ("target_modules", 5, TypeError, r"target_modules must be a list of module names or a regex"),
        ("exclude_modules", [1], TypeError, r"exclude_modules must be a list of module names"),
        ("layers_to_transform", "0", TypeError, r"layers_to_transform must be an int or a list of ints"),
        ("layers_pattern", "layers", ValueError, r"layers_pattern only has an effect together"),
    ],
)
def test_config_value_of_wrong_type(tmp_path, field, value, error, match):
    folder, _ = save_adapter(tmp_path)
    edit_config(folder, **{field: value})
    # seal_peft.from_pretrained names the file; PEFT raises the same SealConfig error without it
    both_loaders_fail(folder, error, r"adapter_config\.json: .*" + match, match_peft=match)


def test_missing_peft_type(tmp_path):
    folder, _ = save_adapter(tmp_path)
    edit_config(folder, peft_type=DELETE)
    both_loaders_fail(
        folder, ValueError, r"has no 'peft_type'; it is not a PEFT adapter config", match_peft="peft_type"
    )


def test_missing_fields_take_defaults_and_a_mismatch_is_caught(tmp_path):
    # a config reduced to peft_type: the defaults describe the same adapter -> loads
    folder, expected = save_adapter(tmp_path, name="plain")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": config["peft_type"]}))
    for load in (PeftModel.from_pretrained, seal_peft.from_pretrained):
        assert torch.equal(logits(load(make_model("llama"), folder).eval()), expected)
    # ... where the defaults describe another adapter, loading is refused
    folder, _ = save_adapter(tmp_path, name="subset", layers_to_transform=[1])
    edit_config(folder, layers_to_transform=DELETE)
    both_loaders_fail(folder, ValueError, r"it has no scales for 1 SEAL layer")
    folder, _ = save_adapter(tmp_path, name="head_dim", head_dim=16)
    edit_config(folder, head_dim=DELETE)
    both_loaders_fail(folder, ValueError, r"\(2,\) scales in the file but the model needs \(4,\)")


def test_missing_modules_to_save_never_overwrites_base_weights(tmp_path):
    """Without the refusal PEFT would load the trained lm_head copy *into the base model's lm_head*."""
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama"), SealConfig(modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(2.0)
    model.save_pretrained(tmp_path / "a")
    edit_config(tmp_path / "a", modules_to_save=DELETE)
    both_loaders_fail(
        tmp_path / "a", ValueError, r"neither SEAL scales nor modules_to_save.*'.*lm_head\.weight'"
    )


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""])
def test_config_not_a_json_object(tmp_path, content):
    folder, _ = save_adapter(tmp_path)
    (folder / "adapter_config.json").write_text(content)
    both_loaders_fail(
        folder, ValueError, r"adapter_config\.json (is not valid JSON|holds a JSON list)", match_peft=""
    )


def test_non_finite_scales_in_file(tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = save_adapter(tmp_path)
    weights = load_file(folder / "adapter_model.safetensors")
    key = sorted(weights)[1]
    weights[key][2] = float("inf")
    save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    both_loaders_fail(folder, ValueError, r"non-finite scales .* Retrain it or use an earlier checkpoint")


# ----------------------------------------------------------------------- adapter for another model
def test_adapter_of_another_architecture(tmp_path):
    folder, _ = save_adapter(tmp_path, arch="gpt2")  # targets 'attn.c_proj'
    both_loaders_fail(folder, ValueError, r"Target modules \{'attn\.c_proj'\} not found in the base model")


def test_failed_load_adapter_keeps_existing_adapters(tmp_path):
    good, expected = save_adapter(tmp_path, name="good")
    bad, _ = save_adapter(tmp_path, name="bad", granularity="channel")
    edit_config(bad, granularity="head")
    model = PeftModel.from_pretrained(make_model("llama"), good).eval()
    scales = {k: v.clone() for k, v in model.state_dict().items() if ".default" in k}
    with pytest.raises(ValueError, match="does not fit the model"):
        model.load_adapter(bad, adapter_name="other")
    # PEFT keeps the name 'other' registered (inactive); the loaded adapter is untouched and in use
    assert model.active_adapters == ["default"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in scales.items())
    assert torch.equal(logits(model), expected)
    model.delete_adapter("other")
    model.load_adapter(good, adapter_name="other")  # a retry under the same name works


def test_seal_from_pretrained_failure_leaves_base_reusable(tmp_path):
    good, expected = save_adapter(tmp_path, name="good", modules_to_save=["lm_head"])
    bad, _ = save_adapter(tmp_path, name="bad", granularity="channel", modules_to_save=["lm_head"])
    edit_config(bad, granularity="head")
    base = make_model("llama")
    before = snapshot(base)
    with pytest.raises(ValueError, match="does not fit the model"):
        seal_peft.from_pretrained(base, bad)
    assert_unchanged(base, before)
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())
    assert torch.equal(logits(seal_peft.from_pretrained(base, good).eval()), expected)


# ------------------------------------------------------------------------------- merge / unmerge
@pytest.mark.parametrize(
    "arch, granularity, dtype",
    [
        ("llama", "head", torch.float32),
        ("gpt2", "channel", torch.float32),  # Conv1D: rows, not columns
        ("mistral", "head", torch.bfloat16),
    ],
)
def test_near_zero_and_non_finite_scales_unmerge_exactly(arch, granularity, dtype):
    model = get_peft_model(make_model(arch, dtype=dtype), SealConfig(granularity=granularity))
    layers = seal_layers(model)
    weights = [m.get_base_layer().weight.detach().clone() for m in layers]
    special = torch.tensor([0.0, -1e-30, 1e-3, float("nan"), float("inf")])
    with torch.no_grad():
        for layer in layers:
            scale = layer.seal_scale["default"]
            scale[: min(len(special), len(scale))] = special[: len(scale)]
    with pytest.warns(UserWarning, match="non-finite weights"):
        model.merge_adapter()  # without safe_merge a NaN/inf scale does get merged (and warns)
    model.unmerge_adapter()
    for layer, w in zip(layers, weights):
        assert torch.equal(layer.get_base_layer().weight, w)  # exact, also for zero / NaN / inf scales


class Int8Linear(nn.Linear):
    """A stand-in for a weight-only int8 layer (bitsandbytes-style): int8 weight + per-row scale."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.weight = nn.Parameter(torch.round(w / scale).to(torch.int8), requires_grad=False)
        self.register_buffer("weight_scale", scale)

    def forward(self, x):
        return nn.functional.linear(x, self.weight.float() * self.weight_scale, self.bias)


def quantize(model, layers=(0, 1)):
    for i in layers:
        attn = model.model.layers[i].self_attn
        attn.o_proj = Int8Linear(attn.o_proj)
    return model


def test_merge_into_int8_layer_refused_and_nothing_changes():
    model = get_peft_model(quantize(make_model("llama")), SealConfig(init_weights=False)).eval()
    unmerged = logits(model)  # unmerged, SEAL works on quantized layers: it scales the activations
    assert torch.isfinite(unmerged).all()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for merge in (
        model.merge_adapter,
        lambda: model.merge_and_unload(),
        lambda: model.merge_and_unload(safe_merge=True),
    ):
        with pytest.raises(
            TypeError, match=r"torch\.int8 \(quantized\) weight of Int8Linear; dequantize the model"
        ):
            merge()
        assert len(seal_layers(model)) == 2 and not any(m.merged for m in seal_layers(model))
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model), unmerged)


def test_merge_is_all_or_nothing_across_layers():
    # only the *last* layer is int8: PEFT would merge layer 0 before reaching it
    model = get_peft_model(quantize(make_model("llama"), layers=(1,)), SealConfig(init_weights=False))
    weight0 = seal_layers(model)[0].get_base_layer().weight.detach().clone()
    with pytest.raises(TypeError, match="dequantize"):
        model.merge_and_unload()
    assert len(seal_layers(model)) == 2 and not seal_layers(model)[0].merged
    assert torch.equal(seal_layers(model)[0].get_base_layer().weight, weight0)
    # NaN in the last layer with safe_merge: no layer merged, none unloaded
    model = get_peft_model(make_model("llama"), SealConfig(init_weights=False))
    with torch.no_grad():
        seal_layers(model)[-1].seal_scale["default"][0] = float("nan")
    weights = [m.get_base_layer().weight.detach().clone() for m in seal_layers(model)]
    for merge in (
        lambda: model.merge_adapter(safe_merge=True),
        lambda: model.merge_and_unload(safe_merge=True),
    ):
        with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default"):
            merge()
        assert len(seal_layers(model)) == 2 and not any(m.merged for m in seal_layers(model))
        assert all(torch.equal(m.get_base_layer().weight, w) for m, w in zip(seal_layers(model), weights))


def _overflowing_fp16_model():
    model = get_peft_model(make_model("llama", dtype=torch.float16), SealConfig()).eval()
    last = seal_layers(model)[-1]  # overflow only in the last layer
    with torch.no_grad():
        last.get_base_layer().weight[:, 0] = 1.0
        last.seal_scale["default"][0] = 1e5  # 1.0 * 1e5 > 65504 = fp16 max
    return model


def test_fp16_overflow_with_safe_merge_raises_and_leaves_weights():
    model = _overflowing_fp16_model()
    weights = [m.get_base_layer().weight.detach().clone() for m in seal_layers(model)]
    for merge in (
        lambda: model.merge_adapter(safe_merge=True),
        lambda: model.merge_and_unload(safe_merge=True),
    ):
        with pytest.raises(
            ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"
        ):
            merge()
        assert len(seal_layers(model)) == 2 and not any(m.merged for m in seal_layers(model))
        assert all(torch.equal(m.get_base_layer().weight, w) for m, w in zip(seal_layers(model), weights))


def test_fp16_overflow_without_safe_merge_warns_and_unmerge_restores():
    """Documented behaviour: the merge goes through with a warning (outputs become inf/NaN, as the
    fp16 weights cannot hold the product); unmerge_adapter() restores the weights exactly."""
    model = _overflowing_fp16_model()
    weights = [m.get_base_layer().weight.detach().clone() for m in seal_layers(model)]
    with model.disable_adapter():
        base_out = logits(model)
    with pytest.warns(
        UserWarning,
        match=r"non-finite weights \(overflow in torch\.float16\?\).*unmerge_adapter\(\) restores",
    ):
        model.merge_adapter()
    assert not torch.isfinite(seal_layers(model)[-1].get_base_layer().weight).all()
    model.unmerge_adapter()
    restored = [m.get_base_layer().weight for m in seal_layers(model)]
    assert torch.equal(restored[0], weights[0])  # scales of 1: exact
    assert torch.equal(restored[1][:, 0], weights[1][:, 0])  # the overflowed column: kept aside, exact
    assert torch.equal(restored[1][:, 8:], weights[1][:, 8:])
    # the rest of head 0 went through x * 1e5 / 1e5 in fp16: exact up to fp16 rounding
    torch.testing.assert_close(restored[1][:, 1:8], weights[1][:, 1:8], rtol=1e-3, atol=0)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base_out, rtol=1e-2, atol=1e-3)


# -------------------------------------------------------------------------------- data generators
def _char_tokenizer(folder: pathlib.Path, config):
    """A one-token-per-character tokenizer saved next to a model config, loaded back from the folder."""
    import string

    from tokenizers import Tokenizer, decoders, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable[:95]) + ["\n"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.save_pretrained(folder)
    if config is not None:
        config.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def test_generator_length_beyond_model_window(tmp_path):
    from transformers import GPT2Config, LlamaConfig

    from seal_peft.data import line_retrieval

    def generate(tok, length):
        return line_retrieval(tok, num_samples=1, length=length, prompt_format="plain", progress=False)

    tok = _char_tokenizer(tmp_path / "llama", LlamaConfig(max_position_embeddings=700))
    assert len(generate(tok, 680)[0]["input_ids"]) <= 700
    with pytest.raises(
        ValueError,
        match=r"length=800 tokens is longer than the model's context window \(max_position_embeddings=700 in .*config\.json\).*tokenizer\.model_max_length = 800",
    ):
        generate(tok, 800)
    tok.model_max_length = 800  # the user's statement that the context was extended
    assert abs(len(generate(tok, 800)[0]["input_ids"]) - 800) <= 24
    tok.model_max_length = 750  # and the tokenizer's own limit still applies first
    with pytest.raises(ValueError, match=r"longer than tokenizer\.model_max_length=750"):
        generate(tok, 800)
    # absolute position embeddings (GPT-2 names it n_positions)
    tok = _char_tokenizer(tmp_path / "gpt2", GPT2Config(n_positions=600))
    with pytest.raises(ValueError, match=r"n_positions=600"):
        generate(tok, 650)
    # a RoPE-scaled model is meant to run past its nominal window: no limit from the config
    scaled = LlamaConfig(max_position_embeddings=700, rope_scaling={"rope_type": "linear", "factor": 4.0})
    generate(_char_tokenizer(tmp_path / "scaled", scaled), 800)
    # no model config next to the tokenizer: only the tokenizer's limit is known
    generate(_char_tokenizer(tmp_path / "none", None), 800)


# ------------------------------------------------------------------------------------ pickle files
MARKER = "pwned.txt"


class Payload:
    """Unpickling this would create a marker file: a harmless stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _pickle_adapter(tmp_path, payload: bool):
    folder, expected = save_adapter(tmp_path)
    from safetensors.torch import load_file

    state = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    if payload:
        state = {**state, "extra": Payload(tmp_path / MARKER)}
    torch.save(state, folder / "adapter_model.bin")
    return folder, expected


def test_malicious_pickle_is_never_unpickled(tmp_path):
    folder, _ = _pickle_adapter(tmp_path, payload=True)
    files = digest(folder)
    with pytest.raises(Exception, match="Weights only load failed"):  # noqa: B017
        PeftModel.from_pretrained(make_model("llama"), folder)  # PEFT: torch.load(weights_only=True)
    base = make_model("llama")
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"holds only a pickled adapter_model\.bin.*allow_pickle=True"):
        seal_peft.from_pretrained(base, folder)
    with pytest.raises(Exception, match="Weights only load failed"):  # noqa: B017
        seal_peft.from_pretrained(base, folder, allow_pickle=True)  # still weights_only
    assert_unchanged(base, before)
    assert not (tmp_path / MARKER).exists()
    assert digest(folder) == files


def test_plain_pickle_adapter_needs_allow_pickle(tmp_path):
    folder, expected = _pickle_adapter(tmp_path, payload=False)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        seal_peft.from_pretrained(make_model("llama"), folder)
    model = seal_peft.from_pretrained(make_model("llama"), folder, allow_pickle=True)
    assert torch.equal(logits(model.eval()), expected)


# ------------------------------------------------------------------------------- misuse of the API
def test_mixed_adapter_batches_refuse_unknown_names():
    """Mixed-adapter batches are supported (tests/test_ecosystem_mixed_batch.py); bad names are refused."""
    model = get_peft_model(make_model("llama"), SealConfig(init_weights=False)).eval()
    for call in (
        lambda: model(INPUTS, adapter_names=["default", "other"]),
        lambda: model.generate(input_ids=INPUTS, adapter_names=["default", "other"], max_new_tokens=2),
    ):
        with pytest.raises(ValueError, match=r"adapter_names names adapter\(s\) this model does not have: 'other'"):
            call()


def test_peft_mixed_model_is_refused():
    base = make_model("llama")
    before = snapshot(base)
    with pytest.raises(ValueError, match="'SEAL' is not compatible with the `PeftMixedModel`"):
        get_peft_model(base, SealConfig(), mixed=True)
    assert_unchanged(base, before)


def test_duplicate_adapter_name_and_clashing_modules_to_save_change_nothing():
    model = get_peft_model(make_model("llama"), SealConfig(init_weights=False, modules_to_save=["lm_head"]))
    model.add_adapter("other", SealConfig(init_weights=False, modules_to_save=["lm_head"]))
    config, state = model.peft_config["default"], {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="Adapter with name 'default' already exists"):
        model.add_adapter("default", SealConfig(granularity="channel"))
    # two active adapters cannot both replace lm_head (modules_to_save is not multiplicative like scales)
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
        model.base_model.set_adapter(["default", "other"])
    assert model.peft_config["default"] is config and model.active_adapters == ["default"]
    assert all(layer.active_adapters == ["default"] for layer in seal_layers(model))
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["o_proj", "self_attn", "layers", "0", "seal_scale", "base_layer"])
def test_adapter_named_like_a_module_is_refused(name, tmp_path):
    """PEFT would save the *other* adapters without weights (its filter drops keys containing the name)."""
    model = get_peft_model(make_model("llama"), SealConfig(init_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=rf"Adapter name '{name}' is also a module/parameter name inside the model"
    ):
        model.add_adapter(name, SealConfig())
    assert list(model.peft_config) == ["default"] and model.state_dict().keys() == before.keys()
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert len(load_file(tmp_path / "adapter_model.safetensors")) == 2  # the existing adapter saves fully
    base = make_model("llama")
    with pytest.raises(ValueError, match="also a module/parameter name"):
        get_peft_model(base, SealConfig(), adapter_name=name)
