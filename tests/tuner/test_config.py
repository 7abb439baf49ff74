"""SealConfig validation, registration with PEFT, and bad-input errors at injection time."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import make_model
from peft import PeftConfig, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import seal_peft
from seal_peft import SealConfig, SealModel, ensure_registered
from seal_peft.tuner.registration import add_enum_member

REGISTRATION = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "seal_peft", "tuner", "registration.py"
)


def test_registered_with_peft():
    assert PeftType.SEAL == "SEAL" and PeftType("SEAL") is PeftType.SEAL and PeftType["SEAL"] is PeftType.SEAL
    assert "SEAL" in [t.value for t in PeftType]
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SEAL] is SealConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["SEAL"] is SealModel
    assert SealConfig().peft_type is PeftType.SEAL


def test_registration_idempotent():
    n = len(PeftType)
    ensure_registered()
    import importlib

    importlib.reload(seal_peft)
    assert len(PeftType) == n
    assert add_enum_member(PeftType, "SEAL", "SEAL") is PeftType.SEAL
    with pytest.raises(RuntimeError):
        add_enum_member(PeftType, "SEAL", "OTHER")


# The enum hack depends on CPython's enum internals, which changed between 3.10 and 3.13: run it
# under every interpreter of the supported range that this machine has (pyenv ships them here).
CHECK = f"""
import enum, importlib.util
spec = importlib.util.spec_from_file_location("reg", {REGISTRATION!r})
reg = importlib.util.module_from_spec(spec); spec.loader.exec_module(reg)
class T(str, enum.Enum):
    A = "A"
m = reg.add_enum_member(T, "SEAL", "SEAL")
assert reg.add_enum_member(T, "SEAL", "SEAL") is m
assert T.SEAL is m and T("SEAL") is m and T["SEAL"] is m and m == "SEAL" and isinstance(m, str)
assert [x.value for x in T] == ["A", "SEAL"] and len(T) == 2 and "SEAL" in T.__members__
assert {{m: 1}}["SEAL"] == 1 and m.name == "SEAL" and m.value == "SEAL"
import json, pickle; assert json.dumps({{"t": m}}) == '{{"t": "SEAL"}}'
print("ok")
"""


def _interpreter(version: str) -> str | None:
    if sys.version_info[:2] == tuple(map(int, version.split("."))):
        return sys.executable
    candidates = [shutil.which(f"python{version}")]
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(
        glob.glob(os.path.join(pyenv_root, "versions", f"{version}.*", "bin", f"python{version}"))
    )
    for found in filter(None, candidates):
        probe = subprocess.run([found, "-c", "print(1)"], capture_output=True, text=True)
        if probe.returncode == 0:
            return found
    return None


@pytest.mark.parametrize("version", ["3.10", "3.11", "3.12", "3.13"])
def test_enum_member_hack_each_python(version):
    exe = _interpreter(version)
    if exe is None:
        pytest.skip(f"python{version} is not installed on this machine")
    result = subprocess.run([exe, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_config_roundtrip(tmp_path):
    cfg = SealConfig(
        granularity="channel", target_modules=["self_attn.o_proj"], layers_to_transform=[0], head_dim=8
    )
    cfg.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SealConfig)
    assert loaded.granularity == "channel" and loaded.layers_to_transform == [0] and loaded.head_dim == 8
    assert loaded.target_modules == {"self_attn.o_proj"}


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(granularity="layer"), ValueError, "granularity='layer' is not supported; use 'head'"),
        (dict(head_dim=0), ValueError, "head_dim=0 must be a positive integer"),
        (dict(head_dim=2.5), ValueError, "must be a positive integer"),
        (dict(init_weights="yes"), TypeError, "init_weights must be True or False"),
        (dict(target_modules=[1, 2]), TypeError, "target_modules must be a list of module names"),
        (dict(layers_to_transform="0"), TypeError, "layers_to_transform must be an int or a list of ints"),
        (dict(layers_pattern="layers"), ValueError, "layers_pattern only has an effect together"),
    ],
)
def test_config_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        SealConfig(**kwargs)


def test_no_matching_target_modules():
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(make_model("llama"), SealConfig(target_modules=["attn_out_proj"]))


def test_unknown_model_type_asks_for_target_modules():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x)

    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(Tiny(), SealConfig())


def test_head_size_not_determinable():
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.out = torch.nn.Linear(12, 12)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attn()

        def forward(self, x):
            return self.attn.out(x)

    with pytest.raises(
        ValueError, match=r"could not determine the attention head size.*SealConfig\(head_dim="
    ):
        get_peft_model(Net(), SealConfig(target_modules=["attn.out"]))
    # works with an explicit head_dim, and channel granularity needs none
    x = torch.randn(2, 12)
    model = get_peft_model(Net(), SealConfig(target_modules=["attn.out"], head_dim=4))
    assert model.get_nb_trainable_parameters()[0] == 3
    model(x)
    assert (
        get_peft_model(
            Net(), SealConfig(target_modules=["attn.out"], granularity="channel")
        ).get_nb_trainable_parameters()[0]
        == 12
    )


def test_head_dim_not_dividing_in_features():
    with pytest.raises(
        ValueError, match=r"head size 5 \(from SealConfig.head_dim\) does not divide the 32 input features"
    ):
        get_peft_model(make_model("llama"), SealConfig(head_dim=5))


def test_non_linear_target():
    with pytest.raises(
        TypeError, match="is a LlamaAttention, not a Linear/Conv1D attention output projection"
    ):
        get_peft_model(make_model("llama"), SealConfig(target_modules=["self_attn"]))
    with pytest.raises(TypeError, match="not a Linear/Conv1D"):
        get_peft_model(make_model("llama"), SealConfig(target_modules=["input_layernorm"]))


def test_bad_input_leaves_base_model_unchanged():
    base = make_model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError):
        get_peft_model(base, SealConfig(head_dim=5))
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k])
