"""Serving several SEAL adapters on one base model: mixed-adapter batches (``adapter_names=[...]``)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from peft import get_peft_model

from seal_peft import SealConfig

ADAPTERS = ["task_a", "task_b", "task_c"]


def multi_adapter_model(arch: str, granularities=("head", "channel", "head")):
    torch.manual_seed(0)
    model = get_peft_model(
        make_model(arch),
        SealConfig(granularity=granularities[0], init_weights=False),
        adapter_name=ADAPTERS[0],
    )
    for name, gran in zip(ADAPTERS[1:], granularities[1:]):
        model.add_adapter(name, SealConfig(granularity=gran, init_weights=False))
    return model.eval()


def single(model, name: str, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        if name == "__base__":
            with model.disable_adapter():
                return model(input_ids=ids, attention_mask=mask).logits
        model.set_adapter(name)
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_mixed_batch_equals_each_adapter_alone(arch):
    model = multi_adapter_model(arch)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (5, 10), generator=g)
    names = ["task_b", "__base__", "task_a", "task_c", "task_b"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
    for i, name in enumerate(names):
        alone = single(model, name, ids[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    # the adapters really differ, so the check above is not vacuous
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-4)
    assert not torch.allclose(mixed[1], mixed[2], atol=1e-4)


def test_mixed_batch_generate_matches_single_adapter_generate():
    model = multi_adapter_model("llama")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 96, (3, 8), generator=g)
    names = ["task_c", "task_a", "__base__"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **kw)
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model.generate(input_ids=ids[i : i + 1], **kw)
            else:
                model.set_adapter(name)
                alone = model.generate(input_ids=ids[i : i + 1], **kw)
            assert torch.equal(mixed[i : i + 1], alone)


def test_mixed_batch_with_padding_and_beam_search():
    model = multi_adapter_model("llama")
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding of the second sample
    names = ["task_a", "task_b"]
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        for i, name in enumerate(names):
            alone = single(model, name, ids[i : i + 1], mask[i : i + 1])
            torch.testing.assert_close(
                mixed[i, mask[i].bool()], alone[0, mask[i].bool()], rtol=1e-5, atol=1e-5
            )
        kw = dict(num_beams=3, max_new_tokens=4, do_sample=False, pad_token_id=0, early_stopping=True)
        kw |= dict(return_dict_in_generate=True, output_scores=True)
        out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kw)
        # beam search repeats every sample num_beams times: each sample's beams must use its own adapter,
        # i.e. give exactly the sequences (and beam scores) of that sample generated alone with its adapter
        for i, name in enumerate(names):
            model.set_adapter(name)
            alone = model.generate(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], **kw)
            assert torch.equal(out.sequences[i : i + 1], alone.sequences)
            torch.testing.assert_close(
                out.sequences_scores[i : i + 1], alone.sequences_scores, rtol=1e-5, atol=1e-6
            )
        # and the two adapters lead to different beams here, so a mix-up would be caught
        model.set_adapter(names[1])
        swapped = model.generate(input_ids=ids[:1], attention_mask=mask[:1], **kw)
    assert not torch.equal(swapped.sequences, out.sequences[:1])


def test_mixed_batch_errors():
    model = multi_adapter_model("llama")
    ids = torch.randint(0, 96, (2, 6))
    with pytest.raises(ValueError, match=r"does not have: 'nope'.*task_a"):
        model(input_ids=ids, adapter_names=["task_a", "nope"])
    with pytest.raises(ValueError, match="2 samples"):
        model(input_ids=ids, adapter_names=["task_a"])
    with pytest.raises(TypeError, match="one adapter name per sample"):
        model(input_ids=ids, adapter_names="task_a")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=ids, adapter_names=["task_a", "task_b"])
    model.eval()
    model.set_adapter("task_a")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged.*unmerge_adapter"):
        model(input_ids=ids, adapter_names=["task_a", "task_b"])
    model.unmerge_adapter()
    with torch.no_grad():
        model(input_ids=ids, adapter_names=["task_a", "task_b"])  # works again
    # hooks are removed after every call: a plain forward uses the active adapter
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    assert torch.allclose(plain, single(model, "task_a", ids))
