"""`seal-peft export-gguf`: a SEAL adapter merged into a GGUF's attention-output tensors.

Fast tier: tiny Llama GGUFs written here with gguf.GGUFWriter (loadable by transformers' GGUF loader).
Checked with real readers: gguf.GGUFReader (every other tensor's bytes and every metadata key/value
identical; the re-encoded tensors equal dequant(source) x scales within the error bound of their type)
and transformers' loader (the exported file gives the weights/logits of the source merged with
`merge_and_unload`). Slow tier: the same on the embedded SmolLM2 Q4_1 GGUF.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file

import seal_peft
from seal_peft import SealConfig
from seal_peft.errors import SealUsageError
from seal_peft.integrations.gguf_export import SUPPORTED_TYPES, export_gguf

H, KV, D, HID, FFN, VOCAB, LAYERS = 4, 2, 16, 64, 128, 96, 2
FP16_HALF_ULP = 2.0**-11  # relative rounding of an fp16 number (the blocks' scale / minimum)


# ------------------------------------------------------------------------------------------ helpers
def write_tiny_gguf(
    path: Path,
    *,
    attn_type: Q = Q.F32,
    layers: int = LAYERS,
    heads: int = H,
    head_dim: int = D,
    arch: str = "llama",
    alignment: int | None = None,
    seed: int = 0,
) -> Path:
    """A tiny Llama GGUF: F32 norms/embeddings/q/k/v, Q8_0 MLP, attention outputs in ``attn_type``, and
    metadata of many value types (strings, string/int/float arrays, bool, float64...)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_name("tiny seal test")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(HID)
    w.add_feed_forward_length(FFN)
    w.add_head_count(heads)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(1)
    w.add_tags(["seal", "tiny", "ünïcode"])
    w.add_array("seal.test.ints", [3, -1, 7])
    w.add_array("seal.test.floats", [0.1, 2.5])
    w.add_bool("seal.test.flag", True)
    w.add_float64("seal.test.f64", 1.0 / 3.0)
    w.add_uint8("seal.test.u8", 200)
    w.add_int16("seal.test.i16", -300)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    def t(*shape, std=0.05):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def add(name, data, qtype=Q.F32):
        if qtype in (Q.F32,):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    add("token_embd.weight", t(VOCAB, HID))
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", 1 + t(HID))
        add(f"blk.{i}.attn_q.weight", t(heads * head_dim, HID))
        add(f"blk.{i}.attn_k.weight", t(KV * head_dim, HID))
        add(f"blk.{i}.attn_v.weight", t(KV * head_dim, HID))
        add(f"blk.{i}.attn_output.weight", t(HID, heads * head_dim), attn_type)
        add(f"blk.{i}.ffn_norm.weight", 1 + t(HID))
        add(f"blk.{i}.ffn_gate.weight", t(FFN, HID), Q.Q8_0)
        add(f"blk.{i}.ffn_up.weight", t(FFN, HID), Q.Q8_0)
        add(f"blk.{i}.ffn_down.weight", t(HID, FFN), Q.Q8_0)
    add("output_norm.weight", 1 + t(HID))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def load_gguf_model(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are plain de-quantised fp32; drop the flag (as models.py does)
        quantizer.remove_quantization_config(model)
    return model.eval()


def save_adapter(model, path: Path, granularity: str, seed: int = 1, **config) -> Path:
    """A SEAL adapter of ``model`` whose scales all differ from 1 and from each other."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, SealConfig(granularity=granularity, init_weights=False, **config))
    peft_model.save_pretrained(path)
    peft_model.unload()
    return path


def channel_scales(adapter: Path, layer: int, in_features: int) -> np.ndarray:
    """The per-input-channel scale vector of one layer, read from the adapter file here (not via the
    code under test): SEAL-H's per-head scale repeated head_dim times."""
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    (key,) = [k for k in weights if f"layers.{layer}.self_attn.o_proj.seal_scale" in k]
    s = weights[key].float()
    return s.repeat_interleave(in_features // s.numel()).numpy()


def tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def field_bytes(reader, fld) -> bytes:
    return b"".join(p.tobytes() for p in fld.parts)


def error_bound(target: np.ndarray, qtype: str) -> np.ndarray:
    """The largest |dequant(quant(x)) - x| the type allows for each element of ``target`` ([rows, in]),
    from the formats' definitions (ggml-quants.c): a block of 32 values along a row stores an fp16 scale d
    (and for *_1 an fp16 minimum m) and integer levels."""
    if qtype == "F32":
        return np.zeros_like(target)
    if qtype == "F16":  # round to nearest: half an ulp (2^-25 for fp16 subnormals)
        return np.abs(target) * FP16_HALF_ULP + 2.0**-25
    if qtype == "BF16":  # round to nearest even, 8 significant bits
        return np.abs(target) * 2.0**-8 + 1e-38
    x = target.reshape(-1, 32).astype(np.float64)
    amax = np.abs(x).max(axis=1, keepdims=True)
    slack = 1e-6 * amax  # fp32 arithmetic of the quantizer
    if qtype in ("Q8_0", "Q4_0", "Q5_0"):
        levels = {"Q8_0": 127, "Q4_0": 8, "Q5_0": 16}[qtype]
        if qtype == "Q8_0":
            d = amax / 127
            bound = 0.5 * d + np.zeros_like(x)
        else:  # d = -(signed extreme)/levels; values of the other sign beyond (levels-0.5)·|d| clip to levels-1
            extreme = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
            d = -extreme / levels
            r = x / np.where(d == 0, 1, d)
            bound = np.where(r > levels - 0.5, np.abs(x - (levels - 1) * d), 0.5 * np.abs(d))
        bound = bound + levels * np.abs(d) * FP16_HALF_ULP + slack
    else:  # Q4_1 / Q5_1: d = (max - min) / levels, m = min
        levels = {"Q4_1": 15, "Q5_1": 31}[qtype]
        lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        d = (hi - lo) / levels
        bound = 0.5 * d + levels * d * FP16_HALF_ULP + np.abs(lo) * FP16_HALF_ULP + slack
    return np.broadcast_to(bound, x.shape).reshape(target.shape)


def dequant(t) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny source GGUFs (attention outputs in F32 / Q8_0 / Q4_1) and a SEAL-H and a SEAL-C adapter."""
    root = tmp_path_factory.mktemp("gguf")
    sources = {}
    for qtype in (Q.F32, Q.F16, Q.Q8_0, Q.Q4_1):
        folder = root / qtype.name
        folder.mkdir()
        sources[qtype.name] = write_tiny_gguf(folder / "tiny.gguf", attn_type=qtype)
    model = load_gguf_model(sources["F32"])
    adapters = {g: save_adapter(model, root / f"seal-{g}", g) for g in ("head", "channel")}
    return sources, adapters


def _reader(path_or_reader):
    return path_or_reader if isinstance(path_or_reader, gguf.GGUFReader) else gguf.GGUFReader(path_or_reader)


def check_copy(src_path, out_path, reencoded_type: str | None = None) -> None:
    """Every metadata key/value byte-identical, same tensors in the same order, every tensor except
    blk.N.attn_output.weight byte-identical (type, shape and data)."""
    src, new = _reader(src_path), _reader(out_path)
    assert list(new.fields) == list(src.fields)
    for name, fld in src.fields.items():
        if name == "GGUF.tensor_count" or name == "GGUF.kv_count" or name == "GGUF.version":
            assert new.fields[name].parts[0].tolist() == fld.parts[0].tolist(), name
            continue
        assert field_bytes(new, new.fields[name]) == field_bytes(src, fld), name
    assert new.alignment == src.alignment
    assert [t.name for t in new.tensors] == [t.name for t in src.tensors]
    for t_src, t_new in zip(src.tensors, new.tensors):
        assert t_new.shape.tolist() == t_src.shape.tolist(), t_src.name
        if t_src.name.endswith("attn_output.weight"):
            assert t_new.tensor_type.name == (reencoded_type or t_src.tensor_type.name)
        else:
            assert t_new.tensor_type == t_src.tensor_type, t_src.name
            assert t_new.data.tobytes() == t_src.data.tobytes(), t_src.name


def check_reencoded(src_path: Path, out_path: Path, adapter: Path) -> tuple[str, float]:
    """dequant(new attn_output) = dequant(source) x channel scales within the bound of the new type.
    Returns (type, largest error / bound)."""
    src, new = tensors(gguf.GGUFReader(src_path)), tensors(gguf.GGUFReader(out_path))
    worst = 0.0
    for layer in range(LAYERS):
        name = f"blk.{layer}.attn_output.weight"
        weight = dequant(src[name])  # [out, in]: ggml ne[0] (the input) is the last numpy axis
        s = channel_scales(adapter, layer, weight.shape[1])
        target = weight * s[None, :]
        got = dequant(new[name])
        kind = new[name].tensor_type.name
        bound = error_bound(target, kind)
        if kind == "F32":
            assert np.array_equal(got, target), name
        err = np.abs(got.astype(np.float64) - target)
        assert (err <= bound).all(), (name, kind, float((err - bound).max()))
        worst = max(worst, float((err / np.maximum(bound, 1e-30)).max()))
        # the bound is tight enough to catch a wrong layout: scaling rows (the output dimension) instead of
        # columns, or the heads in reverse order, violates it
        for wrong in (weight * s[:, None], weight * s.reshape(H, -1)[::-1].reshape(-1)[None, :]):
            assert (np.abs(got - wrong) > error_bound(wrong, kind)).any(), name
    return kind, worst


# ------------------------------------------------------------------------------------------ GGUF level
@pytest.mark.parametrize("granularity", ["head", "channel"])
@pytest.mark.parametrize("source", ["F32", "F16", "Q8_0", "Q4_1"])
def test_export_keeps_everything_else_and_reencodes_attn_output_in_its_own_type(
    tiny, tmp_path, source, granularity
):
    sources, adapters = tiny
    out = tmp_path / "seal.gguf"
    result = export_gguf(adapters[granularity], out, gguf_file=sources[source])
    assert [t.action for t in result.tensors] == ["re-encoded"] * LAYERS
    check_copy(sources[source], out)
    kind, worst = check_reencoded(sources[source], out, adapters[granularity])
    assert kind == source
    assert sorted(os.listdir(tmp_path)) == ["seal.gguf"]  # no temporary files left behind


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES)
def test_type_chooses_the_reencoding_type(tiny, tmp_path, qtype):
    sources, adapters = tiny
    out = tmp_path / "seal.gguf"
    export_gguf(adapters["channel"], out, gguf_file=sources["Q4_1"], qtype=qtype.lower())
    check_copy(sources["Q4_1"], out, reencoded_type=qtype)
    kind, worst = check_reencoded(sources["Q4_1"], out, adapters["channel"])
    assert kind == qtype


def test_identity_adapter_leaves_the_file_byte_identical(tiny, tmp_path):
    """All scales exactly 1 (a fresh adapter): nothing to re-encode, the export is the source file."""
    from peft import get_peft_model

    sources, _ = tiny
    model = load_gguf_model(sources["Q4_1"])
    peft_model = get_peft_model(model, SealConfig(granularity="channel"))
    peft_model.save_pretrained(tmp_path / "ones")
    out = tmp_path / "seal.gguf"
    result = export_gguf(tmp_path / "ones", out, gguf_file=sources["Q4_1"])
    assert [t.action for t in result.tensors] == ["copied"] * LAYERS
    assert out.read_bytes() == sources["Q4_1"].read_bytes()


def test_layers_the_adapter_does_not_cover_are_copied(tiny, tmp_path):
    sources, _ = tiny
    adapter = save_adapter(load_gguf_model(sources["F32"]), tmp_path / "one-layer", "head", layers_to_transform=[1])
    out = tmp_path / "seal.gguf"
    result = export_gguf(adapter, out, gguf_file=sources["Q8_0"], qtype="F16")
    assert [(t.layer, t.action, t.type) for t in result.tensors] == [(0, "copied", "Q8_0"), (1, "re-encoded", "F16")]
    src, new = tensors(gguf.GGUFReader(sources["Q8_0"])), tensors(gguf.GGUFReader(out))
    assert new["blk.0.attn_output.weight"].data.tobytes() == src["blk.0.attn_output.weight"].data.tobytes()
    assert not np.array_equal(dequant(new["blk.1.attn_output.weight"]), dequant(src["blk.1.attn_output.weight"]))


def test_custom_alignment_is_kept(tmp_path):
    source = write_tiny_gguf(tmp_path / "aligned.gguf", attn_type=Q.Q8_0, alignment=64)
    adapter = save_adapter(load_gguf_model(source), tmp_path / "seal-c", "channel")
    out = tmp_path / "out" / "seal.gguf"
    export_gguf(adapter, out, gguf_file=source)
    assert gguf.GGUFReader(out).alignment == 64
    check_copy(source, out)
    check_reencoded(source, out, adapter)


# ------------------------------------------------------------------------------------------ transformers
@pytest.mark.parametrize("granularity", ["head", "channel"])
def test_transformers_loads_the_export_with_the_merged_weights_f32(tiny, tmp_path, granularity):
    """F32 source, F32 export: transformers' GGUF loader gives exactly the weights and logits of the source
    merged with merge_and_unload (an error in the column order would change o_proj)."""
    sources, adapters = tiny
    out = tmp_path / "seal.gguf"
    export_gguf(adapters[granularity], out, gguf_file=sources["F32"])
    merged = seal_peft.from_pretrained(load_gguf_model(sources["F32"]), adapters[granularity])
    merged = merged.merge_and_unload(safe_merge=True)
    exported = load_gguf_model(out)
    ref, got = merged.state_dict(), exported.state_dict()
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, exported(ids).logits)


@pytest.mark.parametrize("source", ["Q8_0", "Q4_1"])
def test_transformers_loads_the_export_within_quantisation_error(tiny, tmp_path, source):
    """A quantized source: transformers' o_proj of the export = the merged o_proj within the type's bound,
    every other weight exactly the source's, and the logits far closer to the merged model's than the
    unmerged source's are."""
    sources, adapters = tiny
    out = tmp_path / "seal.gguf"
    export_gguf(adapters["channel"], out, gguf_file=sources[source])
    base = load_gguf_model(sources[source])
    merged = seal_peft.from_pretrained(load_gguf_model(sources[source]), adapters["channel"])
    merged = merged.merge_and_unload(safe_merge=True)
    exported = load_gguf_model(out)
    ref, got = merged.state_dict(), exported.state_dict()
    for key in ref:
        if "o_proj" in key:
            w = ref[key].numpy()
            assert (np.abs(got[key].numpy() - w) <= error_bound(w, source)).all(), key
            assert not torch.equal(ref[key], base.state_dict()[key])
        else:
            assert torch.equal(ref[key], got[key]), key
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lm, le, lb = merged(ids).logits, exported(ids).logits, base(ids).logits
    diff, effect = (le - lm).abs().max().item(), (lb - lm).abs().max().item()
    print(f"{source}: max|export - merged| = {diff:.4f}, max|source - merged| = {effect:.4f}")
    assert diff < {"Q8_0": 0.05, "Q4_1": 0.4}[source] * effect, (diff, effect)


# ------------------------------------------------------------------------------------------ refusals
def _refused(tmp_path, match, adapter, **kwargs):
    out = tmp_path / "refused" / "seal.gguf"
    with pytest.raises(SealUsageError, match=match):
        export_gguf(adapter, out, **kwargs)
    assert not out.exists()
    assert not out.parent.exists() or os.listdir(out.parent) == []  # no partial or temporary file
    return out


def test_refuses_a_type_the_gguf_package_cannot_write_and_says_what_to_do(tmp_path):
    """A k-quant attention output (Q6_K; its blocks hold 256 values) is read but cannot be written:
    refused naming the type, the tensor and --type; with --type Q8_0 it is re-encoded."""
    source = tmp_path / "q6k.gguf"
    write_tiny_gguf(source, head_dim=64, attn_type=Q.F32)  # rows of 4 heads x 64 = 256 values
    reader = gguf.GGUFReader(source)
    # rewrite the attention outputs as Q6_K blocks with finite values (fp16 scale d = 1e-3)
    w = gguf.GGUFWriter(tmp_path / "k.gguf", "llama")
    w.kv_data[0].clear()
    for fld in reader.fields.values():
        if not fld.name.startswith("GGUF."):
            from seal_peft.integrations.gguf_export import _field_value

            value, vtype, sub = _field_value(fld)
            w.add_key_value(fld.name, value, vtype, sub_type=sub)
    rng = np.random.default_rng(0)
    block, size = gguf.GGML_QUANT_SIZES[Q.Q6_K]
    for t in reader.tensors:
        if t.name.endswith("attn_output.weight"):
            rows = int(t.shape[1])
            raw = rng.integers(0, 256, (rows * int(t.shape[0]) // block, size), dtype=np.uint8)
            raw[:, -2:] = np.array([1e-3], dtype=np.float16).view(np.uint8)
            w.add_tensor(t.name, raw.reshape(rows, -1), raw_dtype=Q.Q6_K)
        else:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    k_source = tmp_path / "k.gguf"
    adapter = save_adapter(load_gguf_model(source), tmp_path / "seal-h", "head")
    _refused(tmp_path, r"blk\.0\.attn_output\.weight .* is Q6_K, .* can read but not write.*--type Q8_0", adapter,
             gguf_file=k_source)
    out = tmp_path / "ok" / "seal.gguf"
    export_gguf(adapter, out, gguf_file=k_source, qtype="Q8_0")
    check_copy(k_source, out, reencoded_type="Q8_0")
    src, new = tensors(gguf.GGUFReader(k_source)), tensors(gguf.GGUFReader(out))
    for layer in range(LAYERS):
        name = f"blk.{layer}.attn_output.weight"
        target = dequant(src[name]) * channel_scales(adapter, layer, 256)[None, :]
        assert np.isfinite(target).all()
        assert (np.abs(dequant(new[name]) - target) <= error_bound(target, "Q8_0")).all()


def test_refuses_an_adapter_of_another_architecture(tiny, tmp_path):
    from conftest import make_model

    sources, _ = tiny
    adapter = save_adapter(make_model("gpt2"), tmp_path / "gpt2", "head")
    _refused(tmp_path, r"not attention-output scales .*attn\.c_proj", adapter, gguf_file=sources["Q8_0"])


def test_refuses_an_adapter_with_another_layer_count(tiny, tmp_path):
    sources, _ = tiny
    more = write_tiny_gguf(tmp_path / "three.gguf", layers=3)
    adapter = save_adapter(load_gguf_model(more), tmp_path / "three-layers", "channel")
    _refused(tmp_path, r"layer\(s\) \[2\] but the GGUF tiny\.gguf has 2 blocks", adapter, gguf_file=sources["Q8_0"])
    fewer = write_tiny_gguf(tmp_path / "one.gguf", layers=1)
    adapter = save_adapter(load_gguf_model(fewer), tmp_path / "one-layer", "channel")
    _refused(tmp_path, r"scales 1 layers .* has 2 attention blocks", adapter, gguf_file=sources["Q8_0"])


@pytest.mark.parametrize("granularity", ["head", "channel"])
def test_refuses_an_adapter_with_other_heads(tiny, tmp_path, granularity):
    sources, _ = tiny
    other = write_tiny_gguf(tmp_path / "eight-heads.gguf", heads=8, head_dim=8)  # 64 channels as 8 x 8
    adapter = save_adapter(load_gguf_model(other), tmp_path / "eight", granularity)
    if granularity == "channel":  # 64 channel scales fit 4 x 16 just as well: same shape, nothing to refuse
        export_gguf(adapter, tmp_path / "fits.gguf", gguf_file=sources["Q8_0"])
        return
    _refused(tmp_path, r"layer 0 has 8 scales \(head\), but .* 64 attention-output input channels \(4 heads x 16",
             adapter, gguf_file=sources["Q8_0"])


def test_refuses_a_source_that_is_not_gguf(tiny, tmp_path):
    _, adapters = tiny
    for name, content in (("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "), ("empty.gguf", b"")):
        path = tmp_path / name
        path.write_bytes(content)
        _refused(tmp_path, r"is not a readable GGUF file .*convert_hf_to_gguf", adapters["head"], gguf_file=path)
    _refused(tmp_path, r"does not exist", adapters["head"], gguf_file=tmp_path / "missing.gguf")


def test_refuses_an_unsupported_architecture(tiny, tmp_path):
    _, adapters = tiny
    source = write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    _refused(tmp_path, r"is a 'gpt2' model.*untransposed", adapters["head"], gguf_file=source)


def test_refuses_bad_type_and_out_paths(tiny, tmp_path):
    sources, adapters = tiny
    _refused(tmp_path, r"--type Q6_K: choose one of F32, F16", adapters["head"], gguf_file=sources["F32"], qtype="Q6_K")
    with pytest.raises(SealUsageError, match="is the source GGUF itself"):
        export_gguf(adapters["head"], sources["F32"], gguf_file=sources["F32"])
    with pytest.raises(SealUsageError, match="is a folder"):
        export_gguf(adapters["head"], tmp_path, gguf_file=sources["F32"])
    _refused(tmp_path, "not a folder", tmp_path / "no-adapter", gguf_file=sources["F32"])


def test_refuses_an_adapter_of_a_non_embedded_model_without_gguf(tiny, tmp_path):
    _, adapters = tiny  # trained on a GGUF in a temporary folder, not an embedded model
    _refused(tmp_path, r"not an embedded model: pass that model's GGUF with --gguf", adapters["head"])
    _refused(tmp_path, r"--model 'some/model' is not an embedded model", adapters["head"], model="some/model")


def test_a_failure_while_writing_leaves_no_file_and_keeps_an_existing_one(tiny, tmp_path, monkeypatch):
    from seal_peft.integrations import gguf_export

    sources, adapters = tiny
    out = tmp_path / "seal.gguf"
    out.write_bytes(b"the previous export")
    calls = []

    def fail_second(plan):
        calls.append(plan.layer)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return original(plan)

    original = gguf_export._re_encode
    monkeypatch.setattr(gguf_export, "_re_encode", fail_second)
    with pytest.raises(OSError, match="simulated"):
        export_gguf(adapters["head"], out, gguf_file=sources["Q8_0"])
    assert calls == [0, 1]
    assert out.read_bytes() == b"the previous export"
    assert sorted(os.listdir(tmp_path)) == ["seal.gguf"]


# ------------------------------------------------------------------------------------------ CLI
def test_cli_export_gguf(tiny, tmp_path, capsys):
    from seal_peft.cli import main

    sources, adapters = tiny
    out = tmp_path / "seal.gguf"
    assert main(["export-gguf", "--adapter", str(adapters["head"]), "--gguf", str(sources["Q4_1"]),
                 "--out", str(out), "--type", "q8_0"]) == 0
    assert "2 attention-output tensor(s) re-encoded (Q8_0)" in capsys.readouterr().err
    check_copy(sources["Q4_1"], out, reencoded_type="Q8_0")
    assert main(["export-gguf", "--adapter", str(adapters["head"]), "--gguf", str(tmp_path / "nope.gguf"),
                 "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --gguf") and "does not exist" in err[0]


# ------------------------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_real_model_export_matches_the_merged_model(tmp_path):
    """The embedded SmolLM2 (Q4_1 GGUF) with a SEAL-C adapter whose scales all differ from 1. Default type:
    metadata and every other tensor byte-identical, all 30 attention outputs within the Q4_1 bound.
    --type F32: transformers' GGUF loader on the export gives exactly the merged model's logits (the
    column layout end to end; the Q4_1 file's logit error is measured by scripts/test-llamacpp.sh)."""
    from peft import get_peft_model

    from seal_peft.data import line_retrieval
    from seal_peft.models import embedded_gguf_file, load_model

    model, tok = load_model()  # the cache = transformers' load of the same GGUF, saved in fp32
    peft_model = get_peft_model(model, SealConfig(granularity="channel"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "seal_scale" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen).clamp(-2, 2))
    adapter = tmp_path / "seal-c"
    peft_model.save_pretrained(adapter)

    out = tmp_path / "seal.gguf"
    result = export_gguf(adapter, out)  # the source: the embedded model the adapter names
    source = embedded_gguf_file()
    assert result.source == source and len(result.re_encoded) == 30
    src_reader, new_reader = gguf.GGUFReader(source), gguf.GGUFReader(out)  # parsing one takes seconds
    check_copy(src_reader, new_reader)
    src, new = tensors(src_reader), tensors(new_reader)
    for layer in range(30):
        name = f"blk.{layer}.attn_output.weight"
        target = dequant(src[name]) * channel_scales(adapter, layer, 576)[None, :]
        assert new[name].tensor_type == Q.Q4_1
        assert (np.abs(dequant(new[name]) - target) <= error_bound(target, "Q4_1")).all(), name

    out32 = tmp_path / "seal-f32.gguf"
    export_gguf(adapter, out32, qtype="F32")
    row = line_retrieval(tok, num_samples=1, length=256, seed=5, progress=False)[0]
    ids = torch.tensor([row["input_ids"]])
    with torch.no_grad():
        with peft_model.disable_adapter():
            base_logits = peft_model(ids).logits
        peft_model.merge_adapter()
        merged_logits = peft_model(ids).logits
        exported_logits = load_gguf_model(out32)(ids).logits
    assert (base_logits - merged_logits).abs().max() > 1  # the adapter changes the model
    assert torch.equal(exported_logits, merged_logits)
