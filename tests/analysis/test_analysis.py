"""Head attribution, perturbation, learned scales, plots, selection and `seal-peft analyze` on tiny
random models (seconds in total)."""

from __future__ import annotations

import copy
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from conftest import make_model, tiny_config
from peft import LoraConfig, get_peft_model

from seal_peft import SealConfig
from seal_peft.analysis import (
    HeadAttribution,
    attribution_agreement,
    head_attribution,
    init_from_attribution,
    learned_head_scales,
    perturb_heads,
    plot_attribution,
    plot_scale_vs_attribution,
    plot_scales,
    restrict_to_heads,
    scale_correlation,
    select_heads,
    selection_config,
    spearman,
    top_vs_random,
)
from seal_peft.tuner.layer import SealLayer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

HEAD_DIM = 8
O_PROJ = {"llama": "model.layers.{}.self_attn.o_proj", "gpt2": "transformer.h.{}.attn.c_proj"}


def records(n=3, length=20, answer=4, seed=0, vocab=96):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (length - answer) + ids[length - answer :]})
    return out


def answer_nll(model, recs, hooked=None):
    """Independent reference: mean answer NLL per sample on a plain model; ``hooked`` =
    (arch, {(layer, head): value}) scales head slices of the o_proj input with forward pre-hooks."""
    handles = []
    if hooked is not None:
        arch, heads = hooked
        for (layer, h), value in heads.items():

            def pre(module, args, h=h, value=value):
                x = args[0].clone()
                x[..., h * HEAD_DIM : (h + 1) * HEAD_DIM] *= value
                return (x, *args[1:])

            handles.append(model.get_submodule(O_PROJ[arch].format(layer)).register_forward_pre_hook(pre))
    try:
        out = []
        with torch.no_grad():
            for r in recs:
                logits = model(torch.tensor([r["input_ids"]])).logits[0, :-1]
                labels = torch.tensor(r["labels"][1:])
                out.append(float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)))
        return np.array(out)
    finally:
        for h in handles:
            h.remove()


def no_seal_layers(model):
    return not any(isinstance(m, SealLayer) for m in model.modules())


# ----------------------------------------------------------------------------- attribution
def test_attribution_matches_finite_differences_and_restores_model():
    model = make_model("llama", dtype=torch.float64)
    recs = records()
    before = answer_nll(model, recs)
    attr = head_attribution(model, recs, progress=False)
    assert attr.values.shape == (3, 2, 4) and attr.layer_ids == [0, 1]
    np.testing.assert_allclose(attr.loss, before, rtol=1e-10)
    eps = 3e-3  # RMSNorm computes in fp32 even in a float64 model: smaller steps drown in rounding
    for layer in range(2):
        for h in range(4):
            up = answer_nll(model, recs, ("llama", {(layer, h): 1 + eps})).mean()
            down = answer_nll(model, recs, ("llama", {(layer, h): 1 - eps})).mean()
            fd = -(up - down) / (2 * eps)
            assert attr.mean[layer, h] == pytest.approx(fd, rel=1e-3, abs=1e-5)
    # the model is restored: no SEAL layer, trainable again, same outputs
    assert no_seal_layers(model) and all(p.requires_grad for p in model.parameters())
    np.testing.assert_array_equal(answer_nll(model, recs), before)
    # ranking and aggregates
    top = attr.top(2, "positive")
    assert (
        attr.value(top[0]) >= attr.value(top[1]) and attr.value(attr.top(1, "negative")[0]) == attr.mean.min()
    )
    assert attr.std.shape == (2, 4) and np.all(attr.std >= 0)


def test_attribution_of_a_seal_model_is_that_of_the_adapted_model():
    model = make_model("llama", dtype=torch.float64)
    peft_model = get_peft_model(model, SealConfig(granularity="head", init_weights=False))
    peft_model.eval()
    recs = records()
    merged = copy.deepcopy(peft_model).merge_and_unload()
    a_peft = head_attribution(peft_model, recs, progress=False)
    a_merged = head_attribution(merged, recs, progress=False)
    np.testing.assert_allclose(a_peft.values, a_merged.values, rtol=1e-6, atol=1e-9)
    # the PeftModel is as before: one adapter, active, trainable
    assert list(peft_model.peft_config) == ["default"] and peft_model.active_adapter == "default"
    assert all(p.requires_grad for n, p in peft_model.named_parameters() if "seal_scale" in n)
    assert not any("seal_probe" in n for n, _ in peft_model.named_parameters())


