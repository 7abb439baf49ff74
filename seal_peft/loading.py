"""Loading and saving SEAL adapters with checks that turn PEFT's low-level errors into actionable ones.

- :func:`check_adapter_dir` validates a local adapter folder (config values, complete weight file,
  no pickle unless allowed) before anything touches a model.
- :func:`from_pretrained` is ``PeftModel.from_pretrained`` plus that validation, and it is
  all-or-nothing: if loading fails, the base model is left exactly as it was.
- :func:`save_adapter` is ``save_pretrained`` that never leaves a half-written adapter behind.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
import warnings
from typing import Any

from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"


def _validate_config_values(config: dict, config_path: str) -> None:
    """Build a ``SealConfig`` from the file's known keys so a bad value names the file and the field.

    Unknown keys are left to PEFT, which ignores them with a warning (forward compatibility with
    configs written by newer versions), exactly as for its own methods.
    """
    from .tuner.config import SealConfig

    known = set(inspect.signature(SealConfig.__init__).parameters) - {"self"}
    try:
        SealConfig(**{k: v for k, v in config.items() if k in known})
    except (TypeError, ValueError) as err:
        cls = TypeError if isinstance(err, TypeError) else ValueError
        raise cls(f"{config_path}: {err} Fix the value in the file, or save the adapter again.") from err


def check_adapter_dir(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict:
    """Validate a local SEAL adapter folder and return its parsed config.

    Raises ``ValueError``/``TypeError`` naming the problem and how to fix it: a missing or invalid
    ``adapter_config.json``, a non-SEAL adapter, a config value SEAL rejects, a truncated or corrupted
    ``adapter_model.safetensors``, or a pickled ``adapter_model.bin`` without ``allow_pickle=True``
    (a pickle can run code when it is loaded; nothing here unpickles it).
    """
    from safetensors import safe_open

    path = os.fspath(path)
    config_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise ValueError(
            f"{path!r} is not a complete PEFT adapter folder: {ADAPTER_CONFIG} is missing (an interrupted save "
            f"writes it last). Save the adapter again."
        )
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}); re-save the adapter.") from err
    if not isinstance(config, dict):
        raise ValueError(
            f"{config_path} holds a JSON {type(config).__name__}, not an object; re-save the adapter."
        )
    if "peft_type" not in config:
        raise ValueError(
            f"{config_path} has no 'peft_type'; it is not a PEFT adapter config. A SEAL adapter's config has "
            f'"peft_type": "SEAL"; re-save the adapter.'
        )
    if config["peft_type"] != "SEAL":
        raise ValueError(
            f"{path!r} holds a {config['peft_type']!r} adapter, not a SEAL one; load it with "
            f"peft.PeftModel.from_pretrained."
        )
    _validate_config_values(config, config_path)
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(path, PICKLE_WEIGHTS)):
            if allow_pickle:
                return config  # PEFT loads it with torch.load(weights_only=True)
            raise ValueError(
                f"{path!r} holds only a pickled {PICKLE_WEIGHTS}. seal_peft does not load pickle files by default: "
                f"unpickling can run arbitrary code. Ask for (or convert to) {ADAPTER_WEIGHTS}, or pass "
                f"allow_pickle=True if you trust the file (PEFT then reads it with torch.load(weights_only=True))."
            )
        raise ValueError(
            f"{path!r} has no {ADAPTER_WEIGHTS}; the adapter was not saved completely. Save it again with "
            f"seal_peft.save_adapter(model, path) or model.save_pretrained(path)."
        )
    try:
        with safe_open(weights, framework="pt") as f:
            for key in f.keys():  # SEAL adapters are tiny: read everything to catch short files
                f.get_tensor(key)
    except Exception as err:  # safetensors raises its own error types for bad headers / short files
        raise ValueError(
            f"{weights} is truncated or corrupted ({err}). Re-download or re-save the adapter."
        ) from err
    return config


def _undo_injection(
    model: nn.Module, modules_before: set[int], requires_grad: dict[str, bool], had_config: bool
):
    """Put back every module PEFT wrapped during a failed load, and the parameters' requires_grad."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    for name, module in list(model.named_modules()):
        if id(module) in modules_before or not name:
            continue
        if isinstance(module, BaseTunerLayer):
            original = module.get_base_layer()
        elif isinstance(module, AuxiliaryTrainingWrapper):
            original = module.original_module
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, original)
    if not had_config and "peft_config" in model.__dict__:
        del model.peft_config
    for name, param in model.named_parameters():
        if name in requires_grad:
            param.requires_grad_(requires_grad[name])


