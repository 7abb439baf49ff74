"""Sharing SEAL adapters on the Hugging Face Hub with a model card that says what they are.

:func:`push_to_hub` (also ``seal_peft.push_to_hub``) uploads a SEAL ``PeftModel`` or a saved SEAL adapter
folder: the adapter files (``adapter_config.json``, ``adapter_model.safetensors``, one sub-folder per
extra adapter) plus a ``README.md`` model card with ``library_name: peft``, the base model, the tags
``seal`` / ``seal-peft`` / ``peft``, each adapter's granularity and target modules, a description of the
training data and how to load it (``import seal_peft`` first). :func:`model_card` returns the card text.

It is an explicit function on ``huggingface_hub.HfApi.upload_folder``, not a change of
``PeftModel.push_to_hub``: ``import seal_peft`` leaves PEFT, transformers and huggingface_hub as they are,
so ``model.push_to_hub(repo_id)`` is transformers' stock method for every PEFT model, SEAL included (in
transformers 5 it writes a generic ``library_name: transformers`` card over PEFT's, which says nothing
about the adapter and hides the ``import seal_peft`` step).

Loading by repo id is plain PEFT (``PeftModel.from_pretrained(base, "org/name")``) and works offline
from the local Hub cache with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any

from torch import nn

from ..tuner.config import SealConfig

SEAL_TAGS = ("seal", "seal-peft", "peft", "long-context", "retrieval")
_PAPER = "https://arxiv.org/abs/2501.15225"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _seal_configs(model: nn.Module) -> dict[str, Any]:
    configs = getattr(model, "peft_config", None) or {}
    return {name: cfg for name, cfg in configs.items() if isinstance(cfg, SealConfig)}


def is_seal_model(model: nn.Module) -> bool:
    """True if ``model`` is a ``PeftModel`` holding at least one SEAL adapter."""
    return bool(_seal_configs(model))


def _hub_base_model(name: str | None) -> str | None:
    """``name`` if it looks like a Hub repo id (not a local folder); the Hub validates ``base_model``."""
    if not name or os.path.exists(name) or not _REPO_ID.match(name):
        return None
    return name


def _embedded_key(path: str | None):
    """``(key, spec)`` if ``path`` is the local cache folder of one of seal-peft's embedded models."""
    if not path:
        return None
    from ..models import EMBEDDED_MODELS

    name = os.path.basename(os.path.normpath(path))
    for key, spec in EMBEDDED_MODELS.items():
        if name == spec.name:
            return key, spec
    return None


def _num_scales(model: nn.Module, adapter: str) -> int:
    suffix = f"seal_scale.{adapter}"
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith(suffix))


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _folder_adapters(folder: str | os.PathLike) -> dict[str, str]:
    """``{adapter name: sub-folder}`` of the SEAL adapters saved in ``folder`` ("" = the ``default`` one).

    Where ``save_pretrained`` puts them: the ``default`` adapter at the root, every other adapter in a
    sub-folder named after it. Each is validated (:func:`seal_peft.check_adapter_dir`): SEAL, complete
    weight file, no pickle.
    """
    from ..loading import check_adapter_dir

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(
            f"{folder!r} is not a folder. Pass a PeftModel with SEAL adapters or a folder written by "
            f"model.save_pretrained(folder) / seal_peft.save_adapter(model, folder)."
        )
    subs = [""] + sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    found = {}
    for sub in subs:
        path = os.path.join(folder, sub)
        if os.path.isfile(os.path.join(path, ADAPTER_FILES[0])):
            check_adapter_dir(path)
            found[sub or "default"] = sub
    if not found:
        raise ValueError(
            f"{folder!r} holds no SEAL adapter (no {ADAPTER_FILES[0]} at its root or in a sub-folder). Save one "
            f"with model.save_pretrained(folder) or seal_peft.save_adapter(model, folder)."
        )
    return found


