"""``seal-peft``: generate data, train, evaluate, merge — and the end-to-end demo.

Run ``seal-peft COMMAND --help`` for each command's options. Every command works on the embedded
SmolLM2-135M-Instruct by default (``--model`` takes any HF causal LM id or path).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .errors import SealUsageError

TASKS = ("line", "kv", "needle")
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # transformers' device_map

# the recipes (the paper's; the one tuned for the embedded model) live in seal_peft.training.RECIPES


# ----------------------------------------------------------------------------- option types
# argparse calls these on the text of an option; an ArgumentTypeError becomes "argument --x: <message>"
# with the usage line and exit code 2, so every bad option is reported before anything is loaded.
def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _ints_at_least(minimum: int) -> Callable[[str], list[int]]:
    one = _int_at_least(minimum)

    def parse(text: str) -> list[int]:
        parts = [x.strip() for x in str(text).split(",") if x.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        try:
            return [one(x) for x in parts]
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"{err} (in {text!r}; comma-separated integers)") from None

    return parse


def _number(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def _non_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


def _depths(text: str) -> list[float]:
    parts = [x.strip() for x in str(text).split(",") if x.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated depths in [0, 1], got {text!r}")
    values = [_number(x) for x in parts]
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad:
        raise argparse.ArgumentTypeError(f"depths must lie in [0, 1] (0 = start, 1 = end), got {bad[0]:g}")
    return values


GRANULARITIES = ("head", "channel")


def _granularities(text: str) -> list[str]:
    parts = [x.strip() for x in str(text).split(",") if x.strip()]
    unknown = [x for x in parts if x not in GRANULARITIES]
    if not parts or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(GRANULARITIES)}, got {text!r}"
        )
    if len(set(parts)) != len(parts):
        raise argparse.ArgumentTypeError(f"each granularity once, got {text!r}")
    return parts


def _extend_spec(text: str) -> str:
    from .extension import parse_extend

    try:
        parse_extend(text)
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


@contextmanager
def _user_input(what: str, *errors: type[BaseException]) -> Iterator[None]:
    """``errors`` raised while acting on what the user gave (``what``: an option and its value) are
    usage errors: one ``error: ...`` line. Everything else keeps its traceback."""
    try:
        yield
    except SealUsageError:
        raise
    except errors as err:
        raise SealUsageError(f"{what}: {err}") from err


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- shared pieces
def _generate(
    tokenizer,
    task: str,
    num_samples: int,
    lengths: list[int],
    depths,
    prompt_format: str,
    seed: int,
    *,
    essays: str,
    exclude=None,
    progress: bool = True,
):
    """Generate ``task`` data; ``essays`` (``"train"`` / ``"eval"``) is the half of the essays that needle
    haystacks come from: the training half for training data, the held-out half for evaluation (the
    recipe's LM windows are cut from the training half)."""
    from . import data

    kwargs = dict(
        num_samples=num_samples,
        length=lengths,
        depths=depths,
        prompt_format=prompt_format,
        seed=seed,
        progress=progress,
    )
    if task == "line":
        return data.line_retrieval(tokenizer, exclude=exclude, **kwargs)
    if task == "kv":
        return data.kv_retrieval(tokenizer, exclude=exclude, **kwargs)
    if task == "needle":
        return data.needle_haystack(tokenizer, essays=essays, **kwargs)
    raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")


def _load_dataset(path: str):
    from datasets import load_from_disk

    if not os.path.isdir(path):
        raise SealUsageError(f"--data {path!r} is not a folder written by `seal-peft generate --out`.")
    with _user_input(f"--data {path!r} is not a dataset written by `seal-peft generate --out`", ValueError, OSError):
        return load_from_disk(path)


def _data_args(p: argparse.ArgumentParser, *, samples: int, lengths: str, seed: int) -> None:
    g = p.add_argument_group("data (generated on the fly unless --data is given)")
    g.add_argument("--data", help="a dataset folder written by `seal-peft generate --out`")
    g.add_argument("--task", choices=TASKS, default="line", help="synthetic task (default: line retrieval)")
    g.add_argument(
        "--num-samples", type=_int_at_least(1), default=samples, help=f"samples per length (default {samples})"
    )
    g.add_argument(
        "--lengths",
        type=_ints_at_least(1),
        default=_ints_at_least(1)(lengths),
        help=f"token lengths, comma-separated (default {lengths})",
    )
    g.add_argument(
        "--depths",
        type=_depths,
        default=None,
        help="needle/line depths in [0,1], comma-separated (default random)",
    )
    g.add_argument(
        "--prompt-format",
        choices=("longeval", "chat", "chat_prefill", "plain"),
        default="longeval",
        help="longeval (default): LongEval's protocol — its wording, the chat template with an empty "
        "assistant turn, up to 100 new tokens, correct = the last integer of the reply; chat: the same "
        "encoding with the project's earlier wording; chat_prefill: the reply pre-filled up to the "
        "number ('... is <'); plain: no chat template (base models)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=seed,
        help=f"data seed (default {seed}); use different seeds for train and eval",
    )


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="HF model id or path (default: embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="model weights dtype; SEAL scales always train in fp32. auto = bfloat16 where the hardware has "
        "fast bf16 (CUDA, or a CPU with AVX512-BF16/AMX), else float32",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _device_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--device",
        default="auto",
        help="where the model runs: auto (default: CUDA when available, else the CPU), cpu, cuda, cuda:N",
    )
    g.add_argument(
        "--device-map",
        default=None,
        choices=DEVICE_MAP_STRATEGIES,
        help="spread a model too large for one device over all of them (transformers' device_map; needs "
        "accelerate); instead of --device",
    )


