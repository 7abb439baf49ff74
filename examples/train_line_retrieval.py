"""Train SEAL on generated line-retrieval data with the stock HF Trainer, then evaluate and merge.

    python examples/train_line_retrieval.py                       # embedded SmolLM2-135M, SEAL-H
    python examples/train_line_retrieval.py --granularity channel --model path/or/hub-id

The training settings come from ``seal_peft.training.RECIPES``: the recipe tuned for the embedded model
(``smollm2``: LM windows mixed in, a higher SEAL-H learning rate) for it, the paper's (``paper``) for any other model;
``--recipe`` picks one.

Multi-process (DDP) training runs the same script unchanged through accelerate; the Trainer
picks up the process group, and only the main process saves, evaluates and merges:

    accelerate launch --num_processes 2 --cpu examples/train_line_retrieval.py      # CPU, gloo
    accelerate launch --config_file configs/accelerate/ddp.yaml examples/train_line_retrieval.py

Everything here is plain transformers + peft; seal_peft only provides the method, the data and the
collator/arguments. Copy it and change the data generator to your task's format.
"""

import argparse

import torch
from peft import get_peft_model
from transformers import Trainer

import seal_peft
from seal_peft.data import line_retrieval
from seal_peft.evaluation import evaluate_retrieval
from seal_peft.models import input_device, load_model
from seal_peft.training import (
    RECIPES,
    SealDataCollator,
    add_lm_samples,
    recipe_for_model,
    seal_loss,
    seal_training_arguments,
)

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None, help="HF id/path (default: embedded SmolLM2-135M-Instruct)")
parser.add_argument("--granularity", default="head", choices=["head", "channel"])
parser.add_argument(
    "--recipe", default=None, choices=list(RECIPES),
    help="seal_peft.training.RECIPES: paper, or smollm2 (tuned for the embedded model; its default)",
)
parser.add_argument("--train-samples", type=int, default=50)
parser.add_argument("--length", type=int, default=1024, help="training sample length in tokens")
parser.add_argument(
    "--prompt-format", default="longeval",
    help="LongEval's protocol (default), chat_prefill, or 'plain' for base models without a chat template",
)
parser.add_argument("--batch-size", type=int, default=1, help="per device (per process)")
parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
parser.add_argument("--gradient-checkpointing", action="store_true", help="for long sequences")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--eval-lengths", default="512,1024,2048")
parser.add_argument("--eval-samples", type=int, default=20, help="per length; 0 skips the evaluation")
parser.add_argument("--no-merge", action="store_true", help="do not write the merged model")
parser.add_argument("--save-rank-scales", action="store_true", help="write every rank's scales (DDP check)")
parser.add_argument("--out", default="runs/example")
args = parser.parse_args()

model, tokenizer = load_model(args.model)
model = get_peft_model(model, seal_peft.SealConfig(granularity=args.granularity))
recipe = RECIPES[args.recipe or recipe_for_model(args.model)][args.granularity]

# ~50 samples whose format matches the task and whose content is random (the paper's recipe)
retrieval = line_retrieval(
    tokenizer, num_samples=args.train_samples, length=args.length, prompt_format=args.prompt_format,
    seed=args.seed, progress=False,
)
train = retrieval
if recipe.lm_every:  # plain essay text mixed in, so the model stays a good language model
    train = add_lm_samples(retrieval, tokenizer, every=recipe.lm_every, length=recipe.lm_length, seed=args.seed)

trainer = Trainer(
    model=model,
    args=seal_training_arguments(  # AdamW, constant lr, no weight decay
        f"{args.out}/trainer",
        granularity=args.granularity,
        learning_rate=recipe.learning_rate,
        num_train_epochs=recipe.num_train_epochs,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
    ),
    train_dataset=train,
    data_collator=SealDataCollator(tokenizer, trim_logits=True),  # logits only where the answer is
    compute_loss_func=seal_loss(model, scale_pull=recipe.scale_pull),  # answer-only cross-entropy
)
if trainer.is_world_process_zero():
    model.print_trainable_parameters()
trainer.train()
if args.save_rank_scales:  # to check that DDP kept the ranks in sync
    scales = {n: p.detach().cpu() for n, p in model.named_parameters() if "seal_scale" in n}
    torch.save(scales, f"{args.out}/scales-rank{trainer.args.process_index}.pt")
# every rank calls save_model (FSDP / DeepSpeed ZeRO-3 gather the sharded scales there); the main
# process writes the adapter folder. Evaluation and merging then run once, on the main process; with
# FSDP / ZeRO-3 pass --eval-samples 0 --no-merge and use `seal-peft eval/merge` on the saved adapter.
trainer.save_model(f"{args.out}/adapter")
if not trainer.is_world_process_zero():
    raise SystemExit(0)

if args.eval_samples > 0:
    lengths = [int(x) for x in args.eval_lengths.split(",")]
    evals = line_retrieval(
        tokenizer,
        num_samples=args.eval_samples * len(lengths),
        length=lengths,
        prompt_format=args.prompt_format,
        seed=1000,
        exclude=retrieval,  # no key or value of the training data (the LM windows have none)
    )
    result = evaluate_retrieval(model.eval(), tokenizer, evals, length_bins=lengths, name="SEAL")
    print(result.table())

if not args.no_merge:
    # fold the scales into o_proj: a plain transformers model with no extra cost at inference
    # the Trainer moved the model to the GPU if there is one: the inputs go where the model is
    ids = torch.tensor([retrieval[0]["input_ids"][: retrieval[0]["prompt_length"]]], device=input_device(model))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merged = model.merge_and_unload(safe_merge=True)
        print("merged vs unmerged max |diff|:", (merged(input_ids=ids).logits - before).abs().max().item())
    merged.save_pretrained(f"{args.out}/merged")
    tokenizer.save_pretrained(f"{args.out}/merged")