def _folder_entries(folder: str | os.PathLike) -> dict[str, tuple[SealConfig, int]]:
    """``{adapter name: (config, number of scales)}`` read from a saved adapter folder."""
    import inspect

    from safetensors import safe_open

    known = set(inspect.signature(SealConfig.__init__).parameters) - {"self"}
    entries = {}
    for name, sub in _folder_adapters(folder).items():
        path = os.path.join(os.fspath(folder), sub)
        with open(os.path.join(path, ADAPTER_FILES[0]), encoding="utf-8") as f:
            config = SealConfig(**{k: v for k, v in json.load(f).items() if k in known})
        count = 0
        with safe_open(os.path.join(path, ADAPTER_FILES[1]), framework="pt") as f:
            for key in f.keys():
                if ".seal_scale" in key:
                    n = 1
                    for dim in f.get_slice(key).get_shape():
                        n *= dim
                    count += n
        entries[name] = (config, count)
    return entries


def model_card(
    model_or_folder: nn.Module | str | os.PathLike,
    repo_id: str | None = None,
    *,
    training_data: str | None = None,
    base_model: str | None = None,
    tags: list[str] | None = None,
) -> str:
    """The ``README.md`` text (YAML metadata + markdown) describing SEAL adapters.

    Args:
        model_or_folder: a ``PeftModel`` with SEAL adapter(s), or a folder they were saved to
            (``save_pretrained`` / ``seal_peft.save_adapter``).
        repo_id: where it will live (used in the loading snippet).
        training_data: one or a few sentences on the data the scales were trained on (the paper's
            recipe: ~50 synthetic samples in the task's format). Recorded as given.
        base_model: Hub id of the base model; default: the adapter config's ``base_model_name_or_path``
            when it is a Hub id (a local path is mentioned in the text but not as metadata).
        tags: extra tags, added to ``seal``, ``seal-peft``, ``peft``, ``long-context``, ``retrieval``.
    """
    from huggingface_hub import ModelCard, ModelCardData

    if isinstance(model_or_folder, (str, os.PathLike)):
        entries = _folder_entries(model_or_folder)
    else:
        model = model_or_folder
        entries = {name: (cfg, _num_scales(model, name)) for name, cfg in _seal_configs(model).items()}
        if not entries:
            raise ValueError(
                f"model_card() needs a PeftModel with SEAL adapters; {type(model).__name__} has none. Create it "
                f"with peft.get_peft_model(model, seal_peft.SealConfig(...)) after `import seal_peft`."
            )
    configs = {name: cfg for name, (cfg, _) in entries.items()}
    first = next(iter(configs.values()))
    recorded_base = getattr(first, "base_model_name_or_path", None)
    hub_base = base_model or _hub_base_model(recorded_base)
    all_tags = list(dict.fromkeys([*SEAL_TAGS, *(tags or [])]))
    if hub_base:
        all_tags.append(f"base_model:adapter:{hub_base}")
    data = ModelCardData(library_name="peft", tags=all_tags, pipeline_tag="text-generation")
    if hub_base:
        data.base_model = hub_base
    repo = repo_id or "<repo_id>"
    base_ref = hub_base or recorded_base or "<base model>"
    load_base = (
        f'base = AutoModelForCausalLM.from_pretrained("{base_ref}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{base_ref}")'
    )
    base_note = "" if hub_base else " (a local path when the adapter was saved)"
    embedded = None if hub_base else _embedded_key(recorded_base)
    if embedded:  # seal-peft's embedded model (converted from a GGUF wheel into a local cache)
        key, spec = embedded
        base_ref = spec.name
        base_note = f" — seal-peft's embedded model `{key}`: {spec.description}"
        load_base = f'from seal_peft.models import load_model\nbase, tokenizer = load_model("{key}")  # {spec.install}'

    rows = []
    for name, cfg in configs.items():
        targets = cfg.target_modules
        targets = (
            ", ".join(f"`{t}`" for t in sorted(targets))
            if isinstance(targets, (set, list))
            else f"`{targets}`"
        )
        kind = (
            "SEAL-H (one scale per attention head)"
            if cfg.granularity == "head"
            else ("SEAL-C (one scale per channel)")
        )
        folder = "(repo root)" if name == "default" else f"`{name}/`"
        rows.append(f"| `{name}` | {folder} | {kind} | {targets} | {entries[name][1]:,} |")
    extra = [n for n in configs if n != "default"]
    # Extra adapters live in sub-folders. Load them from a local snapshot: PEFT 0.21's
    # load_adapter(repo, subfolder=...) looks for <sub>/<sub>/... when HF_HUB_OFFLINE=1.
    load_extra = ""
    if extra:
        load_extra = f'\nfrom huggingface_hub import snapshot_download\nlocal = snapshot_download("{repo}")\n'
        load_extra += "".join(f'model.load_adapter(f"{{local}}/{n}", adapter_name="{n}")\n' for n in extra)
    description = training_data or (
        "Not described by the uploader. SEAL adapters are usually trained on ~50 synthetic samples in the "
        "format of the target task (e.g. line retrieval) whose content is random."
    )
    text = f"""
# SEAL adapter for {base_ref}

A [SEAL]({_PAPER}) (Scaling to Emphasize Attention for Long-context retrieval) adapter: learned scales
that multiply the input of every attention output projection, i.e. one scale per attention head
(SEAL-H) or per channel (SEAL-C). It changes how much each head contributes, nothing else: a few
hundred to a few thousand parameters, and it can be merged into the base weights at no inference cost.
Made with [seal-peft](https://pypi.org/project/seal-peft/), a native PEFT method.

| adapter | folder | granularity | target modules | trainable scales |
|---|---|---|---|---|
{chr(10).join(rows)}

- Base model: `{base_ref}`{base_note}
- PEFT type: `SEAL`

## Training data

{description}

## How to load

`import seal_peft` **before** loading: it registers the SEAL method with PEFT (PEFT alone does not
know `peft_type: SEAL`).

```python
import seal_peft  # registers SEAL with PEFT
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

{load_base}
model = PeftModel.from_pretrained(base, "{repo}")
{load_extra}```

Deploy without seal-peft: `model.merge_and_unload(safe_merge=True).save_pretrained("merged")` (or
`seal-peft merge --model BASE --adapter {repo} --out merged`) writes a plain transformers
checkpoint that vLLM, TGI or llama.cpp load like the base model.
"""
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + text).content


