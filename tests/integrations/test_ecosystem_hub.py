"""Hub: what `seal_peft.push_to_hub` of a SEAL adapter uploads (intercepted at the huggingface_hub API, no
network), loading an adapter by repo id from a local Hub cache with HF_HUB_OFFLINE=1, and that
`import seal_peft` changes nothing in PEFT, transformers or huggingface_hub."""

from __future__ import annotations

import ast
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
from seal_peft.integrations.hub import model_card

REPO = "acme/seal-tiny"
BASE_ID = "acme/tiny-llama"
ROOT = Path(__file__).resolve().parents[2]  # the repository


class FakeHub:
    """Records create_repo / create_branch / upload_folder / create_commit calls instead of sending them."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, dict]] = []
        self.files: dict[str, bytes] = {}
        hub = self

        def info(repo_id, kw):
            url = f"https://huggingface.co/{repo_id}/commit/{'0' * 40}"
            return CommitInfo(commit_url=url, commit_message=kw.get("commit_message") or "",
                              commit_description="", oid="0" * 40)

        def create_repo(self, repo_id, **kw):
            hub.calls.append(("create_repo", dict(kw, repo_id=repo_id)))
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(self, repo_id, **kw):
            hub.calls.append(("create_branch", dict(kw, repo_id=repo_id)))

        def upload_folder(self, *, repo_id, folder_path, **kw):
            hub.calls.append(("upload_folder", dict(kw, repo_id=repo_id)))
            for path in sorted(Path(folder_path).rglob("*")):
                if path.is_file():
                    hub.files[path.relative_to(folder_path).as_posix()] = path.read_bytes()
            return info(repo_id, kw)

        def create_commit(self, repo_id, operations, **kw):  # transformers' stock push_to_hub
            hub.calls.append(("create_commit", dict(kw, repo_id=repo_id)))
            for op in operations:
                data = op.path_or_fileobj
                hub.files[op.path_in_repo] = data if isinstance(data, bytes) else Path(data).read_bytes()
            return info(repo_id, kw)

        def no_network(self, *a, **kw):
            raise AssertionError("unexpected Hub call")

        for name in ("upload_file", "model_info", "repo_info", "file_exists"):
            monkeypatch.setattr(HfApi, name, no_network)
        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
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


ADAPTER_FILES = {
    "README.md", "adapter_config.json", "adapter_model.safetensors",
    "task_b/adapter_config.json", "task_b/adapter_model.safetensors",
}


def test_push_to_hub_uploads_adapter_and_seal_model_card(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    model = _two_adapters(tiny_checkpoint(tmp_path / "base"))
    info = seal_peft.push_to_hub(model, REPO, training_data="50 synthetic line-retrieval samples, 512 tokens each.",
                                 private=True, commit_message="first")
    assert info.oid == "0" * 40
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][1]["private"] is True and hub.calls[0][1]["exist_ok"] is True
    assert hub.calls[1][1]["commit_message"] == "first" and hub.calls[1][1]["repo_id"] == REPO
    assert set(hub.files) == ADAPTER_FILES
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
    assert "| `default` | (repo root) | SEAL-H (one scale per attention head) | `self_attn.o_proj` | 8 |" in body

    # the uploaded files are a loadable adapter: write them as a Hub cache, load by repo id offline
    _check_offline_load(tmp_path, hub.files, model)


def test_push_to_hub_from_saved_folder(tmp_path, monkeypatch):
    """A saved adapter folder uploads the same files and card as the model; the folder is not changed."""
    model = _two_adapters(tiny_checkpoint(tmp_path / "base"))
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    (folder / "trainer_state.json").write_text("{}")  # not part of the adapter: not uploaded
    before = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    hub = FakeHub(monkeypatch)
    seal_peft.push_to_hub(folder, REPO, training_data="recipe")
    from_folder = dict(hub.files)
    assert set(from_folder) == ADAPTER_FILES
    assert {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert from_folder["README.md"].decode() == model_card(model, REPO, training_data="recipe")
    assert model_card(folder, REPO, training_data="recipe") == model_card(model, REPO, training_data="recipe")
    hub.files.clear()
    seal_peft.push_to_hub(model, REPO, training_data="recipe")
    assert hub.files == from_folder

    with pytest.raises(TypeError, match="selected_adapters"):
        seal_peft.push_to_hub(folder, REPO, selected_adapters=["default"])
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="not a SEAL one"):
        seal_peft.push_to_hub(tmp_path / "lora", REPO)
    with pytest.raises(ValueError, match="no SEAL adapter"):
        seal_peft.push_to_hub(tmp_path / "base", REPO)
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"] * 2  # the bad calls uploaded nothing


def test_push_to_hub_branch_and_selected_adapter(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    model = _two_adapters(tiny_checkpoint(tmp_path / "base"))
    seal_peft.integrations.hub.push_to_hub(model, REPO, revision="v1", selected_adapters=["default"], tags=["my-task"])
    assert [c[0] for c in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
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
    # model.push_to_hub is transformers' own method for every PEFT model, SEAL included (generic card)
    import transformers.utils.hub as tf_hub
    from huggingface_hub import ModelCard, ModelCardData

    hub = FakeHub(monkeypatch)
    generic = ModelCard.from_template(ModelCardData(library_name="transformers"))
    monkeypatch.setattr(tf_hub, "create_and_tag_model_card", lambda *a, **k: generic)
    for peft_model in (lora, model):
        hub.files.clear()
        peft_model.push_to_hub(REPO)
        assert "adapter_model.safetensors" in hub.files
        assert yaml.safe_load(hub.files["README.md"].decode().split("---\n")[1])["library_name"] == "transformers"
    assert [c[0] for c in hub.calls] == ["create_repo", "create_commit"] * 2
    with pytest.raises(TypeError, match="training_data"):  # the stock signature: no SEAL keyword
        lora.push_to_hub(REPO, training_data="x")


# ------------------------------------------------------------------------------- no import side effects
# Every seal_peft submodule import runs seal_peft/__init__ first, so the module imported first decides
# the import order; each one is imported first in a fresh interpreter.
MODULES = ["seal_peft.tuner.config", "seal_peft.tuner.registration", "seal_peft.tuner.model", "seal_peft.integrations.hub"]
SIDE_EFFECTS = r"""
import importlib, json, sys, tempfile, os
import huggingface_hub, peft, transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils.hub import PushToHubMixin