# ----------------------------------------------------------------------------- perturbation
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_perturbation_equals_hook_on_plain_model(arch):
    model = make_model(arch, dtype=torch.float64)
    recs = records(n=2)
    conds = {"one": [(1, 2)], "group": [(0, 1), (1, 3)]}
    calls = []
    first = model.get_submodule(O_PROJ[arch].format(0).rsplit(".", 2)[0])  # decoder layer 0
    handle = first.register_forward_hook(lambda *a: calls.append(1))
    for value in (0.0, 1.5):
        calls.clear()
        res = perturb_heads(model, recs, conds, value=value, progress=False)
        # layer 0 ran once per sample for the recording, once for "group", never for "one"
        assert len(calls) == 2 * len(recs)
        np.testing.assert_allclose(res.base_nll, answer_nll(model, recs), rtol=1e-10)
        for name, heads in conds.items():
            expected = answer_nll(model, recs, (arch, dict.fromkeys(heads, value)))
            np.testing.assert_allclose(res.nll[name], expected, rtol=1e-10)
        plain = perturb_heads(model, recs, conds, value=value, progress=False, reuse_prefix=False)
        for name in conds:
            np.testing.assert_allclose(res.nll[name], plain.nll[name], rtol=1e-12)
    handle.remove()
    assert no_seal_layers(model)
    row = res.row("one")
    assert row["delta_loglik"] == pytest.approx(float(np.mean(res.base_nll - res.nll["one"])))
    assert row["effect"] == pytest.approx(row["delta_loglik"] / 0.5)


def test_top_vs_random_and_agreement_with_small_perturbation():
    model = make_model("llama", dtype=torch.float64)
    recs = records()
    attr = head_attribution(model, recs, progress=False)
    res = top_vs_random(model, recs, attr, k=2, draws=2, single_heads=3, progress=False)
    assert set(res.conditions) >= {"top2_positive", "top2_negative", "random2_0", "random2_1"}
    assert set(res.conditions["random2_0"]).isdisjoint(attr.top(2) + attr.top(2, "negative"))
    agreement = attribution_agreement(attr, res)
    assert agreement["num_heads"] == 3 and -1 <= agreement["spearman"] <= 1
    # a tiny perturbation is the derivative: perfect rank agreement, effect == attribution
    heads = [(layer, h) for layer in range(2) for h in range(4)]
    small = perturb_heads(model, recs, heads, value=1 - 1e-3, progress=False)
    exact = attribution_agreement(attr, small)
    assert exact["spearman"] == pytest.approx(1.0)
    assert exact["median_effect_over_attribution"] == pytest.approx(1.0, rel=1e-2)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)  # ties
    assert np.isnan(spearman([1, 2], [1, 2]))


# ----------------------------------------------------------------------------- learned scales + records
@pytest.mark.parametrize("granularity", ["head", "channel"])
def test_learned_scales_from_adapter_folder(tmp_path, granularity):
    trained = get_peft_model(make_model("llama"), SealConfig(granularity=granularity, init_weights=False))
    trained.save_pretrained(tmp_path / "adapter")
    expected = np.stack(
        [
            trained.get_submodule(f"base_model.model.model.layers.{i}.self_attn.o_proj")
            .seal_scale["default"]
            .detach()
            .numpy()
            for i in range(2)
        ]
    )
    model = make_model("llama")
    scales = learned_head_scales(model, tmp_path / "adapter")
    assert no_seal_layers(model) and scales.granularity == granularity
    if granularity == "head":
        np.testing.assert_allclose(scales.mean, expected)
    else:
        np.testing.assert_allclose(scales.mean, expected.reshape(2, 4, HEAD_DIM).mean(-1), rtol=1e-6)
        np.testing.assert_allclose(scales.std, expected.reshape(2, 4, HEAD_DIM).std(-1), rtol=1e-5)
    attr = head_attribution(model, records(), progress=False)
    corr = scale_correlation(attr, scales)
    assert corr["num_heads"] == 8 and -1 <= corr["spearman"] <= 1
    # records: JSON round trip, CSV with the learned scale
    attr.to_json(tmp_path / "a.json", scales)
    back = HeadAttribution.from_json(tmp_path / "a.json")
    np.testing.assert_allclose(back.values, attr.values)
    assert back.layer_ids == attr.layer_ids
    assert json.loads((tmp_path / "a.json").read_text())["heads"][0]["learned_scale"] == pytest.approx(
        scales.mean[0, 0]
    )
    header = (attr.to_csv(tmp_path / "a.csv", scales)).read_text().splitlines()[0]
    assert header.startswith("layer,head,attribution,std,rank,learned_scale")


