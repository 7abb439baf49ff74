"""The speed/memory benchmark scripts run end to end on a tiny random model (seconds, nothing timed).

They only check that each script runs and reports what it promises (ratios, peak memory, the
merged-model checks); the numbers themselves are not asserted, timings in tests would be flaky.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_inference_benchmark_tiny(tmp_path, capsys):
    out = tmp_path / "inference.json"
    record = load_benchmark("speed_inference").main(
        [
            "--model", "tiny", "--dtype", "float32,bfloat16", "--lengths", "16,32",
            "--decode-context", "8", "--decode-tokens", "2", "--repeats", "2", "--json", str(out),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "unmerged/base" in printed and "merged/base" in printed
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(record["results"]))
    phases = {(r["dtype"], r["phase"], r["tokens"]) for r in record["results"]}
    assert ("float32", "prefill", 32) in phases and ("bfloat16", "decode/token", 8) in phases
    for r in record["results"]:
        assert r["seconds"]["base"]["n"] == 2
        for v in ("unmerged", "merged"):
            assert r["ratio_vs_base"][v]["median"] > 0
    checks = record["checks"]
    assert checks["float32"]["o_proj_type"] == "torch.nn.Linear"
    # merged == unmerged (fp32 exactly up to rounding), and the adapter is not the identity
    assert checks["float32"]["max_abs_logit_diff_merged_vs_unmerged"] < 1e-4
    assert checks["float32"]["max_abs_logit_diff_merged_vs_base"] > 1e-3


def test_merged_graph_check_catches_a_leftover_wrapper():
    bench = load_benchmark("speed_inference")
    from seal_peft.tuner.layer import SealLayer

    base, _ = load_benchmark("_common").load_benchmark_model("tiny", torch.float32)
    models = bench.build_variants(base, "head", seed=0)
    bench.check_merged_is_base_graph(models["base"], models["merged"])
    assert any(isinstance(m, SealLayer) for m in models["unmerged"].modules())
    with pytest.raises(AssertionError):
        bench.check_merged_is_base_graph(models["base"], models["unmerged"].base_model.model)


def test_training_benchmark_tiny_in_process(tmp_path, capsys):
    out = tmp_path / "training.json"
    variants = "forward,forward-trim,seal-h,seal-c,lora,ia3,seal-h+full,lora+full,seal-h+ckpt"
    record = load_benchmark("speed_training").main(
        [
            "--model", "tiny", "--dtype", "float32", "--lengths", "48", "--steps", "1", "--warmup", "1",
            "--variants", variants, "--in-process", "--json", str(out),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "step/LoRA step" in printed and "peak/LoRA peak" in printed
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == set(variants.split(","))
    # trimmed variants compute logits only for the answer positions (+1), untrimmed for all 48
    assert results["seal-h"]["logits_positions"] == 17 and results["seal-h+full"]["logits_positions"] == 48
    assert results["forward"]["logits_positions"] == 48 and results["forward-trim"]["logits_positions"] == 17
    assert results["seal-h"]["trainable_params"] == 2 * 4  # 2 layers x 4 heads
    assert results["seal-c"]["trainable_params"] == 2 * 64
    assert results["forward"]["trainable_params"] == 0
    for spec, r in results.items():
        assert r["step_s"]["median"] > 0 and r["peak_mib"] >= 0
        if not spec.startswith("forward"):
            assert math.isfinite(r["loss"])
    rows = {(row[0], row[1]): row for row in record["ratios"]}
    assert float(rows[(48, "seal-h")][4]) > 0  # relative to LoRA at the same length


def test_training_benchmark_worker_subprocess():
    """The default mode: each variant in a fresh process reporting one JSON line."""
    script = BENCH / "speed_training.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--worker", "seal-h", "--model", "tiny", "--dtype", "float32",
         "--lengths", "32", "--steps", "1", "--warmup", "0", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT ") :])
    assert result["variant"] == "seal-h" and result["tokens"] == 32 and result["peak_exact"] in (True, False)


def test_training_benchmark_rejects_unknown_variant():
    with pytest.raises(ValueError, match="bad variant"):
        load_benchmark("speed_training").parse_variant("seal-x+fast")


def test_gpu_paper_setting_runs_on_cpu_tiny(tmp_path, capsys):
    out = tmp_path / "paper.json"
    record = load_benchmark("gpu_paper_setting").main(
        [
            "--config", "tiny", "--seq-len", "40", "--samples", "50", "--variants", "seal-h,seal-c,lora",
            "--steps", "1", "--warmup", "0", "--device", "cpu", "--dtype", "float32", "--json", str(out),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "50 samples" in printed
    saved = json.loads(out.read_text())
    assert [r["variant"] for r in saved["results"]] == ["seal-h", "seal-c", "lora"]
    for r in record["results"]:
        assert r["extrapolated_total_s"] == pytest.approx(50 * r["step_s"]["median"])
        assert r["peak_mib_above_weights"] >= 0 and math.isfinite(r["loss"])
    assert saved["args"]["grad_ckpt"] is True and saved["model_params"] > 0


def test_gpu_paper_configs_have_the_paper_shapes():
    bench = load_benchmark("gpu_paper_setting")
    cfg = bench.resolve_config("longchat-7b-32k")
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size) == (32, 32, 4096)
    assert cfg.max_position_embeddings == 32768
    mistral = bench.resolve_config("mistral-7b-v0.2")
    assert mistral.num_key_value_heads == 8
    with torch.device("meta"):  # the full 7B shape builds (on the meta device: no memory, no time)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert 6.5e9 < n < 7.0e9
    with pytest.raises(ValueError, match="--config"):
        bench.resolve_config("no-such-model")


# ------------------------------------------------------------------ the fast paths the benchmarks rely on


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["head", "channel"])
def test_long_input_inference_equals_merged_exactly(dtype, granularity):
    """Prefill (more rows than 2 * out_features, no grad) uses the scaled weight: bit-identical to merged."""
    import copy

    from peft import get_peft_model

    import seal_peft

    base, _ = load_benchmark("_common").load_benchmark_model("tiny", dtype)
    unmerged = get_peft_model(
        copy.deepcopy(base), seal_peft.SealConfig(granularity=granularity, init_weights=False)
    )
    merged = copy.deepcopy(unmerged).merge_and_unload()
    ids = torch.randint(0, 512, (1, 160))  # 160 rows > 2 * 64 output features of o_proj
    with torch.no_grad():
        assert torch.equal(unmerged(ids).logits, merged(ids).logits)
        short = ids[:, :16]  # activation path: equal up to rounding (measured: fp32 2e-7, bf16 4e-3)
        tol = 1e-5 if dtype == torch.float32 else 1.6e-2  # bf16: 4 ulp of logits ~0.6 (measured: 1 ulp)
        torch.testing.assert_close(unmerged(short).logits, merged(short).logits, atol=tol, rtol=0)
        # the adapter moves the logits far more than that (~0.2), so the check is not vacuous
        assert (unmerged(short).logits - base(short).logits).abs().max() > 10 * tol


def test_long_input_paths_keep_gradients_and_hooks():
    from peft import get_peft_model

    import seal_peft
    from seal_peft.tuner.layer import SealLayer

    base, _ = load_benchmark("_common").load_benchmark_model("tiny", torch.float32)
    model = get_peft_model(base, seal_peft.SealConfig(init_weights=False))
    layer = next(m for m in model.modules() if isinstance(m, SealLayer))
    x = torch.randn(1, 160, 64)
    expected = layer.base_layer(x * layer.channel_scale("default"))
    # training: the scale gradient flows (activation path), identical to the reference gradient
    out = layer(x)
    out.sum().backward()
    grad = layer.seal_scale["default"].grad.clone()
    layer.seal_scale["default"].grad = None
    expected.sum().backward()
    torch.testing.assert_close(grad, layer.seal_scale["default"].grad)
    # inference: weight path, same values
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected.detach(), atol=1e-5, rtol=1e-5)
        # a hook on the base layer must run: the fast path steps aside
        handle = layer.base_layer.register_forward_hook(lambda m, a, o: o * 0)
        assert torch.count_nonzero(layer(x)) == 0
        handle.remove()


def test_layer_benchmark_tiny(tmp_path, capsys):
    out = tmp_path / "layer.json"
    load_benchmark("speed_layer").main(
        ["--features", "32", "--head-dim", "8", "--tokens", "1,80", "--repeats", "1", "--budget-ms", "0.5",
         "--json", str(out)]
    )  # fmt: skip
    assert "original wrapper" in capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    assert {(r["dtype"], r["tokens"], r["mode"]) for r in results} >= {
        ("bfloat16", 80, "fwd+bwd"),
        ("float32", 1, "no-grad"),
    }
    assert set(results[0]["seconds"]) == {"base", "seal", "orig", "act-ref", "bcast"}


def test_eval_throughput_benchmark_tiny(tmp_path, capsys):
    out = tmp_path / "eval.json"
    record = load_benchmark("eval_throughput").main(
        ["--model", "tiny", "--length", "256", "--samples", "2", "--repeats", "2", "--max-new-tokens", "4",
         "--batch-size", "2", "--json", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "evaluator / floor" in printed and "model.generate / custom loop" in printed
    assert "decode forwards" in printed
    saved = json.loads(out.read_text())
    assert set(saved["seconds"]) == {"floor", "evaluator", "loop-concat", "generate", "batched"}
    assert all(s["n"] == 2 for s in saved["seconds"].values())
    assert set(saved["cpu_ratio_vs_floor"]) == {"evaluator", "loop-concat", "generate", "batched"}
    # the batch-1 variants give the evaluator's answers (the benchmark reports, the tests elsewhere assert)
    assert (
        record["same_answers_as_evaluator"]["generate"] and record["same_answers_as_evaluator"]["loop-concat"]
    )
    b = saved["breakdown"]
    assert b["prefill_calls"] == 2 and b["decode_steps"] == 2 * 3  # 4 tokens: 1 from the prefill, 3 steps
    assert b["decode_steps_per_chunk"] == [6]  # one chunk of --batch-size 2 records
    assert record["decode_steps"]["batched"] == 3 and record["decode_ms_per_step"]["floor"] is None


def test_training_floor_scalar_is_the_only_trainable_parameter():
    bench = load_benchmark("speed_training")
    model, _ = load_benchmark("_common").load_benchmark_model("tiny", torch.float32)
    scalar = bench.attach_floor_scalar(model)
    assert [p for p in model.parameters() if p.requires_grad] == [scalar]
    ids = torch.randint(3, 500, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
        scalar.fill_(2.0)
        scaled = model(ids).logits
        scalar.fill_(1.0)
    assert not torch.allclose(ref, scaled)  # the scalar multiplies the embedding output
    model(ids).logits[0, -1].logsumexp(-1).backward()
    assert scalar.grad is not None and scalar.grad.abs() > 0


def test_training_floor_benchmark_tiny_in_process(tmp_path, capsys):
    out = tmp_path / "floor.json"
    record = load_benchmark("training_floor").main(
        ["--model", "tiny", "--lengths", "48", "--rounds", "2", "--in-process", "--profile", "3", "--json", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "step / floor" in printed and "ops that differ most" in printed
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"floor", "seal-h", "seal-c", "floor+ckpt", "seal-h+ckpt", "seal-c+ckpt"}
    assert rows["floor"]["trainable_params"] == 1 and rows["seal-h"]["trainable_params"] == 2 * 4
    assert rows["floor"]["step_vs_floor"]["median"] == 1.0 and rows["seal-c"]["step_s"]["n"] == 2
    assert rows["floor"]["cpu_step_vs_floor"]["median"] == 1.0 and rows["seal-h"]["cpu_step_s"]["n"] == 2
    assert (
        "peak_vs_floor" in rows["seal-h"] and rows["seal-h"]["saved_vs_floor"] > 0
    )  # in-process peaks: inexact
    assert rows["seal-h+ckpt"]["saved_for_backward_mib"] is None  # hidden by checkpointing
    assert all(r["logits_positions"] == 17 for r in record["rows"])


def test_training_floor_timing_worker_subprocess():
    record = load_benchmark("training_floor").main(
        ["--model", "tiny", "--lengths", "40", "--rounds", "1", "--groups", "plain", "--no-memory"]
    )
    assert [r["variant"] for r in record["rows"]] == ["floor", "seal-h", "seal-c"]
    assert "peak_mib" not in record["rows"][0]


@pytest.mark.parametrize("granularity", ["seal-h", "seal-c"])
def test_seal_input_shares_storage_with_attention_output(granularity):
    # the scale gradient needs each o_proj input; with SDPA it is the attention output that flash
    # attention's backward keeps anyway, so it costs no memory (layer 0: no attention backward)
    from peft import get_peft_model

    common, bench = load_benchmark("_common"), load_benchmark("training_floor")
    for attn, shared in (("sdpa", 1), ("eager", 0)):
        model, _ = common.load_benchmark_model("tiny", torch.float32, attn_implementation=attn)
        model = get_peft_model(model, common.adapter_config(granularity)).train()
        ids = torch.randint(3, 500, (1, 24))
        forward = lambda m=model, ids=ids: m(input_ids=ids, use_cache=False).logits.sum()  # noqa: E731
        got = bench.scale_input_sharing(model, forward)
        assert got == {"scale_ops": 2, "shared_with_attention": shared}, attn


@pytest.mark.parametrize("layers", [None, [1]])
def test_line_retrieval_ia3_peer_scales_o_proj_inputs_only(layers):
    """``--peer ia3``: PEFT's IA3 on ``o_proj`` as a feed-forward module (one learned scale per input
    channel: structurally SEAL-C), optionally on some layers only (IA3Config has no layers_to_transform)."""
    from conftest import make_model

    model = load_benchmark("line_retrieval").peer_model(make_model("llama"), "ia3", layers)
    trainable = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    n_layers = model.config.num_hidden_layers
    expected = range(n_layers) if layers is None else layers
    assert sorted(trainable) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.o_proj.ia3_l.default" for i in expected
    )
    width = model.config.num_attention_heads * model.config.head_dim
    assert all(shape == (1, width) for shape in trainable.values())  # the input side: H * head_dim


def test_scale_structure_decomposes_and_projects_seal_c_exactly(tmp_path):
    """``scale_structure``: between-heads + within-head shares of a SEAL-C adapter's change sum to 1 and
    match a hand computation; ``head-mean`` makes every head's channels equal to their mean, ``within``
    keeps ``s - m + 1``; the saved projections reload with exactly those scales."""
    from conftest import make_model
    from peft import get_peft_model

    import seal_peft

    bench = load_benchmark("scale_structure")
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama"), seal_peft.SealConfig(granularity="channel"))
    params = [p for n, p in model.named_parameters() if "seal_scale" in n]
    with torch.no_grad():
        for p in params:
            p.copy_(1 + 0.3 * torch.randn_like(p))
    s = torch.stack([p.detach().double().reshape(4, 8) for p in params])  # 2 layers x 4 heads x 8 channels
    m = s.mean(-1, keepdim=True)
    between, within = float(((m - 1) ** 2).sum() * 8), float(((s - m) ** 2).sum())
    got = bench.decompose(model)
    assert got["heads"] == 8
    assert got["between_heads_share"] == pytest.approx(between / (between + within), rel=1e-12)
    assert got["between_heads_share"] + got["within_head_share"] == pytest.approx(1.0, rel=1e-12)
    originals = [p.detach().clone() for p in params]

    bench.project(model, "head-mean")
    for p, o in zip(params, originals):
        o = o.reshape(4, 8)
        assert torch.equal(p.detach().reshape(4, 8), o.mean(1, keepdim=True).expand(4, 8))
    assert bench.decompose(model)["within_head_share"] < 1e-12
    model.save_pretrained(tmp_path / "head-mean")
    with torch.no_grad():
        for p, o in zip(params, originals):
            p.copy_(o)

    bench.project(model, "within")
    for p, o in zip(params, originals):
        o = o.reshape(4, 8)
        assert torch.equal(p.detach().reshape(4, 8), o - o.mean(1, keepdim=True) + 1)
    assert bench.decompose(model)["between_heads_share"] < 1e-10
    reloaded = seal_peft.from_pretrained(make_model("llama"), tmp_path / "head-mean")
    for p, o in zip([p for n, p in reloaded.named_parameters() if "seal_scale" in n], originals):
        assert torch.equal(p.detach().reshape(4, 8), o.reshape(4, 8).mean(1, keepdim=True).expand(4, 8))
    with pytest.raises(ValueError, match="unknown projection"):
        bench.project(model, "heads")
    head_model = get_peft_model(make_model("llama"), seal_peft.SealConfig(granularity="head"))
    with pytest.raises(ValueError, match="SEAL-H already"):
        bench.decompose(head_model)
