"""Shared machinery of the analysis: a SEAL-H *probe* adapter, answer scoring, and prefix reuse.

The probe is an ordinary SEAL-H adapter (all scales 1.0, so the model is unchanged) injected with
``get_peft_model`` or ``add_adapter``. Its scales are the handles of the analysis: their gradient is
the first-order attribution of every head at once, and setting some of them in place to 0 (or 1.5)
is an exact perturbation of those heads. Nothing in the attention code is patched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..evaluation.generation import as_records
from ..models import accepts_logits_to_keep, input_device
from ..tuner.config import SealConfig
from ..tuner.layer import SealLayer

PROBE = "seal_probe"

#: a ``.<digits>.`` component of a module name; the last one is the decoder-layer index
_INDEX = re.compile(r"\.(\d+)(?=\.)")

Head = tuple[int, int]


# ----------------------------------------------------------------------------------------------- data
@dataclass
class Prepared:
    """One record ready for a forward pass: ids, labels, how many logits to keep, which labels count
    for accuracy."""

    input_ids: torch.Tensor  # [1, T]
    labels: torch.Tensor  # [T]
    keep: int  # positions whose logits are needed (the answer is at the end)
    acc_count: int  # supervised tokens (from the first) that must all be argmax-correct


def as_record_list(data: Any, what: str = "analysis data") -> list[Mapping[str, Any]]:
    """``evaluation.as_records`` plus what the analysis needs: ``input_ids`` and ``labels`` of the same
    length, at least one supervised token each."""
    records = as_records(data, what, task="analyse")
    for i, r in enumerate(records):
        if "input_ids" not in r or "labels" not in r:
            raise ValueError(
                f"record {i} of the {what} has no 'input_ids'/'labels'; use records from seal_peft.data "
                "generators (labels = -100 except the answer tokens)"
            )
        if not any(int(t) != -100 for t in r["labels"]):
            raise ValueError(
                f"record {i} of the {what} has no supervised token (all labels are -100); the analysis "
                "measures the loss of the answer, so label the answer tokens"
            )
        if len(r["labels"]) != len(r["input_ids"]):
            raise ValueError(f"record {i}: labels and input_ids have different lengths")
    return records


def _accuracy_count(record: Mapping[str, Any], supervised: list[int], tokenizer: Any) -> int:
    """How many supervised tokens decide correctness.

    For a numeric answer and a tokenizer: the tokens up to the last one holding a digit (so the
    trailing ``.`` / end-of-turn do not count) - the teacher-forced twin of greedy decoding scored
    by the first integer. Otherwise every supervised token.
    """
    answer = record.get("answer")
    if tokenizer is None or answer is None or not str(answer).strip().strip("<>").isdigit():
        return len(supervised)
    last = 0
    for i, token in enumerate(supervised):
        if any(c.isdigit() for c in tokenizer.decode([token])):
            last = i + 1
    return last or len(supervised)


def prepare(records: Sequence[Mapping[str, Any]], tokenizer: Any, device: torch.device) -> list[Prepared]:
    out = []
    for r in records:
        ids = torch.as_tensor(list(r["input_ids"]), dtype=torch.long)
        labels = torch.as_tensor(list(r["labels"]), dtype=torch.long)
        sup = (labels != -100).nonzero().flatten()
        first = int(sup[0])
        if first == 0:
            raise ValueError("a record's first token is supervised; nothing precedes it to predict it")
        supervised = [int(labels[i]) for i in sup]
        out.append(
            Prepared(
                input_ids=ids[None].to(device),
                labels=labels,  # moved to the logits' device by answer_loss (device_map: the last layer's)
                keep=len(ids) - first + 1,
                acc_count=_accuracy_count(r, supervised, tokenizer),
            )
        )
    return out


def forward_logits(model: nn.Module, sample: Prepared, use_keep: bool) -> torch.Tensor:
    kwargs: dict[str, Any] = {"use_cache": False}
    if use_keep:
        kwargs["logits_to_keep"] = sample.keep
    return model(input_ids=sample.input_ids, **kwargs).logits


def answer_loss(logits: torch.Tensor, sample: Prepared) -> tuple[torch.Tensor, bool]:
    """Mean negative log-likelihood of the supervised tokens and teacher-forced correctness."""
    n = sample.input_ids.shape[1]
    k = logits.shape[1]
    pred = logits[0, :-1]
    if pred.dtype != torch.float64:
        pred = pred.float()  # fp16/bf16 logits: the loss in fp32
    target = sample.labels[n - k + 1 :].to(pred.device)
    mask = target != -100
    nll = nn.functional.cross_entropy(pred[mask], target[mask])
    hits = pred[mask].argmax(-1) == target[mask]
    return nll, bool(hits[: sample.acc_count].all())


# ----------------------------------------------------------------------------------------------- probe
@dataclass
class HeadLayout:
    """Which SEAL layer belongs to which decoder layer, and how many heads each has."""

    names: list[str]
    layer_ids: list[int]
    num_heads: list[int]

    @property
    def max_heads(self) -> int:
        return max(self.num_heads)

    def position(self, layer: int) -> int:
        try:
            return self.layer_ids.index(int(layer))
        except ValueError:
            raise ValueError(
                f"layer {layer} has no SEAL probe; the model's probed layers are {self.layer_ids[0]}.."
                f"{self.layer_ids[-1]}"
            ) from None

    def check_head(self, head: Head) -> tuple[int, int]:
        layer, h = int(head[0]), int(head[1])
        pos = self.position(layer)
        if not 0 <= h < self.num_heads[pos]:
            raise ValueError(
                f"head {h} of layer {layer} does not exist (the layer has {self.num_heads[pos]})"
            )
        return pos, h

    def all_heads(self) -> list[Head]:
        return [(lid, h) for lid, n in zip(self.layer_ids, self.num_heads) for h in range(n)]


def layer_index(name: str) -> tuple[str, int] | None:
    """``("model.layers", 12)`` for ``"model.layers.12.self_attn.o_proj"``; ``None`` without an index."""
    matches = list(_INDEX.finditer(name))
    if not matches:
        return None
    last = matches[-1]
    return name[: last.start()], int(last.group(1))


def layout_of(model: nn.Module, adapter_name: str) -> tuple[HeadLayout, list[SealLayer]]:
    names, ids, heads, modules = [], [], [], []
    for name, module in model.named_modules():
        if isinstance(module, SealLayer) and adapter_name in module.seal_scale:
            names.append(name)
            modules.append(module)
            heads.append(int(module.seal_scale[adapter_name].numel()))
    if not modules:
        raise ValueError(f"the model has no SEAL layer with adapter {adapter_name!r}")
    parsed = [layer_index(n) for n in names]
    if all(p is not None for p in parsed) and len({p[1] for p in parsed}) == len(parsed):
        ids = [p[1] for p in parsed]
    else:  # no layer index in the names: number the projections in model order
        ids = list(range(len(names)))
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    layout = HeadLayout([names[i] for i in order], [ids[i] for i in order], [heads[i] for i in order])
    return layout, [modules[i] for i in order]


def _is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


class SealProbe:
    """A SEAL-H adapter named ``"seal_probe"`` with every scale at 1.0, on a plain model or on a
    ``PeftModel`` holding SEAL adapters (their scales stay active and frozen; the probe multiplies).

    Use as a context manager: on exit the probe is removed and the model restored (modules,
    ``requires_grad`` flags, train/eval mode, active adapters).
    """

    def __init__(self, model: nn.Module, head_dim: int | None = None, target_modules: Any = None):
        from peft import get_peft_model

        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        self._was_training = model.training
        self._user_model = model
        config = SealConfig(granularity="head", head_dim=head_dim, target_modules=target_modules)
        if _is_peft_model(model):
            if any(type(c).__name__ != "SealConfig" for c in model.peft_config.values()):
                raise TypeError(
                    "head analysis works on a plain model or a PeftModel holding SEAL adapters; this one holds "
                    f"{sorted({type(c).__name__ for c in model.peft_config.values()})}. Call "
                    "merge_and_unload() first."
                )
            if any(isinstance(m, SealLayer) and m.merged for m in model.modules()):
                raise ValueError(
                    "the SEAL adapter is merged into the weights; call model.unmerge_adapter() before the "
                    "analysis (a merged layer ignores scales, including the probe's)"
                )
            self._previous = list(model.base_model.active_adapters)
            model.add_adapter(PROBE, config)
            model.base_model.set_adapter([*self._previous, PROBE])
            self.peft_model = model
        else:
            self._previous = None
            self.peft_model = get_peft_model(model, config, adapter_name=PROBE)
        for p in self.peft_model.parameters():
            p.requires_grad_(False)
        self.layout, self.modules = layout_of(self.peft_model, PROBE)
        self.params = [m.seal_scale[PROBE] for m in self.modules]
        for p in self.params:
            p.requires_grad_(True)
        self.peft_model.eval()
        self.use_keep = accepts_logits_to_keep(self.peft_model)
        self.device = input_device(self.peft_model)  # where the inputs go (device_map: the first layer)

    # -- scales
    def reset(self) -> None:
        with torch.no_grad():
            for p in self.params:
                p.fill_(1.0)

    def set_heads(self, heads: Iterable[Head], value: float) -> int:
        """Set the probe scale of ``heads`` to ``value``; returns the lowest layer id touched."""
        lowest = len(self.params)
        with torch.no_grad():
            for head in heads:
                pos, h = self.layout.check_head(head)
                self.params[pos][h] = float(value)
                lowest = min(lowest, pos)
        return self.layout.layer_ids[lowest] if lowest < len(self.params) else 0

    def gradients(self) -> np.ndarray:
        grid = np.full((len(self.params), self.layout.max_heads), np.nan)
        for i, p in enumerate(self.params):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            grid[i, : p.numel()] = g.detach().float().cpu().numpy()
        return grid

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    # -- lifecycle
    def close(self) -> None:
        model = self._user_model
        if self._previous is None:
            self.peft_model.unload()
        else:
            model.base_model.set_adapter(self._previous)
            model.delete_adapter(PROBE)
        for p, flag in self._flags:
            p.requires_grad_(flag)
        model.train(self._was_training)

    def __enter__(self) -> SealProbe:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------- prefix reuse
class _Replay(nn.Module):
    """Stands in for a decoder layer whose output is already known: returns it, computes nothing."""

    def __init__(self, original: nn.Module, output: Any):
        super().__init__()
        self._original = (original,)  # a tuple, so it is not registered as a submodule
        self._output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._output

    def __getattr__(self, name: str) -> Any:  # e.g. ``attention_type`` read by the model's loop
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"][0], name)


class PrefixReuse:
    """Skip the decoder layers below the lowest perturbed one.

    Perturbing a head of layer ``l`` cannot change the outputs of layers ``< l``, so after one
    recorded unperturbed forward, those layers are replaced (temporarily) by modules that return the
    recorded outputs. Halves the cost of single-head perturbations on average. Needs the decoder
    layers in one ``ModuleList`` that the model calls in order (all HF decoder LMs); ``enabled`` is
    False (plain forwards) when the SEAL layers do not sit in one.
    """

    def __init__(self, model: nn.Module, layout: HeadLayout, enabled: bool = True):
        self.container: nn.ModuleList | None = None
        self.outputs: dict[int, Any] = {}
        if not enabled:
            return
        parsed = [layer_index(n) for n in layout.names]
        if any(p is None for p in parsed) or len({p[0] for p in parsed}) != 1:
            return
        if [p[1] for p in parsed] != layout.layer_ids:  # several SEAL layers per decoder layer
            return
        try:
            container = model.get_submodule(parsed[0][0])
        except AttributeError:  # pragma: no cover
            return
        if isinstance(container, nn.ModuleList) and max(layout.layer_ids) < len(container):
            self.container = container

    @property
    def enabled(self) -> bool:
        return self.container is not None

    @contextmanager
    def recording(self) -> Iterator[None]:
        self.outputs = {}
        if self.container is None:
            yield
            return

        def hook(index: int):
            def store(module: nn.Module, args: Any, output: Any) -> None:
                self.outputs[index] = output

            return store

        handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(self.container)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def skip_below(self, layer_id: int) -> Iterator[None]:
        if self.container is None or not self.outputs or layer_id <= 0:
            yield
            return
        originals = {}
        try:
            for i in range(layer_id):
                originals[i] = self.container[i]
                self.container[i] = _Replay(originals[i], self.outputs[i])
            yield
        finally:
            for i, module in originals.items():
                self.container[i] = module
