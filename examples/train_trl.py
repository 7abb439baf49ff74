"""Train SEAL with TRL's SFTTrainer on generated line-retrieval data, then reload the adapter with plain PEFT.

    python examples/train_trl.py                                   # embedded SmolLM2-135M, SEAL-C, tiny run
    python examples/train_trl.py --granularity head --train-samples 50 --length 2048
    python examples/train_trl.py --format prompt-completion        # TRL tokenizes and masks the prompt itself

SFTTrainer wraps the model with SEAL itself (``peft_config=SealConfig(...)``) and trains only the scales. The
loss is on the answer only: the generated records carry ``labels`` with the prompt masked to -100, which TRL
uses as they are (``--format records``, the default), or, with ``--format prompt-completion``, the records
become TRL's text prompt/completion pairs and TRL's completion-only loss masks the prompt.

``seal_peft.integrations.trl.sft_config`` is TRL's ``SFTConfig`` with SEAL's recipe; TRL's own defaults would
truncate samples to 1024 tokens (dropping any longer sample: its answer is at the end), train at lr 2e-5 and
in bf16 with gradient checkpointing. Needs ``pip install trl`` (tested with trl 1.16.0).
"""

import argparse

import torch
from peft import PeftModel
from trl import SFTTrainer

import seal_peft
from seal_peft.data import line_retrieval
from seal_peft.integrations.trl import prompt_completion, sft_config
from seal_peft.models import load_model, on_cpu
from seal_peft.training import RECIPES, add_lm_samples, recipe_for_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None, help="HF id/path (default: embedded SmolLM2-135M-Instruct)")
parser.add_argument("--granularity", default="channel", choices=["head", "channel"])
parser.add_argument("--recipe", default=None, choices=list(RECIPES), help="default: the model's (smollm2/paper)")
parser.add_argument("--train-samples", type=int, default=4, help="the paper uses 50")
parser.add_argument("--length", type=int, default=384, help="training sample length in tokens (paper: ~the window)")
parser.add_argument("--format", default="records", choices=["records", "prompt-completion"])
parser.add_argument("--lm-every", type=int, default=None, help="LM windows per N samples (records format only)")
parser.add_argument("--batch-size", type=int, default=1)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="runs/trl")
args = parser.parse_args()

model, tokenizer = load_model(args.model)
recipe = RECIPES[args.recipe or recipe_for_model(args.model)][args.granularity]
train = line_retrieval(tokenizer, num_samples=args.train_samples, length=args.length, seed=args.seed, progress=False)
lm_every = recipe.lm_every if args.lm_every is None else args.lm_every
if args.format == "prompt-completion":
    train = prompt_completion(train, tokenizer)  # text columns: TRL tokenizes them and masks the prompt
elif lm_every:  # plain essay text mixed in (labels on every token), so the model stays a good LM
    train = add_lm_samples(train, tokenizer, every=lm_every, length=min(recipe.lm_length, args.length), seed=args.seed)

trainer = SFTTrainer(
    model=model,
    args=sft_config(  # AdamW, constant lr, no weight decay, fp32, no truncation
        f"{args.out}/trainer",
        args.granularity,
        learning_rate=recipe.learning_rate,
        num_train_epochs=recipe.num_train_epochs,
        per_device_train_batch_size=args.batch_size,
        seed=args.seed,
        logging_steps=1,
        **({"use_cpu": True} if on_cpu(model) else {}),
    ),
    train_dataset=train,
    processing_class=tokenizer,
    peft_config=seal_peft.SealConfig(granularity=args.granularity),
)
trainer.model.print_trainable_parameters()
trainer.train()
trainer.save_model(f"{args.out}/adapter")  # adapter_config.json + adapter_model.safetensors (scales only)

# the adapter is an ordinary PEFT adapter: reload it onto a fresh base model and compare
trained = trainer.model.eval()
reloaded = PeftModel.from_pretrained(load_model(args.model)[0], f"{args.out}/adapter").to(trained.device).eval()
ids = torch.tensor([tokenizer("line 3: REGISTER_CONTENT is <42>")["input_ids"]], device=trained.device)
with torch.no_grad():
    diff = (reloaded(input_ids=ids).logits - trained(input_ids=ids).logits).abs().max().item()
scales = torch.cat([p.detach().flatten().cpu() for n, p in trained.named_parameters() if "seal_scale" in n])
print(f"adapter: {args.out}/adapter | scales min {scales.min():.4f} max {scales.max():.4f} | "
      f"reloaded vs trained logits max |diff| {diff}")