def _library_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("seal-peft")
    except PackageNotFoundError:  # run from a source tree without installing
        return None


def push_to_hub(
    model_or_folder: nn.Module | str | os.PathLike,
    repo_id: str,
    *,
    training_data: str | None = None,
    base_model: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    **save_kwargs: Any,
):
    """Upload SEAL adapter(s) and a SEAL model card to ``repo_id`` in one commit; return the ``CommitInfo``.

    ``model_or_folder``: a ``PeftModel`` with SEAL adapters (saved with ``save_pretrained(**save_kwargs)``,
    e.g. ``selected_adapters=["task_a"]``), or a folder it was saved to (its adapter files are uploaded:
    ``adapter_config.json`` + ``adapter_model.safetensors`` at the root and in each adapter sub-folder;
    other files in it are not, and the folder is not changed). ``README.md`` is :func:`model_card` of
    exactly the uploaded adapters; it replaces a card already in the repository.

    Through ``huggingface_hub.HfApi``: ``create_repo(exist_ok=True)``, ``create_branch`` for a
    ``revision`` that is not a PR, then ``upload_folder``. Everything is checked before the first request.
    """
    from huggingface_hub import HfApi

    is_folder = isinstance(model_or_folder, (str, os.PathLike))
    if is_folder and save_kwargs:
        raise TypeError(
            f"push_to_hub(folder, ...) got {', '.join(sorted(save_kwargs))}: save_pretrained keywords apply only "
            f"when passing a model; a folder is uploaded as saved (save the adapters you want with "
            f"model.save_pretrained(folder, selected_adapters=[...]), or pass the model)."
        )
    if not is_folder and not is_seal_model(model_or_folder):
        raise ValueError(
            f"seal_peft.push_to_hub needs a PeftModel with SEAL adapters or a saved SEAL adapter folder; got a "
            f"{type(model_or_folder).__name__} without one. Other PEFT models: use model.push_to_hub(repo_id)."
        )
    with tempfile.TemporaryDirectory() as tmp:
        if is_folder:
            for sub in _folder_adapters(model_or_folder).values():
                os.makedirs(os.path.join(tmp, sub), exist_ok=True)
                for name in ADAPTER_FILES:
                    shutil.copyfile(os.path.join(model_or_folder, sub, name), os.path.join(tmp, sub, name))
        else:
            model_or_folder.save_pretrained(tmp, **save_kwargs)
        readme = model_card(tmp, repo_id, training_data=training_data, base_model=base_model, tags=tags)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(readme)
        api = HfApi(library_name="seal-peft", library_version=_library_version())
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        if revision is not None and not create_pr:
            api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=commit_message or "Upload SEAL adapter",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )
