"""Device placement: inputs follow the model's (input) device, and every CLI command that loads a model
places it as ``--device`` / ``--device-map`` say. Runs on the CPU: the "accelerator" is the meta device
(tensors without data), and the fake model returns its logits on the CPU, as the last layer of a model
spread over several devices does."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

ACCEL = torch.device("meta")
VOCAB = 16
EOS, FIRST = 15, 7


class FakeSplitModel(nn.Module):
    """Input embeddings on ``ACCEL``, logits on the CPU. Every tensor input must arrive on ``ACCEL``.

    Greedy decoding sees token ``FIRST`` after the prompt, then EOS.
    """

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 4, device=ACCEL)
        self.calls: list[dict[str, torch.device]] = []

    def get_input_embeddings(self):
        return self.embed

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=None,
        logits_to_keep=0,
    ):
        devices = {
            k: v.device
            for k, v in dict(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
            ).items()
            if isinstance(v, torch.Tensor)
        }
        self.calls.append(devices)
        bad = {k: d for k, d in devices.items() if d != ACCEL}
        assert not bad, f"inputs not on the model's device: {bad}"
        batch, width = input_ids.shape
        keep = width if not logits_to_keep else min(int(logits_to_keep), width)
        logits = torch.zeros(batch, keep, VOCAB)
        logits[..., EOS if len(self.calls) > 1 else FIRST] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=("cache",))


def test_generation_puts_prefill_and_decode_inputs_on_the_model_device():
    from seal_peft.evaluation import greedy_generate

    model = FakeSplitModel()
    out = greedy_generate(
        model, [[1, 2, 3], [4, 5]], max_new_tokens=4, eos_token_id=EOS, batch_size=2, progress=False
    )
    assert out == [[FIRST], [FIRST]]
    assert len(model.calls) == 2  # prefill + one decode step (whose token ids come from CPU logits)


def test_perplexity_puts_windows_on_the_model_device():
    import math

    from seal_peft.evaluation import perplexity

    model = FakeSplitModel()
    value = perplexity(model, None, list(range(1, 12)), max_length=4)
    assert len(model.calls) == 4 and all(c["input_ids"] == ACCEL for c in model.calls)
    assert math.isfinite(value)


def test_answer_scores_put_inputs_on_the_model_device_and_score_on_the_logits_device():
    from seal_peft.analysis import answer_scores

    model = FakeSplitModel()
    record = {"input_ids": [1, 2, 3, FIRST, EOS], "labels": [-100, -100, -100, FIRST, EOS], "answer": "x"}
    scores = answer_scores(model, [record], progress=False)
    assert scores["accuracy"] == 0.0 and len(model.calls) == 1  # the 2nd token is not predicted


def test_input_device_is_the_embedding_device():
    from seal_peft.models import input_device

    model = FakeSplitModel()
    assert input_device(model) == ACCEL
    assert input_device(nn.Linear(2, 2)) == torch.device("cpu")


# ---------------------------------------------------------------------------------------------------- CLI
class _Stop(Exception):
    pass


@pytest.mark.parametrize(
    "argv",
    [
        ["eval"],
        ["train", "--out", "unused"],
        ["analyze", "--out", "unused"],
        ["demo", "--out", "unused"],
    ],
)
def test_every_model_command_places_the_model(monkeypatch, tmp_path, argv):
    from seal_peft import cli, models

    seen = []

    def fake_load_model(name, **kwargs):
        seen.append(kwargs)
        raise _Stop

    monkeypatch.setattr(models, "load_model", fake_load_model)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(_Stop):
        cli.main(argv + ["--quiet", "--dtype", "float32"])
    assert seen[-1]["device"] == torch.device("cuda") and "device_map" not in seen[-1]
    with pytest.raises(_Stop):
        cli.main(argv + ["--quiet", "--dtype", "float32", "--device", "cpu"])
    assert seen[-1]["device"] == torch.device("cpu")
    with pytest.raises(_Stop):
        cli.main(argv + ["--quiet", "--dtype", "float32", "--device-map", "auto"])
    assert seen[-1]["device_map"] == "auto" and "device" not in seen[-1]
    with pytest.raises(SystemExit):  # one or the other
        cli.build_parser().parse_args(argv + ["--device", "cpu", "--device-map", "auto"])


def test_training_a_model_on_the_cpu_stays_on_the_cpu(monkeypatch):
    """The Trainer moves a model to the GPU when there is one; ``--device cpu`` must keep it there."""
    from conftest import make_model

    import seal_peft.training as training

    seen = {}
    monkeypatch.setattr(training, "train_seal", lambda m, t, ds, out, **kw: seen.update(kw))
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}] * 2
    training.train_variant(make_model("llama"), None, rows, "head", "unused", lm_every=0)
    assert seen["use_cpu"] is True
