"""Train one SEAL variant on generated line-retrieval data and evaluate it (or the base model).

Prints and writes one JSON record: accuracy per evaluation length under each evaluation protocol
(``--eval-formats``: LongEval's by default, beside the pre-filled one), held-out essay perplexity,
training time, and every evaluated sample's output. Used to make docs/results.md; every number there
comes from a command like

    python benchmarks/line_retrieval.py --granularity channel --lr 2e-2 --split test --out results/c.json

Settings are chosen on the ``dev`` split (eval seed 500) and reported on the ``test`` split (eval
seed 1000); training data uses seed 0 and the evaluation sets exclude its keys and values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

EVAL_SEEDS = {"dev": 500, "test": 1000}
# peers trained on the same data (issue: "why SEAL and not LoRA"): the paper's SEAL-L (LoRA r=4 on q,k,v,o,
# lr 2e-4) and SEAL-D (DoRA r=4), PEFT's IA3 on o_proj alone (structurally SEAL-C, so SEAL-C's lr), and
# o_proj fully fine-tuned (fp32 master weights inside the bf16 model)
PEERS = ("lora", "dora", "ia3", "o_proj")
PEER_LR = {"lora": 2e-4, "dora": 2e-4, "ia3": 2e-2, "o_proj": 1e-4}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def peer_model(model, peer: str, layers: list[int] | None):
    """``model`` prepared for training with a peer method; every other weight frozen."""
    from peft import IA3Config, LoraConfig, get_peft_model

    if peer in ("lora", "dora"):
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=ATTENTION,
            use_dora=peer == "dora",
            layers_to_transform=layers,
        )
        return get_peft_model(model, config)
    if peer == "ia3":
        # IA3Config has no layers_to_transform: name the layers' o_proj modules instead
        targets = ["o_proj"] if layers is None else [f"layers.{i}.self_attn.o_proj" for i in layers]
        return get_peft_model(model, IA3Config(target_modules=targets, feedforward_modules=targets))
    dtype = model.dtype
    model.requires_grad_(False)
    for name, module in model.named_modules():
        if name.endswith("o_proj") and (layers is None or int(name.split(".")[-3]) in layers):
            # AdamW updates of bf16 weights would round away; train fp32 weights, cast at the boundary
            module.float().requires_grad_(True)
            module.register_forward_pre_hook(lambda m, a: (a[0].float(), *a[1:]))
            module.register_forward_hook(lambda m, a, out: out.to(dtype))
    return model


def reference_docs_text(tok, num_tokens: int) -> str:
    """The first ``num_tokens`` tokens of Python's language reference (``pydoc_data.topics``, shipped
    with CPython): English technical prose from another domain than the essays, never trained on."""
    from pydoc_data.topics import topics

    ids = tok(" ".join(topics[k] for k in sorted(topics)), add_special_tokens=False)["input_ids"]
    return tok.decode(ids[:num_tokens])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF id/path; default: embedded SmolLM2-135M-Instruct")
    p.add_argument(
        "--granularity", default="head", choices=["head", "channel", "none"], help="none = base model"
    )
    p.add_argument(
        "--peer",
        default=None,
        choices=sorted(PEERS),
        help="train a peer method on the same data instead of SEAL (lr default: PEER_LR)",
    )
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--train-samples", type=int, default=50)
    p.add_argument("--train-length", default="1024", help="comma-separated token lengths, cycled")
    p.add_argument("--scale-pull", type=float, default=0.0)
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass (memory for 12K-16K training samples)",
    )
    p.add_argument("--lm-every", type=int, default=0, help="insert one essay LM sample after every N samples")
    p.add_argument("--lm-length", type=int, default=512, help="tokens per LM sample (training essays)")
    p.add_argument(
        "--lm-kl",
        type=float,
        default=0.0,
        help="train the LM samples on this weight x KL(base || adapted) instead of their cross-entropy",
    )
    p.add_argument("--layers", default=None, help="comma-separated layer indices to adapt (default all)")
    p.add_argument("--eval-lengths", default="512,1024,2048,4096")
    p.add_argument("--eval-samples", type=int, default=40)
    p.add_argument("--split", default="dev", choices=sorted(EVAL_SEEDS))
    p.add_argument(
        "--prompt-format",
        default="longeval",
        choices=["longeval", "chat", "chat_prefill", "plain"],
        help="format of the training samples (default: LongEval's protocol)",
    )
    p.add_argument(
        "--eval-formats",
        default="longeval,chat_prefill",
        help="evaluation protocols, comma-separated (default: LongEval's and the pre-filled one)",
    )
    p.add_argument(
        "--eval-samples-per-format",
        default=None,
        help="samples per length for each of --eval-formats, comma-separated (default: --eval-samples)",
    )
    p.add_argument("--ppl-tokens", type=int, default=2048, help="held-out essay tokens for perplexity")
    p.add_argument(
        "--ood-ppl-tokens",
        type=int,
        default=2048,
        help="tokens of out-of-domain text (Python's reference docs, stdlib pydoc_data) for a second "
        "perplexity; 0 = skip",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="base model dtype (scales stay fp32); auto = bf16 only where the hardware has native bf16",
    )
    p.add_argument("--out", default=None)
    p.add_argument("--save-adapter", default=None)
    p.add_argument("--adapter", default=None, help="evaluate this saved adapter instead of training one")
    p.add_argument(
        "--extend",
        default=None,
        metavar="METHOD:FACTOR",
        help="extend the context first (seal_peft.extension: ntk:2, yarn:2, self_extend:4, ...): training, "
        "evaluation and perplexity all run on the extended model, and a saved adapter records it",
    )
    args = p.parse_args(argv)

    from peft import get_peft_model

    import seal_peft
    from seal_peft.data import heldout_text, line_retrieval
    from seal_peft.evaluation import evaluate_retrieval, perplexity
    from seal_peft.models import load_model, resolve_dtype
    from seal_peft.training import add_lm_samples, train_seal

    torch.manual_seed(args.seed)
    dtype = resolve_dtype(args.dtype)
    model, tok = load_model(args.model, dtype=dtype)
    if args.extend:
        from seal_peft.extension import apply_from_config, extended_context_length, parse_extend

        apply_from_config(model, parse_extend(args.extend))
        limit, current = extended_context_length(model), tok.model_max_length or 0
        tok.model_max_length = limit if current > 10**7 else max(limit, current)  # huge = "no limit"
    eval_lengths = [int(x) for x in args.eval_lengths.split(",")]
    train_lengths = [int(x) for x in args.train_length.split(",")]
    record: dict = {"args": vars(args), "dtype": str(dtype).removeprefix("torch.")}
    train_ds = line_retrieval(
        tok,
        args.train_samples,
        train_lengths,
        prompt_format=args.prompt_format,
        seed=args.seed,
        progress=False,
    )
    eval_formats = [f for f in args.eval_formats.split(",") if f]
    per_format = (
        [int(x) for x in args.eval_samples_per_format.split(",")]
        if args.eval_samples_per_format
        else [args.eval_samples] * len(eval_formats)
    )
    if len(per_format) != len(eval_formats):
        raise SystemExit("--eval-samples-per-format needs one number per --eval-formats entry")
    # the same seed for every protocol: the same records (keys, values, depths) asked in each format
    eval_sets = {
        fmt: line_retrieval(
            tok,
            n * len(eval_lengths),
            eval_lengths,
            prompt_format=fmt,
            seed=EVAL_SEEDS[args.split],
            exclude=train_ds,
            progress=False,
        )
        for fmt, n in zip(eval_formats, per_format)
        if n
    }
    if args.adapter:
        model = seal_peft.from_pretrained(model, args.adapter)
        record["adapter"] = args.adapter
    elif args.granularity != "none" or args.peer:
        layers = [int(x) for x in args.layers.split(",")] if args.layers else None
        if args.peer:
            model = peer_model(model, args.peer, layers)
        else:
            model = get_peft_model(
                model, seal_peft.SealConfig(granularity=args.granularity, layers_to_transform=layers)
            )
        record["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        data = train_ds
        if args.lm_every:
            data = add_lm_samples(train_ds, tok, every=args.lm_every, length=args.lm_length, seed=args.seed)
        t0 = time.time()
        train_seal(
            model,
            tok,
            data,
            "/tmp/seal_bench_run",
            granularity="head" if args.peer else args.granularity,
            learning_rate=PEER_LR[args.peer] if args.peer and args.lr is None else args.lr,
            num_train_epochs=args.epochs,
            scale_pull=args.scale_pull,
            lm_kl=args.lm_kl,
            gradient_checkpointing=args.gradient_checkpointing,
            seed=args.seed,
            progress=False,
            logging_steps=10,
        )
        record["train_seconds"] = round(time.time() - t0, 1)
        if not args.peer:
            scales = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "seal_scale" in n])
            record["scales"] = {
                "min": scales.min().item(),
                "max": scales.max().item(),
                "mean": scales.mean().item(),
            }
        if args.save_adapter and args.peer != "o_proj":
            model.save_pretrained(args.save_adapter)
        if args.peer in ("lora", "dora", "ia3"):
            model = model.merge_and_unload()  # evaluate what would be deployed (DoRA unmerged is slow)
    t0 = time.time()
    if eval_sets:
        record["accuracy"], record["n_per_length"], record["samples"] = {}, {}, {}
    for fmt, eval_ds in eval_sets.items():
        result = evaluate_retrieval(model, tok, eval_ds, progress=False, length_bins=eval_lengths)
        record["accuracy"][fmt] = {str(k): v for k, v in result.accuracy_by_length(eval_lengths).items()}
        record["n_per_length"][fmt] = {str(k): v for k, v in result.counts_by_length(eval_lengths).items()}
        record["samples"][fmt] = [
            {k: row[k] for k in ("length", "depth", "key", "answer", "output", "correct")}
            for row in result.rows
        ]
        print(json.dumps({fmt: record["accuracy"][fmt]}), file=sys.stderr, flush=True)
    record["eval_seconds"] = round(time.time() - t0, 1)
    text = heldout_text(tok, args.ppl_tokens, seed=0)
    record["ppl"] = perplexity(model, tok, text, max_length=args.ppl_tokens)
    if args.ood_ppl_tokens:
        ood = reference_docs_text(tok, args.ood_ppl_tokens)
        record["ppl_ood"] = perplexity(model, tok, ood, max_length=args.ood_ppl_tokens)
    print(json.dumps({k: v for k, v in record.items() if k != "samples"}), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