def snapshot():
    out = {}
    for cls in (PeftModel, PushToHubMixin, huggingface_hub.HfApi, huggingface_hub.ModelCard,
                transformers.PreTrainedModel):
        for name, value in vars(cls).items():
            out[f"{cls.__qualname__}.{name}"] = value
    return out

def lora_card(path):
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    import torch; torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(target_modules=["q_proj"]))
    model.save_pretrained(path)
    return open(os.path.join(path, "README.md")).read()

push = PeftModel.push_to_hub
before = snapshot()
card_before = lora_card(tempfile.mkdtemp())
assert not any(m == "seal_peft" or m.startswith("seal_peft.") for m in sys.modules)
order = sys.argv[1:]
for name in order:
    importlib.import_module(name)
after = snapshot()
changed = sorted(k for k in set(before) | set(after) if before.get(k) is not after.get(k))
from peft.utils import PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
import seal_peft
print(json.dumps({
    "changed": changed,
    "same_push": PeftModel.push_to_hub is push,
    "push_qualname": PeftModel.push_to_hub.__qualname__,
    "lora_card_same": lora_card(tempfile.mkdtemp()) == card_before,
    "registered": PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SEAL] is seal_peft.SealConfig
                  and PEFT_TYPE_TO_TUNER_MAPPING["SEAL"] is seal_peft.SealModel,
    "config_type": str(seal_peft.SealConfig().peft_type),
}))
"""


@pytest.mark.parametrize("first", range(len(MODULES)), ids=MODULES)
def test_import_changes_nothing_in_other_libraries(tmp_path, first):
    order = MODULES[first:] + MODULES[:first]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", SIDE_EFFECTS, *order], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["changed"] == [] and report["same_push"] is True
    assert report["push_qualname"] == "PushToHubMixin.push_to_hub"
    assert report["lora_card_same"] is True
    assert report["registered"] is True and report["config_type"] == "PeftType.SEAL"


def _seal_imports(path: Path) -> set[str]:
    """seal_peft modules that ``path`` imports anywhere (module level or inside functions)."""
    package = ["seal_peft", *path.relative_to(ROOT / "seal_peft").with_suffix("").parts[:-1]]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "seal_peft"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            elif (node.module or "").split(".")[0] == "seal_peft":
                target = node.module
            else:
                continue
            found.add(target)
            if not node.module:  # `from . import x`: x may be a module
                found |= {f"{target}.{a.name}" for a in node.names}
    return found


def test_tuner_modules_import_no_cycle():
    """tuner/{config,registration,model,layer}, integrations/hub and loading: no import cycle, lazy imports included.

    Registration is a leaf (it imports nothing of seal_peft; the package __init__ passes it the classes), so
    creating a SealConfig does not pull in the tuner, and nothing imports the package itself.
    """
    names = ["tuner.config", "tuner.registration", "tuner.model", "tuner.layer", "integrations.hub", "loading"]
    graph = {
        name: {
            m.removeprefix("seal_peft.")
            for m in _seal_imports(ROOT / "seal_peft" / (name.replace(".", "/") + ".py"))
        }
        for name in names
    }
    assert graph["tuner.registration"] == set()
    assert all("seal_peft" not in deps and "" not in deps for deps in graph.values()), graph

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    assert {n: reach(n) for n in names if n in reach(n)} == {}
    assert reach("tuner.config") == {"tuner.registration"}


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
    root = ROOT
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
