"""The generic PEFT-tuner matrix: every generic operation on SEAL configs x tiny architectures.

A *case* is a set of adapters (configs) plus the adapters active at once. Operations whose result
depends on how a config meets an architecture (which modules are wrapped, Conv1D vs Linear, head
size, save/load key names, merge arithmetic) run on the full product ``CASES x ARCHS``. Operations
that are bookkeeping (enable/disable, requires_grad, load flags) run on a covering subset: every case
once (on a rotating architecture) and every architecture once with the plain head config.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import VOCAB, make_model, tiny_config
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from safetensors.torch import load_file

from seal_peft import TARGET_MODULES_MAPPING, SealConfig, SealLayer

ARCHS = ["llama", "mistral", "gpt2", "gpt_neox", "gemma3"]
# a module to train fully with modules_to_save (GPT-2's lm_head is tied to the embedding: use ln_f)
FINAL_NORM = {
    "llama": "model.norm",
    "mistral": "model.norm",
    "gemma3": "model.norm",
    "gpt_neox": "final_layer_norm",
    "gpt2": "ln_f",
}
INPUTS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


# ----------------------------------------------------------------------------------------- helpers
@functools.cache
def _cached_base(arch: str):
    return make_model(arch)


def base_model(arch: str):
    """A fresh copy of the tiny ``arch`` model (built once per session)."""
    return copy.deepcopy(_cached_base(arch))


def suffix(arch: str) -> str:
    return TARGET_MODULES_MAPPING[tiny_config(arch)[0].model_type][0]


def projections(arch: str) -> list[str]:
    """Names of the attention output projections in the plain model, layer order."""
    s = suffix(arch)
    return [n for n, _ in _cached_base(arch).named_modules() if n.endswith("." + s)]


def layer_of(name: str) -> int:
    return int(re.search(r"\.(\d+)\.", name).group(1))


@dataclass(frozen=True)
class Case:
    name: str
    # arch -> [(adapter name, config, module names (plain-model) it adapts)]
    adapters: Callable[[str], list[tuple[str, SealConfig, list[str]]]]
    active: tuple[str, ...]


def _one(cfg: Callable[[str], SealConfig], which: Callable[[str], list[str]] = projections):
    return lambda arch: [("default", cfg(arch), which(arch))]


def _only_layer(i: int):
    return lambda arch: [n for n in projections(arch) if layer_of(n) == i]


def _two(arch: str):
    return [
        ("a", SealConfig(init_weights=False), projections(arch)),
        (
            "b",
            SealConfig(
                granularity="channel",
                init_weights=False,
                target_modules=rf".*\.1\.{re.escape(suffix(arch))}",
            ),
            _only_layer(1)(arch),
        ),
    ]


CASES = [
    Case("head", _one(lambda a: SealConfig(init_weights=False)), ("default",)),
    Case("channel", _one(lambda a: SealConfig(granularity="channel", init_weights=False)), ("default",)),
    Case(
        "explicit_list",
        _one(lambda a: SealConfig(init_weights=False, target_modules=projections(a))),
        ("default",),
    ),
    Case(
        "regex",
        _one(
            lambda a: SealConfig(
                granularity="channel", init_weights=False, target_modules=rf".*\.0\.{re.escape(suffix(a))}"
            ),
            _only_layer(0),
        ),
        ("default",),
    ),
    Case(
        "layers_to_transform",
        _one(lambda a: SealConfig(init_weights=False, layers_to_transform=[1]), _only_layer(1)),
        ("default",),
    ),
    Case(
        "exclude_modules",
        _one(lambda a: SealConfig(init_weights=False, exclude_modules=[projections(a)[0]]), _only_layer(1)),
        ("default",),
    ),
    Case(
        "modules_to_save",
        _one(lambda a: SealConfig(init_weights=False, modules_to_save=[FINAL_NORM[a]])),
        ("default",),
    ),
    Case("two_adapters", _two, ("a",)),
    Case("two_active", _two, ("a", "b")),
]
CASE_IDS = [c.name for c in CASES]
FULL = [pytest.param(c, a, id=f"{c.name}-{a}") for c in CASES for a in ARCHS]
# every case once (rotating architectures) + every architecture once with the plain head config
COVER = [
    pytest.param(c, ARCHS[i % len(ARCHS)], id=f"{c.name}-{ARCHS[i % len(ARCHS)]}")
    for i, c in enumerate(CASES)
]
COVER += [pytest.param(CASES[0], a, id=f"head-{a}") for a in ARCHS if a != ARCHS[0]]


def seal_layers(model) -> dict[str, SealLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SealLayer)}


def strip(name: str) -> str:
    """Module name of a PeftModel -> name in the plain model."""
    return name.removeprefix("base_model.model.")


def build(case: Case, arch: str, seed: int = 0):
    """The PeftModel of ``case`` on a fresh ``arch`` model, with non-trivial scales and saved modules."""
    adapters = case.adapters(arch)
    torch.manual_seed(seed)
    name0, cfg0, _ = adapters[0]
    model = get_peft_model(base_model(arch), cfg0, adapter_name=name0)
    for name, cfg, _ in adapters[1:]:
        model.add_adapter(name, cfg)
    if len(case.active) > 1:
        model.base_model.set_adapter(list(case.active))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                for copy_ in module.modules_to_save.values():
                    for p in copy_.parameters():
                        p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def expected_trainable(case: Case, arch: str) -> set[str]:
    """Parameter names (PeftModel) that must train: the active adapters' scales and saved modules."""
    names = set()
    for adapter, cfg, modules in case.adapters(arch):
        if adapter not in case.active:
            continue
        names |= {f"base_model.model.{m}.seal_scale.{adapter}" for m in modules}
        for saved in cfg.modules_to_save or []:
            plain = dict(_cached_base(arch).named_modules())
            full = next(n for n in plain if n == saved or n.endswith("." + saved))
            names |= {
                f"base_model.model.{full}.modules_to_save.{adapter}.{p}"
                for p, _ in plain[full].named_parameters()
            }
    return names


