"""The paper's training setting on a GPU: a 7B model, 50 samples x 31K tokens, one A100-class card.

The paper reports ~40 min per 7B model for SEAL on 31K-token data (one A100 80GB). This script
measures what one optimizer step costs at that size and extrapolates the epoch:

- builds a *randomly initialised* model of the given shape directly on the device in bf16 (timing
  and memory do not depend on weight values, and nothing has to be downloaded): the architecture is
  given as an inline config (``--config llama2-7b``, ``longchat-7b-32k``, ``mistral-7b-v0.2``,
  ``tiny``) or a path to a ``config.json``;
- trains one sample of ``--seq-len`` tokens per step with the project's recipe: answer-only loss on
  trimmed logits (``SealDataCollator(trim_logits=True)`` + ``seal_loss``), AdamW, gradient
  checkpointing (non-reentrant), ``--attn`` attention (sdpa by default, ``flash_attention_2`` if
  installed);
- reports per variant the median step time, the extrapolated time for ``--samples`` steps (one
  epoch of the paper's data), and peak memory (``torch.cuda.max_memory_allocated``: total, and
  above the loaded weights).

    python benchmarks/gpu_paper_setting.py --config longchat-7b-32k --seq-len 31000 --variants seal-h,seal-c,lora
    python benchmarks/gpu_paper_setting.py --config tiny --seq-len 256 --device cpu --dtype float32   # smoke test

Runs on CPU too (``--device cpu``; peak memory is then peak RSS above the loaded model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    LEARNING_RATE,
    TINY_LLAMA,
    PeakMemory,
    adapter_config,
    answer_sample,
    config_from_dict,
    fmt_ms,
    machine_info,
    markdown_table,
    parse_dtype,
    summarize,
    timed_steps,
    write_json,
)

_LLAMA2_7B = dict(
    model_type="llama",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

#: architectures written inline (from the models' public config.json files)
CONFIGS: dict[str, dict] = {
    "llama2-7b": _LLAMA2_7B,
    # LongChat-7B-v1.5-32K: Llama-2-7B with linear RoPE scaling x8 (the paper's main model)
    "longchat-7b-32k": dict(
        _LLAMA2_7B, max_position_embeddings=32768, rope_scaling={"rope_type": "linear", "factor": 8.0}
    ),
    "mistral-7b-v0.2": dict(
        model_type="mistral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rope_theta=1e6,
        sliding_window=None,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "tiny": TINY_LLAMA,
}


def resolve_config(name: str):
    if name in CONFIGS:
        return config_from_dict(CONFIGS[name])
    if os.path.exists(name):
        with open(name, encoding="utf-8") as f:
            return config_from_dict(json.load(f))
    raise ValueError(f"--config {name!r}: use one of {sorted(CONFIGS)} or a path to a config.json")


def build_random_model(config, dtype: torch.dtype, device: torch.device, attn: str, seed: int):
    """A randomly initialised model created directly on ``device`` in ``dtype`` (no fp32 CPU copy)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model


def enable_checkpointing(model: torch.nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def run(args: argparse.Namespace) -> dict:
    from peft import get_peft_model

    from seal_peft.training import SealDataCollator, seal_loss

    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype)
    config = resolve_config(args.config)
    model = build_random_model(config, dtype, device, args.attn, args.seed)
    if args.grad_ckpt:
        enable_checkpointing(model)
    n_params = sum(p.numel() for p in model.parameters())
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    sample = answer_sample(args.seq_len, config.vocab_size, args.answer_tokens, seed=args.seed)
    batch = SealDataCollator(pad_token_id=0, trim_logits=not args.full_logits)([sample])
    labels = batch.pop("labels").to(device)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    inputs["use_cache"] = False
    record: dict = {
        "args": vars(args),
        "machine": machine_info(device),
        "model_params": n_params,
        "weights_gib": round(weights_gib, 3),
        "results": [],
    }
    print(
        f"# paper setting: {args.config} ({n_params / 1e9:.2f}B params, {weights_gib:.2f} GiB {args.dtype}), "
        f"{args.samples} samples x {args.seq_len} tokens, attn={args.attn}, grad_ckpt={args.grad_ckpt}, "
        f"{device}"
    )
    for kind in [v for v in args.variants.split(",") if v]:
        peft_model = get_peft_model(model, adapter_config(kind))
        peft_model.train()
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE[kind], weight_decay=0.0)
        loss_fn = seal_loss(peft_model)
        losses: list[float] = []

        def step(peft_model=peft_model, optimizer=optimizer, loss_fn=loss_fn, losses=losses):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(peft_model(**inputs), labels)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))

        with PeakMemory(device) as mem:
            times = timed_steps(step, device, args.warmup, args.steps)
            above = mem.peak_mib()
            total = mem.peak_bytes() / 2**20 if device.type == "cuda" else None
        s = summarize(times)
        result = {
            "variant": kind,
            "trainable_params": sum(p.numel() for p in params),
            "step_s": s,
            "tokens_per_s": args.seq_len / s["median"],
            "extrapolated_total_s": s["median"] * args.samples,
            "peak_mib_above_weights": round(above, 1),
            "peak_mib_total": None if total is None else round(total, 1),
            "loss": losses[-1],
        }
        record["results"].append(result)
        print(
            f"  {kind}: step {fmt_ms(s)} ms, x{args.samples} = {result['extrapolated_total_s'] / 60:.1f} min, "
            f"peak +{above:.0f} MiB",
            flush=True,
        )
        del optimizer, step
        model = peft_model.unload()  # back to the bare model for the next variant
        del peft_model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(
        markdown_table(
            [
                "variant",
                "trainable",
                "step ms (median [min-max])",
                "tokens/s",
                f"{args.samples} samples",
                "peak above weights",
                "peak total",
            ],
            [
                [
                    r["variant"],
                    r["trainable_params"],
                    fmt_ms(r["step_s"]),
                    f"{r['tokens_per_s']:.0f}",
                    f"{r['extrapolated_total_s'] / 60:.1f} min",
                    f"{r['peak_mib_above_weights'] / 1024:.2f} GiB",
                    "-" if r["peak_mib_total"] is None else f"{r['peak_mib_total'] / 1024:.2f} GiB",
                ]
                for r in record["results"]
            ],
        )
    )
    return record


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config", default="longchat-7b-32k", help=f"one of {sorted(CONFIGS)} or a config.json path"
    )
    p.add_argument("--seq-len", type=int, default=31000, help="tokens per sample (paper: 31K)")
    p.add_argument("--samples", type=int, default=50, help="samples per epoch (paper: 50)")
    p.add_argument("--variants", default="seal-h,seal-c", help="comma-separated: seal-h, seal-c, lora, ia3")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attn", default="sdpa", help="sdpa | flash_attention_2 | eager")
    p.add_argument(
        "--no-grad-ckpt", dest="grad_ckpt", action="store_false", help="disable gradient checkpointing"
    )
    p.add_argument("--full-logits", action="store_true", help="logits for every position (trim_logits=False)")
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    record = run(args)
    write_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
