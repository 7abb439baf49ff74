"""Deployment: a merged SEAL model is a plain transformers checkpoint that loads where seal_peft
(and PEFT's registration of SEAL) does not exist, with the unmerged adapter's logits."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from test_ecosystem_common import tiny_checkpoint
from transformers import AutoModelForCausalLM

import seal_peft
from seal_peft import SealConfig
from seal_peft.cli import main as cli_main
from seal_peft.models import load_model

# Runs in `python -I -S`: no site processing, so neither the editable install's import hook nor the
# repository is on sys.path; only the plain site-packages folder (for torch/transformers) is added.
CHILD = r"""
import json, sys
sys.path.append(SITE)
try:
    import seal_peft  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("seal_peft must not be importable here")
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(MERGED, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(MERGED)
ids = torch.tensor(tok(TEXT)["input_ids"])[None]
with torch.no_grad():
    logits = model(input_ids=ids).logits
torch.save({"ids": ids, "logits": logits}, OUT)
print(json.dumps({"seal_modules": [n for n, m in model.named_modules() if "seal" in type(m).__name__.lower()]}))
"""
TEXT = "line 7: REGISTER_CONTENT is <31245>. What is the REGISTER_CONTENT in line 7?"


def _load_without_seal(merged: Path, out: Path, cwd: Path) -> dict:
    site = sysconfig.get_paths()["purelib"]
    code = "\n".join(f"{k} = {v!r}" for k, v in
                     {"SITE": site, "MERGED": str(merged), "OUT": str(out), "TEXT": TEXT}.items()) + CHILD
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _adapter(tmp_path: Path, granularity: str) -> tuple[Path, Path]:
    base = tiny_checkpoint(tmp_path / "base")
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           SealConfig(granularity=granularity, init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    return base, tmp_path / "adapter"


def _unmerged_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("granularity", ["head", "channel"])
def test_cli_merge_loads_without_seal_peft(tmp_path, granularity):
    base, adapter = _adapter(tmp_path, granularity)
    merged = tmp_path / "merged"
    assert cli_main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(merged), "--quiet"]) == 0
    files = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any("adapter" in f for f in files)
    config = json.loads((merged / "config.json").read_text())
    assert config["model_type"] == "llama" and "peft" not in json.dumps(config).lower()

    report = _load_without_seal(merged, tmp_path / "child.pt", cwd=tmp_path)
    assert report["seal_modules"] == []
    child = torch.load(tmp_path / "child.pt")
    expected = _unmerged_logits(base, adapter, child["ids"])
    torch.testing.assert_close(child["logits"], expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the adapter really changes the model
        plain = AutoModelForCausalLM.from_pretrained(base).eval()(input_ids=child["ids"]).logits
    assert (plain - expected).abs().max() > 1e-3


def test_python_merge_path_loads_without_seal_peft(tmp_path):
    base, adapter = _adapter(tmp_path, "head")
    model, tok = load_model(str(base))
    merged = seal_peft.from_pretrained(model, adapter).merge_and_unload(safe_merge=True)
    merged.save_pretrained(tmp_path / "merged")
    tok.save_pretrained(tmp_path / "merged")
    _load_without_seal(tmp_path / "merged", tmp_path / "child.pt", cwd=tmp_path)
    child = torch.load(tmp_path / "child.pt")
    torch.testing.assert_close(child["logits"], _unmerged_logits(base, adapter, child["ids"]), rtol=1e-5, atol=1e-5)


def _extended_adapter(tmp_path: Path, method: str, **opts) -> tuple[Path, Path]:
    from seal_peft.extension import extend_context

    base = tiny_checkpoint(tmp_path / "base")
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), SealConfig(init_weights=False))
    extend_context(model, method, **opts)  # recorded in the adapter config
    model.save_pretrained(tmp_path / "adapter")
    return base, tmp_path / "adapter"


def _extended_unmerged_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from seal_peft.extension import from_pretrained

    model = from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["ntk", "yarn", "dynamic_ntk"])
def test_cli_merge_carries_rope_extension(tmp_path, method):
    """A RoPE extension is config values: the merged config.json has them, plain transformers applies them."""
    base, adapter = _extended_adapter(tmp_path, method, factor=2)
    merged = tmp_path / "merged"
    assert cli_main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(merged), "--quiet"]) == 0
    config = json.loads((merged / "config.json").read_text())
    record = json.loads((adapter / "adapter_config.json").read_text())["extension"]
    assert config["seal_extension"] == {**record, "native_max_position_embeddings": 2048}
    rope = config["rope_parameters"]
    if method == "ntk":
        assert rope["rope_type"] == "default" and rope["rope_theta"] > 10000.0
    else:
        assert rope["rope_type"] == {"yarn": "yarn", "dynamic_ntk": "dynamic"}[method] and rope["factor"] == 2.0
    assert config["max_position_embeddings"] == (2048 if method == "dynamic_ntk" else 4096)

    _load_without_seal(merged, tmp_path / "child.pt", cwd=tmp_path)
    child = torch.load(tmp_path / "child.pt")
    expected = _extended_unmerged_logits(base, adapter, child["ids"])
    torch.testing.assert_close(child["logits"], expected, rtol=1e-5, atol=1e-5)
    if method != "dynamic_ntk":  # (dynamic NTK is the plain RoPE inside the native window)
        unextended = _unmerged_logits(base, adapter, child["ids"])
        assert (unextended - expected).abs().max() > 1e-4  # 10x the tolerance above: the extension shows


def test_cli_merge_self_extend_warns_and_records_it(tmp_path):
    """Self-Extend is an attention implementation: recorded in config.json, re-applied by seal_peft."""
    from seal_peft.extension import apply_from_config, self_extend_states

    base, adapter = _extended_adapter(tmp_path, "self_extend", factor=4, window=16)
    merged = tmp_path / "merged"
    with pytest.warns(UserWarning, match=r"Self-Extend.*apply_from_config"):
        assert cli_main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(merged),
                         "--quiet"]) == 0
    config = json.loads((merged / "config.json").read_text())
    assert config["seal_extension"] == {"method": "self_extend", "factor": 4, "window": 16,
                                        "native_max_position_embeddings": 2048}
    assert config["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}
    ids = torch.randint(0, 300, (1, 80), generator=torch.Generator().manual_seed(0))  # > window: grouped path
    expected = _extended_unmerged_logits(base, adapter, ids)
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert self_extend_states(plain) == []
    with torch.no_grad():
        # plain transformers: no Self-Extend (tiny model, so small logit changes; 10x the tolerance below)
        assert (plain(input_ids=ids).logits - expected).abs().max() > 1e-4
        apply_from_config(plain, merged)  # the record in config.json
        assert len(self_extend_states(plain)) == 2
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
