"""Export a SEAL adapter into a GGUF file that llama.cpp and Ollama run as a plain model.

SEAL folds into the columns of each attention output projection (``W' = W · diag(s)``, see
docs/merging.md), so a SEAL model *is* its base GGUF with different ``blk.N.attn_output.weight``
tensors. :func:`export_gguf` reads the base GGUF (by default the one the embedded SmolLM2 ships as),
re-encodes only those tensors — dequantize, multiply column ``c`` by ``s_c``, quantize again (by
default to the tensor's own type) — and copies every other tensor's bytes and every metadata key
unchanged, with the ``gguf`` package's writer.

Layout: a GGUF tensor's ``ne[0]`` is its innermost (contiguous) dimension, so a 2-D tensor read by
``gguf.GGUFReader`` and de-quantized is the numpy array ``[ne[1], ne[0]]`` = torch's ``nn.Linear``
weight ``[out_features, in_features]``; quantization blocks run along the input dimension. llama.cpp's
converter permutes ``attn_q`` / ``attn_k`` of Llama models (its RoPE layout) but stores ``attn_output``
as the HF ``o_proj`` weight, and transformers' GGUF loader reads it back unchanged; so column
``h * head_dim + j`` (query head ``h``) of the de-quantized array is what SEAL scales.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SealUsageError

__all__ = ["ARCHITECTURES", "SUPPORTED_TYPES", "GGUFExport", "TensorExport", "adapter_scales", "export_gguf"]

#: types the attention-output tensors can be re-encoded in: those ``gguf.quants.quantize`` (gguf 0.19.0)
#: writes. k-quants (Q2_K ... Q6_K) and i-quants are read (de-quantized) by the package but not written;
#: the ternary TQ1_0/TQ2_0 and MXFP4 formats it writes are model-specific and not offered.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")

#: GGUF architectures whose ``blk.N.attn_output.weight`` is the HF ``layers.N.self_attn.o_proj`` weight
#: with the query heads' outputs as head-major input columns, stored untransposed and unpermuted by both
#: llama.cpp's converter and transformers' GGUF loader (GPT-2's, for one, is transposed). Verified end to
#: end: llama (SmolLM2).
ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")

_SCALE_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.o_proj\.seal_scale$")
_FALLBACK = "merge it instead (seal-peft merge) and convert the merged folder with llama.cpp's convert_hf_to_gguf.py"


@dataclass
class TensorExport:
    """What happened to one attention-output tensor."""

    name: str
    source_type: str
    type: str
    action: str  # "re-encoded" or "copied" (no scale differs from 1 and the type is unchanged)
    layer: int


@dataclass
class GGUFExport:
    """The result of :func:`export_gguf`."""

    path: Path
    source: Path
    tensors: list[TensorExport] = field(default_factory=list)
    copied_tensors: int = 0  # tensors other than attn_output, copied byte for byte
    metadata_keys: int = 0  # metadata keys, all copied

    @property
    def re_encoded(self) -> list[TensorExport]:
        return [t for t in self.tensors if t.action == "re-encoded"]

    def summary(self) -> str:
        types = sorted({t.type for t in self.re_encoded})
        return (
            f"{self.path}: {len(self.re_encoded)} attention-output tensor(s) re-encoded "
            f"({', '.join(types) or '-'}) with the SEAL scales; {self.copied_tensors + len(self.tensors) - len(self.re_encoded)} "
            f"other tensor(s) and all {self.metadata_keys} metadata keys copied unchanged from {self.source}"
        )


# ------------------------------------------------------------------------------------------ the adapter
def adapter_scales(adapter: str | os.PathLike) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """The config of a saved SEAL adapter and its scales per layer (``layer index -> float32 vector``:
    one value per head for SEAL-H, per channel for SEAL-C), read from ``adapter_model.safetensors``.

    Raises ``SealUsageError`` for a folder that is not a SEAL adapter, or one that scales anything but
    ``layers.N.self_attn.o_proj`` (the only module with a GGUF counterpart, ``blk.N.attn_output``).
    """
    from safetensors import safe_open

    from ..loading import ADAPTER_WEIGHTS, check_adapter_dir

    path = os.fspath(adapter)
    if not os.path.isdir(path):
        raise SealUsageError(f"--adapter {path!r} is not a folder (a SEAL adapter saved with save_pretrained).")
    try:
        config = check_adapter_dir(path)
    except (ValueError, TypeError) as err:
        raise SealUsageError(f"--adapter {path!r}: {err}") from err
    if config.get("extension"):
        raise SealUsageError(
            f"--adapter {path!r} was trained under a context extension ({config['extension']}); a GGUF export "
            "re-encodes attention-output weights only and would drop it. Use seal-peft merge, which records the "
            "extension in config.json."
        )
    scales: dict[int, np.ndarray] = {}
    others: list[str] = []
    with safe_open(os.path.join(path, ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            match = _SCALE_KEY.search(key)
            if match is None:
                others.append(key)
                continue
            layer = int(match.group(1))
            if layer in scales:
                raise SealUsageError(f"--adapter {path!r} holds two scale vectors for layer {layer} ({key}).")
            scales[layer] = f.get_tensor(key).float().flatten().numpy()
    if others:
        raise SealUsageError(
            f"--adapter {path!r} holds tensors that are not attention-output scales "
            f"(layers.N.self_attn.o_proj.seal_scale): {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}. "
            f"export-gguf maps only those onto blk.N.attn_output.weight; for this adapter, {_FALLBACK}."
        )
    if not scales:
        raise SealUsageError(f"--adapter {path!r} holds no scales.")
    return config, scales


# ------------------------------------------------------------------------------------------ the GGUF
def _open_gguf(path: Path):
    import gguf

    if not path.is_file():
        raise SealUsageError(f"--gguf {str(path)!r} does not exist (a GGUF file, e.g. model.Q4_1.gguf).")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader raises ValueError / IndexError / KeyError / struct errors on bad input
        raise SealUsageError(
            f"--gguf {str(path)!r} is not a readable GGUF file ({type(err).__name__}: {err}). export-gguf re-encodes "
            f"a GGUF model (such as the embedded SmolLM2's); for a transformers checkpoint, {_FALLBACK}."
        ) from err
    if reader.byte_order != "I":
        raise SealUsageError(
            f"--gguf {str(path)!r} is stored in the other byte order; convert it first with gguf's "
            "gguf_convert_endian.py."
        )
    return reader


def _scalar(reader, key: str):
    fld = reader.get_field(key)
    if fld is None:
        return None
    if fld.types and fld.types[0].name == "ARRAY":
        return [fld.parts[i].tolist()[0] for i in fld.data]
    return fld.contents()


def _field_value(fld) -> tuple[Any, Any, Any]:
    """``(value, type, sub_type)`` of a metadata field for ``GGUFWriter.add_key_value`` that packs into the
    same bytes: strings stay raw bytes (no decoding), numbers stay numpy scalars of the stored width."""
    from gguf import GGUFValueType

    vtype = fld.types[0]
    if vtype == GGUFValueType.STRING:
        return bytes(fld.parts[-1]), vtype, None
    if vtype != GGUFValueType.ARRAY:
        return fld.parts[-1][0], vtype, None
    sub = fld.types[1] if len(fld.types) > 1 else None
    if sub is None or sub == GGUFValueType.ARRAY or not fld.data:
        raise SealUsageError(
            f"metadata key {fld.name!r} is an {'empty' if not fld.data else 'nested'} array, which the gguf "
            f"package cannot write; {_FALLBACK}."
        )
    if sub == GGUFValueType.STRING:
        return [bytes(fld.parts[i]) for i in fld.data], vtype, sub
    return [fld.parts[i][0] for i in fld.data], vtype, sub


@dataclass
class _Plan:
    tensor: Any  # gguf ReaderTensor
    layer: int
    target: Any  # GGMLQuantizationType
    vector: np.ndarray | None  # the channel scales; None = copy the bytes


def _channel_vector(scale: np.ndarray, in_features: int, heads, config: dict, layer: int, where: str) -> np.ndarray:
    """The per-input-channel scales of one layer (SEAL-H: each head's scale repeated head_dim times)."""
    n = scale.size
    granularity = config.get("granularity", "head")
    head_dim = config.get("head_dim")
    expected = in_features if granularity == "channel" else (in_features // head_dim if head_dim else heads)
    if not isinstance(expected, int) or n != expected or in_features % n != 0:
        shape = f"{heads} heads x {in_features // heads} channels" if isinstance(heads, int) and heads else f"{in_features} channels"
        raise SealUsageError(
            f"the adapter's layer {layer} has {n} scales ({granularity}), but {where} has {in_features} "
            f"attention-output input channels ({shape}): the adapter was trained on another model. Export it "
            f"onto the GGUF of the model it was trained on (--gguf / --model)."
        )
    if not np.isfinite(scale).all():
        raise SealUsageError(f"the adapter's layer {layer} has non-finite scales (NaN/inf); the adapter is broken.")
    return np.repeat(scale.astype(np.float32), in_features // n)


def _plan(reader, source: Path, config: dict, scales: dict[int, np.ndarray], qtype) -> list[_Plan]:
    """Check everything before a byte is written: architecture, layer count, scale shapes, types."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    where = f"the GGUF {source.name}"
    arch = _scalar(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise SealUsageError(
            f"{where} is a {arch!r} model; export-gguf re-encodes attention-output tensors of "
            f"{', '.join(ARCHITECTURES)} GGUFs (where blk.N.attn_output is the untransposed HF o_proj). For this "
            f"model, {_FALLBACK}."
        )
    blocks = _scalar(reader, f"{arch}.block_count")
    heads = _scalar(reader, f"{arch}.attention.head_count")
    attn = {}
    for t in reader.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.attn_output\.weight", t.name)
        if m:
            attn[int(m.group(1))] = t
    n_blocks = int(blocks) if blocks is not None else len(attn)
    extra = sorted(set(scales) - set(attn))
    if extra:
        raise SealUsageError(
            f"the adapter has scales for layer(s) {extra[:5]} but {where} has {n_blocks} blocks "
            f"(blk.0 ... blk.{n_blocks - 1}): the adapter was trained on another model (its layers: "
            f"{min(scales)}..{max(scales)}). Export it onto the GGUF of the model it was trained on."
        )
    if config.get("layers_to_transform") is None and not config.get("exclude_modules") and set(scales) != set(attn):
        raise SealUsageError(
            f"the adapter scales {len(scales)} layers ({min(scales)}..{max(scales)}) but {where} has {len(attn)} "
            f"attention blocks, and the adapter does not restrict its layers (layers_to_transform): it was "
            f"trained on another model. Export it onto the GGUF of the model it was trained on."
        )
    target_override = None
    if qtype is not None:
        name = qtype.name if isinstance(qtype, Q) else str(qtype).upper()
        if name not in SUPPORTED_TYPES:
            raise SealUsageError(f"--type {qtype}: choose one of {', '.join(SUPPORTED_TYPES)}.")
        target_override = Q[name]
    plans = []
    for layer in sorted(attn):
        t = attn[layer]
        if layer not in scales:
            plans.append(_Plan(t, layer, t.tensor_type, None))
            continue
        if len(t.shape) != 2:
            raise SealUsageError(f"{t.name} in {where} has {len(t.shape)} dimensions, expected 2.")
        in_features = int(t.shape[0])  # ne[0]: the innermost dimension = the input channels
        layer_heads = heads[layer] if isinstance(heads, list) else heads
        vector = _channel_vector(scales[layer], in_features, layer_heads, config, layer, f"{where}'s {t.name}")
        target = target_override if target_override is not None else t.tensor_type  # Q.F32 is 0
        if target == t.tensor_type and bool((vector == 1.0).all()):
            plans.append(_Plan(t, layer, target, None))  # the identity: keep the source bytes
            continue
        try:
            gguf.quants.dequantize(t.data[:1], t.tensor_type)
        except NotImplementedError:
            raise SealUsageError(
                f"{t.name} in {where} is {t.tensor_type.name}, which the gguf package cannot de-quantize; "
                f"{_FALLBACK}."
            ) from None
        if target.name not in SUPPORTED_TYPES:
            raise SealUsageError(
                f"{t.name} in {where} is {target.name}, which the gguf package {gguf_version()} can read but not "
                f"write, so it cannot be re-encoded in its own type. Pass --type Q8_0 (or any of "
                f"{', '.join(SUPPORTED_TYPES)}) to re-encode the attention-output tensors in another type (every other "
                f"tensor stays {target.name}/as it is), or {_FALLBACK} and llama-quantize."
            )
        block = gguf.GGML_QUANT_SIZES[target][0]
        if in_features % block:
            raise SealUsageError(
                f"{t.name} has rows of {in_features} values, not a multiple of the {target.name} block size "
                f"({block}); choose another --type (F32, F16 or BF16 always fit)."
            )
        plans.append(_Plan(t, layer, target, vector))
    return plans


def gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:  # pragma: no cover - an unpackaged checkout of gguf-py
        return "(unknown version)"


def _re_encode(plan: _Plan) -> np.ndarray:
    import gguf

    t = plan.tensor
    weight = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)  # [out, in]
    merged = weight * plan.vector[None, :]  # column c (input channel c) times s_c, as SealLayer.merge
    if not np.isfinite(merged).all():
        raise SealUsageError(f"{t.name}: the scaled weights are not finite; the adapter is broken.")
    data = gguf.quants.quantize(merged, plan.target)
    if plan.target.name == "F16" and not np.isfinite(data).all():
        raise SealUsageError(f"{t.name}: the scaled weights overflow F16; choose --type BF16 or F32.")
    return data


def _source_path(gguf_file, model, config: dict, workdir: Path) -> Path:
    from ..models import embedded_gguf_file, resolve_embedded

    if gguf_file is not None:
        return Path(gguf_file)
    name = model
    base = config.get("base_model_name_or_path") or ""
    if name is None and base:  # the embedded model the adapter was trained on (by name or cache folder name)
        for candidate in (base, os.path.basename(os.path.normpath(base))):
            if resolve_embedded(candidate) is not None:
                name = candidate
                break
        else:
            raise SealUsageError(
                f"the adapter was trained on {base!r}, which is not an embedded model: pass that model's GGUF "
                f"with --gguf FILE.gguf (or --model NAME for an embedded one)."
            )
    if name is not None and resolve_embedded(name) is None:
        raise SealUsageError(
            f"--model {name!r} is not an embedded model (those ship as GGUF files); export-gguf needs a GGUF: pass "
            f"--gguf FILE.gguf of that model, or {_FALLBACK}."
        )
    try:
        return embedded_gguf_file(name, workdir=workdir)
    except ImportError as err:
        raise SealUsageError(str(err)) from err


def export_gguf(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    gguf_file: str | os.PathLike | None = None,
    model: str | None = None,
    qtype: Any = None,
    progress: bool = False,
) -> GGUFExport:
    """Write ``out``: the GGUF ``gguf_file`` with the SEAL ``adapter`` merged into its attention outputs.

    Args:
        adapter: a saved SEAL adapter folder (SEAL-H or SEAL-C) of the model ``gguf_file`` holds.
        out: the GGUF file to write. It appears only when complete (written to a temporary file in the same
            folder, then renamed), so an error or an interruption never leaves a partial file.
        gguf_file: the base model's GGUF. Default: the embedded model ``model`` names, else the embedded model
            the adapter was trained on (``base_model_name_or_path`` in its config, a name or the cache folder
            of an embedded model; any other model needs ``gguf_file``), else the embedded SmolLM2-135M-Instruct.
        model: an embedded model name (``smollm2``, ``gemma3-270m``) instead of ``gguf_file``.
        qtype: the type of the re-encoded attention-output tensors (one of :data:`SUPPORTED_TYPES`);
            default: each tensor's own type.
        progress: show a progress bar.

    Every other tensor's bytes and every metadata key/value are copied unchanged; an attention-output
    tensor whose scales are all exactly 1 (or that the adapter does not cover) is copied too unless
    ``qtype`` asks for another type. Raises ``SealUsageError`` (a ``ValueError``) before writing anything
    for an adapter of another model, a source that is not a supported GGUF, or a type that cannot be written.
    """
    try:
        import gguf
    except ImportError as err:
        raise SealUsageError(f"export-gguf writes GGUF files with the `gguf` package: pip install gguf ({err})") from err

    config, scales = adapter_scales(adapter)
    out = Path(out)
    if out.is_dir():
        raise SealUsageError(f"--out {str(out)!r} is a folder; give the file to write (e.g. {out / 'model.gguf'}).")
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.src-", dir=out.parent))
    tmp = writer = None
    try:
        source = _source_path(gguf_file, model, config, workdir)
        if out.exists() and os.path.samefile(out, source):
            raise SealUsageError(f"--out {str(out)!r} is the source GGUF itself; write the export to another file.")
        reader = _open_gguf(source)
        plans = {p.tensor.name: p for p in _plan(reader, source, config, scales, qtype)}
        fields = [f for name, f in reader.fields.items() if not name.startswith("GGUF.")]
        values = [(f.name, *_field_value(f)) for f in fields]

        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        writer = gguf.GGUFWriter(tmp, arch=str(_scalar(reader, "general.architecture")), endianess=reader.endianess)
        writer.data_alignment = reader.alignment
        writer.kv_data[0].clear()  # the constructor added general.architecture; copy every key in the source's order
        for name, value, vtype, sub in values:
            writer.add_key_value(name, value, vtype, sub_type=sub)
        for t in reader.tensors:
            plan = plans.get(t.name)
            if plan is None or plan.vector is None:
                writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
            else:
                n_bytes = t.n_elements * gguf.GGML_QUANT_SIZES[plan.target][1] // gguf.GGML_QUANT_SIZES[plan.target][0]
                shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # numpy order [out, in]
                writer.add_tensor_info(t.name, shape, np.dtype(np.float32), n_bytes, plan.target)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        result = GGUFExport(path=out, source=source, metadata_keys=len(values))
        tensors = reader.tensors
        if progress:
            from tqdm.auto import tqdm

            tensors = tqdm(tensors, desc="export-gguf", unit="tensor")
        for t in tensors:
            plan = plans.get(t.name)
            if plan is None:
                writer.write_tensor_data(t.data)
                result.copied_tensors += 1
                continue
            if plan.vector is None:
                writer.write_tensor_data(t.data)
                action = "copied"
            else:
                writer.write_tensor_data(_re_encode(plan))
                action = "re-encoded"
            result.tensors.append(TensorExport(t.name, t.tensor_type.name, plan.target.name, action, plan.layer))
        writer.close()
        writer = None
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
        tmp = None
        return result
    finally:
        if writer is not None:
            writer.close()
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        for leftover in workdir.iterdir():
            leftover.unlink(missing_ok=True)
        workdir.rmdir()
