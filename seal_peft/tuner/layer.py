"""The SEAL tuner layer: a learned scale on the input of an attention output projection.

For an output projection ``y = W x + b`` whose input ``x`` is the concatenation of the heads'
attention outputs (column ``h * head_dim + d`` belongs to head ``h``), SEAL computes
``y = W (s * x) + b`` where ``s`` is a per-channel vector built from the adapter's parameters:
SEAL-H repeats one scalar per head over that head's ``head_dim`` channels, SEAL-C has one scalar per
channel. Merging uses ``W (s * x) = (W diag(s)) x``: column ``j`` of ``W`` is multiplied by ``s_j``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

# Channels whose merged scale is smaller than this (in absolute value) cannot be restored accurately
# by division; their original weight values are kept aside at merge time and put back on unmerge.
UNMERGE_EPS = 1e-2
# Weight dtypes whose merge -> unmerge by division would round visibly (~1/2 ulp per cycle): with
# exact_unmerge (the default) the original weight is copied at merge time and put back on unmerge.
COPY_ON_MERGE_DTYPES = (torch.float16, torch.bfloat16)


# Weight dtypes a merge can fold scales into (float8 / float4 and integer weights are quantized).
MERGEABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_plain_tensor(weight: torch.Tensor) -> bool:
    """A dense ``Tensor`` / ``Parameter``, not a subclass (torchao quantized tensors, DTensor, ...)."""
    return type(weight) in (torch.Tensor, nn.Parameter) and type(weight.data) is torch.Tensor


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """Merge arithmetic runs in fp32, or fp64 for fp64 weights (fp32 would round them)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