def _placement(args) -> dict[str, Any]:
    """``load_model`` keywords for ``--device`` / ``--device-map``: one device, or transformers' device_map."""
    from .models import resolve_device

    if getattr(args, "device_map", None):
        return {"device_map": args.device_map}
    return {"device": resolve_device(getattr(args, "device", None))}


def _load_model(args, dtype):
    """The model of ``--model`` with dtype ``dtype``, placed as ``--device`` / ``--device-map`` say."""
    return _load_base(args.model, dtype, _placement(args))


def _load_base(model_name, dtype, placement):
    from .models import load_model

    with _user_input(f"--model {model_name or 'smollm2 (the embedded default)'}", OSError, ImportError):
        return load_model(model_name, dtype=dtype, **placement)


def _on_cpu(model) -> bool:
    from .models import input_device

    return input_device(model).type == "cpu" and not getattr(model, "hf_device_map", None)


def _recipe_arg(p: argparse.ArgumentParser) -> None:
    from .training import RECIPES

    def describe(name: str) -> str:
        head, channel = RECIPES[name]["head"], RECIPES[name]["channel"]
        lm = f"one {head.lm_length}-token LM window per {head.lm_every} samples" if head.lm_every else "no LM"
        return f"{name}: lr {head.learning_rate:g} head / {channel.learning_rate:g} channel, {lm}"

    described = "; ".join(describe(name) for name in RECIPES)
    p.add_argument(
        "--recipe",
        choices=("auto", *RECIPES),
        default="auto",
        help="training recipe (seal_peft.training.RECIPES): paper = the paper's, smollm2 = tuned for the "
        f"embedded model on the dev split; auto (default) = smollm2 for the embedded model, else paper ({described})",
    )


def _recipe_name(args) -> str:
    from .training import recipe_for_model

    return recipe_for_model(args.model) if args.recipe == "auto" else args.recipe


def _extend_arg(p: argparse.ArgumentParser, note: str) -> None:
    p.add_argument(
        "--extend",
        default=None,
        metavar="METHOD:FACTOR",
        type=_extend_spec,
        help="extend the context first (docs/extension.md): ntk:2, dynamic_ntk:2, yarn:2, self_extend:4 "
        "(group size; window option: self_extend:4:window=1024)" + note,
    )