def test_plots_are_written(tmp_path):
    model = make_model("llama")
    attr = head_attribution(model, records(), progress=False)
    scales = learned_head_scales(
        get_peft_model(make_model("llama"), SealConfig(granularity="channel", init_weights=False))
    )
    paths = [
        plot_attribution(attr, tmp_path / "attribution.png"),
        plot_scales(scales, tmp_path / "scales.png"),
        plot_scale_vs_attribution(attr, scales, tmp_path / "scatter.png"),
    ]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# ----------------------------------------------------------------------------- selection / init
def test_selection_trains_only_selected_heads_and_init_from_attribution():
    model = make_model("llama")
    attr = head_attribution(model, records(), progress=False)
    heads = select_heads(attr, 2, by="abs")
    config = selection_config(heads)
    assert config.layers_to_transform == sorted({h[0] for h in heads})
    peft_model = get_peft_model(model, config)
    mask = restrict_to_heads(peft_model, heads)
    init = init_from_attribution(peft_model, attr, max_change=0.2)
    changed = np.array(list(init.values())) - 1
    assert np.max(np.abs(changed)) == pytest.approx(0.2)
    assert all(np.sign(v - 1) == np.sign(attr.value(h)) for h, v in init.items())
    params = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.0)
    for r in records():
        out = peft_model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    layout_ids = config.layers_to_transform
    for lid, p, p0 in zip(layout_ids, params, start):
        moved = (p.detach() != p0).numpy()
        assert list(moved) == [(lid, h) in heads for h in range(4)]
    mask.remove()
    with pytest.raises(ValueError, match="between 1 and"):
        select_heads(attr, 0)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_gives_clear_errors(tmp_path):
    model = make_model("llama")
    with pytest.raises(ValueError, match="empty"):
        head_attribution(model, [], progress=False)
    with pytest.raises(ValueError, match="no supervised token"):
        head_attribution(model, [{"input_ids": [1, 2, 3], "labels": [-100] * 3}], progress=False)
    with pytest.raises(ValueError, match="input_ids'/'labels"):
        head_attribution(model, [{"input_ids": [1, 2, 3]}], progress=False)
    with pytest.raises(ValueError, match="head 7 of layer 1 does not exist"):
        perturb_heads(model, records(), [(1, 7)], progress=False)
    with pytest.raises(ValueError, match="layer 5 has no SEAL probe"):
        perturb_heads(model, records(), [(5, 0)], progress=False)
    with pytest.raises(ValueError, match="value=1.0"):
        perturb_heads(model, records(), [(1, 0)], value=1.0, progress=False)
    assert no_seal_layers(model) and all(p.requires_grad for p in model.parameters())
    # an adapter trained on another model (3 layers) does not load onto this one
    config, _, _ = tiny_config("llama")
    config.num_hidden_layers = 3
    from transformers import AutoModelForCausalLM

    other = get_peft_model(AutoModelForCausalLM.from_config(config), SealConfig())
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="does not fit the model"):
        learned_head_scales(model, tmp_path / "other")
    assert no_seal_layers(model)
    with pytest.raises(ValueError, match="not a folder"):
        learned_head_scales(model, tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not an attribution file"):
        HeadAttribution.from_json(tmp_path / "bad.json")
    lora = get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="merge_and_unload"):
        head_attribution(lora, records(), progress=False)


# ----------------------------------------------------------------------------- CLI
def _tiny_llama_with_real_tokenizer(path):
    """A 2-layer Llama saved with the embedded SmolLM2 tokenizer (so the data generators work)."""
    from seal_peft.models import load_tokenizer

    try:
        tok = load_tokenizer()
    except ImportError:
        pytest.skip("the embedded SmolLM2 tokenizer is not installed")
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return tok, config