def from_pretrained(
    model: nn.Module,
    adapter: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    *,
    allow_pickle: bool = False,
    **kwargs: Any,
):
    """Load a SEAL adapter onto ``model`` and return the ``PeftModel``.

    Same as ``peft.PeftModel.from_pretrained`` (which also works after ``import seal_peft``), but:

    - a local adapter folder is validated first (:func:`check_adapter_dir`), so a corrupted file, a bad
      config value or a non-SEAL adapter gives a clear error before anything touches the model;
    - a pickled ``adapter_model.bin`` is refused unless ``allow_pickle=True``;
    - if loading fails anyway (e.g. the adapter does not fit the model), ``model`` is restored: PEFT
      would leave it wrapped with SEAL layers and frozen.

    Hub ids are passed through to PEFT unchanged (PEFT prefers safetensors there too).
    """
    from peft import PeftModel

    if os.path.isdir(os.fspath(adapter)):
        sub = kwargs.get("subfolder")
        check_adapter_dir(
            os.path.join(os.fspath(adapter), sub) if sub else adapter, allow_pickle=allow_pickle
        )
    modules_before = {id(m) for m in model.modules()}
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    had_config = "peft_config" in model.__dict__
    try:
        return PeftModel.from_pretrained(
            model, adapter, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs
        )
    except BaseException:
        _undo_injection(model, modules_before, requires_grad, had_config)
        raise


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def save_adapter(model: nn.Module, path: str | os.PathLike, **kwargs: Any) -> None:
    """``model.save_pretrained(path, **kwargs)`` that never leaves a half-written adapter at ``path``.

    PEFT writes the weight file and then the config straight into ``path``; an interruption (crash,
    full disk, killed job) leaves a truncated file or a new weight file next to the old config. Here
    everything is written to a temporary folder next to ``path`` first and checked by reading it back;
    then, if ``path`` does not exist, the folder is renamed into place (atomic). If it exists (e.g. a
    folder holding other files too), each adapter's old ``adapter_config.json`` is removed first, the
    new files are moved in one by one (each move atomic) and the configs go last: at every moment the
    folder holds the complete old adapter, the complete new one, or no config at all, which every
    loader refuses loudly. Other files in ``path`` are left alone.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(path):
        raise ValueError(f"{path!r} is a file; pass a folder to save the adapter into.")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if not kwargs.get("is_main_process", True):
        return  # like save_pretrained: only the main process writes
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        card = os.path.join(path, "README.md")
        if os.path.isfile(card):  # PEFT updates an existing model card rather than replacing it
            shutil.copy2(card, os.path.join(tmp, "README.md"))
        model.save_pretrained(tmp, **kwargs)
        configs = []
        for dirpath, _, files in os.walk(tmp):
            if ADAPTER_CONFIG in files:
                configs.append(os.path.relpath(dirpath, tmp))
                if ADAPTER_WEIGHTS in files:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        check_adapter_dir(dirpath)
        _fsync_tree(tmp)
        if not os.path.exists(path):
            os.rename(tmp, path)
            return
        for rel in configs:  # invalidate the old adapters before their weights are replaced
            old = os.path.join(path, rel, ADAPTER_CONFIG)
            if os.path.exists(old):
                os.remove(old)
        moves = []
        for dirpath, _, files in os.walk(tmp):
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), tmp)
                moves.append(rel)
        moves.sort(key=lambda rel: os.path.basename(rel) == ADAPTER_CONFIG)  # configs last
        for rel in moves:
            os.makedirs(os.path.dirname(os.path.join(path, rel)), exist_ok=True)
            os.replace(os.path.join(tmp, rel), os.path.join(path, rel))
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
