"""Training SEAL with the stock HF ``Trainer``: the recipes (:data:`RECIPES`, the one source of them), a
collator, recommended arguments, and two optional ways to keep the rest of the model intact (a pull of
the scales toward 1, and plain-text LM samples mixed into the data). Nothing here replaces the
Trainer's loop.

Example::

    from transformers import Trainer
    from seal_peft.training import SealDataCollator, seal_training_arguments

    args = seal_training_arguments("out", granularity="head")
    Trainer(model=peft_model, args=args, train_dataset=ds, data_collator=SealDataCollator(tok)).train()
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

GRANULARITIES = ("head", "channel")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to train one SEAL variant: the ``train_seal`` settings and the LM mixing.

    ``lm_every > 0``: one plain-text LM window of ``lm_length`` tokens from the training essays per
    ``lm_every`` retrieval samples (:func:`add_lm_samples`; the Trainer shuffles the mix). ``lm_kl > 0``
    trains those windows on the KL divergence to the base model instead of on their text
    (:func:`seal_loss`).
    """

    learning_rate: float
    num_train_epochs: float = 1.0
    scale_pull: float = 0.0
    lm_every: int = 0
    lm_length: int = 512
    lm_kl: float = 0.0

    def train_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`train_seal` this recipe sets."""
        return {
            "learning_rate": self.learning_rate,
            "num_train_epochs": self.num_train_epochs,
            "scale_pull": self.scale_pull,
            "lm_kl": self.lm_kl,
        }


#: Every recipe, by name then granularity: the one source that the CLI, the examples and the benchmarks
#: read. Both train on ~50 synthetic samples with AdamW, a constant learning rate, no weight decay, batch 1.
RECIPES: dict[str, dict[str, Recipe]] = {
    # the paper's (Lee et al. 2025; LongEval line retrieval on 7B models): 1 epoch, no LM mixing
    "paper": {"head": Recipe(learning_rate=1e-2), "channel": Recipe(learning_rate=2e-2)},
    # tuned for the embedded SmolLM2-135M-Instruct on the dev split (docs/results.md): with 50 samples at
    # 2K tokens, one 512-token essay LM window per 2 samples (keeps essay perplexity at base); SEAL-H
    # needs a higher learning rate than the paper's on this model
    "smollm2": {
        "head": Recipe(learning_rate=3e-2, lm_every=2, lm_length=512),
        "channel": Recipe(learning_rate=2e-2, lm_every=2, lm_length=512),
    },
}

#: the paper's learning rates (``RECIPES["paper"]``), the default of :func:`seal_training_arguments`
DEFAULT_LR = {g: r.learning_rate for g, r in RECIPES["paper"].items()}


def get_recipe(name: str, granularity: str) -> Recipe:
    """``RECIPES[name][granularity]`` with errors that list the choices."""
    if name not in RECIPES:
        raise ValueError(f"recipe {name!r}: use one of {', '.join(RECIPES)} (seal_peft.training.RECIPES).")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}: use 'head' or 'channel'.")
    return RECIPES[name][granularity]


def recipe_for_model(name_or_path: Any) -> str:
    """The recipe to use by default for a model: ``"smollm2"`` for the embedded SmolLM2-135M-Instruct
    (``None`` / ``"smollm2"``: the model it was tuned on), ``"paper"`` for every other model."""
    from .models import EMBEDDED_MODELS, resolve_embedded

    spec = resolve_embedded(name_or_path)
    return "smollm2" if spec is not None and spec.name == EMBEDDED_MODELS["smollm2"].name else "paper"


class SealDataCollator:
    """Pads ``input_ids`` / ``attention_mask`` / ``labels`` to the longest sample of the batch.

    Metadata columns (``length``, ``depth``, ``answer`` ...) are dropped, so the Trainer can run with
    ``remove_unused_columns=False``. Padding is on the right; padded labels are -100.

    ``trim_logits=True`` adds ``logits_to_keep`` to the batch: the model then computes vocabulary
    logits only for the positions that predict supervised tokens (the answer is at the end of a SEAL
    sample), which saves the LM head and the softmax over the whole prompt. It needs a loss that
    understands trimmed logits: ``Trainer(..., compute_loss_func=seal_loss(model))``.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        pad_token_id: int | None = None,
        pad_to_multiple_of: int | None = None,
        trim_logits: bool = False,
    ):
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = (
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            )
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.trim_logits = trim_logits

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("SealDataCollator got an empty batch.")
        for i, f in enumerate(features):
            if "input_ids" not in f or "labels" not in f:
                raise ValueError(
                    f"Sample {i} has no 'input_ids'/'labels'; build training data with seal_peft.data generators "
                    f"(or give each sample input_ids and labels with the prompt masked to -100)."
                )
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), -100, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.as_tensor(f["input_ids"])
            labels[i, :n] = torch.as_tensor(f["labels"])
            mask[i, :n] = torch.as_tensor(f.get("attention_mask", [1] * n))
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if self.trim_logits:
            supervised = (labels != -100).any(dim=0).nonzero()
            first = int(supervised.min()) if len(supervised) else longest - 1
            # position t predicts token t+1: keep logits from the position before the first label on
            batch["logits_to_keep"] = max(longest - first + 1, 1)
        return batch


def seal_training_arguments(
    output_dir: str,
    granularity: str = "head",
    learning_rate: float | None = None,
    num_train_epochs: float = 1.0,
    per_device_train_batch_size: int = 1,
    gradient_accumulation_steps: int = 1,
    gradient_checkpointing: bool = False,
    seed: int = 0,
    **overrides: Any,
):
    """``TrainingArguments`` with the paper's recipe for SEAL.

    AdamW, constant learning rate (the paper's, ``RECIPES["paper"]``: 1e-2 for ``"head"``, 2e-2 for
    ``"channel"``, unless given), no
    warm-up, no weight decay on the scales, 1 epoch, batch 1 (+ optional accumulation), optional
    gradient checkpointing (non-reentrant, so the frozen model needs no input grads). No
    checkpoints or reports by default; anything can be overridden by keyword.
    """
    from transformers import TrainingArguments

    if granularity not in DEFAULT_LR:
        raise ValueError(f"granularity={granularity!r}: use 'head' or 'channel'.")
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        learning_rate=DEFAULT_LR[granularity] if learning_rate is None else learning_rate,
        num_train_epochs=num_train_epochs,
        per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
    )
    # transformers 5.x renamed gradient_checkpointing -> activation_checkpointing (old name deprecated)
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    kwargs[ckpt] = gradient_checkpointing
    kwargs[f"{ckpt}_kwargs"] = {"use_reentrant": False} if gradient_checkpointing else None
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def seal_scales(model: nn.Module) -> list[torch.Tensor]:
    """All trainable SEAL scale tensors of ``model`` (active adapters)."""
    return [p for n, p in model.named_parameters() if "seal_scale" in n and p.requires_grad]


class _LastInputs:
    """A forward pre-hook on ``model`` that remembers the token ids and mask of its last call, so that a
    ``compute_loss_func`` (which the Trainer gives only outputs and labels) can run the base model on the
    same tokens. It reads the call's arguments and changes nothing."""

    def __init__(self, model: nn.Module):
        self.input_ids: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.attention_mask = kwargs.get("attention_mask")


def seal_loss(model: nn.Module, scale_pull: float = 0.0, lm_kl: float = 0.0) -> Callable:
    """A ``compute_loss_func`` for ``Trainer``: answer cross-entropy + ``scale_pull * sum((s - 1)^2)``.

    Works with full or trimmed logits (``SealDataCollator(trim_logits=True)``). Pulling the scales
    toward 1 (identity) limits how far SEAL moves the model away from the base — a cheap guard for
    general ability (perplexity). ``scale_pull=0`` is the plain answer loss.

    ``lm_kl > 0`` changes what the plain-text LM windows (:func:`add_lm_samples`, rows whose **first**
    label is set: every token a target, which a prompt-masked sample never has) are trained on: instead
    of their next-token cross-entropy, ``lm_kl`` times the KL divergence from the *base* model's
    next-token distribution (``model.disable_adapter()``, no gradient) to the adapted one's, token for
    token — the windows then hold the model to what the base predicted instead of to the text. It costs
    one extra forward per LM window and registers a forward pre-hook on ``model`` that remembers the
    last call's ``input_ids`` / ``attention_mask`` (the Trainer passes the loss only the outputs and the
    labels). ``model`` must be the ``PeftModel`` the Trainer trains.
    """
    strength = scale_pull
    if strength < 0:
        raise ValueError(f"scale_pull={strength} must be >= 0.")
    if lm_kl < 0:
        raise ValueError(f"lm_kl={lm_kl} must be >= 0 (0 = the LM windows keep their cross-entropy).")
    seen = None
    if lm_kl > 0:
        if not hasattr(model, "disable_adapter"):
            raise TypeError(
                f"lm_kl needs the PeftModel being trained (for disable_adapter()), got {type(model).__name__}; "
                "pass the model returned by get_peft_model(...)."
            )
        seen = _LastInputs(model)

    def compute_loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        lm_rows = labels[:, 0] != -100 if seen is not None and labels.dim() == 2 else None
        # logits may cover only the last positions (logits_to_keep): align labels with them
        labels = labels[..., labels.shape[-1] - logits.shape[-2] :]
        shift_logits = logits[..., :-1, :].float()
        shift_labels = labels[..., 1:].to(logits.device)
        count = num_items_in_batch if num_items_in_batch is not None else (shift_labels != -100).sum()
        windows = lm_rows is not None and bool(lm_rows.any())
        targets = shift_labels
        if windows:  # LM windows: KL to the base model instead of their cross-entropy
            lm_rows = lm_rows.to(logits.device)
            targets = shift_labels.masked_fill(lm_rows[:, None], -100)
        loss = nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        if windows:
            loss = loss + lm_kl * _kl_to_base(model, seen, lm_rows, shift_logits, shift_labels, logits.shape[-2])
        loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
        if strength > 0:
            scales = seal_scales(model)
            if scales:
                penalty = torch.cat([(s.float() - 1).pow(2).flatten() for s in scales]).sum()
                loss = loss + strength * penalty.to(loss.device)
        return loss

    return compute_loss


def _kl_to_base(model, seen: _LastInputs, rows, shift_logits, shift_labels, keep: int) -> torch.Tensor:
    """Sum over the target tokens of ``rows`` of KL(base || adapted) of the next-token distributions."""
    if seen.input_ids is None:
        raise RuntimeError("lm_kl: the loss was called before any forward of the model it was built for.")
    ids = seen.input_ids[rows.to(seen.input_ids.device)]
    mask = None if seen.attention_mask is None else seen.attention_mask[rows.to(seen.attention_mask.device)]
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False)
    base_logp = torch.log_softmax(base.logits[..., :-1, :].float().to(shift_logits.device), dim=-1)
    logq = torch.log_softmax(shift_logits[rows], dim=-1)
    per_token = (base_logp.exp() * (base_logp - logq)).sum(-1)
    return per_token[shift_labels[rows] != -100].sum()


def scale_pull_loss(model: nn.Module, strength: float) -> Callable:
    """Alias of ``seal_loss(model, scale_pull=strength)``."""
    return seal_loss(model, scale_pull=strength)


def train_seal(
    model: nn.Module,
    tokenizer: Any,
    train_dataset: Any,
    output_dir: str,
    *,
    granularity: str = "head",
    learning_rate: float | None = None,
    num_train_epochs: float = 1.0,
    scale_pull: float = 0.0,
    lm_kl: float = 0.0,
    gradient_accumulation_steps: int = 1,
    gradient_checkpointing: bool = False,
    seed: int = 0,
    progress: bool = True,
    **overrides: Any,
):
    """Train the SEAL scales of ``model`` (a ``PeftModel``) with the stock ``Trainer``; return it.

    A thin convenience: ``seal_training_arguments`` + ``SealDataCollator(trim_logits=True)`` +
    ``seal_loss(model, scale_pull, lm_kl)``. Equivalent to writing the three lines yourself (see
    ``examples/train_line_retrieval.py``).
    """
    from transformers import Trainer

    if len(train_dataset) == 0:
        raise ValueError("train_seal: the training dataset is empty.")
    if not progress:
        overrides.setdefault("logging_strategy", "no")  # quiet: no per-step loss lines either
    args = seal_training_arguments(
        output_dir,
        granularity=granularity,
        learning_rate=learning_rate,
        num_train_epochs=num_train_epochs,
        gradient_accumulation_steps=gradient_accumulation_steps,
        gradient_checkpointing=gradient_checkpointing,
        seed=seed,
        disable_tqdm=not progress,
        **overrides,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=SealDataCollator(tokenizer, trim_logits=True),
        compute_loss_func=seal_loss(model, scale_pull=scale_pull, lm_kl=lm_kl),
    )
    trainer.train()
    model.eval()
    return trainer


def mix_lm_samples(dataset, lm_samples, every: int = 5, seed: int = 0):
    """Interleave plain language-modelling samples into SEAL training data.

    ``lm_samples`` is a dataset/list of records with ``input_ids`` (labels = the ids: every token is
    predicted), e.g. from ``lm_text_samples``. One LM sample is inserted after every ``every``
    retrieval samples (order otherwise kept), so the scales also have to keep the model a good
    language model. Returns a ``datasets.Dataset`` with the columns ``input_ids``, ``attention_mask``,
    ``labels``.

    The stock ``Trainer`` shuffles its training set (seeded by ``data_seed``), so what training sees is
    the *ratio* — one LM sample per ``every`` retrieval samples, in shuffled order — not the positions.
    ``train_sampling_strategy="sequential"`` (a ``TrainingArguments`` field, through
    ``seal_training_arguments`` / ``train_seal``) keeps the interleaved order; the recipe's numbers
    (docs/results.md) were measured shuffled.
    """
    from datasets import Dataset

    if every < 1:
        raise ValueError(f"every={every} must be >= 1.")
    task = [_core_record(r) for r in dataset]
    lm = [_core_record({**r, "labels": r.get("labels", r["input_ids"])}) for r in lm_samples]
    if not task:
        raise ValueError("mix_lm_samples: the retrieval dataset is empty.")
    if not lm:
        raise ValueError("mix_lm_samples: no LM samples given.")
    rng = random.Random(seed)
    rng.shuffle(lm)
    out, j = [], 0
    for i, r in enumerate(task, 1):
        out.append(r)
        if i % every == 0:
            out.append(lm[j % len(lm)])
            j += 1
    return Dataset.from_list(out)


def add_lm_samples(dataset, tokenizer: Any, every: int = 5, length: int = 512, seed: int = 0):
    """``dataset`` with plain-text LM windows of ``length`` tokens from the *training* essays inserted
    after every ``every`` samples (``mix_lm_samples`` + ``lm_text_samples``): one window per ``every``
    samples, which the ``Trainer`` then shuffles with the rest (see :func:`mix_lm_samples`).

    The essays' ``"train"`` half is used, so the held-out perplexity text (``heldout_text``, the
    ``"eval"`` half) is never trained on. This is what ``seal-peft train --lm-every N`` does.
    """
    from .data import load_essays

    if every < 1:
        raise ValueError(f"every={every} must be >= 1 (one LM sample after every N retrieval samples).")
    lm = lm_text_samples(tokenizer, load_essays("train"), max(1, len(dataset) // every), length, seed=seed)
    return mix_lm_samples(dataset, lm, every=every, seed=seed)


def lm_text_samples(
    tokenizer: Any, texts: Sequence[str], num_samples: int, length: int, seed: int = 0
) -> list[dict]:
    """Cut ``num_samples`` windows of ``length`` tokens out of ``texts`` (labels = ids)."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
    if len(ids) < length:
        raise ValueError(f"lm_text_samples: the texts hold {len(ids)} tokens, fewer than length={length}.")
    rng = random.Random(seed)
    rows = []
    for _ in range(num_samples):
        start = rng.randrange(0, len(ids) - length + 1)
        window = ids[start : start + length]
        rows.append({"input_ids": window, "attention_mask": [1] * length, "labels": list(window)})
    return rows


def _core_record(r: dict) -> dict:
    n = len(r["input_ids"])
    return {
        "input_ids": list(r["input_ids"]),
        "attention_mask": list(r.get("attention_mask", [1] * n)),
        "labels": list(r["labels"]),
    }


def train_variant(
    model,
    tokenizer,
    train_ds,
    granularity: str,
    out_dir: str,
    *,
    learning_rate=None,
    epochs=None,
    scale_pull=None,
    layers=None,
    gradient_checkpointing=False,
    seed=0,
    progress=True,
    lm_every=None,
    lm_length=None,
    lm_kl=None,
    recipe: str = "paper",
    **trainer_overrides,
):
    """Wrap ``model`` with SEAL and train it (``seal-peft train`` / ``demo``) with ``seal_peft.training.RECIPES[recipe][granularity]``;
    returns the PeftModel.

    ``lm_every > 0`` adds one plain-text LM window of ``lm_length`` tokens (training essays) per
    ``lm_every`` retrieval samples (``seal_peft.training.add_lm_samples``; the Trainer shuffles the
    mix). Arguments left at ``None`` take the recipe's value; ``trainer_overrides`` go to
    ``TrainingArguments``. A model on the CPU trains on the CPU (the Trainer would otherwise move it
    to a GPU).
    """
    import dataclasses

    from peft import get_peft_model

    from .models import on_cpu
    from .tuner.config import SealConfig

    chosen = {
        "learning_rate": learning_rate,
        "num_train_epochs": epochs,
        "scale_pull": scale_pull,
        "lm_every": lm_every,
        "lm_length": lm_length,
        "lm_kl": lm_kl,
    }
    settings = dataclasses.replace(
        get_recipe(recipe, granularity), **{k: v for k, v in chosen.items() if v is not None}
    )
    lm_every, lm_length = settings.lm_every, settings.lm_length
    if lm_every:
        train_ds = add_lm_samples(train_ds, tokenizer, every=lm_every, length=lm_length, seed=seed)
    peft_model = get_peft_model(model, SealConfig(granularity=granularity, layers_to_transform=layers))
    train_seal(
        peft_model,
        tokenizer,
        train_ds,
        out_dir,
        granularity=granularity,
        seed=seed,
        progress=progress,
        gradient_checkpointing=gradient_checkpointing,
        **({"use_cpu": True} if on_cpu(model) else {}),
        **settings.train_kwargs(),
        **trainer_overrides,
    )
    return peft_model