def test_attribution_benchmark_tiny(tmp_path):
    """benchmarks/attribution.py (docs/analysis.md's selection table) end to end on a tiny model."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import attribution as bench
    finally:
        sys.path.remove(os.path.join(REPO, "benchmarks"))
    _tiny_llama_with_real_tokenizer(tmp_path / "tiny")
    small = ["--attr-samples", "2", "--attr-length", "256", "--train-samples", "3", "--train-length", "256"]
    rec = bench.main(
        ["--model", str(tmp_path / "tiny"), "--k", "2", "--eval-samples", "2", "--eval-length", "256"]
        + ["--variants", "ones,ones_more,topk,init"]
        + small
        + ["--out", str(tmp_path / "sel.json")]
    )
    assert set(rec["variants"]) == {"base", "ones", "ones_more", "topk", "init"}
    assert len(rec["variants"]["ones"]["train_loss_curve"]) == 3
    assert (
        len(rec["variants"]["ones_more"]["train_loss_curve"]) == 5
    )  # attribution samples + training samples
    assert math.isfinite(rec["variants"]["init"]["train_loss_first_half"])
    topk = rec["variants"]["topk"]  # k=2 heads: their layers' scales are trainable, only those 2 move
    assert topk["trainable_scales"] in (4, 8) and topk["scale_correlation"]["heads_moved"] <= 2
    assert json.loads((tmp_path / "sel.json").read_text())["variants"]["ones"]["answer_nll"] > 0


def test_cli_analyze_writes_records_and_plots(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from seal_peft.cli import main

    tok, config = _tiny_llama_with_real_tokenizer(tmp_path / "tiny")
    get_peft_model(
        AutoModelForCausalLM.from_pretrained(tmp_path / "tiny"), SealConfig(init_weights=False)
    ).save_pretrained(tmp_path / "adapter")
    args = ["analyze", "--model", str(tmp_path / "tiny"), "--num-samples", "2", "--length", "256", "--quiet"]
    out = tmp_path / "out"
    rc = main(
        args
        + ["--adapter", str(tmp_path / "adapter"), "--perturb-top", "2", "--random-draws", "1"]
        + ["--check-heads", "3", "--out", str(out)]
    )
    assert rc == 0
    for name in ("attribution.json", "heads.csv", "perturbation.json", "perturbation.csv", "summary.json"):
        assert (out / name).stat().st_size > 0
    for name in ("attribution.png", "scales.png", "scale_vs_attribution.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_samples"] == 2 and len(summary["top_positive"]) == 8
    assert {"scale_correlation", "perturbation", "agreement"} <= set(summary)
    assert "learned_scale" in (out / "heads.csv").read_text().splitlines()[0]
    assert "top positive" in capsys.readouterr().out
    # reuse the attribution; an adapter of another model is a clean error (exit code 2)
    other = tmp_path / "other"
    config.num_hidden_layers = 3
    get_peft_model(AutoModelForCausalLM.from_config(config), SealConfig()).save_pretrained(other)
    rc = main(
        args
        + ["--attribution", str(out / "attribution.json"), "--adapter", str(other), "--perturb-top", "0"]
        + ["--out", str(tmp_path / "out2")]
    )
    assert rc == 2 and "does not fit" in capsys.readouterr().err
    # perturbation on top of the adapter: the unperturbed reference is the adapted model's
    strong = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "tiny"), SealConfig())
    with torch.no_grad():
        for name, p in strong.named_parameters():
            if "seal_scale" in name:
                p.uniform_(0.0, 3.0)
    strong.save_pretrained(tmp_path / "strong")
    reuse = args + ["--attribution", str(out / "attribution.json"), "--adapter", str(tmp_path / "strong")]
    rc = main(
        reuse
        + [
            "--perturb-top",
            "1",
            "--random-draws",
            "1",
            "--perturb-with-adapter",
            "--out",
            str(tmp_path / "o3"),
        ]
    )
    assert rc == 0
    on_base = json.loads((out / "perturbation.json").read_text())["base_answer_nll"]
    on_adapter = json.loads((tmp_path / "o3" / "perturbation.json").read_text())["base_answer_nll"]
    import seal_peft

    adapted = seal_peft.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "tiny"), tmp_path / "strong"
    )
    from seal_peft.analysis import answer_scores
    from seal_peft.data import line_retrieval

    data = line_retrieval(
        tok, num_samples=2, length=256, prompt_format="chat_prefill", seed=2000, progress=False
    )
    expected = answer_scores(adapted, data, tok, progress=False)["answer_nll"]
    # (a random tiny model is near-uniform over its vocabulary, so NLL differences are small but exact)
    assert abs(on_adapter - expected) < 1e-5 and abs(on_adapter - on_base) > 5e-4
    assert json.loads((tmp_path / "o3" / "summary.json").read_text())["perturbed_model"].startswith(
        "base + adapter"
    )
    rc = main(args + ["--perturb-with-adapter", "--out", str(tmp_path / "o4")])
    assert rc == 2 and "--perturb-with-adapter needs --adapter" in capsys.readouterr().err
