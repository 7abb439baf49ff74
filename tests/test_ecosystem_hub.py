"""Hub: what `push_to_hub` of a SEAL adapter would upload (intercepted at the huggingface_hub API, no
network), and loading an adapter by repo id from a local Hub cache with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import CommitInfo, HfApi, RepoUrl
from peft import LoraConfig, get_peft_model
from test_ecosystem_common import tiny_checkpoint
from transformers import AutoModelForCausalLM

import seal_peft
from seal_peft import SealConfig
from seal_peft.hub import model_card

REPO = "acme/seal-tiny"
BASE_ID = "acme/tiny-llama"


class FakeHub:
    """Records create_repo / create_branch / create_commit calls instead of sending them."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, dict]] = []
        self.files: dict[str, bytes] = {}
        hub = self

        def create_repo(self, repo_id, **kw):
            hub.calls.append(("create_repo", dict(kw, repo_id=repo_id)))
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(self, repo_id, **kw):
            hub.calls.append(("create_branch", dict(kw, repo_id=repo_id)))

        def create_commit(self, repo_id, operations, **kw):
            hub.calls.append(("create_commit", dict(kw, repo_id=repo_id)))
            for op in operations:
                data = op.path_or_fileobj
                hub.files[op.path_in_repo] = data if isinstance(data, bytes) else Path(data).read_bytes()
            url = f"https://huggingface.co/{repo_id}/commit/{'0' * 40}"
            return CommitInfo(commit_url=url, commit_message=kw.get("commit_message", ""),
                              commit_description="", oid="0" * 40)

        def no_network(self, *a, **kw):
            raise AssertionError("unexpected Hub call")

        for name in ("upload_folder", "upload_file", "model_info", "repo_info", "file_exists"):
            monkeypatch.setattr(HfApi, name, no_network)
        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)

    def card(self) -> tuple[dict, str]:
        text = self.files["README.md"].decode()
        _, meta, body = text.split("---\n", 2)
        return yaml.safe_load(meta), body


def _two_adapters(base: Path):
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), SealConfig(init_weights=False))
    model.add_adapter("task_b", SealConfig(granularity="channel", init_weights=False))
    for cfg in model.peft_config.values():
        cfg.base_model_name_or_path = BASE_ID  # as if the base had been loaded from the Hub
    return model.eval()


def test_push_to_hub_uploads_adapter_and_seal_model_card(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    model = _two_adapters(tiny_checkpoint(tmp_path / "base"))
    info = model.push_to_hub(REPO, training_data="50 synthetic line-retrieval samples, 512 tokens each.",
                             private=True, commit_message="first")
    assert info.oid == "0" * 40
    assert [c[0] for c in hub.calls] == ["create_repo", "create_commit"]
    assert hub.calls[0][1]["private"] is True and hub.calls[0][1]["exist_ok"] is True
    assert hub.calls[1][1]["commit_message"] == "first" and hub.calls[1][1]["repo_id"] == REPO
    assert set(hub.files) == {
        "README.md", "adapter_config.json", "adapter_model.safetensors",
        "task_b/adapter_config.json", "task_b/adapter_model.safetensors",
    }
    config = json.loads(hub.files["adapter_config.json"])
    assert config["peft_type"] == "SEAL" and config["granularity"] == "head"
    assert json.loads(hub.files["task_b/adapter_config.json"])["granularity"] == "channel"

    meta, body = hub.card()
    assert meta["library_name"] == "peft" and meta["base_model"] == BASE_ID
    assert {"seal", "seal-peft", "peft", f"base_model:adapter:{BASE_ID}"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "text-generation"
    assert "SEAL-H (one scale per attention head)" in body and "SEAL-C (one scale per channel)" in body
    assert "`self_attn.o_proj`" in body and "50 synthetic line-retrieval samples" in body
    assert "import seal_peft" in body and f'PeftModel.from_pretrained(base, "{REPO}")' in body
    assert body.index("import seal_peft") < body.index("PeftModel.from_pretrained")
    assert 'model.load_adapter(f"{local}/task_b", adapter_name="task_b")' in body

    # the uploaded files are a loadable adapter: write them as a Hub cache, load by repo id offline
    _check_offline_load(tmp_path, hub.files, model)


def test_push_to_hub_branch_and_selected_adapter(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    model = _two_adapters(tiny_checkpoint(tmp_path / "base"))
    seal_peft.hub.push_to_hub(model, REPO, revision="v1", selected_adapters=["default"], tags=["my-task"])
    assert [c[0] for c in hub.calls] == ["create_repo", "create_branch", "create_commit"]
    assert hub.calls[2][1]["revision"] == "v1"
    assert set(hub.files) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    meta, body = hub.card()
    assert "my-task" in meta["tags"] and "Not described by the uploader" in body


def test_card_without_hub_base_and_non_seal_models(tmp_path, monkeypatch):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_checkpoint(tmp_path / "b")), SealConfig())
    text = model_card(model)
    assert "base_model:" not in text.split("---\n")[1]  # a local path is not Hub metadata
    model.peft_config["default"].base_model_name_or_path = "/cache/seal_peft/models/SmolLM2-135M-Instruct"
    text = model_card(model)  # seal-peft's embedded model: say how to load it
    assert "# SEAL adapter for SmolLM2-135M-Instruct" in text and 'load_model("smollm2")' in text
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "b"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="SEAL adapters"):
        model_card(lora)
    # other PEFT methods keep transformers' own push_to_hub (which writes a generic transformers card)
    import transformers.utils.hub as tf_hub
    from huggingface_hub import ModelCard, ModelCardData

    hub = FakeHub(monkeypatch)
    generic = ModelCard.from_template(ModelCardData(library_name="transformers"))
    monkeypatch.setattr(tf_hub, "create_and_tag_model_card", lambda *a, **k: generic)
    lora.push_to_hub(REPO)
    assert "adapter_model.safetensors" in hub.files
    assert yaml.safe_load(hub.files["README.md"].decode().split("---\n")[1])["library_name"] == "transformers"


def _hub_cache(home: Path, repo: str, files: dict[str, bytes], rev: str = "a" * 40) -> None:
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    for name, data in files.items():
        path = root / "snapshots" / rev / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(rev)


CHILD = r"""
import sys, torch
import seal_peft
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, repo, out = sys.argv[1:4]
ids = torch.arange(3, 40)[None]
m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), repo).eval()
from huggingface_hub import snapshot_download
local = snapshot_download(repo)  # as the model card says (offline: from the cache)
m.load_adapter(f"{local}/task_b", adapter_name="task_b")
res = {}
with torch.no_grad():
    for name in ("default", "task_b"):
        m.set_adapter(name)
        res[name] = m(input_ids=ids).logits
    m2 = seal_peft.from_pretrained(AutoModelForCausalLM.from_pretrained(base), repo).eval()
    res["seal_from_pretrained"] = m2(input_ids=ids).logits
torch.save(res, out)
"""


def _check_offline_load(tmp_path: Path, files: dict[str, bytes], model) -> None:
    home = tmp_path / "hf_home"
    _hub_cache(home, REPO, files)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("HF_HUB_CACHE", None)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    out = tmp_path / "offline.pt"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "base"), REPO, str(out)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(out)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        for name in ("default", "task_b"):
            model.set_adapter(name)
            torch.testing.assert_close(got[name], model(input_ids=ids).logits, rtol=0, atol=1e-6)
        model.set_adapter("default")
        torch.testing.assert_close(got["seal_from_pretrained"], model(input_ids=ids).logits, rtol=0, atol=1e-6)