def saved_keys(case: Case, arch: str, adapter: str) -> set[str]:
    """Keys of an adapter's safetensors file: its scales and the weights of its saved modules."""
    _, cfg, modules = next(a for a in case.adapters(arch) if a[0] == adapter)
    keys = {f"base_model.model.{m}.seal_scale" for m in modules}
    plain = dict(_cached_base(arch).named_modules())
    for saved in cfg.modules_to_save or []:
        full = next(n for n in plain if n == saved or n.endswith("." + saved))
        keys |= {f"base_model.model.{full}.{p}" for p, _ in plain[full].named_parameters()}
    return keys


def reference_logits(model, arch: str, active=None) -> torch.Tensor:
    """Logits of the plain model with each adapted projection's input multiplied (via a forward
    pre-hook) by the product of the active adapters' per-channel scales, and saved modules swapped for
    the adapter's trained copies: SEAL's definition, computed without SEAL's forward."""
    peft = model
    active = list(peft.base_model.active_adapters if active is None else active)
    plain = base_model(arch)
    handles = []
    for name, layer in seal_layers(peft).items():
        names = [a for a in active if a in layer.seal_scale]
        if not names:
            continue
        vector = torch.ones(layer.in_features)
        for a in names:
            vector = vector * layer.channel_scale(a).detach().float()
        target = plain.get_submodule(strip(name))
        handles.append(
            target.register_forward_pre_hook(
                lambda m, args, v=vector: (args[0] * v.to(args[0].dtype),) + args[1:]
            )
        )
    for name, module in peft.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            trained = [a for a in active if a in module.modules_to_save]
            if trained:
                parent, _, child = strip(name).rpartition(".")
                setattr(plain.get_submodule(parent), child, copy.deepcopy(module.modules_to_save[trained[0]]))
    try:
        with torch.no_grad():
            return plain(INPUTS).logits
    finally:
        for h in handles:
            h.remove()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUTS).logits


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.get_base_layer().weight.detach().clone() for n, m in seal_layers(model).items()}


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def assert_ulp_close(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 1.0) -> None:
    """``|actual - expected| <= ulps * eps * |expected|`` elementwise (eps of the dtype): unmerge by division."""
    err = (actual.double() - expected.double()).abs()
    bound = ulps * torch.finfo(expected.dtype).eps * expected.double().abs()
    assert bool((err <= bound).all()), f"unmerge error {float((err - bound).max()):.3g} above {ulps} ulp"