class SealLayer(BaseTunerLayer):
    """Mixin holding the per-adapter SEAL scales of one output projection.

    Attributes:
        seal_scale: ``ParameterDict`` adapter name -> 1-D scale of length ``in_features // group``.
        seal_group: adapter name -> channels per scale (``head_dim`` for SEAL-H, 1 for SEAL-C).
        seal_exact_unmerge: adapter name -> keep a copy of a bf16/fp16 weight while merged
            (``SealConfig.exact_unmerge``).

    Merge state (what :meth:`unmerge` needs to restore the weight) lives in ``_seal_merge_state``:
    adapter name -> ``(vector, idx, buffer)``, where ``vector`` is a *copy* of the fp32 per-channel
    scale that was folded in, ``idx`` the channels whose original values are kept (``None``: the whole
    weight is kept), and ``buffer`` the name of a non-persistent buffer holding those original values
    (``None``: nothing kept by this merge). Buffers follow ``.to()`` (device and dtype) and never appear
    in a state dict; ``vector`` and ``idx`` follow the weight's device (``_apply``) and stay fp32/int64.
    """

    adapter_layer_names = ("seal_scale",)
    other_param_names = ("seal_group", "seal_exact_unmerge")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.seal_scale = nn.ParameterDict({})
        self.seal_group: dict[str, int] = {}
        self.seal_exact_unmerge: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # adapter -> (copy of the vector folded in, kept channels or None = whole weight, buffer name or None)
        self._seal_merge_state: dict[str, tuple[torch.Tensor, torch.Tensor | None, str | None]] = {}
        # set by SealModel while merge_and_unload runs: the layer is dropped after merging, never unmerged
        self._seal_merging_to_unload = False

        base = self.get_base_layer()
        if isinstance(base, Conv1D):
            self.is_conv1d = True
            self.in_features, self.out_features = base.weight.shape
        elif isinstance(base, nn.Linear):
            self.is_conv1d = False
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            raise TypeError(
                f"SEAL can only wrap a Linear (or GPT-2 style Conv1D) attention output projection, got "
                f"{type(base).__name__}. Point `target_modules` at the attention output projection "
                f"(e.g. 'self_attn.o_proj')."
            )

    def update_layer(
        self,
        adapter_name: str,
        group: int,
        init_weights: bool = True,
        inference_mode: bool = False,
        exact_unmerge: bool = True,
    ) -> None:
        """Create the scales of ``adapter_name``: one per ``group`` consecutive input channels."""
        if group <= 0 or self.in_features % group != 0:
            raise ValueError(
                f"SEAL head size {group} does not divide the projection's {self.in_features} input features; "
                f"pass the correct `head_dim` in SealConfig (in_features = num_heads * head_dim)."
            )
        n = self.in_features // group
        if init_weights:
            value = torch.ones(n)
        else:
            # non-identity init for tests: every scale differs from 1 and from the others
            value = 1.0 + 0.5 * torch.randn(n).clamp(-1.5, 1.5)
        self.seal_scale[adapter_name] = nn.Parameter(value)
        self.seal_group[adapter_name] = group
        self.seal_exact_unmerge[adapter_name] = bool(exact_unmerge)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def channel_scale(self, adapter_name: str) -> torch.Tensor:
        """The per-input-channel scale vector (length ``in_features``) of one adapter."""
        scale = self.seal_scale[adapter_name]
        group = self.seal_group[adapter_name]
        if group == 1:
            return scale
        return scale.repeat_interleave(group)

    def _active_channel_scale(self) -> torch.Tensor | None:
        vector = None
        for name in self.active_adapters:
            if name not in self.seal_scale:
                continue
            v = self.channel_scale(name)
            vector = v if vector is None else vector * v
        return vector

    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (last dimension ``in_features``) multiplied by the active adapters' channel scales.

        The hot path of the unmerged forward (training, decoding), kept to a handful of kernel launches:
        this matters for per-token decoding, where the activation is one row. The product is taken in
        the activation dtype (a bf16 model is not up-cast to fp32); the gradient still reaches the fp32
        scale through the cast. Autograd keeps only ``x`` (needed for the scale gradient) and the
        small cast scale vector (needed for the input gradient).
        """
        names = [n for n in self.active_adapters if n in self.seal_scale]
        if not names:
            return x
        if len(names) > 1:  # several active adapters: one pass over x with the product of their scales
            vector = self._active_channel_scale()
            return x * vector.to(x.dtype)
        name = names[0]
        scale = self.seal_scale[name]
        if scale.dtype != x.dtype:
            scale = scale.to(x.dtype)  # cast the few scales, then expand (not the other way round)
        group = self.seal_group[name]
        # An in_features-long vector, not a [heads, 1] view broadcast over x viewed as [..., heads, head_dim]:
        # measured on CPU, the broadcast product is ~2x slower in bf16 and its backward (a reduction over
        # the token and head_dim axes) ~1.7x slower in both dtypes; repeat_interleave of a few scales is ~free.
        return x * (scale if group == 1 else scale.repeat_interleave(group))

    def _scaled_weight_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Inference on many tokens: ``x @ (W diag(s))^T + b`` with the scaled weight built on the fly.

        Exactly what the merged layer computes (same fp32 product rounded to the weight dtype as
        :meth:`merge`), and cheaper than scaling the activation once the input has more than
        ``2 * out_features`` rows (prefill). Returns ``None`` (use the activation path) when a gradient
        must reach the scales or the weight (it would cost a weight-sized matmul), for anything but a
        plain ``nn.Linear``, or when the base layer has hooks (e.g. accelerate offloading) that only its
        own forward would run.
        """
        base = self.base_layer
        if type(base) is not nn.Linear or x.numel() <= 2 * base.weight.numel():
            return None
        if base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"):
            return None
        weight = base.weight
        if weight.dtype != x.dtype or weight.device != x.device or not _is_plain_tensor(weight):
            return None
        names = [n for n in self.active_adapters if n in self.seal_scale]
        if not names:
            return None
        if torch.is_grad_enabled() and (
            weight.requires_grad or any(self.seal_scale[n].requires_grad for n in names)
        ):
            return None
        vector = self._active_channel_scale().to(device=weight.device, dtype=torch.float32)
        return nn.functional.linear(x, self._merged(weight, vector), base.bias)

    # ------------------------------------------------------------------ merge / unmerge
    def _weight_view_scale(self, vector: torch.Tensor) -> torch.Tensor:
        # nn.Linear weight is [out, in]: scale columns; Conv1D weight is [in, out]: scale rows.
        return vector[:, None] if self.is_conv1d else vector[None, :]

    def _merge_vector(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        # Always a copy: for SEAL-C (group 1) channel_scale() is the Parameter itself, and the merge state
        # must not change when the scales do after the merge (optimizer step, load_adapter, in-place edit).
        return self.channel_scale(name).detach().to(device=weight.device, dtype=torch.float32, copy=True)

    def _merged(self, weight: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        return (weight.to(_compute_dtype(weight)) * self._weight_view_scale(vector)).to(weight.dtype)

    def _check_mergeable(self, weight: torch.Tensor) -> None:
        subclass = not _is_plain_tensor(weight)
        if subclass or weight.dtype not in MERGEABLE_DTYPES:
            kind = f"{type(weight).__name__} tensor subclass" if subclass else f"{weight.dtype}"
            raise TypeError(
                f"Cannot merge SEAL scales into a {kind} (quantized) weight of "
                f"{type(self.get_base_layer()).__name__}; dequantize the model first (load it in "
                f"bf16/fp16/fp32) or keep the adapter unmerged (the scales then act on the activations, "
                f"which works on quantized layers). A merge rescales plain fp16/bf16/fp32/fp64 weights only: "
                f"float8 and integer weights, and tensor subclasses (torchao quantized tensors, DTensor "
                f"shards), would be requantized or not rescaled correctly."
            )

    def check_merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Raise the error :meth:`merge` would raise, without changing anything.

        ``SealModel`` calls this on every layer before merging any of them, so a merge that fails in
        one layer never leaves the others merged (or, with ``merge_and_unload``, merged and unloaded).
        """
        if isinstance(adapter_names, str):
            return  # merge() raises PEFT's TypeError for this
        names = self.active_adapters if adapter_names is None else adapter_names
        names = [n for n in names if n in self.seal_scale and n not in self.merged_adapters]
        if not names:
            return
        weight = self.get_base_layer().weight
        self._check_mergeable(weight)
        if not safe_merge:
            return
        merged = weight.data
        for name in names:
            merged = self._merged(merged, self._merge_vector(name, weight))
            if not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {name} seems to be broken"
                )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the scales of the given (default: active) adapters into the base weight.

        Args:
            safe_merge: compute the merged weight out of place and raise ``ValueError`` if it is not
                finite, leaving the base weight untouched.
            adapter_names: adapters to merge (default: the active ones).
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        weight = base.weight
        self._check_mergeable(weight)
        for name in adapter_names:
            if name not in self.seal_scale:
                continue
            vector = self._merge_vector(name, weight)
            merged = self._merged(weight.data, vector)
            finite = torch.isfinite(merged)
            if safe_merge and not finite.all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {name} seems to be broken"
                )
            if not finite.all():
                warnings.warn(
                    f"Merging SEAL adapter {name!r} produced non-finite weights (overflow in "
                    f"{weight.dtype}?); the model will output inf/NaN. unmerge_adapter() restores the "
                    f"original weights; use safe_merge=True to refuse such merges.",
                    stacklevel=2,
                )
            buffer = f"_seal_unmerge_{len(self.merged_adapters)}"  # position in the merge stack
            if any(state[1] is None for state in self._seal_merge_state.values()):
                # an earlier merge into this layer kept the whole weight: unmerge puts that copy back
                idx, kept = None, None
            elif (
                weight.dtype in COPY_ON_MERGE_DTYPES
                and self.seal_exact_unmerge.get(name, True)
                and not self._seal_merging_to_unload
            ):
                # half precision: a multiply-divide round trip rounds again (up to 1/2 ulp per cycle);
                # keeping the original weight makes unmerge bit-exact for any number of cycles
                idx, kept = None, weight.data.clone()
            else:
                # division restores all channels to within an ulp except those it cannot: tiny/non-finite
                # scales, and channels whose merged values overflowed. Their original values are kept.
                small = (vector.abs() < UNMERGE_EPS) | ~torch.isfinite(vector)
                if not finite.all():
                    small |= ~finite.all(dim=1 if self.is_conv1d else 0)
                idx = small.nonzero().flatten()
                kept = (weight.data[idx] if self.is_conv1d else weight.data[:, idx]).clone()
            if kept is not None:
                self.register_buffer(buffer, kept, persistent=False)
            weight.data = merged
            self._seal_merge_state[name] = (vector, idx, buffer if kept is not None else None)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo all merges (last merged first), restoring the base weight."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        weight = base.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self._seal_merge_state:
                continue
            vector, idx, buffer = self._seal_merge_state.pop(name)
            # the state follows .to() of this module; the casts below only matter if the weight was
            # replaced behind its back (e.g. weight.data = ...), and are no-ops otherwise
            kept = None if buffer is None else self._buffers.pop(buffer)
            if kept is not None:
                kept = kept.to(device=weight.device, dtype=weight.dtype)
            if idx is None:
                if kept is not None:  # the whole original weight (else: an earlier merge's copy restores it)
                    weight.data = kept
                continue
            vector = vector.to(weight.device)
            safe = torch.where(vector.abs() < UNMERGE_EPS, torch.ones_like(vector), vector)
            safe = torch.where(torch.isfinite(safe), safe, torch.ones_like(safe))
            compute = _compute_dtype(weight)
            restored = (weight.data.to(compute) / self._weight_view_scale(safe)).to(weight.dtype)
            idx = idx.to(weight.device)
            if self.is_conv1d:
                restored[idx] = kept
            else:
                restored[:, idx] = kept
            weight.data = restored

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` from every per-adapter container (scales, group sizes, merge state)."""
        super().delete_adapter(adapter_name)
        state = self._seal_merge_state.pop(adapter_name, None)
        if state is not None and state[2] is not None:
            self._buffers.pop(state[2], None)

    def _move_merge_state(self) -> None:
        """Keep the merge state's vectors and indices on the weight's device (their dtype stays)."""
        device = self.get_base_layer().weight.device
        for name, (vector, idx, buffer) in self._seal_merge_state.items():
            if vector.device != device:
                self._seal_merge_state[name] = (
                    vector.to(device),
                    None if idx is None else idx.to(device),
                    buffer,
                )

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The multiplicative factor a merge applies to the weight (broadcastable to its shape)."""
        return self._weight_view_scale(self.channel_scale(adapter_name))


class Linear(nn.Module, SealLayer):
    """SEAL wrapper of a ``nn.Linear`` or GPT-2 style ``Conv1D`` attention output projection."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        group: int,
        init_weights: bool = True,
        inference_mode: bool = False,
        exact_unmerge: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        SealLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(
            adapter_name,
            group=group,
            init_weights=init_weights,
            inference_mode=inference_mode,
            exact_unmerge=exact_unmerge,
        )

    def _apply(self, fn, *args: Any, **kwargs: Any):
        # .to()/.cuda()/.half() ...: buffers (kept weight values) follow by themselves; the fp32 vectors of
        # the merge state are plain attributes and follow the weight's device here (not its dtype).
        result = super()._apply(fn, *args, **kwargs)
        if self._seal_merge_state:
            self._move_merge_state()
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if not args and not kwargs:
            out = self._scaled_weight_forward(x)
            if out is not None:
                return out
        return self.base_layer(self.scale_input(x), *args, **kwargs)

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Sample ``i`` of ``x`` scaled by adapter ``adapter_names[i]`` (``"__base__"``: unscaled).

        A SEAL adapter is only a channel scale, so a mixed batch is one ``[batch, in_features]`` scale
        matrix and one multiply; no sub-batches. Adapters this layer does not have leave samples unscaled.
        """
        if self.merged:
            raise ValueError(
                f"Cannot pass adapter_names while adapter(s) {self.merged_adapters} are merged; call "
                f"model.unmerge_adapter() first."
            )
        if len(adapter_names) != x.shape[0]:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries but the batch has {x.shape[0]} samples; pass one "
                f"adapter name (or '__base__') per sample."
            )
        rows: dict[str, torch.Tensor] = {}
        ones = torch.ones(self.in_features, device=x.device, dtype=x.dtype)
        for name in dict.fromkeys(adapter_names):
            if name in self.seal_scale:
                rows[name] = self.channel_scale(name).to(device=x.device, dtype=x.dtype)
            else:
                rows[name] = ones
        scales = torch.stack([rows[name] for name in adapter_names])  # [batch, in_features]
        scales = scales.view(x.shape[0], *([1] * (x.dim() - 2)), self.in_features)
        return self.base_layer(x * scales, *args, **kwargs)

    def __repr__(self) -> str:
        return "seal." + super().__repr__()
