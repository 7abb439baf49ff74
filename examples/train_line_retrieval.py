"""Train SEAL on generated line-retrieval data with the stock HF Trainer, then evaluate and merge.

    python examples/train_line_retrieval.py                       # embedded SmolLM2-135M, SEAL-H
    python examples/train_line_retrieval.py --granularity channel --model path/or/hub-id

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
from seal_peft.models import load_model
from seal_peft.training import SealDataCollator, seal_loss, seal_training_arguments

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None, help="HF id/path (default: embedded SmolLM2-135M-Instruct)")
parser.add_argument("--granularity", default="head", choices=["head", "channel"])
parser.add_argument("--train-samples", type=int, default=50)
parser.add_argument("--length", type=int, default=1024, help="training sample length in tokens")
parser.add_argument("--eval-lengths", default="512,1024,2048")
parser.add_argument("--eval-samples", type=int, default=20)
parser.add_argument("--out", default="runs/example")
args = parser.parse_args()

model, tokenizer = load_model(args.model)
model = get_peft_model(model, seal_peft.SealConfig(granularity=args.granularity))
model.print_trainable_parameters()

# ~50 samples whose format matches the task and whose content is random (the paper's recipe)
train = line_retrieval(
    tokenizer, num_samples=args.train_samples, length=args.length, prompt_format="chat_prefill", seed=0
)
lengths = [int(x) for x in args.eval_lengths.split(",")]
evals = line_retrieval(
    tokenizer,
    num_samples=args.eval_samples * len(lengths),
    length=lengths,
    prompt_format="chat_prefill",
    seed=1000,
    exclude=train,
)

trainer = Trainer(
    model=model,
    args=seal_training_arguments(
        f"{args.out}/trainer", granularity=args.granularity
    ),  # AdamW, constant lr, 1 epoch
    train_dataset=train,
    data_collator=SealDataCollator(tokenizer, trim_logits=True),  # logits only where the answer is
    compute_loss_func=seal_loss(model),  # answer-only cross-entropy
)
trainer.train()
model.save_pretrained(f"{args.out}/adapter")

result = evaluate_retrieval(
    model.eval(), tokenizer, evals, max_new_tokens=32, length_bins=lengths, name="SEAL"
)
print(result.table())

# fold the scales into o_proj: a plain transformers model with no extra cost at inference
ids = torch.tensor([evals[0]["input_ids"][: evals[0]["prompt_length"]]])
with torch.no_grad():
    before = model(input_ids=ids).logits
    merged = model.merge_and_unload(safe_merge=True)
    print("merged vs unmerged max |diff|:", (merged(input_ids=ids).logits - before).abs().max().item())
merged.save_pretrained(f"{args.out}/merged")
tokenizer.save_pretrained(f"{args.out}/merged")