def assert_plain(model, arch):
    assert not any(isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) for m in model.modules())
    assert not hasattr(model, "peft_config")
    assert not any("seal_" in n for n, _ in model.named_parameters())
    assert type(model) is type(_cached_base(arch))


# ------------------------------------------------------------------------------ the full product
@pytest.mark.parametrize("case, arch", FULL)
def test_structure_forward_and_finite(case, arch):
    model = build(case, arch)
    wrapped = {strip(n): set(m.seal_scale) for n, m in seal_layers(model).items()}
    expected: dict[str, set[str]] = {}
    for adapter, _, modules in case.adapters(arch):
        for m in modules:
            expected.setdefault(m, set()).add(adapter)
    assert wrapped == expected
    out = logits(model)
    assert torch.isfinite(out).all()
    close(out, reference_logits(model, arch))
    assert not torch.allclose(out, logits(_cached_base(arch)), atol=1e-4)


@pytest.mark.parametrize("case, arch", FULL)
def test_save_load_roundtrip(case, arch, tmp_path):
    model = build(case, arch)
    expected = logits(model)
    adapters = case.adapters(arch)
    model.save_pretrained(tmp_path)
    for adapter, _, _ in adapters:
        folder = tmp_path if adapter == "default" else tmp_path / adapter
        assert sorted(f for f in os.listdir(folder) if f.startswith("adapter_")) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        keys = set(load_file(folder / "adapter_model.safetensors"))
        assert keys == saved_keys(case, arch, adapter)
    first = adapters[0][0]
    path = lambda a: tmp_path if a == "default" else tmp_path / a  # noqa: E731
    loaded = PeftModel.from_pretrained(base_model(arch), path(first), adapter_name=first)
    for adapter, _, _ in adapters[1:]:
        loaded.load_adapter(path(adapter), adapter_name=adapter)
    loaded.base_model.set_adapter(list(case.active))
    loaded.eval()
    assert torch.equal(logits(loaded), expected)
    original = {k: v for k, v in model.state_dict().items() if "seal_" in k or "modules_to_save" in k}
    again = loaded.state_dict()
    assert all(torch.equal(again[k], v) for k, v in original.items())

    if len(adapters) > 1:  # selected_adapters
        model.save_pretrained(tmp_path / "sel", selected_adapters=["b"])
        assert os.listdir(tmp_path / "sel" / "b") and not (tmp_path / "sel" / "a").exists()
        assert not (tmp_path / "sel" / "adapter_config.json").exists()
        with pytest.raises(ValueError, match="invalid `selected_adapters`"):
            model.save_pretrained(tmp_path / "bad", selected_adapters=["nope"])
        only_b = PeftModel.from_pretrained(base_model(arch), tmp_path / "sel" / "b", adapter_name="b").eval()
        close(logits(only_b), reference_logits(model, arch, active=["b"]))


