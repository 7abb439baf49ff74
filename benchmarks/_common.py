"""Shared helpers of the speed/memory benchmarks (not a public API).

Models, synthetic samples with the project's answer-only labels, adapter configs for SEAL/LoRA/IA3,
timing statistics and peak-memory measurement (peak RSS on CPU, ``max_memory_allocated`` on CUDA).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

# ---------------------------------------------------------------------------------------------- models

#: a tiny random Llama (4 heads of 16 channels, 2 layers): Python/launch overhead dominates its timings
TINY_LLAMA = dict(
    model_type="llama",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    tie_word_embeddings=False,
)


def config_from_dict(spec: dict[str, Any]):
    """A transformers config from a plain dict with a ``model_type`` key."""
    from transformers import AutoConfig

    spec = dict(spec)
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def load_benchmark_model(name: str, dtype: torch.dtype, attn_implementation: str = "sdpa", seed: int = 0):
    """``(model, description)`` in eval mode: ``"tiny"`` (random tiny Llama), ``"smollm2"`` (embedded
    SmolLM2-135M-Instruct) or any HF id/path understood by :func:`seal_peft.models.load_model`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if name == "tiny":
        model = AutoModelForCausalLM.from_config(
            config_from_dict(TINY_LLAMA), dtype=dtype, attn_implementation=attn_implementation
        )
        return model.eval(), "tiny random Llama (2 layers, 4 heads x 16, hidden 64)"
    from seal_peft.models import load_model

    model, _ = load_model(
        None if name == "smollm2" else name, dtype=dtype, attn_implementation=attn_implementation
    )
    cfg = model.config
    desc = (
        f"{getattr(cfg, '_name_or_path', name) or name} ({cfg.num_hidden_layers} layers, "
        f"{cfg.num_attention_heads} heads x {getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads})"
    )
    return model.eval(), desc


def parse_dtype(name: str) -> torch.dtype:
    aliases = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
    dtype = getattr(torch, aliases.get(name, name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use bfloat16, float32 or float16")
    return dtype


# -------------------------------------------------------------------------------------------- adapters

ADAPTERS = ("seal-h", "seal-c", "lora", "ia3")


def adapter_config(kind: str):
    """The PEFT config of one compared method.

    ``seal-h`` / ``seal-c``: SEAL per head / per channel on ``o_proj``. ``lora``: the paper's SEAL-L
    baseline, LoRA r=4 (alpha 8, no dropout) on q, k, v, o. ``ia3``: PEFT's own IA3 with its default
    targets for the model type (Llama: k, v, down_proj).
    """
    from peft import IA3Config, LoraConfig

    import seal_peft

    if kind == "seal-h":
        return seal_peft.SealConfig(granularity="head")
    if kind == "seal-c":
        return seal_peft.SealConfig(granularity="channel")
    if kind == "lora":
        return LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        )
    if kind == "ia3":
        return IA3Config(task_type="CAUSAL_LM")
    raise ValueError(f"unknown adapter {kind!r}; choose from {ADAPTERS}")


def _paper_lr(granularity: str) -> float:
    from seal_peft.training import RECIPES

    return RECIPES["paper"][granularity].learning_rate


#: optimizer learning rates of the timed training steps: SEAL's from the paper's recipe
#: (``seal_peft.training.RECIPES``), LoRA's (the paper's SEAL-L) and IA3's
LEARNING_RATE = {"seal-h": _paper_lr("head"), "seal-c": _paper_lr("channel"), "lora": 2e-4, "ia3": 1e-2}


def randomize_seal_scales(peft_model, seed: int = 0, spread: float = 0.2) -> None:
    """Set every SEAL scale to ``1 + spread * N(0, 1)`` (a trained-looking, non-identity adapter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "seal_scale" in name:
                p.copy_(1.0 + spread * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------------------------- data


def answer_sample(
    length: int, vocab_size: int, answer_tokens: int = 16, seed: int = 0
) -> dict[str, list[int]]:
    """A SEAL-shaped training sample of ``length`` random tokens: a long prompt (labels -100) and a
    short answer at the end (the only supervised tokens), like the line-retrieval samples."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (length,), generator=g).tolist()
    n = min(answer_tokens, length - 1)
    labels = [-100] * (length - n) + ids[length - n :]
    return {"input_ids": ids, "labels": labels}


# ------------------------------------------------------------------------------------------- timing


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and count of a list of timings/ratios."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def timed(fn: Callable[[], Any], device: torch.device | None = None) -> float:
    """Seconds one call of ``fn`` takes (synchronising CUDA around it)."""
    sync = device is not None and device.type == "cuda"
    if sync:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def timed_steps(fn: Callable[[], Any], device: torch.device | None, warmup: int, steps: int) -> list[float]:
    """Run ``fn`` ``warmup + steps`` times; the seconds of the last ``steps`` calls (see ``timed``)."""
    times = [timed(fn, device) for _ in range(warmup + steps)]
    return times[warmup:]


def fmt_ratio(s: dict[str, float]) -> str:
    return f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"


def fmt_ms(s: dict[str, float]) -> str:
    return f"{s['median'] * 1e3:.1f} [{s['min'] * 1e3:.1f}-{s['max'] * 1e3:.1f}]"


# ------------------------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a block of work, in MiB above the memory in use when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU (Linux): the
    kernel's peak resident set size (VmHWM) after resetting it through ``/proc/self/clear_refs``;
    where that is impossible, ``resource.getrusage`` maxrss (then the peak can include earlier work;
    ``exact`` says which). Measure each variant in a fresh process for CPU numbers you compare: a
    process that ran other work first can reuse memory its allocator kept, hiding part of the peak.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.exact = True

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        self.start = (_status_kb("VmRSS") or 0) * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.exact = False
        return self

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        hwm = _status_kb("VmHWM") if self.exact else None
        if hwm is not None:
            return hwm * 1024
        import resource

        scale = 1 if platform.system() == "Darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def peak_mib(self) -> float:
        """Peak so far minus the memory in use at ``__enter__``."""
        return (self.peak_bytes() - self.start) / 2**20

    def __exit__(self, *exc: Any) -> None:
        return None


def saved_for_backward_bytes(model: torch.nn.Module, forward: Callable[[], Any]) -> tuple[int, Any]:
    """Bytes of the activations autograd keeps for the backward of ``forward()`` (and its result).

    Counts every distinct storage packed by autograd during the call, except the model's own
    parameters: a deterministic measure of what a method keeps alive between forward and backward,
    independent of the allocator. (Activation checkpointing packs through its own hooks, so it is
    not measured this way.)
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return sum(seen.values()), out


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "python": platform.python_version(),
    }
    try:
        import peft
        import transformers

        info["transformers"] = transformers.__version__
        info["peft"] = peft.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        info["cpu"] = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        info["cpu_count"] = os.cpu_count()
    return info


def write_json(path: str | None, record: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