def resolve_dtype(name: str):
    """``auto``: bf16 where it is fast (CUDA with bf16, CPUs whose oneDNN has bf16 kernels), else fp32."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    try:
        fast = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # builds without oneDNN
        fast = False
    return torch.bfloat16 if fast else torch.float32


def _apply_extend(model, tokenizer, extend):
    """``--extend METHOD:FACTOR[:key=value,...]``: extend the model's context (seal_peft.extension) and let
    the tokenizer (and the data generators) accept the extended length."""
    from .extension import extend_context, extended_context_length, parse_extend

    if extend:
        record = parse_extend(extend)
        method, factor = record.pop("method"), record.pop("factor")
        with _user_input(f"--extend {extend}", ValueError):
            extend_context(model, method, factor=factor, **record)
    if extend or getattr(getattr(model, "config", None), "seal_extension", None):
        limit = extended_context_length(model)
        current = getattr(tokenizer, "model_max_length", 0) or 0  # huge = "no limit" sentinel
        tokenizer.model_max_length = limit if current > 10**7 else max(limit, current)
    return model


def _check_essays(ds, path: str, essays: str) -> None:
    """A needle dataset given with ``--data`` must come from the half of the essays this command uses."""
    import warnings

    from .data._common import dataset_metadata
    from .errors import SealUsageError

    if "task" not in ds.column_names or "needle_haystack" not in set(ds.unique("task")):
        return  # line / kv retrieval: no essays
    halves = {m["essays"] for m in dataset_metadata(ds) if "essays" in m}
    regenerate = f"regenerate it with `seal-peft generate --task needle --essays {essays} ... --out {path}`"
    if not halves:
        warnings.warn(
            f"--data {path!r} holds needle samples but no record of which essays they come from (written by "
            f"an older seal-peft?); they must come from the {essays} half: {regenerate}.",
            UserWarning,
            stacklevel=3,
        )
        return
    if essays == "eval" and halves != {"eval"}:
        raise SealUsageError(
            f"--data {path!r}: its needle haystacks come from the {'/'.join(sorted(halves))} essays, which "
            "training also uses (the recipe's LM windows, needle training data), so the result would be "
            f"measured on text the adapter trained on. Evaluate on the held-out half: {regenerate}."
        )
    if essays == "train" and "eval" in halves:
        raise SealUsageError(
            f"--data {path!r}: its needle haystacks come from the held-out (eval) essays, which evaluation and "
            f"the held-out perplexity use; train on the training half: {regenerate}."
        )
    if essays == "train" and "all" in halves:
        warnings.warn(
            f"--data {path!r}: its needle haystacks come from all the essays, including the held-out half "
            f"that evaluation and the held-out perplexity use; {regenerate}.",
            UserWarning,
            stacklevel=3,
        )


def _check_tokenizer(ds, path: str, tokenizer, model_name) -> None:
    """A dataset given with ``--data`` must have been built with the tokenizer of the loaded model: its
    ``input_ids`` are that tokenizer's ids."""
    import warnings

    from .data._common import dataset_metadata, tokenizer_fingerprint

    model = f"--model {model_name}" if model_name else "the embedded SmolLM2-135M-Instruct (no --model)"
    regenerate = (
        f"regenerate it for this model with `seal-peft generate{' --model ' + model_name if model_name else ''} "
        f"... --out DIR`, or pass the --model it was built for"
    )
    recorded = [m["tokenizer"] for m in dataset_metadata(ds) if isinstance(m.get("tokenizer"), dict)]
    if not recorded:
        warnings.warn(
            f"--data {path!r} does not record the tokenizer it was built with (written by an older seal-peft, "
            f"or not by seal-peft), so it cannot be checked against the tokenizer of {model}; if it was "
            f"built for another model, {regenerate}.",
            UserWarning,
            stacklevel=3,
        )
        return
    current = tokenizer_fingerprint(tokenizer)
    if current["sha256"] is None:
        return
    for built in recorded:
        if built.get("sha256") != current["sha256"]:
            raise SealUsageError(
                f"--data {path!r} was generated with another tokenizer: {built.get('name')!r} "
                f"({built.get('vocab_size')} tokens, vocabulary sha256 {str(built.get('sha256'))[:12]}), but this "
                f"run loads {model}, whose tokenizer is {current['name']!r} ({current['vocab_size']} tokens, "
                f"sha256 {current['sha256'][:12]}); its token ids would stand for other tokens. {regenerate}."
            )


def _dataset_from_args(args, tokenizer, *, essays: str, exclude=None):
    """The dataset of ``--data`` or one generated from the data options; ``essays`` is the half of the
    essays this command may use (``"train"`` for training, ``"eval"`` for evaluation)."""
    if args.data:
        ds = _load_dataset(args.data)
        _check_tokenizer(ds, args.data, tokenizer, getattr(args, "model", None))
        _check_essays(ds, args.data, essays)
        return ds
    with _user_input("the data options (--task, --lengths, --depths, --prompt-format)", ValueError):
        return _generate_from_args(args, tokenizer, essays=essays, exclude=exclude)


def _generate_from_args(args, tokenizer, *, essays: str, exclude=None):
    return _generate(
        tokenizer,
        args.task,
        args.num_samples * len(args.lengths),
        args.lengths,
        args.depths,
        args.prompt_format,
        args.seed,
        essays=essays,
        exclude=exclude,
        progress=not args.quiet,
    )


# ----------------------------------------------------------------------------- commands
def cmd_generate(args) -> int:
    from .models import load_tokenizer

    with _user_input(f"--model {args.model or 'smollm2 (the embedded default)'}", OSError, ImportError):
        tok = load_tokenizer(args.model)
    ds = _dataset_from_args(args, tok, essays=args.essays)
    ds.save_to_disk(args.out)
    _log(f"wrote {len(ds)} samples ({args.task}, lengths {args.lengths}) to {args.out}", args.quiet)
    return 0


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
    recipe: str = "paper",
    **trainer_overrides,
):
    """Wrap ``model`` with SEAL and train it with ``seal_peft.training.RECIPES[recipe][granularity]``;
    returns the PeftModel.

    ``lm_every > 0`` adds one plain-text LM window of ``lm_length`` tokens (training essays) per
    ``lm_every`` retrieval samples (``seal_peft.training.add_lm_samples``; the Trainer shuffles the
    mix). Arguments left at ``None`` take the recipe's value; ``trainer_overrides`` go to
    ``TrainingArguments``. A model on the CPU trains on the CPU (the Trainer would otherwise move it
    to a GPU).
    """
    import dataclasses

    from peft import get_peft_model

    from .training import add_lm_samples, get_recipe, train_seal
    from .tuner.config import SealConfig

    chosen = {
        "learning_rate": learning_rate,
        "num_train_epochs": epochs,
        "scale_pull": scale_pull,
        "lm_every": lm_every,
        "lm_length": lm_length,
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
        **({"use_cpu": True} if _on_cpu(model) else {}),
        **settings.train_kwargs(),
        **trainer_overrides,
    )
    return peft_model


def cmd_train(args) -> int:
    model, tok = _load_model(args, resolve_dtype(args.dtype))
    _check_layers(model, args.layers)
    _apply_extend(model, tok, args.extend)
    ds = _dataset_from_args(args, tok, essays="train")
    recipe = _recipe_name(args)
    t0 = time.time()
    peft_model = train_variant(
        model,
        tok,
        ds,
        args.granularity,
        os.path.join(args.out, "trainer"),
        learning_rate=args.lr,
        epochs=args.epochs,
        scale_pull=args.scale_pull,
        layers=args.layers,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
        progress=not args.quiet,
        lm_every=args.lm_every,
        lm_length=args.lm_length,
        recipe=recipe,
    )
    from .extension import record_extension

    record_extension(peft_model)  # the extension is saved in adapter_config.json ("extension")
    peft_model.save_pretrained(args.out)
    _log(
        f"trained SEAL-{args.granularity[0].upper()} (recipe {recipe}) on {len(ds)} samples in "
        f"{time.time() - t0:.0f} s; "
        f"adapter saved to {args.out}",
        args.quiet,
    )
    return 0


def _check_layers(model, layers) -> None:
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if layers and isinstance(n, int):
        outside = sorted({layer for layer in layers if layer >= n})
        if outside:
            raise SealUsageError(
                f"--layers {','.join(map(str, layers))}: the model has {n} layers (0..{n - 1}); "
                f"{','.join(map(str, outside))} do not exist."
            )


def _load_with_adapter(model_name, adapter, merge, dtype="auto", extend=None, placement=None):
    from .extension import from_pretrained  # applies the extension recorded with the adapter

    model, tok = _load_base(model_name, resolve_dtype(dtype), placement or {})
    _apply_extend(model, tok, extend)
    if adapter:
        if os.path.isdir(adapter) and not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise SealUsageError(
                f"--adapter {adapter!r} is a folder without adapter_config.json, not a saved adapter (the "
                "--out folder of `seal-peft train`)."
            )
        with _user_input(f"--adapter {adapter}", ValueError, OSError):
            model = from_pretrained(model, adapter)
        _apply_extend(model, tok, None)
        if merge:
            model = model.merge_and_unload(safe_merge=True)
    return model.eval(), tok


def evaluate_model(model, tok, eval_ds, lengths, name, out_dir=None, ppl_tokens=2048, progress=True) -> dict:
    """Retrieval accuracy by length + held-out perplexity; writes records when ``out_dir`` is given."""
    from .data import heldout_text
    from .evaluation import evaluate_retrieval, perplexity

    result = evaluate_retrieval(
        model, tok, eval_ds, progress=progress, name=name, length_bins=lengths
    )
    summary = {"name": name, "accuracy": result.accuracy, "by_length": result.accuracy_by_length(lengths)}
    if ppl_tokens:
        summary["ppl"] = perplexity(model, tok, heldout_text(tok, ppl_tokens, seed=0), max_length=ppl_tokens)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        result.to_json(os.path.join(out_dir, f"{name}.json"))
        result.to_csv(os.path.join(out_dir, f"{name}.csv"))
    summary["result"] = result
    return summary


def cmd_eval(args) -> int:
    from .evaluation import plot_accuracy_vs_length

    model, tok = _load_with_adapter(
        args.model, args.adapter, args.merge, args.dtype, args.extend, placement=_placement(args)
    )
    ds = _dataset_from_args(args, tok, essays="eval")  # never the essays the LM windows trained on
    name = args.name or ("base" if not args.adapter else os.path.basename(os.path.normpath(args.adapter)))
    s = evaluate_model(model, tok, ds, args.lengths, name, args.out, args.ppl_tokens, progress=not args.quiet)
    print(_table([s], args.lengths))
    if args.out:
        plot_accuracy_vs_length({name: s["result"]}, os.path.join(args.out, f"{name}_accuracy.png"))
        with open(os.path.join(args.out, f"{name}_summary.json"), "w") as f:
            json.dump({k: v for k, v in s.items() if k != "result"}, f, indent=1)
    return 0


