"""The device-dependent paths on the device named by ``SEAL_TEST_DEVICE`` (default ``cpu``).

CI runs these on CPU like every other fast test; ``scripts/gpu_check.sh`` runs them with
``SEAL_TEST_DEVICE=cuda`` (asking for a device that is not there fails, it does not skip):

- bf16 training: the frozen model computes in bf16 on the device, the scales stay fp32 on the
  device, only they get gradients and move, and no base weight changes;
- merge / unmerge: merging folds exactly ``(W.float() * s).to(dtype)`` into the weight, merged
  logits equal unmerged ones, unmerge restores the weight (bf16 bit-exactly, fp32 within one ulp),
  ``merge_and_unload`` leaves a plain ``nn.Linear`` on the device;
- placement: adapters load onto the device of the model they are loaded into, and generation and
  perplexity accept CPU token ids for a model on the device.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from distributed_worker import build_model
from peft import PeftModel, get_peft_model
from torch import nn

import seal_peft
from seal_peft.training import DEFAULT_LR, SealDataCollator, seal_loss

DEVICE = torch.device(os.environ.get("SEAL_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="module", autouse=True)
def _device_is_there():
    if DEVICE.type == "cuda":
        assert torch.cuda.is_available(), "SEAL_TEST_DEVICE=cuda but torch sees no CUDA device"


def _model(dtype=torch.float32, granularity="head", **kwargs):
    base = build_model().to(device=DEVICE, dtype=dtype)
    return get_peft_model(base, seal_peft.SealConfig(granularity=granularity, **kwargs))


def _o_projs(model):
    return [m for m in model.modules() if isinstance(m, seal_peft.SealLayer)]


@pytest.mark.parametrize("granularity", ["head", "channel"])
def test_bf16_training_on_device(granularity):
    model = _model(torch.bfloat16, granularity)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    scales = [p for p in model.parameters() if p.requires_grad]
    assert len(scales) == 2
    assert all(p.dtype == torch.float32 and p.device.type == DEVICE.type for p in scales)
    optimizer = torch.optim.AdamW(scales, lr=DEFAULT_LR[granularity], weight_decay=0.0)
    loss_fn = seal_loss(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 96, (2, 64), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    batch = SealDataCollator(pad_token_id=0, trim_logits=True)(
        [{"input_ids": i.tolist(), "labels": lab.tolist()} for i, lab in zip(ids, labels)]
    )
    labels = batch.pop("labels")
    batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
    model.train()
    losses = []
    for _ in range(3):
        out = model(**batch, use_cache=False)
        assert out.logits.dtype == torch.bfloat16 and out.logits.device.type == DEVICE.type
        loss = loss_fn(out, labels)
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in scales)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert all(math.isfinite(x) for x in losses)
    assert all((p.detach() - 1).abs().max() > 1e-3 for p in scales), "the scales did not move"
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["head", "channel"])
def test_merge_unmerge_exact_on_device(dtype, granularity):
    model = _model(dtype, granularity, init_weights=False).eval()
    layers = _o_projs(model)
    originals = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    ids = torch.randint(2, 96, (1, 40), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits.float()
        model.merge_adapter()
        for layer, w in zip(layers, originals):
            expected = (w.float() * layer.channel_scale("default").float()[None, :]).to(dtype)
            assert torch.equal(layer.get_base_layer().weight, expected)
        merged = model(input_ids=ids).logits.float()
        model.unmerge_adapter()
        for layer, w in zip(layers, originals):
            got = layer.get_base_layer().weight
            assert got.device.type == DEVICE.type
            if dtype == torch.bfloat16:
                assert torch.equal(got, w)  # the copy kept while merged (exact_unmerge)
            else:
                torch.testing.assert_close(got, w, rtol=2**-23, atol=0)  # one ulp (division)
    if dtype == torch.float32:
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    else:
        # bf16: scaling the activation vs the weight rounds differently (here 2e-3 on logits of at
        # most 0.4); the adapter itself moves the logits by ~0.075, so a merge that lost the scales fails
        assert (merged - unmerged).abs().max() < 1e-2
    with torch.no_grad():
        plain = model.merge_and_unload(safe_merge=True)
        assert not any(isinstance(m, seal_peft.SealLayer) for m in plain.modules())
        o_proj = plain.model.layers[0].self_attn.o_proj
        assert type(o_proj) is nn.Linear and o_proj.weight.device.type == DEVICE.type
        torch.testing.assert_close(plain(input_ids=ids).logits.float(), merged, rtol=0, atol=0)


def test_adapter_loads_onto_the_model_device_and_eval_takes_cpu_ids(tmp_path):
    from seal_peft.evaluation.generation import greedy_generate
    from seal_peft.evaluation.perplexity import token_nll

    trained = get_peft_model(build_model(), seal_peft.SealConfig(granularity="channel", init_weights=False))
    trained.save_pretrained(tmp_path / "adapter")
    cpu_scales = {n: p.detach() for n, p in trained.named_parameters() if "seal_scale" in n}
    for load in (PeftModel.from_pretrained, seal_peft.from_pretrained):
        model = load(build_model().to(DEVICE), tmp_path / "adapter").eval()
        loaded = {n: p for n, p in model.named_parameters() if "seal_scale" in n}
        assert loaded.keys() == cpu_scales.keys()
        for n, p in loaded.items():
            assert p.device.type == DEVICE.type and torch.equal(p.cpu(), cpu_scales[n]), n
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]  # plain Python ids (CPU)
    out = greedy_generate(model, prompts, max_new_tokens=4, eos_token_id=[], progress=False, batch_size=2)
    assert [len(o) for o in out] == [4, 4] and all(0 <= t < 96 for o in out for t in o)
    with torch.no_grad():  # the same greedy tokens as a direct forward of the first step
        first = model(input_ids=torch.tensor([prompts[0]], device=DEVICE)).logits[0, -1].argmax().item()
    assert out[0][0] == first
    nll, n = token_nll(model, list(range(2, 42)), max_length=16)
    assert n == 39 and math.isfinite(nll) and nll > 0