@pytest.mark.parametrize("case, arch", FULL)
def test_merge_idempotent_safe_and_unmerge(case, arch):
    model = build(case, arch)
    before = base_weights(model)
    tuned = logits(model)
    model.merge_adapter(safe_merge=True)
    layers = seal_layers(model)
    for layer in layers.values():
        active_here = [a for a in case.active if a in layer.seal_scale]
        assert layer.merged_adapters == active_here
    close(logits(model), tuned)
    merged_weights = base_weights(model)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    assert all(torch.equal(w, merged_weights[n]) for n, w in base_weights(model).items())
    close(logits(model), tuned)
    model.unmerge_adapter()
    assert not any(layer.merged for layer in layers.values())
    assert all(not layer._seal_merge_state for layer in layers.values())
    for n, w in base_weights(model).items():  # fp32: one division per merged adapter, <= 1 ulp each
        assert_ulp_close(w, before[n], ulps=len([a for a in case.active if a in layers[n].seal_scale]))
    close(logits(model), tuned)
    with pytest.warns(UserWarning, match="Already unmerged"):
        next(iter(layers.values())).unmerge()


@pytest.mark.parametrize("case, arch", FULL)
def test_merge_and_unload_and_unload(case, arch):
    model = build(case, arch)
    tuned = logits(model)
    merged = model.merge_and_unload(safe_merge=True)
    assert_plain(merged, arch)
    close(logits(merged), tuned)

    # unload: SEAL layers give back their untouched base layers; like PEFT, a modules_to_save wrapper
    # gives back the active adapter's trained copy
    model = build(case, arch)
    trained = {
        f"{strip(n)}.{k}": v.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, AuxiliaryTrainingWrapper) and m.active_adapters
        for k, v in m.modules_to_save[m.active_adapters[0]].state_dict().items()
    }
    plain = model.unload()
    assert_plain(plain, arch)
    ref = {**_cached_base(arch).state_dict(), **trained}
    assert all(torch.equal(v, ref[k]) for k, v in plain.state_dict().items())
    if not trained:
        assert torch.equal(logits(plain), logits(_cached_base(arch)))


# -------------------------------------------------------------------------- the covering subset
@pytest.mark.parametrize("case, arch", COVER)
def test_disable_adapter_nested_restores_state(case, arch):
    model = build(case, arch)
    base_out, tuned = logits(_cached_base(arch)), logits(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with model.disable_adapter():
        close(logits(model), base_out)
        with model.disable_adapter():
            close(logits(model), base_out)
        close(logits(model), base_out)  # the inner exit must not re-enable
        assert not any(p.requires_grad for n, p in model.named_parameters() if "seal_" in n)
    close(logits(model), tuned)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert model.base_model.active_adapters == list(case.active)

    # a frozen (inference) adapter stays frozen after the context (PEFT alone re-enables grads)
    model.requires_grad_(False)
    with model.disable_adapter():
        pass
    assert not any(p.requires_grad for p in model.parameters())

    # merged adapters: base outputs inside, tuned outputs after (PEFT semantics: they come back unmerged)
    model.merge_adapter()
    with model.disable_adapter():
        close(logits(model), base_out)
    close(logits(model), tuned)
    assert not any(layer.merged for layer in seal_layers(model).values())


@pytest.mark.parametrize("case, arch", COVER)
def test_only_adapter_params_train(case, arch):
    model = build(case, arch)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(case, arch)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=INPUTS, labels=INPUTS).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n
    changed = [n for n, p in model.named_parameters() if n in adapter and not torch.equal(p, adapter[n])]
    assert any(".seal_scale." in n for n in changed)


