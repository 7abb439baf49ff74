"""Sharing SEAL adapters on the Hugging Face Hub with a model card that says what they are.

``model.push_to_hub(repo_id)`` on a SEAL ``PeftModel`` (after ``import seal_peft``) and
:func:`push_to_hub` upload the adapter files (``adapter_config.json``, ``adapter_model.safetensors``,
one sub-folder per extra adapter) plus a ``README.md`` model card with ``library_name: peft``, the
base model, the tags ``seal`` / ``seal-peft`` / ``peft``, each adapter's granularity and target
modules, a description of the training data and how to load it (``import seal_peft`` first).

Why not transformers' ``push_to_hub`` as is: in transformers 5 it replaces the card PEFT writes with a
generic ``library_name: transformers`` card (``create_and_tag_model_card``), which tells a reader
nothing about the adapter and hides the ``import seal_peft`` step; PEFT models other than SEAL keep
the stock behaviour.

Loading by repo id is plain PEFT (``PeftModel.from_pretrained(base, "org/name")``) and works offline
from the local Hub cache with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

from torch import nn

SEAL_TAGS = ("seal", "seal-peft", "peft", "long-context", "retrieval")
_PAPER = "https://arxiv.org/abs/2501.15225"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _seal_configs(model: nn.Module) -> dict[str, Any]:
    from .config import SealConfig

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
    from .models import EMBEDDED_MODELS

    name = os.path.basename(os.path.normpath(path))
    for key, spec in EMBEDDED_MODELS.items():
        if name == spec.name:
            return key, spec
    return None


def _num_scales(model: nn.Module, adapter: str) -> int:
    suffix = f"seal_scale.{adapter}"
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith(suffix))


def model_card(
    model: nn.Module,
    repo_id: str | None = None,
    *,
    training_data: str | None = None,
    base_model: str | None = None,
    tags: list[str] | None = None,
) -> str:
    """The ``README.md`` text (YAML metadata + markdown) describing the SEAL adapters of ``model``.

    Args:
        model: a ``PeftModel`` with SEAL adapter(s).
        repo_id: where it will live (used in the loading snippet).
        training_data: one or a few sentences on the data the scales were trained on (the paper's
            recipe: ~50 synthetic samples in the task's format). Recorded as given.
        base_model: Hub id of the base model; default: the adapter config's ``base_model_name_or_path``
            when it is a Hub id (a local path is mentioned in the text but not as metadata).
        tags: extra tags, added to ``seal``, ``seal-peft``, ``peft``, ``long-context``, ``retrieval``.
    """
    from huggingface_hub import ModelCard, ModelCardData

    configs = _seal_configs(model)
    if not configs:
        raise ValueError(
            f"model_card() needs a PeftModel with SEAL adapters; {type(model).__name__} has none. Create it with "
            f"peft.get_peft_model(model, seal_peft.SealConfig(...)) after `import seal_peft`."
        )
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
        rows.append(f"| `{name}` | {folder} | {kind} | {targets} | {_num_scales(model, name):,} |")
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


def push_to_hub(
    model: nn.Module,
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
    """Upload the SEAL adapter(s) of ``model`` and a SEAL model card to ``repo_id``; return the commit.

    One commit through ``huggingface_hub.HfApi``: ``create_repo(exist_ok=True)``, then
    ``create_commit`` with the files ``model.save_pretrained`` writes plus ``README.md`` (see
    :func:`model_card`; an existing card in the repo is replaced). ``save_kwargs`` go to
    ``save_pretrained`` (e.g. ``selected_adapters=["task_a"]``).
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from . import __version__

    readme = model_card(model, repo_id, training_data=training_data, base_model=base_model, tags=tags)
    api = HfApi(library_name="seal-peft", library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        save_kwargs.pop("max_shard_size", None)  # transformers' argument; adapters are never sharded
        model.save_pretrained(tmp, **save_kwargs)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(readme)
        operations = []
        for root, _, files in os.walk(tmp):
            for file in sorted(files):
                path = os.path.join(root, file)
                in_repo = os.path.relpath(path, tmp).replace(os.sep, "/")
                with open(path, "rb") as fh:
                    operations.append(CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=fh.read()))
        if revision is not None and not create_pr:
            api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message or "Upload SEAL adapter",
            commit_description=commit_description,
            token=token,
            create_pr=create_pr,
            revision=revision,
        )


_ORIGINAL_PUSH = "_seal_original_push_to_hub"


def install_push_to_hub() -> None:
    """Route ``PeftModel.push_to_hub`` to :func:`push_to_hub` for models with SEAL adapters (idempotent).

    Other PEFT models call the original method unchanged.
    """
    from peft import PeftModel

    if hasattr(PeftModel, _ORIGINAL_PUSH):
        return
    original = PeftModel.push_to_hub

    def seal_aware_push_to_hub(self, repo_id: str, *args: Any, **kwargs: Any):
        if is_seal_model(self):
            return push_to_hub(self, repo_id, *args, **kwargs)
        kwargs.pop("training_data", None)
        return original(self, repo_id, *args, **kwargs)

    seal_aware_push_to_hub.__doc__ = (original.__doc__ or "") + (
        "\n\nFor SEAL adapters (seal_peft installed): see seal_peft.hub.push_to_hub (SEAL model card; extra "
        "keyword training_data=...)."
    )
    setattr(PeftModel, _ORIGINAL_PUSH, original)
    PeftModel.push_to_hub = seal_aware_push_to_hub