def cmd_merge(args) -> int:
    """Fold the adapter into the base weights; the adapter's context extension goes into config.json."""
    import warnings

    import torch

    from .extension import extension_of, from_pretrained  # applies the extension recorded with the adapter
    from .models import load_model

    # merge in full precision unless asked otherwise (the merged checkpoint is what gets deployed)
    model, tok = load_model(
        args.model, dtype=torch.float32 if args.dtype == "auto" else resolve_dtype(args.dtype)
    )
    merged = from_pretrained(model, args.adapter).merge_and_unload(safe_merge=True)
    _apply_extend(merged, tok, None)  # an extended model: the tokenizer accepts the extended length
    merged.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    record = extension_of(merged)
    note = "a plain transformers checkpoint; no seal_peft needed to load it"
    if record is not None and record["method"] == "self_extend":
        warnings.warn(
            f"{args.out}: the adapter was trained under Self-Extend ({record}), an attention implementation "
            f"rather than a config value. config.json records it as `seal_extension`, but transformers, vLLM, "
            f"TGI or llama.cpp load the merged model WITHOUT Self-Extend. After loading, re-apply it with "
            f"seal_peft.extension.apply_from_config(model, {args.out!r}).",
            UserWarning,
            stacklevel=2,
        )
        note = "Self-Extend is recorded in config.json but must be re-applied with seal_peft after loading"
    elif record is not None:
        note += f"; the {record['method']} RoPE extension is in config.json and applied by transformers on load"
    _log(f"merged model written to {args.out} ({note})", args.quiet)
    return 0


def cmd_analyze(args) -> int:
    """Head attribution (+ perturbation check, + learned scales of an adapter): records and plots."""
    import torch

    from . import analysis as an

    progress = not args.quiet
    if args.perturb_with_adapter and not args.adapter:
        raise SealUsageError(
            "--perturb-with-adapter needs --adapter ADAPTER_DIR (the adapter to perturb on top of)."
        )
    os.makedirs(args.out, exist_ok=True)
    # gradients and small log-likelihood differences: full precision unless asked otherwise
    model, tok = _load_model(args, torch.float32 if args.dtype == "auto" else resolve_dtype(args.dtype))
    ds = None
    if args.attribution:
        with _user_input(f"--attribution {args.attribution}", ValueError, OSError):
            attr = an.HeadAttribution.from_json(args.attribution)
        _log(f"[analyze] attribution read from {args.attribution}", args.quiet)
    else:
        ds = _dataset_from_args(args, tok, essays="eval")
        meta = {
            "model": args.model or "SmolLM2-135M-Instruct (embedded)",
            "data": args.data or f"{args.task}, {len(ds)} samples, lengths {args.lengths}, seed {args.seed}",
            "prompt_format": args.prompt_format,
        }
        attr = an.head_attribution(model, ds, tok, progress=progress, meta=meta)
        _log(f"[analyze] attribution of {len(ds)} samples took {attr.seconds:.1f} s", args.quiet)
    scales = None
    if args.adapter:
        with _user_input(f"--adapter {args.adapter}", ValueError, OSError):
            scales = an.learned_head_scales(model, args.adapter)
    summary: dict[str, Any] = {
        "attribution_seconds": round(attr.seconds, 1),
        "num_samples": attr.num_samples,
        "base_accuracy_teacher_forced": attr.accuracy,
        "base_answer_nll": float(attr.loss.mean()),
        "top_positive": [
            {"layer": layer, "head": h, "attribution": v}
            for layer, h, v in attr.ranked("positive")[: args.top]
        ],
        "top_negative": [
            {"layer": layer, "head": h, "attribution": v}
            for layer, h, v in attr.ranked("negative")[: args.top]
        ],
    }
    attr.to_json(os.path.join(args.out, "attribution.json"), scales)
    attr.to_csv(os.path.join(args.out, "heads.csv"), scales)
    an.plot_attribution(attr, os.path.join(args.out, "attribution.png"))
    if scales is not None:
        an.plot_scales(scales, os.path.join(args.out, "scales.png"))
        an.plot_scale_vs_attribution(attr, scales, os.path.join(args.out, "scale_vs_attribution.png"))
        summary["adapter"] = args.adapter
        summary["scale_correlation"] = an.scale_correlation(attr, scales)
    if args.perturb_top > 0 or args.check_heads > 0:
        if ds is None:
            ds = _dataset_from_args(args, tok, essays="eval")
        target = model
        if args.perturb_with_adapter:
            from .loading import from_pretrained

            with _user_input(f"--adapter {args.adapter}", ValueError, OSError):
                target = from_pretrained(model, args.adapter)  # the probe multiplies on top of its scales
            summary["perturbed_model"] = f"base + adapter {args.adapter}"
        with _user_input("--perturb-top / --random-draws / --check-heads / --perturb-value", ValueError):
            res = an.top_vs_random(
                target,
                ds,
                attr,
                k=args.perturb_top,
                draws=args.random_draws,
                value=args.perturb_value,
                tokenizer=tok,
                seed=args.seed,
                single_heads=args.check_heads,
                progress=progress,
            )
        res.to_json(os.path.join(args.out, "perturbation.json"))
        res.to_csv(os.path.join(args.out, "perturbation.csv"))
        summary["perturbation"] = {"seconds": round(res.seconds, 1), "conditions": res.rows()}
        if args.check_heads:
            summary["agreement"] = an.attribution_agreement(attr, res)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

    def heads(rows):
        return ", ".join(f"L{r['layer']}.H{r['head']} {r['attribution']:+.3f}" for r in rows)

    print(
        f"head attribution: {attr.num_samples} samples, {attr.seconds:.0f} s; teacher-forced accuracy "
        f"{attr.accuracy:.2f}"
    )
    print(f"top positive: {heads(summary['top_positive'])}")
    print(f"top negative: {heads(summary['top_negative'])}")
    if "scale_correlation" in summary:
        c = summary["scale_correlation"]
        print(
            f"learned {c['granularity']} scales vs attribution: Spearman {c['spearman']:+.2f}, "
            f"sign agreement {c['sign_agreement']:.2f} ({c['heads_moved']} heads moved)"
        )
    if "perturbation" in summary:
        print(res.table())
    if "agreement" in summary:
        print(f"attribution vs exact single-head effect: Spearman {summary['agreement']['spearman']:+.2f}")
    print(f"records and plots: {args.out}")
    return 0


