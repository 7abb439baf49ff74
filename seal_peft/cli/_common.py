"""Pieces shared by the ``seal-peft`` commands: option types, model/data loading from the options, usage errors."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import SealUsageError
from ..models import resolve_dtype

TASKS = ("line", "kv", "needle")

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # transformers' device_map

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
    from ..extension import parse_extend

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
    from .. import data

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
    from ..models import resolve_device

    if getattr(args, "device_map", None):
        return {"device_map": args.device_map}
    return {"device": resolve_device(getattr(args, "device", None))}

def _load_model(args, dtype):
    """The model of ``--model`` with dtype ``dtype``, placed as ``--device`` / ``--device-map`` say."""
    return _load_base(args.model, dtype, _placement(args))

def _load_base(model_name, dtype, placement):
    from ..models import load_model

    with _user_input(f"--model {model_name or 'smollm2 (the embedded default)'}", OSError, ImportError):
        return load_model(model_name, dtype=dtype, **placement)

def _recipe_arg(p: argparse.ArgumentParser) -> None:
    from ..training import RECIPES

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
    from ..training import recipe_for_model

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

def _apply_extend(model, tokenizer, extend):
    """``--extend METHOD:FACTOR[:key=value,...]``: extend the model's context (seal_peft.extension) and let
    the tokenizer (and the data generators) accept the extended length."""
    from ..extension import extend_context, extended_context_length, parse_extend

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

    from ..data._common import dataset_metadata
    from ..errors import SealUsageError

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

    from ..data._common import dataset_metadata, tokenizer_fingerprint

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
    from ..extension import from_pretrained  # applies the extension recorded with the adapter

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