@pytest.mark.parametrize("case, arch", COVER)
def test_load_is_trainable_and_low_cpu_mem_usage(case, arch, tmp_path):
    model = build(case, arch)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    adapters = case.adapters(arch)
    path = lambda a: tmp_path if a == "default" else tmp_path / a  # noqa: E731

    def load(**kw):
        first = adapters[0][0]
        loaded = PeftModel.from_pretrained(base_model(arch), path(first), adapter_name=first, **kw)
        for adapter, _, _ in adapters[1:]:
            loaded.load_adapter(path(adapter), adapter_name=adapter, **kw)
        return loaded

    frozen = load()
    assert not any(p.requires_grad for p in frozen.parameters())
    if len(case.active) > 1:
        frozen.base_model.set_adapter(list(case.active), inference_mode=True)
    assert torch.equal(logits(frozen.eval()), expected)

    trainable = load(is_trainable=True)
    trainable.base_model.set_adapter(list(case.active))
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == expected_trainable(case, arch)

    lean = load(low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in lean.parameters())
    lean.base_model.set_adapter(list(case.active), inference_mode=True)
    assert torch.equal(logits(lean.eval()), expected)


# ------------------------------------------------------------------------- per architecture
@pytest.mark.parametrize("arch", ARCHS)
def test_set_adapter_and_active_adapter(arch):
    case = CASES[CASE_IDS.index("two_adapters")]
    model = build(case, arch)
    assert model.active_adapter == "a" and model.active_adapters == ["a"]
    out_a = logits(model)
    close(out_a, reference_logits(model, arch, active=["a"]))
    model.set_adapter("b")
    assert model.active_adapter == "b" and model.active_adapters == ["b"]
    assert all(layer.active_adapters == ["b"] for layer in seal_layers(model).values())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.endswith(".seal_scale.b")
    }
    close(logits(model), reference_logits(model, arch, active=["b"]))
    model.base_model.set_adapter(["a", "b"])
    assert model.active_adapters == ["a", "b"]
    close(logits(model), reference_logits(model, arch, active=["a", "b"]))
    state = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="nope"):
        model.set_adapter("nope")
    assert model.active_adapters == ["a", "b"] and state == {
        n: p.requires_grad for n, p in model.named_parameters()
    }
    model.set_adapter("a", inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.equal(logits(model), out_a)


def _snapshot(model) -> dict:
    layers = seal_layers(model)
    return {
        "config": list(model.peft_config),
        "active": list(model.active_adapters),
        "scale": {n: {a: p.detach().clone() for a, p in m.seal_scale.items()} for n, m in layers.items()},
        "group": {n: dict(m.seal_group) for n, m in layers.items()},
        "merged": {n: list(m.merged_adapters) for n, m in layers.items()},
        "merge_state": {n: sorted(m._seal_merge_state) for n, m in layers.items()},
        "weight": base_weights(model),
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def _same(a: dict, b: dict) -> bool:
    def eq(x, y):
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y)
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        return x == y

    return eq(a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_delete_adapter(arch, tmp_path):
    case = CASES[CASE_IDS.index("two_adapters")]
    model = build(case, arch)
    model.set_adapter("b")
    model.merge_adapter()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['b'\] while they are merged"):
        model.delete_adapter("b")
    assert _same(before, _snapshot(model))  # refused without touching anything
    with pytest.raises(ValueError, match="Adapter nope does not exist"):
        model.delete_adapter("nope")
    assert _same(before, _snapshot(model))

    model.unmerge_adapter()
    with pytest.warns(UserWarning, match="Setting active adapter to a"):
        model.delete_adapter("b")  # the active one
    assert list(model.peft_config) == ["a"] and model.active_adapters == ["a"]
    for layer in seal_layers(model).values():
        assert set(layer.seal_scale) == {"a"} and set(layer.seal_group) == {"a"}
        assert "b" not in layer._seal_merge_state and "b" not in layer.merged_adapters
    assert not any(k.endswith(".b") or ".b." in k for k in model.state_dict())
    close(logits(model), reference_logits(model, arch, active=["a"]))
    model.save_pretrained(tmp_path)
    assert sorted(p for p in os.listdir(tmp_path) if not p.endswith(".md")) == ["a"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(arch, dtype, tmp_path):
    base = make_model(arch, dtype=dtype)
    model = get_peft_model(base, SealConfig(init_weights=False)).eval()
    layers = seal_layers(model)
    assert all(m.seal_scale["default"].dtype == torch.float32 for m in layers.values())  # autocast to fp32
    assert all(m.get_base_layer().weight.dtype == dtype for m in layers.values())
    out = logits(model)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # same model in fp32 as a reference: half precision only adds rounding. Measured max |difference| on
    # these models: fp16 <= 6e-4, bf16 <= 4e-3 (logits up to 0.7); the tolerance is ~3x that, and the
    # adapter's own effect on the logits is checked to be well above it (so ignoring it would fail).
    tol = 2e-3 if dtype == torch.float16 else 1.2e-2
    ref = copy.deepcopy(model).float()
    close(out.float(), logits(ref), tol=tol)
    assert (logits(ref) - logits(_cached_base(arch))).abs().max() > 3 * tol
    before = base_weights(model)
    model.merge_adapter(safe_merge=True)
    assert all(m.get_base_layer().weight.dtype == dtype for m in layers.values())
    close(logits(model).float(), out.float(), tol=tol)
    model.unmerge_adapter()
    for n, w in base_weights(model).items():  # half precision: the original weight is put back, bit-exact
        assert torch.equal(w, before[n])
    # saved in fp32, loaded in fp32 onto a half model: identical outputs
    model.save_pretrained(tmp_path)
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "adapter_model.safetensors").values())
    loaded = PeftModel.from_pretrained(make_model(arch, dtype=dtype), tmp_path).eval()
    assert all(m.seal_scale["default"].dtype == torch.float32 for m in seal_layers(loaded).values())
    assert torch.equal(logits(loaded), out)  # `model` itself went through a half-precision merge round trip
    # no autocast: the adapter lives in the model dtype
    plain = get_peft_model(make_model(arch, dtype=dtype), SealConfig(), autocast_adapter_dtype=False)
    assert all(m.seal_scale["default"].dtype == dtype for m in seal_layers(plain).values())
    assert torch.equal(logits(plain), logits(make_model(arch, dtype=dtype)))


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_inputs_embeds_and_state_dict_helpers(arch):
    from peft import get_base_model_state_dict

    model = build(CASES[0], arch)
    ids = INPUTS[:, :5]
    tokens = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    merged = copy.deepcopy(model).merge_and_unload()
    assert torch.equal(tokens, merged.generate(input_ids=ids, max_new_tokens=4, do_sample=False))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(INPUTS)
        close(model(inputs_embeds=embeds).logits, logits(model))
    base_state = get_base_model_state_dict(model)
    ref = _cached_base(arch).state_dict()
    assert base_state.keys() == ref.keys() and all(torch.equal(base_state[k], ref[k]) for k in ref)
    model.set_requires_grad("default", requires_grad=False)
    assert not any(p.requires_grad for p in model.parameters())
    model.set_requires_grad("default")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected_trainable(CASES[0], arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_names_make_no_difference(arch, tmp_path):
    """Adapter names that are substrings of each other, of module names or of SEAL's prefix."""
    names = ["o", "o_pro", "seal"]
    torch.manual_seed(0)
    reference = get_peft_model(base_model(arch), SealConfig(init_weights=False)).eval()
    model = get_peft_model(base_model(arch), SealConfig(), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, SealConfig())
    for name in names:
        with torch.no_grad():
            for n, layer in seal_layers(model).items():
                layer.seal_scale[name].copy_(
                    seal_layers(reference)[n].seal_scale["default"] * (names.index(name) + 1)
                )
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base_model(arch), tmp_path / names[0], adapter_name=names[0])
    for name in names[1:]:
        loaded.load_adapter(tmp_path / name, adapter_name=name)
    for i, name in enumerate(names):
        model.set_adapter(name)
        loaded.set_adapter(name)
        assert torch.equal(logits(loaded.eval()), logits(model.eval()))
        if i == 0:
            assert torch.equal(logits(model), logits(reference))