def _table(summaries: list[dict], lengths: list[int]) -> str:
    head = "| variant | " + " | ".join(_fmt_len(n) for n in lengths) + " | essay ppl |"
    lines = [head, "|" + "---|" * (len(lengths) + 2)]
    for s in summaries:
        cells = [f"{s['by_length'].get(n, float('nan')):.2f}" for n in lengths]
        ppl = f"{s['ppl']:.2f}" if s.get("ppl") else "-"
        lines.append(f"| {s['name']} | " + " | ".join(cells) + f" | {ppl} |")
    return "\n".join(lines)


def _fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def cmd_demo(args) -> int:
    """Base eval -> train SEAL-H and SEAL-C -> eval -> merged == unmerged -> save, with a table."""
    import torch

    from .evaluation import plot_accuracy_vs_length
    from .loading import from_pretrained
    from .models import input_device
    from .training import get_recipe

    t_start = time.time()
    progress = not args.quiet
    dtype = resolve_dtype(args.dtype)
    os.makedirs(args.out, exist_ok=True)
    model, tok = _load_model(args, dtype)
    where = f"device map {args.device_map}" if args.device_map else str(input_device(model))
    _log(
        f"[demo] model: {args.model or 'embedded SmolLM2-135M-Instruct'} ({str(dtype).replace('torch.', '')}, "
        f"{where}); "
        f"output: {args.out}",
        args.quiet,
    )
    train_ds = _generate(
        tok,
        "line",
        args.train_samples,
        [args.train_length],
        None,
        args.prompt_format,
        args.seed,
        essays="train",
        progress=progress,
    )
    eval_ds = _generate(
        tok,
        "line",
        args.eval_samples * len(args.lengths),
        args.lengths,
        None,
        args.prompt_format,
        args.seed + 1000,
        essays="eval",
        exclude=train_ds,
        progress=progress,
    )
    _log(
        f"[demo] data: {len(train_ds)} training samples at {args.train_length} tokens (seed {args.seed}); "
        f"{len(eval_ds)} evaluation samples at {args.lengths} (seed {args.seed + 1000}, no shared keys/values)",
        args.quiet,
    )
    summaries = []
    _log("[demo] evaluating the base model ...", args.quiet)
    summaries.append(
        evaluate_model(
            model,
            tok,
            eval_ds,
            args.lengths,
            "base",
            os.path.join(args.out, "eval"),
            args.ppl_tokens,
            progress,
        )
    )
    del model
    checks = {}
    for granularity in args.granularities:
        label = f"SEAL-{granularity[0].upper()}"
        base, _ = _load_model(args, dtype)
        t0 = time.time()
        recipe = _recipe_name(args)
        _log(f"[demo] training {label} (recipe {recipe}: {get_recipe(recipe, granularity)}) ...", args.quiet)
        peft_model = train_variant(
            base,
            tok,
            train_ds,
            granularity,
            os.path.join(args.out, "trainer"),
            seed=args.seed,
            progress=progress,
            recipe=recipe,
        )
        train_s = time.time() - t0
        adapter_dir = os.path.join(args.out, f"adapter-{granularity}")
        peft_model.save_pretrained(adapter_dir)
        _log(
            f"[demo] {label}: trained in {train_s:.0f} s, adapter saved to {adapter_dir}; evaluating ...",
            args.quiet,
        )
        s = evaluate_model(
            peft_model,
            tok,
            eval_ds,
            args.lengths,
            label,
            os.path.join(args.out, "eval"),
            args.ppl_tokens,
            progress,
        )
        s["train_seconds"] = train_s
        summaries.append(s)
        del peft_model, base
        # merged == unmerged, checked in fp32 on a real evaluation prompt with the saved adapter
        fp32, _ = _load_model(args, torch.float32)
        reloaded = from_pretrained(fp32, adapter_dir)
        prompt = eval_ds[0]["input_ids"][: eval_ds[0]["prompt_length"]]
        ids = torch.tensor([prompt], device=input_device(fp32))
        with torch.no_grad():
            unmerged = reloaded(input_ids=ids, logits_to_keep=16).logits
            merged_model = reloaded.merge_and_unload(safe_merge=True)
            merged = merged_model(input_ids=ids, logits_to_keep=16).logits
        diff = (merged - unmerged).abs().max().item()
        checks[label] = diff
        _log(f"[demo] {label}: merged vs unmerged (fp32) max |logit diff| = {diff:.2e}", args.quiet)
        if granularity == args.granularities[-1]:
            merged_dir = os.path.join(args.out, f"merged-{granularity}")
            merged_model.save_pretrained(merged_dir)
            tok.save_pretrained(merged_dir)
            _log(f"[demo] merged {label} model saved to {merged_dir}", args.quiet)
        del merged_model, reloaded, fp32
    plot = os.path.join(args.out, "accuracy_vs_length.png")
    plot_accuracy_vs_length({s["name"]: s["result"] for s in summaries}, plot, title="Line retrieval")
    table = _table(summaries, args.lengths)
    report = {
        "lengths": args.lengths,
        "prompt_format": args.prompt_format,
        "dtype": str(dtype),
        "variants": [{k: v for k, v in s.items() if k != "result"} for s in summaries],
        "merged_vs_unmerged_max_abs_logit_diff": checks,
        "seconds": round(time.time() - t_start, 1),
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(
        f"\nLine retrieval accuracy ({args.eval_samples} samples per length, prompt format {args.prompt_format}, "
        f"{str(dtype).replace('torch.', '')} weights):"
    )
    print(table)
    print(f"\nmerged == unmerged: {', '.join(f'{k} max|diff| {v:.1e}' for k, v in checks.items())}")
    print(f"plot: {plot}   records: {os.path.join(args.out, 'eval')}   total: {report['seconds']:.0f} s")
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seal-peft",
        description="SEAL: learn per-head (or per-channel) attention-output scales that restore long-context "
        "retrieval. Commands: demo (the whole loop on the embedded model), generate, train, eval, merge.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser(
        "demo", help="the whole loop on the embedded model: base eval, train SEAL-H/C, eval, merge"
    )
    _model_args(d)
    _device_args(d)
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument(
        "--lengths",
        type=_ints_at_least(1),
        default=[512, 1024, 2048],
        help="evaluation lengths (default 512,1024,2048)",
    )
    d.add_argument(
        "--eval-samples", type=_int_at_least(1), default=20, help="evaluation samples per length (default 20)"
    )
    d.add_argument(
        "--train-samples", type=_int_at_least(1), default=50, help="training samples (default 50, as the paper)"
    )
    d.add_argument(
        "--train-length",
        type=_int_at_least(1),
        default=2048,
        help="training sample length in tokens (default 2048)",
    )
    d.add_argument(
        "--granularities",
        type=_granularities,
        default=["head", "channel"],
        help="which SEAL variants to train (default head,channel)",
    )
    d.add_argument(
        "--prompt-format",
        choices=("longeval", "chat", "chat_prefill", "plain"),
        default="longeval",
        help="see `seal-peft eval --help` (default: LongEval's protocol)",
    )
    d.add_argument(
        "--ppl-tokens",
        type=_int_at_least(0),
        default=2048,
        help="held-out essay tokens for perplexity (0 = skip)",
    )
    _recipe_arg(d)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate", help="write a synthetic dataset (datasets.save_to_disk folder)")
    _model_args(g)
    _data_args(g, samples=50, lengths="2048", seed=0)
    g.add_argument(
        "--essays",
        choices=("train", "eval"),
        default="train",
        help="half of the essays that needle haystacks come from: train (default; training data) or eval "
        "(held out: for data you evaluate on; `seal-peft eval` generates from it and refuses --data from the "
        "other half)",
    )
    g.add_argument("--out", required=True, help="output folder")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="train a SEAL adapter with the stock HF Trainer and save it")
    _model_args(t)
    _device_args(t)
    _data_args(t, samples=50, lengths="2048", seed=0)
    t.add_argument(
        "--granularity", choices=("head", "channel"), default="head", help="head = SEAL-H, channel = SEAL-C"
    )
    t.add_argument(
        "--lr",
        type=_positive,
        default=None,
        help="learning rate (default: the recipe's, see --recipe)",
    )
    _recipe_arg(t)
    t.add_argument("--epochs", type=_positive, default=None, help="epochs (default: the recipe's, 1)")
    t.add_argument(
        "--scale-pull", type=_non_negative, default=None, help="weight of the pull of the scales toward 1 (default 0)"
    )
    t.add_argument(
        "--layers", type=_ints_at_least(0), default=None, help="only adapt these layers (comma-separated)"
    )
    t.add_argument(
        "--lm-every",
        type=_int_at_least(0),
        default=None,
        metavar="N",
        help="keep the model a good LM: add one plain-text window (training essays) per N samples, "
        "shuffled with them (default: the recipe's, 2 for smollm2, 0 = off for paper; docs/training.md)",
    )
    t.add_argument("--lm-length", type=_int_at_least(1), default=None, help="tokens per LM window (default 512)")
    t.add_argument(
        "--gradient-checkpointing", action="store_true", help="trade compute for memory on long samples"
    )
    _extend_arg(t, "; recorded in the adapter")
    t.add_argument("--out", required=True, help="adapter output folder")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "eval", help="retrieval accuracy by length (+ held-out perplexity), records and a plot"
    )
    _model_args(e)
    _device_args(e)
    _data_args(e, samples=40, lengths="512,1024,2048", seed=1000)
    e.add_argument("--adapter", default=None, help="SEAL adapter folder (default: evaluate the base model)")
    e.add_argument("--merge", action="store_true", help="merge the adapter before evaluating")
    _extend_arg(e, ". An adapter's recorded extension is applied automatically")
    e.add_argument("--name", default=None, help="name of this run in tables/files")
    e.add_argument(
        "--ppl-tokens",
        type=_int_at_least(0),
        default=2048,
        help="held-out essay tokens for perplexity (0 = skip)",
    )
    e.add_argument("--out", default=None, help="folder for records (JSON/CSV) and the plot")
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser(
        "merge", help="fold an adapter into the model and save a plain transformers checkpoint"
    )
    _model_args(m)
    m.add_argument("--adapter", required=True, help="SEAL adapter folder")
    m.add_argument("--out", required=True, help="output folder for the merged model + tokenizer")
    m.set_defaults(func=cmd_merge)

    a = sub.add_parser(
        "analyze", help="per-head retrieval attribution, perturbation check, learned scales: records + plots"
    )
    _model_args(a)
    _device_args(a)
    _data_args(a, samples=20, lengths="1024", seed=2000)
    a.add_argument("--adapter", default=None, help="a SEAL adapter folder whose learned scales to compare")
    a.add_argument(
        "--attribution",
        default=None,
        help="reuse an attribution.json of an earlier run instead of computing it",
    )
    a.add_argument("--top", type=_int_at_least(1), default=10, help="heads listed per direction (default 10)")
    a.add_argument(
        "--perturb-top",
        type=_int_at_least(0),
        default=5,
        help="perturb the top-k positive/negative heads as groups (0 = skip)",
    )
    a.add_argument(
        "--random-draws", type=_int_at_least(0), default=3, help="groups of k random heads to compare (default 3)"
    )
    a.add_argument("--perturb-value", type=_number, default=0.0, help="scale of perturbed heads (default 0)")
    a.add_argument(
        "--check-heads",
        type=_int_at_least(0),
        default=0,
        help="also perturb this many single heads; Spearman vs attribution",
    )
    a.add_argument(
        "--perturb-with-adapter",
        action="store_true",
        help="run the perturbation check on the model with --adapter loaded (a model that retrieves "
        "well, so the accuracy change is visible); the attribution stays that of the base model",
    )
    a.add_argument("--out", required=True, help="output folder")
    for command in sub.choices.values():
        command.add_argument(
            "--debug",
            action="store_true",
            help="show the traceback of a usage error too (other errors always show theirs)",
        )
    # attribution scores the NLL of the answer: pre-filled replies make that the number's tokens alone
    # (under longeval the reply also restates the key); docs/analysis.md was measured this way
    a.set_defaults(func=cmd_analyze, prompt_format="chat_prefill")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return args.func(args)
    except SealUsageError as err:  # bad input: one line; anything else is a bug and keeps its traceback
        if getattr(args, "debug", False):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
