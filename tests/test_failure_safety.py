"""No data loss: an interrupted save never leaves an adapter that later loads silently.

PEFT's ``save_pretrained`` writes ``adapter_model.safetensors`` and then ``adapter_config.json``
straight into the target folder. The interruption is simulated by making safetensors' writer put
half the bytes on disk and raise (as a crash, a full disk or a killed job would).
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch
from conftest import VOCAB, make_model
from peft import PeftModel, get_peft_model

import seal_peft
from seal_peft import SealConfig

INPUTS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))


def logits(model):
    with torch.no_grad():
        return model.eval()(INPUTS).logits


def adapter(seed: int, **config):
    torch.manual_seed(seed)
    return get_peft_model(make_model("llama"), SealConfig(init_weights=False, **config))


def files(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def never_loads(folder: pathlib.Path) -> None:
    """Both loaders refuse the folder loudly."""
    with pytest.raises(
        ValueError, match="truncated or corrupted|not a complete PEFT adapter folder|no adapter_model"
    ):
        seal_peft.from_pretrained(make_model("llama"), folder)
    with pytest.raises(Exception):  # noqa: B017  (PEFT/safetensors raise their own types)
        PeftModel.from_pretrained(make_model("llama"), folder)


@pytest.fixture
def interrupt(monkeypatch):
    """Call it to make every following safetensors save_file write half of the file, then fail."""
    import peft.peft_model
    from safetensors.torch import save as to_bytes

    def half_then_crash(tensors, filename, metadata=None):
        data = to_bytes(tensors, metadata=metadata)
        pathlib.Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device (simulated)")

    return lambda: monkeypatch.setattr(peft.peft_model, "safe_save_file", half_then_crash)


# ------------------------------------------------------------------------- plain save_pretrained
def test_interrupted_save_pretrained_into_new_folder_never_loads(tmp_path, interrupt):
    interrupt()
    with pytest.raises(OSError, match="simulated"):
        adapter(0).save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()  # PEFT left half a file ...
    assert not (tmp_path / "a" / "adapter_config.json").exists()
    never_loads(tmp_path / "a")  # ... which nothing loads


def test_interrupted_save_pretrained_over_old_adapter_never_loads(tmp_path, interrupt):
    adapter(0).save_pretrained(tmp_path / "a")
    interrupt()
    with pytest.raises(OSError, match="simulated"):
        adapter(1).save_pretrained(tmp_path / "a")
    # the old config is still there, next to half a new weight file: refused, never half-loaded
    assert (tmp_path / "a" / "adapter_config.json").exists()
    never_loads(tmp_path / "a")


def test_truncation_at_any_point_is_caught_by_both_loaders(tmp_path):
    adapter(0, modules_to_save=["lm_head"]).save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    data = weights.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    for cut in sorted(
        {0, 1, 7, 8, header // 2, header - 1, header, header + 1, (header + len(data)) // 2, len(data) - 1}
    ):
        weights.write_bytes(data[:cut])
        never_loads(tmp_path / "a")
    weights.write_bytes(data)
    seal_peft.from_pretrained(make_model("llama"), tmp_path / "a")


# ------------------------------------------------------------------------------- save_adapter
def test_save_adapter_interrupted_new_folder_leaves_nothing(tmp_path, interrupt):
    interrupt()
    with pytest.raises(OSError, match="simulated"):
        seal_peft.save_adapter(adapter(0), tmp_path / "a")
    assert os.listdir(tmp_path) == []  # no folder, no temporary leftovers


def test_save_adapter_interrupted_keeps_old_adapter(tmp_path, interrupt):
    old = adapter(0, modules_to_save=["lm_head"])
    seal_peft.save_adapter(old, tmp_path / "a")
    (tmp_path / "a" / "notes.txt").write_text("mine")
    before = files(tmp_path / "a")
    interrupt()
    with pytest.raises(OSError, match="simulated"):
        seal_peft.save_adapter(adapter(1, modules_to_save=["lm_head"]), tmp_path / "a")
    assert files(tmp_path / "a") == before and sorted(os.listdir(tmp_path)) == ["a"]
    assert torch.equal(logits(seal_peft.from_pretrained(make_model("llama"), tmp_path / "a")), logits(old))


def test_save_adapter_interrupted_while_moving_files_in(tmp_path, monkeypatch):
    """Crash between replacing the weights and the config: the folder has no config, so it is refused
    instead of pairing new weights with an old config."""
    seal_peft.save_adapter(adapter(0), tmp_path / "a")
    real_replace = os.replace

    def crash_on_config(src, dst):
        if os.path.basename(dst) == "adapter_config.json":
            raise OSError("killed (simulated)")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_config)
    new = adapter(1, granularity="channel")
    with pytest.raises(OSError, match="simulated"):
        seal_peft.save_adapter(new, tmp_path / "a")
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (tmp_path / "a" / "adapter_config.json").exists()
    never_loads(tmp_path / "a")
    assert sorted(os.listdir(tmp_path)) == ["a"]
    seal_peft.save_adapter(new, tmp_path / "a")  # a retry completes it
    assert torch.equal(logits(seal_peft.from_pretrained(make_model("llama"), tmp_path / "a")), logits(new))


def test_save_adapter_replaces_and_keeps_other_files(tmp_path):
    first, second = adapter(0), adapter(1)
    second.add_adapter("other", SealConfig(granularity="channel", init_weights=False))
    seal_peft.save_adapter(first, tmp_path / "a")
    (tmp_path / "a" / "notes.txt").write_text("mine")
    readme = (tmp_path / "a" / "README.md").read_text()
    (tmp_path / "a" / "README.md").write_text(readme + "\nMy own notes.\n")
    seal_peft.save_adapter(second, tmp_path / "a")
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine"
    assert "My own notes." in (tmp_path / "a" / "README.md").read_text()  # card updated, not replaced
    assert sorted(os.listdir(tmp_path)) == ["a"]
    loaded = seal_peft.from_pretrained(make_model("llama"), tmp_path / "a")
    assert torch.equal(logits(loaded), logits(second))
    loaded.load_adapter(tmp_path / "a" / "other", adapter_name="other")
    second.set_adapter("other")
    loaded.set_adapter("other")
    assert torch.equal(logits(loaded), logits(second))
    with pytest.raises(ValueError, match="is a file"):
        seal_peft.save_adapter(first, tmp_path / "a" / "notes.txt")
